"""Compiled (numba) MinHash signing of many documents at once. `lorydata.minhash` is the
API and defines the hash; this kernel computes exactly the same signatures.

Where the per-document numpy path spends its time (dev corpus, one core): about 45% in the
(shingles × permutations) uint64 products, each pass allocating a new array; 30% looking words
up in a Python dict to CRC them once; 12% in `re.findall`; 8% in `np.unique`. Here one pass
over each document's code points finds the words (a lookup table built from the same `\\w`
regex), CRCs their UTF-8 bytes on the fly, combines shingles and folds every permutation
into a running minimum held in registers, without temporary arrays or Python objects.
Duplicate shingles are not removed: the minimum does not change when a value repeats.
"""

from __future__ import annotations

import re
from functools import cache

import numba as nb
import numpy as np

_MAX_CODE_POINT = 0x110000
_U32_MAX = np.uint32(0xFFFFFFFF)


@cache
def word_table(pattern: str = r"\w") -> np.ndarray:
    """(0x110000,) uint8: 1 where a code point matches `pattern` (a one-character class of
    Python's `re`), so the kernel splits words exactly as `re.findall(pattern + "+")` does."""
    every = "".join(map(chr, range(_MAX_CODE_POINT)))  # index = code point (a str may hold surrogates)
    table = np.zeros(_MAX_CODE_POINT, np.uint8)
    for run in re.finditer(f"{pattern}+", every):  # a few hundred runs: letters come in blocks
        table[run.start() : run.end()] = 1
    return table


@cache
def crc32_table() -> np.ndarray:
    """The byte table of CRC-32 (ISO-HDLC, reflected polynomial 0xEDB88320), zlib's CRC."""
    table = np.zeros(256, np.uint32)
    for byte in range(256):
        value = byte
        for _ in range(8):
            value = (value >> 1) ^ 0xEDB88320 if value & 1 else value >> 1
        table[byte] = value
    return table


@nb.njit(cache=True, inline="always")
def _crc_byte(crc, byte, table):
    return table[(crc ^ byte) & np.uint32(0xFF)] ^ (crc >> np.uint32(8))


@nb.njit(cache=True)
def _crc_code_point(crc, cp, table):
    """Feed one code point's UTF-8 bytes into a running (not yet inverted) CRC-32."""
    if cp < 0x80:
        return _crc_byte(crc, np.uint32(cp), table)
    if cp < 0x800:
        crc = _crc_byte(crc, np.uint32(0xC0 | (cp >> 6)), table)
        return _crc_byte(crc, np.uint32(0x80 | (cp & 0x3F)), table)
    if cp < 0x10000:
        crc = _crc_byte(crc, np.uint32(0xE0 | (cp >> 12)), table)
        crc = _crc_byte(crc, np.uint32(0x80 | ((cp >> 6) & 0x3F)), table)
        return _crc_byte(crc, np.uint32(0x80 | (cp & 0x3F)), table)
    crc = _crc_byte(crc, np.uint32(0xF0 | (cp >> 18)), table)
    crc = _crc_byte(crc, np.uint32(0x80 | ((cp >> 12) & 0x3F)), table)
    crc = _crc_byte(crc, np.uint32(0x80 | ((cp >> 6) & 0x3F)), table)
    return _crc_byte(crc, np.uint32(0x80 | (cp & 0x3F)), table)


@nb.njit(cache=True, inline="always")
def _mix64(x):
    """splitmix64's finaliser, as `lorydata.minhash._mix64` (uint64 wrap-around)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


@nb.njit(cache=True)
def _word_ids(code_points, start, end, is_word, crc_table, out):
    """Write the ids (CRC-32 of the UTF-8 bytes + 1) of the words in code_points[start:end]
    to `out`; return how many there are."""
    count = 0
    crc = np.uint32(0)
    inside = False
    for i in range(start, end):
        cp = code_points[i]
        if is_word[cp]:
            if not inside:
                crc = np.uint32(0xFFFFFFFF)
                inside = True
            crc = _crc_code_point(crc, cp, crc_table)
        elif inside:
            out[count] = np.uint64(crc ^ np.uint32(0xFFFFFFFF)) + np.uint64(1)
            count += 1
            inside = False
    if inside:
        out[count] = np.uint64(crc ^ np.uint32(0xFFFFFFFF)) + np.uint64(1)
        count += 1
    return count


@nb.njit(cache=True, nogil=True)
def signatures_kernel(code_points, starts, is_word, crc_table, shingle_weights, a, b, out, has_words):
    """MinHash signatures of documents given as one array of code points.

    Args:
        code_points: (C,) uint32, the lower-cased documents one after another.
        starts: (D+1,) int64, document d is code_points[starts[d]:starts[d+1]].
        is_word: `word_table()`.
        crc_table: `crc32_table()`.
        shingle_weights: (shingle_words,) uint64 position weights.
        a, b: (num_perm,) uint64 permutation multipliers and offsets.
        out: (D, num_perm) uint32, written: the signatures (2**32 - 1 everywhere for a
            document without words).
        has_words: (D,) bool, written.
    """
    num_perm = a.shape[0]
    longest = 0
    for d in range(starts.shape[0] - 1):
        longest = max(longest, starts[d + 1] - starts[d])
    ids = np.empty(longest // 2 + 1, np.uint64)  # words need a separator: at most half + 1
    minimum = np.empty(num_perm, np.uint64)
    for d in range(starts.shape[0] - 1):
        words = _word_ids(code_points, starts[d], starts[d + 1], is_word, crc_table, ids)
        minimum[:] = np.uint64(0xFFFFFFFF)
        has_words[d] = words > 0
        if words > 0:
            width = min(shingle_weights.shape[0], words)
            for i in range(words - width + 1):
                combined = np.uint64(0)
                for j in range(width):
                    combined += ids[i + j] * shingle_weights[j]
                h = _mix64(combined)
                for p in range(num_perm):
                    minimum[p] = min(minimum[p], (h * a[p] + b[p]) >> np.uint64(32))
        for p in range(num_perm):
            out[d, p] = np.uint32(minimum[p])
