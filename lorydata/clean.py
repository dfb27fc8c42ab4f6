"""Cleaning: Unicode and whitespace normalisation, binary detection, length filters, hashing.

Normalisation is deliberately conservative so that code keeps its indentation: it fixes
line endings, Unicode composition, exotic spaces and control characters, trailing spaces
and runs of blank lines, and nothing else.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass

from lorydata.documents import DeadLetter, Document, DropReason

# Exotic spaces become a plain space; zero-width characters and the BOM disappear.
_SPACES = dict.fromkeys(
    [0x00A0, 0x1680, *range(0x2000, 0x200B), 0x202F, 0x205F, 0x3000, 0x0B, 0x0C], " "
)
_INVISIBLE = dict.fromkeys([0x200B, 0x200C, 0x200D, 0x2060, 0xFEFF, 0x00AD])
# C0/C1 control characters other than tab and newline (DEL included).
_CONTROL = dict.fromkeys([*range(0x00, 0x09), *range(0x0E, 0x20), 0x7F, *range(0x80, 0xA0)])
_TRANSLATE = str.maketrans({**_SPACES, **_INVISIBLE, **_CONTROL})
# str.translate is fast on ASCII text, but looks every character up in a dict once the text
# is not pure ASCII (most of the cleaning time); there, finding the few characters to change
# with a regex and replacing each distinct one is the same mapping at a fraction of the cost.
_TO_TRANSLATE = re.compile("[" + "".join(f"\\u{c:04x}" for c in sorted(_TRANSLATE)) + "]")
_REPLACEMENTS = {chr(c): (r or "") for c, r in _TRANSLATE.items()}


@dataclass(frozen=True)
class CleanConfig:
    """Normalisation and length filters.

    Args:
        min_chars: documents shorter than this after cleaning are dropped as `too_short`.
        max_chars: documents longer than this after cleaning are dropped as `too_long`.
        max_replacement_share: documents whose share of U+FFFD replacement characters is
            above this (or that contain NUL bytes) are dropped as `binary`. Text in a
            legacy encoding (Latin-1 read as UTF-8) stays far below 0.3; binary data read as
            UTF-8 is mostly replacements.
        normalize: apply the normalisation at all (off keeps the text byte for byte).
    """

    min_chars: int = 1
    max_chars: int = 1_000_000
    max_replacement_share: float = 0.3
    normalize: bool = True


def normalize_text(text: str) -> str:
    """NFC, Unix line endings, plain spaces, no controls or trailing spaces, ≤ 1 blank line.

    Each step runs only where a fast substring test finds its pattern; the result is that of
    `text.translate(_TRANSLATE)` and the regex substitutions `[ \\t]+\\n` → `\\n` and
    `\\n{3,}` → `\\n\\n` (tests compare against a copy of that reference).
    """
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = unicodedata.normalize("NFC", text)
    if text.isascii():
        text = text.translate(_TRANSLATE)
    else:
        for char in set(_TO_TRANSLATE.findall(text)):
            text = text.replace(char, _REPLACEMENTS[char])
    if " \n" in text or ("\t" in text and "\t\n" in text):
        # Also strips the last line, which the final strip() would strip anyway.
        text = "\n".join([line.rstrip(" \t") for line in text.split("\n")])
    while "\n\n\n" in text:  # each pass shortens every run of 3+ newlines, down to 2
        text = text.replace("\n\n\n", "\n\n")
    return text.strip()


def content_hash(text: str) -> str:
    """The exact-dedup key of a text: 128-bit BLAKE2b of its UTF-8 bytes, in hex."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()


def _looks_binary(text: str, max_share: float) -> str | None:
    if "\x00" in text:
        return "contains NUL characters"
    bad = 0 if text.isascii() else text.count("\ufffd")
    if bad and bad > max_share * len(text):
        return f"{bad} of {len(text)} characters are U+FFFD replacements"
    return None


def clean_document(doc: Document, config: CleanConfig) -> Document | DeadLetter:
    """Normalise a document and apply the filters; fills `content_hash` and a missing id.

    Args:
        doc: a document straight from a reader.
        config: normalisation switch and limits.

    Returns:
        The cleaned document, or a dead letter saying why it was dropped.
    """
    why = _looks_binary(doc.text, config.max_replacement_share)
    if why:
        return DeadLetter(doc.source, doc.line, DropReason.BINARY, why, doc.text[:200])
    text = normalize_text(doc.text) if config.normalize else doc.text
    if not text.strip():
        return DeadLetter(doc.source, doc.line, DropReason.EMPTY, "no text after cleaning")
    if len(text) < config.min_chars:
        detail = f"{len(text)} chars < min_chars {config.min_chars}"
        return DeadLetter(doc.source, doc.line, DropReason.TOO_SHORT, detail, text[:200])
    if len(text) > config.max_chars:
        detail = f"{len(text)} chars > max_chars {config.max_chars}"
        return DeadLetter(doc.source, doc.line, DropReason.TOO_LONG, detail, text[:200])
    digest = content_hash(text)
    return Document(doc.id or digest[:16], text, doc.source, doc.line, doc.domain, doc.replacements, digest)


class ExactDeduper:
    """In-process exact dedup: the first document with a given content hash wins.

    The Beam pipeline does the same with a GroupByKey on the hash; this class serves
    in-process users of the library.
    """

    def __init__(self):
        self._seen: dict[str, str] = {}
        self.duplicates = 0

    def first_of(self, doc: Document) -> str | None:
        """None when `doc` is new (and remembers it), else the id of the earlier copy."""
        earlier = self._seen.get(doc.content_hash)
        if earlier is None:
            self._seen[doc.content_hash] = doc.id
            return None
        self.duplicates += 1
        return earlier
