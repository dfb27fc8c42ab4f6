"""Packing: cut an ordered stream of tokenized documents into fixed-length sequences.

Every document is followed by one EOS token. A document that does not fit in the current
sequence continues in the next one, so no token is lost except, optionally, the tail.

`doc_starts` lists the offsets in a sequence where a document *or the continuation of
one* begins, so it always starts with 0 and `domains[i]` is the domain of the tokens from
`doc_starts[i]` up to the next start. That gives every token a domain (per-domain
perplexity needs it), and a continuation is recognisable: the previous sequence (by
`seq_id`) does not end with EOS.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from lorydata.errors import LoryDataError


@dataclass
class PackedSequence:
    """One training sequence, as stored in a shard row.

    Args:
        input_ids: int32 array of exactly `seq_len` tokens.
        doc_starts: offsets where a document (or its continuation) begins; starts with 0.
        domains: the domain of each entry of `doc_starts` ("" when unknown).
        seq_id: position of the sequence in the packing order (the walk order).
        pad_tokens: how many trailing tokens are padding (only the padded tail has any).
    """

    input_ids: np.ndarray
    doc_starts: list[int]
    domains: list[str]
    seq_id: int
    pad_tokens: int = 0


@dataclass
class PackStats:
    """What packing did, for the manifest."""

    documents: int = 0
    tokens: int = 0  # document tokens plus one EOS each
    sequences: int = 0
    continued_documents: int = 0  # documents split across a sequence boundary
    tail_tokens_dropped: int = 0
    pad_tokens: int = 0

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class SequencePacker:
    """Streams documents in, full sequences out.

    Args:
        seq_len: tokens per sequence.
        eos_id: token appended after every document.
        pad_id: token that fills the tail when `tail="pad"`.
        tail: what to do with the last, partial sequence: "drop" or "pad".
        first_seq_id: `seq_id` of the first sequence (packing partitions separately offsets it).
    """

    seq_len: int
    eos_id: int
    pad_id: int
    tail: str = "drop"
    first_seq_id: int = 0
    stats: PackStats = field(default_factory=PackStats)

    def __post_init__(self):
        if self.seq_len < 2:
            raise LoryDataError(f"seq_len must be at least 2, got {self.seq_len}")
        if self.tail not in ("drop", "pad"):
            raise LoryDataError(f"tail must be 'drop' or 'pad', got {self.tail!r}")
        self._buf = np.empty(self.seq_len, dtype=np.int32)
        self._fill = 0
        self._starts: list[int] = []
        self._domains: list[str] = []
        self._next_id = self.first_seq_id

    def _emit(self, pad_tokens: int = 0) -> PackedSequence:
        seq = PackedSequence(self._buf.copy(), self._starts, self._domains, self._next_id, pad_tokens)
        self._next_id += 1
        self.stats.sequences += 1
        self._fill, self._starts, self._domains = 0, [], []
        return seq

    def add(self, tokens: Sequence[int] | np.ndarray, domain: str = "") -> Iterator[PackedSequence]:
        """Append one document (EOS is added here); yields the sequences it completes."""
        doc = np.asarray(tokens, dtype=np.int32)
        total = len(doc) + 1
        self.stats.documents += 1
        self.stats.tokens += total
        pos = 0
        while pos < total:
            self._starts.append(self._fill)
            self._domains.append(domain)
            take = min(total - pos, self.seq_len - self._fill)
            end = pos + take
            body_end = min(end, len(doc))
            if body_end > pos:
                self._buf[self._fill : self._fill + body_end - pos] = doc[pos:body_end]
            if end == total:  # the chunk includes the trailing EOS
                self._buf[self._fill + take - 1] = self.eos_id
            self._fill += take
            pos = end
            if self._fill == self.seq_len:
                if pos < total:
                    self.stats.continued_documents += 1
                yield self._emit()

    def finish(self) -> Iterator[PackedSequence]:
        """Drop or pad the partial last sequence."""
        if self._fill == 0:
            return
        missing = self.seq_len - self._fill
        if self.tail == "drop":
            self.stats.tail_tokens_dropped += self._fill
            self._fill, self._starts, self._domains = 0, [], []
            return
        self._buf[self._fill :] = self.pad_id
        self.stats.pad_tokens += missing
        self._fill = self.seq_len
        yield self._emit(pad_tokens=missing)


def pack_documents(
    documents: Iterable[tuple[Sequence[int] | np.ndarray, str]],
    seq_len: int,
    eos_id: int,
    pad_id: int,
    tail: str = "drop",
    stats: PackStats | None = None,
) -> Iterator[PackedSequence]:
    """Pack (tokens, domain) pairs, in the given order, into sequences of `seq_len` tokens.

    Args:
        documents: token ids (without EOS) and domain of each document, in packing order.
        seq_len: tokens per sequence.
        eos_id: token appended after every document.
        pad_id: tail padding token.
        tail: "drop" or "pad" the last partial sequence.
        stats: if given, filled with the packing counts.
    """
    packer = SequencePacker(seq_len, eos_id, pad_id, tail)
    if stats is not None:
        packer.stats = stats
    for tokens, domain in documents:
        yield from packer.add(tokens, domain)
    yield from packer.finish()


def block_starts(lengths_in_order: np.ndarray, seq_len: int, block_tokens: int) -> np.ndarray:
    """Where to cut an ordered stream into blocks that are packed independently.

    A block ends once it holds `block_tokens` tokens (one EOS per document counted), at the
    first document that then starts exactly on a sequence boundary of the block, so the
    block loses no tail and the next one keeps the stream's sequence alignment (what a
    token-aware walk planned for). When no document starts on a boundary before twice
    `block_tokens`, the block is cut there anyway (its tail then follows `--tail`).

    Args:
        lengths_in_order: tokens of each document in packing order (EOS excluded).
        seq_len: tokens per sequence.
        block_tokens: tokens per block, at least.

    Returns:
        Sorted document indices where blocks begin (always starting with 0 when non-empty).
    """
    sizes = np.asarray(lengths_in_order, dtype=np.int64) + 1
    starts = np.cumsum(sizes) - sizes
    n, cuts, begin = len(sizes), [], 0
    while begin < n:
        cuts.append(begin)
        base = starts[begin]
        first = max(begin + 1, int(np.searchsorted(starts, base + block_tokens)))
        limit = max(first, int(np.searchsorted(starts, base + 2 * block_tokens)))
        if first >= n:
            break
        aligned = np.flatnonzero((starts[first:limit] - base) % seq_len == 0)
        begin = first + int(aligned[0]) if len(aligned) else min(limit, n)
    return np.asarray(cuts, dtype=np.int64)
