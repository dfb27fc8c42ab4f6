"""Tokenizer wrapper around Hugging Face `tokenizers`, with a recorded identity.

Shards store token ids, so a shard folder is only meaningful together with the exact
tokenizer that produced it. `Tokenizer.identity()` (file sha256, vocab size, EOS and pad
ids) goes into every manifest, and readers compare it before use.

Encoding runs on tiktoken when the tokenizer is byte-level BPE that tiktoken reproduces
token for token (`lorydata.tokenizer_fast` says when and why), ~10× faster per core, and on
`tokenizers` otherwise; the ids are the same either way, so the engine is not part of the
identity. Special-token text inside a document (e.g. "<|endoftext|>") becomes that token's
id on both engines, as `tokenizers` does with `add_special_tokens=False`.
"""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import pyarrow as pa
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from lorydata.errors import LoryDataError
from lorydata.hashing import file_sha256
from lorydata.tokenizer_fast import NotConvertible, TiktokenBPE, default_threads, list_array

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
DEFAULT_TOKENIZER = Path(__file__).parent / "assets" / "tokenizer" / "tokenizer.json"
_EOS_CANDIDATES = (EOS_TOKEN, "</s>", "<eos>", "[SEP]", "<|end_of_text|>")
_PAD_CANDIDATES = (PAD_TOKEN, "<pad>", "[PAD]")


@dataclass(frozen=True)
class TokenizerIdentity:
    """What a manifest records about the tokenizer that made its shards."""

    path: str
    sha256: str
    vocab_size: int
    eos_id: int
    pad_id: int

    def to_dict(self) -> dict:
        return asdict(self)


def _resolve(path: str | Path) -> Path:
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise LoryDataError(f"tokenizer not found: {path} (give a tokenizer.json or a folder holding one)")
    return path


ENGINES = ("auto", "tokenizers")


class Tokenizer:
    """A `tokenizers` tokenizer with an EOS id, a pad id and a content hash.

    Args:
        path: a `tokenizer.json` file or a folder that holds one. Defaults to the byte-level
            BPE (vocab 8192) shipped with lorydata.
        engine: "auto" encodes with tiktoken where it gives identical ids (else
            `tokenizers`); "tokenizers" always uses `tokenizers`.
    """

    def __init__(self, path: str | Path | None = None, engine: str = "auto"):
        if engine not in ENGINES:
            raise LoryDataError(f"unknown tokenizer engine {engine!r} (choose from {', '.join(ENGINES)})")
        self.requested_engine = engine
        self.path = _resolve(path or DEFAULT_TOKENIZER).resolve()
        try:
            self._tok = HFTokenizer.from_file(str(self.path))
        except Exception as exc:  # tokenizers raises a bare Exception on bad JSON
            raise LoryDataError(f"cannot load tokenizer {self.path}: {exc}") from None
        self.sha256 = file_sha256(self.path)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.eos_id = self._find_special(_EOS_CANDIDATES, "EOS")
        pad = self._find_special(_PAD_CANDIDATES, "pad", required=False)
        # Without a pad token, padding uses EOS; the loss mask comes from the manifest's counts.
        self.pad_id = self.eos_id if pad is None else pad

    def _find_special(self, candidates: tuple[str, ...], what: str, required: bool = True) -> int | None:
        for token in candidates:
            token_id = self._tok.token_to_id(token)
            if token_id is not None:
                return token_id
        if required:
            raise LoryDataError(f"tokenizer {self.path} has no {what} token (looked for {', '.join(candidates)})")
        return None

    def identity(self) -> TokenizerIdentity:
        return TokenizerIdentity(str(self.path), self.sha256, self.vocab_size, self.eos_id, self.pad_id)

    @cached_property
    def _fast(self) -> TiktokenBPE | str:
        """The tiktoken engine, or why there is none (built on first use: it checks every merge)."""
        if self.requested_engine == "tokenizers":
            return "engine 'tokenizers' was requested"
        try:
            import tiktoken  # noqa: F401  (optional dependency: without it, `tokenizers` encodes)
        except ImportError:
            return "tiktoken is not installed"
        try:
            return TiktokenBPE(json.loads(self.path.read_text(encoding="utf-8")), self._tok)
        except NotConvertible as exc:
            return str(exc)

    @property
    def engine(self) -> str:
        """"tiktoken" or "tokenizers": what encodes."""
        return "tokenizers" if isinstance(self._fast, str) else "tiktoken"

    @property
    def fallback_reason(self) -> str | None:
        """Why `tokenizers` encodes instead of tiktoken (None when tiktoken does)."""
        return self._fast if isinstance(self._fast, str) else None

    def encode(self, text: str) -> list[int]:
        if not isinstance(self._fast, str):
            try:
                return self._fast.encode(text).tolist()
            except UnicodeEncodeError:
                pass  # a lone surrogate: `tokenizers` reports it as it always did
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        offsets, values = self.encode_batch_numpy(texts)
        flat = values.tolist()
        return [flat[start:end] for start, end in itertools.pairwise(offsets.tolist())]

    def encode_batch_numpy(self, texts: Sequence[str], threads: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Ids of many texts as (len(texts) + 1,) int64 offsets and (tokens,) int32 values:
        text i is values[offsets[i]:offsets[i + 1]].

        Args:
            texts: the documents.
            threads: threads to encode with; None: every core this process may use (as
                `tokenizers`' batch encode does). Pass 1 inside a worker of a multi-process
                runner.
        """
        threads = default_threads() if threads is None else threads
        if not isinstance(self._fast, str):
            try:
                return self._fast.encode_batch(texts, threads)
            except UnicodeEncodeError:
                pass  # a lone surrogate: `tokenizers` reports it as it always did
        # encode_batch_fast (tokenizers >= 0.21) skips the offsets, which shards never use.
        encode = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        encodings = encode(list(texts), add_special_tokens=False)
        lengths = [len(encoding.ids) for encoding in encodings]
        offsets = np.zeros(len(texts) + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        values = np.fromiter(itertools.chain.from_iterable(e.ids for e in encodings), np.int32, int(offsets[-1]))
        return offsets, values

    def encode_batch_arrow(self, texts: Sequence[str], threads: int | None = None) -> pa.ListArray:
        """Ids of many texts as an Arrow list<int32> array (what the documents stage stores),
        built from numpy buffers, without a Python int per token.

        Args:
            texts: the documents (at most 2**31 - 1 tokens in all).
            threads: as in `encode_batch_numpy`.
        """
        return list_array(*self.encode_batch_numpy(texts, threads))

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)


def _sample_texts(texts: Iterable[str], sample_chars: int, seed: int) -> list[str]:
    """Reservoir-sample whole documents until about `sample_chars` characters are held."""
    rng = random.Random(seed)
    kept: list[str] = []
    held = 0
    for seen, text in enumerate(texts):
        if held < sample_chars:
            kept.append(text)
            held += len(text)
        else:
            slot = rng.randrange(seen + 1)
            if slot < len(kept):
                held += len(text) - len(kept[slot])
                kept[slot] = text
    return kept


def train_tokenizer(
    texts: Iterable[str],
    out_dir: str | Path,
    vocab_size: int = 8192,
    sample_chars: int = 50_000_000,
    min_frequency: int = 2,
    seed: int = 0,
    show_progress: bool = False,
) -> Tokenizer:
    """Train a byte-level BPE tokenizer and save it as `out_dir/tokenizer.json`.

    Args:
        texts: documents to learn from; a sample of about `sample_chars` characters is kept.
        out_dir: folder to write `tokenizer.json` into (created if missing).
        vocab_size: final vocabulary size, special tokens included.
        sample_chars: how many characters of text to train on at most.
        min_frequency: pairs seen fewer times are not merged.
        seed: seed of the document sample.
        show_progress: let `tokenizers` draw its progress bar.

    Returns:
        The trained tokenizer, loaded from the written file.
    """
    if vocab_size < 256 + 2:
        raise LoryDataError(f"vocab_size {vocab_size} is below the 256 byte tokens plus 2 special tokens")
    sample = _sample_texts(texts, sample_chars, seed)
    if not sample:
        raise LoryDataError("no text to train the tokenizer on")
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tok.train_from_iterator(_iter(sample), trainer=trainer, length=len(sample))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    return Tokenizer(out)


def _iter(texts: list[str]) -> Iterator[str]:
    yield from texts
