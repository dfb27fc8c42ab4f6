"""A tiktoken engine for byte-level BPE `tokenizer.json` files, token-identical to `tokenizers`.

`tokenizers` spends most of an `encode` on things shards never use (offsets, alignment,
Python objects per token); tiktoken runs the same regex split and BPE over bytes about 10×
faster per core on the dev corpus (`benchmarks/bench_floors.py`), releases the GIL (threads
run in parallel) and hands ids back as a buffer, not Python ints. It is used only when it
provably gives the ids `tokenizers` gives: `TiktokenBPE` raises `NotConvertible` with the
reason otherwise, and `lorydata.tokenizer.Tokenizer` then encodes with `tokenizers`.

Why the ids are equal. Both engines first split out added tokens (`<|endoftext|>` in a
document becomes its id, as `tokenizers` does with `add_special_tokens=False`), then split
the rest with GPT-2's regex (the same pattern text; checked over every Unicode code point by
the tests), then run BPE on each piece's bytes. The BPE rules differ on paper: `tokenizers`
merges the adjacent pair of lowest *merge* rank listed in `merges`; tiktoken merges the
adjacent pair whose *concatenation* has the lowest rank among all tokens, and returns a piece
that is itself a token whole. They agree when
  (a) merges are well-founded (a merge's parts are bytes or results of earlier merges) and
      no two merges make the same token, and
  (b) tiktoken knows only tokens that `tokenizers`' BPE maps to themselves (self-consistent),
      ranked by the merge that makes them.
Sketch: with (a), `tokenizers` applies merges in non-decreasing rank. Every symbol of its
state is self-consistent (the merges inside a symbol's span are exactly those of encoding the
span alone). Take the state both engines share and two adjacent symbols x, y whose
concatenation t is a known token. Encoding t alone is a merge sequence ending at rank(t); the
part already done in context is a prefix of it, and what is left is still available in
context, so `tokenizers`' next rank r ≤ rank(t), with equality only if the next merge is
t's own (x, y). So tiktoken's lowest-rank pair is `tokenizers`' pair (ties: leftmost in
both), states stay equal, and a whole piece that is a known token is also what BPE returns.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import pre_tokenizers

# The split of `tokenizers`' ByteLevel pre-tokenizer (use_regex=true), verbatim.
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_INT32_MAX = np.iinfo(np.int32).max


def byte_to_char() -> dict[int, str]:
    """GPT-2's byte → printable character map, the alphabet of byte-level BPE vocabularies."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = dict(zip(kept, map(chr, kept), strict=True))
    shifted = 0
    for byte in range(256):
        if byte not in chars:
            chars[byte] = chr(256 + shifted)
            shifted += 1
    return chars


class NotConvertible(Exception):
    """This tokenizer.json is not one tiktoken reproduces exactly (the message says why)."""


@dataclass(frozen=True)
class _AddedToken:
    content: str
    token_id: int


def _check_pipeline(spec: dict) -> None:
    """Raise NotConvertible unless the tokenizer is byte-level BPE with GPT-2's split and
    nothing before or after it that changes ids."""
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise NotConvertible(f"model is {model.get('type')}, not BPE")
    for key in ("dropout", "continuing_subword_prefix", "end_of_word_suffix", "ignore_merges", "byte_fallback"):
        if model.get(key):  # each is off when null, false, 0 or ""
            raise NotConvertible(f"BPE option {key}={model.get(key)!r}")
    if spec.get("normalizer") is not None:
        raise NotConvertible("has a normalizer")
    pre = spec.get("pre_tokenizer") or {}
    if pre.get("type") != "ByteLevel" or pre.get("add_prefix_space", True) or not pre.get("use_regex", True):
        raise NotConvertible(f"pre-tokenizer is not ByteLevel(add_prefix_space=false, use_regex=true): {pre}")
    post = spec.get("post_processor")
    if post is not None and post.get("type") != "ByteLevel":  # ByteLevel only trims offsets
        raise NotConvertible(f"post-processor {post.get('type')}")
    if spec.get("truncation") is not None or spec.get("padding") is not None:
        raise NotConvertible("truncation or padding is set")


def _added_tokens(spec: dict) -> list[_AddedToken]:
    """The added tokens, if `tokenizers`' leftmost-longest extraction of them equals
    tiktoken's leftmost-first one (plain matching, one pass, no token a prefix of another)."""
    tokens = spec.get("added_tokens") or []
    for token in tokens:
        if token.get("lstrip") or token.get("rstrip") or token.get("single_word") or not token["content"]:
            raise NotConvertible(f"added token {token['content']!r} has lstrip/rstrip/single_word or is empty")
    if len({bool(token.get("normalized")) for token in tokens}) > 1:
        raise NotConvertible("added tokens mix normalized and raw matching (two extraction passes)")
    contents = [token["content"] for token in tokens]
    for a in contents:
        for b in contents:
            if a != b and b.startswith(a):
                raise NotConvertible(f"added token {a!r} is a prefix of {b!r}")
    return [_AddedToken(token["content"], int(token["id"])) for token in tokens]


def _merges(model: dict) -> list[tuple[str, str]]:
    merges = []
    for merge in model.get("merges") or []:
        pair = tuple(merge.split(" ")) if isinstance(merge, str) else tuple(merge)
        if len(pair) != 2:
            raise NotConvertible(f"merge {merge!r} is not a pair")
        merges.append(pair)
    return merges


def _ranks(spec: dict, hf: HFTokenizer) -> tuple[dict[bytes, int], list[int]]:
    """tiktoken's ranks (bytes 0-255, then 256 + merge index) and, per rank, the vocab id."""
    vocab: dict[str, int] = spec["model"]["vocab"]
    chars = byte_to_char()
    char_to_byte = {char: byte for byte, char in chars.items()}
    if set(chars.values()) != set(pre_tokenizers.ByteLevel.alphabet()):
        raise NotConvertible("byte alphabet differs from tokenizers' ByteLevel")
    missing = [char for char in chars.values() if char not in vocab]
    if missing:
        raise NotConvertible(f"{len(missing)} byte characters are not in the vocabulary")
    ranks = {bytes([byte]): byte for byte in range(256)}
    ids = [vocab[chars[byte]] for byte in range(256)]
    made: dict[str, int] = {}  # token → index of the merge that makes it
    for index, (left, right) in enumerate(_merges(spec["model"])):
        for part in (left, right):
            if len(part) != 1 and part not in made:
                raise NotConvertible(f"merge {index} uses {part!r} before any merge makes it")
        token = left + right
        if token in made or token not in vocab:
            raise NotConvertible(f"merge {index} makes {token!r} again or outside the vocabulary")
        made[token] = index
    for token, index in made.items():
        try:
            whole = [piece.value for piece in hf.model.tokenize(token)] == [token]
        except Exception as exc:  # tokenizers raises a bare Exception (e.g. a character outside the vocabulary)
            raise NotConvertible(f"BPE of token {token!r} fails: {exc}") from None
        # Tokens that BPE never returns whole are never formed by `tokenizers`: leave them out.
        if whole:
            try:
                ranks[bytes(char_to_byte[char] for char in token)] = 256 + index
            except KeyError:
                raise NotConvertible(f"token {token!r} has a character outside the byte alphabet") from None
    ids.extend([-1] * len(made))
    for token, index in made.items():
        ids[256 + index] = vocab[token]
    return ranks, ids


class TiktokenBPE:
    """tiktoken running a byte-level BPE `tokenizer.json`, ids as `tokenizers` gives them.

    Args:
        spec: the parsed tokenizer.json.
        hf: the same tokenizer loaded by `tokenizers` (to check which tokens BPE returns whole).

    Raises:
        NotConvertible: the tokenizer is not one tiktoken reproduces exactly.
    """

    def __init__(self, spec: dict, hf: HFTokenizer):
        import tiktoken  # optional: only needed on the fast path

        _check_pipeline(spec)
        added = _added_tokens(spec)
        ranks, ids = _ranks(spec, hf)
        specials = {token.content: len(ids) + k for k, token in enumerate(added)}
        ids.extend(token.token_id for token in added)
        self._ids = np.asarray(ids, np.int64).astype(np.int32)
        # Most trained vocabularies number tokens in merge order: then ranks are ids.
        self._identity = bool(np.array_equal(self._ids, np.arange(len(ids))))
        self._encoding = tiktoken.Encoding("lory-bpe", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                                           special_tokens=specials)
        self._specials = frozenset(specials)

    def encode(self, text: str) -> np.ndarray:
        """(tokens,) int32 ids of one text.

        Raises:
            UnicodeEncodeError: the text holds a lone surrogate (no UTF-8 for it).
        """
        ranks = self._encoding.encode_to_numpy(text, allowed_special=self._specials)
        return ranks.view(np.int32) if self._identity else self._ids[ranks]

    def encode_batch(self, texts: Sequence[str], threads: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Ids of many texts as (len(texts) + 1,) int64 offsets and (tokens,) int32 values:
        text i is values[offsets[i]:offsets[i + 1]].

        Args:
            texts: the documents.
            threads: encoding threads (tiktoken releases the GIL).
        """
        if threads > 1 and len(texts) > 1:
            # Contiguous slices, several per thread (documents differ in length), in order.
            step = -(-len(texts) // (4 * threads))
            with ThreadPoolExecutor(threads) as pool:
                slices = pool.map(self._ranks_of_all, (texts[i : i + step] for i in range(0, len(texts), step)))
                parts = [part for piece in slices for part in piece]
        else:
            parts = self._ranks_of_all(texts)
        offsets = np.zeros(len(texts) + 1, np.int64)
        np.cumsum([len(part) for part in parts], out=offsets[1:])
        ranks = np.concatenate(parts) if parts else np.zeros(0, np.uint32)
        return offsets, (ranks.view(np.int32) if self._identity else self._ids[ranks])

    def _ranks_of_all(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [self._encoding.encode_to_numpy(text, allowed_special=self._specials) for text in texts]


def default_threads() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def list_array(offsets: np.ndarray, values: np.ndarray) -> pa.ListArray:
    """Offsets and int32 values as an Arrow list<int32> array (no per-token Python objects)."""
    if offsets[-1] > _INT32_MAX:
        raise ValueError(f"{offsets[-1]} tokens in one batch exceed Arrow list offsets; pass fewer texts")
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values, pa.int32()))
