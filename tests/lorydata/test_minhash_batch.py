"""`MinHasher.signatures` (compiled, many documents) against the per-document numpy definition
`MinHasher.reference_signature`, bit for bit: the bundled sample and adversarial texts."""

import json
import re

import numpy as np
import pytest
import zstandard

from lorydata import minhash, minhash_kernels
from lorydata.minhash import MinHashConfig, MinHasher

EMPTY = 2**32 - 1
ADVERSARIAL = [
    "",
    "   \n\t  ",
    " ... !!! --- ¿¡ «» “”",
    "one",
    "two words",
    "three small words",
    "four words, not five",
    "exactly five words right here",
    "The cat sat on the mat, and the CAT sat on the mat.",
    "İstanbul ΣΊΣΥΦΟΣ Straße ǅemal ﬁne Ⅻ ½ ²",  # lower() changes lengths; letter-like numbers
    "日本語のテキスト、中文文本。 한국어 텍스트 ไทย العربية ١٢٣ ۴۵۶ देवनागरी १२३",
    "e\u0301 a\u0308 combining marks, zero\u200bwidth\u200dspace, nbsp\u00a0here, ideographic\u3000space",
    "emoji 😀 between 🎉 words 👨‍👩‍👧 and flags 🇫🇷 in text",
    "snake_case_words __dunder__ _ __ x_1 1_x 123 4.5 6,7",
    "a\ud800b lone surrogates \udfff are not word characters",
    "nul\x00between\x01control\x7fcharacters\x85next\u2028line",
    "word " * 5000,  # the same shingle thousands of times
    "x" * 100_000,  # one very long word
    " ".join(f"w{i}" for i in range(20_000)),  # many distinct shingles
]


def sample_texts(path) -> list[str]:
    with zstandard.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


def reference(hasher: MinHasher, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    rows = [hasher.reference_signature(text) for text in texts]
    empty = np.full(hasher.config.num_perm, EMPTY, np.uint32)
    return np.stack([empty if row is None else row for row in rows]), np.array([row is not None for row in rows])


def assert_same(hasher: MinHasher, texts: list[str]) -> None:
    signatures, has_words = hasher.signatures(texts)
    expected, expected_words = reference(hasher, texts)
    assert signatures.dtype == np.uint32 and signatures.shape == (len(texts), hasher.config.num_perm)
    np.testing.assert_array_equal(has_words, expected_words)
    np.testing.assert_array_equal(signatures, expected)


def test_bundled_sample_is_bit_identical(sample_corpus):
    assert_same(MinHasher(), sample_texts(sample_corpus))


def test_adversarial_texts_are_bit_identical():
    hasher = MinHasher()
    assert_same(hasher, ADVERSARIAL)
    signatures, has_words = hasher.signatures(ADVERSARIAL)
    assert not has_words[:3].any() and has_words[3:].all()
    assert (signatures[:3] == EMPTY).all()


@pytest.mark.parametrize("config", [MinHashConfig(shingle_words=1), MinHashConfig(shingle_words=3, bands=4, rows=2, seed=7),
                                    MinHashConfig(shingle_words=9, bands=20, rows=5, seed=123)])
def test_other_configs_are_bit_identical(config, sample_corpus):
    assert_same(MinHasher(config), ADVERSARIAL + sample_texts(sample_corpus)[:50])


def test_every_code_point_splits_and_hashes_like_the_regex():
    """Every code point, in runs of 1-3 separated by spaces: word characters (`\\w` of
    Python's `re` after lower()) and the CRC of their 1-4 byte UTF-8 encodings."""
    hasher = MinHasher(MinHashConfig(shingle_words=2))
    code_points = [c for c in range(0x110000) if not 0xD800 <= c < 0xE000]
    texts = []
    for start in range(0, len(code_points), 8192):
        chars = [chr(c) for c in code_points[start : start + 8192]]
        texts.append(" ".join("".join(chars[i : i + 1 + i % 3]) for i in range(0, len(chars), 3)))
    assert_same(hasher, texts)


def test_word_table_is_the_regex():
    table = minhash_kernels.word_table()
    probe = [0, 0x30, 0x41, 0x5F, 0x2D, 0xB2, 0x130, 0x660, 0x2028, 0x3000, 0x4E00, 0xD800, 0x1F600, 0x10FFFF]
    assert [bool(table[c]) for c in probe] == [bool(re.fullmatch(r"\w", chr(c))) for c in probe]


def test_batches_split_across_calls_keep_rows_in_order(monkeypatch, sample_corpus):
    texts = ADVERSARIAL[:12] + sample_texts(sample_corpus)[:30]
    whole = MinHasher().signatures(texts)
    monkeypatch.setattr(minhash, "_BATCH_CHARS", 500)  # many kernel calls, some of one text
    split = MinHasher().signatures(texts)
    np.testing.assert_array_equal(whole[0], split[0])
    np.testing.assert_array_equal(whole[1], split[1])


def test_single_text_api_and_empty_batch():
    hasher = MinHasher()
    assert hasher.signature("") is None and hasher.signature("!!") is None
    text = ADVERSARIAL[8]
    np.testing.assert_array_equal(hasher.signature(text), hasher.reference_signature(text))
    np.testing.assert_array_equal(hasher.signature_or_empty(""), np.full(128, EMPTY, np.uint32))
    signatures, has_words = hasher.signatures([])
    assert signatures.shape == (0, 128) and has_words.shape == (0,)


def test_band_keys_of_a_matrix_are_the_rows_band_keys(sample_corpus):
    hasher = MinHasher()
    signatures, _ = hasher.signatures(sample_texts(sample_corpus)[:20])
    keys = hasher.band_keys(signatures)
    assert keys.shape == (20, hasher.config.bands)
    np.testing.assert_array_equal(keys, np.stack([hasher.band_keys(row) for row in signatures]))
