"""MinHash signatures of word shingles and their LSH band keys (numpy, deterministic).

A document's shingles are its runs of `shingle_words` consecutive lower-cased words
(`\\w+` runs, so punctuation and whitespace changes do not count). Each shingle is hashed to
64 bits; permutation i maps a shingle hash h to the top 32 bits of `a_i * h + b_i (mod 2**64)`
(multiply-add-shift with odd `a_i`), and the signature holds, per permutation, the minimum
over the document's shingles. Two signatures agree in a given position with probability
equal to the Jaccard similarity of the shingle sets, so the share of equal positions
estimates it. Everything derives from `seed` by numpy's PCG64 and from CRC-32 of the words,
so signatures are identical in every process, on every machine, for every `PYTHONHASHSEED`.

Computing: `MinHasher.signatures(texts)` signs many documents in one compiled pass
(`lorydata.minhash_kernels`: ~15× the per-document numpy path on one core, bit-identical);
`signature` and `signature_or_empty` call it for one text. `reference_signature` keeps the
numpy definition above (shingle hashes, then the minimum over permutations) for tests and
benchmarks.

LSH: the signature is cut into `bands` bands of `rows` values; two documents become a
candidate pair when all values of at least one band agree, which happens with probability
`1 - (1 - J**rows)**bands` (see `candidate_probability`).

Defaults (5-word shingles, 16 bands × 8 rows = 128 permutations, threshold 0.8):
- 5-word shingles, as datatrove and Gopher-style dedup use: short enough that a few edited
  words change only a few percent of the shingles, long enough that unrelated prose written
  with the same vocabulary shares almost none.
- 128 permutations: the Jaccard estimate has a standard deviation of sqrt(J(1-J)/128), 0.035
  at J = 0.8, and hashing 128 permutations costs well under a millisecond per thousand words.
- 16 × 8 puts the LSH S-curve's midpoint at (1/16)**(1/8) = 0.71, under the threshold: a pair
  at J = 0.8 becomes a candidate with probability 0.95, at J = 0.85 with 0.994, at J = 0.5
  with 0.06, so few pairs need verifying and few true pairs are missed (inside a group of
  copies a missed pair is usually joined through another member anyway).
- Jaccard threshold 0.8: documents sharing four fifths of their shingles are the same
  document with edits (the verification uses the whole signature, not one band).
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from lorydata import minhash_kernels

_WORD = re.compile(r"\w+")
_UINT32_MAX = np.uint32(0xFFFFFFFF)
# Shingle hashes are processed in blocks of this many rows, so a (block × permutations)
# uint64 array stays near 2 MB however long the document is.
_BLOCK = 2048
# `signatures` hands the kernel documents in groups of about this many characters, so the
# UTF-32 copy of a batch stays near 4 MB however many documents it holds (from 60k to 8M
# characters the speed is the same within noise).
_BATCH_CHARS = 1_000_000


@dataclass(frozen=True)
class MinHashConfig:
    """Parameters of MinHash LSH near-duplicate detection.

    Args:
        shingle_words: words per shingle.
        bands: LSH bands.
        rows: signature values per band; `bands * rows` is the number of permutations.
        threshold: estimated Jaccard at or above which a candidate pair is a near-duplicate.
        seed: seed of the permutations (documents are comparable only under one seed).
    """

    shingle_words: int = 5
    bands: int = 16
    rows: int = 8
    threshold: float = 0.8
    seed: int = 0

    @property
    def num_perm(self) -> int:
        return self.bands * self.rows

    def validate(self) -> None:
        """Raise ValueError for parameters that cannot work."""
        if self.shingle_words < 1 or self.bands < 1 or self.rows < 1:
            raise ValueError(f"shingle words, bands and rows must be positive, got {self}")
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"the Jaccard threshold must be in (0, 1], got {self.threshold}")


def candidate_probability(jaccard: float, bands: int, rows: int) -> float:
    """Probability that a pair of Jaccard similarity `jaccard` shares at least one band."""
    return 1.0 - (1.0 - jaccard**rows) ** bands


def _mix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser: a bijection of uint64 that spreads every input bit."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def words(text: str) -> list[str]:
    """The lower-cased `\\w+` runs of a text."""
    return _WORD.findall(text.lower())


class MinHasher:
    """Computes signatures and band keys for one `MinHashConfig`.

    Args:
        config: the parameters; every hasher with an equal config gives equal signatures.
    """

    def __init__(self, config: MinHashConfig = MinHashConfig()):
        config.validate()
        self.config = config

    @cached_property
    def _params(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        rng = np.random.default_rng(self.config.seed)
        top = np.iinfo(np.uint64).max
        a = rng.integers(0, top, size=self.config.num_perm, dtype=np.uint64, endpoint=True) | np.uint64(1)
        b = rng.integers(0, top, size=self.config.num_perm, dtype=np.uint64, endpoint=True)
        # Position weights of a shingle's words and of a band's values (odd, so distinct).
        shingle_w = rng.integers(0, top, size=self.config.shingle_words, dtype=np.uint64, endpoint=True) | np.uint64(1)
        band_w = rng.integers(0, top, size=self.config.rows + 1, dtype=np.uint64, endpoint=True) | np.uint64(1)
        return a, b, shingle_w, band_w

    def shingle_hashes(self, text: str) -> np.ndarray:
        """The distinct 64-bit hashes of a text's word shingles (sorted).

        A text with fewer words than a shingle is one shingle of all its words; a text
        without words has no shingles (an empty array).
        """
        found = words(text)
        if not found:
            return np.zeros(0, dtype=np.uint64)
        # Words repeat: CRC-32 each distinct word once (+ 1, so no word hashes to 0).
        cache: dict[str, int] = {}
        ids = np.fromiter(
            (cache.get(w) or cache.setdefault(w, zlib.crc32(w.encode("utf-8")) + 1) for w in found),
            dtype=np.uint64,
            count=len(found),
        )
        _, _, weights, _ = self._params
        n = min(self.config.shingle_words, len(ids))
        count = len(ids) - n + 1
        combined = np.zeros(count, dtype=np.uint64)
        for j in range(n):  # wrap-around uint64 arithmetic is the intended hash
            combined += ids[j : j + count] * weights[j]
        return np.unique(_mix64(combined))

    def signatures(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """MinHash signatures of many texts at once (a compiled loop, no per-word Python).

        Equal, bit for bit, to `signature_or_empty` of each text (tests compare them).

        Args:
            texts: the documents.

        Returns:
            (len(texts), num_perm) uint32 signatures, with the empty signature (every value
            2**32 - 1) for a text without words, and (len(texts),) bool: which texts have words.
        """
        a, b, weights, _ = self._params
        out = np.empty((len(texts), self.config.num_perm), np.uint32)
        has_words = np.empty(len(texts), bool)
        is_word, crc_table = minhash_kernels.word_table(), minhash_kernels.crc32_table()
        first = 0
        while first < len(texts):
            lowered, chars = [], 0
            while first + len(lowered) < len(texts) and (not lowered or chars < _BATCH_CHARS):
                lowered.append(texts[first + len(lowered)].lower())
                chars += len(lowered[-1])
            starts = np.zeros(len(lowered) + 1, np.int64)
            np.cumsum([len(text) for text in lowered], out=starts[1:])
            # Lone surrogates are legal in a str; they are not word characters, so pass them.
            code_points = np.frombuffer("".join(lowered).encode("utf-32-le", "surrogatepass"), np.uint32)
            rows = slice(first, first + len(lowered))
            minhash_kernels.signatures_kernel(code_points, starts, is_word, crc_table, weights, a, b,
                                              out[rows], has_words[rows])
            first += len(lowered)
        return out, has_words

    def signature(self, text: str) -> np.ndarray | None:
        """The (num_perm,) uint32 MinHash signature of a text, or None if it has no words."""
        signatures, has_words = self.signatures([text])
        return signatures[0] if has_words[0] else None

    def signature_or_empty(self, text: str) -> np.ndarray:
        """`signature`, with the empty signature (every value 2**32 - 1) for a text without
        words, for code that needs one row per document."""
        return self.signatures([text])[0][0]

    def reference_signature(self, text: str) -> np.ndarray | None:
        """`signature` computed with numpy from `shingle_hashes`: the definition the compiled
        `signatures` reproduces (kept for tests and benchmarks; it is ~5× slower)."""
        hashes = self.shingle_hashes(text)
        if len(hashes) == 0:
            return None
        a, b, _, _ = self._params
        result = np.full(self.config.num_perm, _UINT32_MAX, dtype=np.uint32)
        for start in range(0, len(hashes), _BLOCK):
            block = hashes[start : start + _BLOCK, None]
            permuted = ((block * a + b) >> np.uint64(32)).astype(np.uint32)
            np.minimum(result, permuted.min(axis=0), out=result)
        return result

    def band_keys(self, signatures: np.ndarray) -> np.ndarray:
        """(..., bands) uint64 keys of (..., num_perm) signatures (one, or a matrix of them):
        equal keys mean (up to 2**-64) equal bands of the same index."""
        _, _, _, band_w = self._params
        shape = signatures.shape[:-1]
        bands = signatures.reshape(*shape, self.config.bands, self.config.rows).astype(np.uint64)
        combined = (bands * band_w[: self.config.rows]).sum(axis=-1, dtype=np.uint64)
        combined += np.arange(self.config.bands, dtype=np.uint64) * band_w[-1]
        return _mix64(combined)


def estimated_jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Share of equal positions of two signatures: the MinHash estimate of their Jaccard."""
    return float(np.count_nonzero(a == b)) / len(a)


def is_empty(signatures: np.ndarray) -> np.ndarray:
    """Which signatures (rows) are the empty signature of a text without words."""
    return (signatures == _UINT32_MAX).all(axis=-1)
