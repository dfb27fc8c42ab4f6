"""MinHash signatures, LSH buckets, verification, groups and keepers, semantic pairs."""

import os
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from lorydata.minhash import MinHashConfig, MinHasher, candidate_probability, estimated_jaccard, words
from lorydata.near_dedup import DocRef, bucket_pairs, find_near_duplicates, group_duplicates, semantic_pairs

ROOT = Path(__file__).resolve().parents[2]
VOCAB = [f"w{i}" for i in range(5000)]


def prose(seed: int, n_words: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [VOCAB[i] for i in rng.integers(0, len(VOCAB), n_words)]


def paragraphs(seed: int, count: int = 4, size: int = 150) -> list[str]:
    return [" ".join(prose(seed * 100 + p, size)) + "." for p in range(count)]


def edited(text: str, every: int, seed: int) -> str:
    """`text` with every `every`-th word replaced by another."""
    out = text.split(" ")
    rng = np.random.default_rng(seed)
    for i in range(0, len(out), every):
        out[i] = f"edit{rng.integers(1_000_000)}"
    return " ".join(out)


def ref(key: str, text: str) -> tuple[DocRef, str]:
    return DocRef(key, len(text), f"id-{key}"), text


def test_signature_matches_naive_reference():
    config = MinHashConfig(shingle_words=3, bands=4, rows=2, seed=7)
    hasher = MinHasher(config)
    text = "The cat sat on the mat, and the CAT sat."
    a, b, weights, _ = hasher._params
    ids = [zlib.crc32(w.encode()) + 1 for w in words(text)]
    mask = 2**64 - 1

    def mix(x: int) -> int:
        x ^= x >> 30
        x = (x * 0xBF58476D1CE4E5B9) & mask
        x ^= x >> 27
        x = (x * 0x94D049BB133111EB) & mask
        return x ^ (x >> 31)

    shingles = {mix(sum(ids[i + j] * int(weights[j]) for j in range(3)) & mask) for i in range(len(ids) - 2)}
    expected = [min(((int(a[p]) * h + int(b[p])) & mask) >> 32 for h in shingles) for p in range(8)]
    assert hasher.signature(text).tolist() == expected
    assert len(hasher.shingle_hashes(text)) == len(shingles) == 7  # "the cat sat" occurs twice


def test_estimate_tracks_exact_jaccard():
    hasher = MinHasher()
    base = prose(1, 600)
    for replace_every in (2, 4, 10, 40):
        copy = edited(" ".join(base), replace_every, seed=replace_every).split(" ")
        sa, sb = set(hasher.shingle_hashes(" ".join(base))), set(hasher.shingle_hashes(" ".join(copy)))
        exact = len(sa & sb) / len(sa | sb)
        estimate = estimated_jaccard(hasher.signature(" ".join(base)), hasher.signature(" ".join(copy)))
        sigma = np.sqrt(exact * (1 - exact) / 128)
        assert abs(estimate - exact) <= 4 * sigma + 1e-9, (replace_every, exact, estimate)


def test_signatures_do_not_depend_on_the_process_hash_seed():
    text = "Ünïcode words, numbers 12 and punctuation; the same in every process."
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from lorydata.minhash import MinHasher; "
            "print(MinHasher().signature(sys.argv[2]).tolist())")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code, str(ROOT), text], env=env, capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == str(MinHasher().signature(text).tolist())


def test_case_punctuation_and_whitespace_do_not_count():
    hasher = MinHasher()
    a = hasher.signature("Hello,   world! This is  a test of the shingles.")
    b = hasher.signature("hello world\nthis is a TEST of the shingles")
    assert np.array_equal(a, b)
    assert np.array_equal(hasher.band_keys(a), hasher.band_keys(b))


def test_texts_without_words_and_one_word_texts():
    hasher = MinHasher()
    assert hasher.signature("") is None and hasher.signature(" ... !!! ---") is None
    assert hasher.signature_or_empty("").tolist() == [2**32 - 1] * 128
    one, same, other = hasher.signature("Hello"), hasher.signature("hello."), hasher.signature("goodbye")
    assert np.array_equal(one, same) and estimated_jaccard(one, other) < 0.1
    docs = [ref("a", ""), ref("b", "!!!"), ref("c", "Hello"), ref("d", "hello."), ref("e", "goodbye")]
    dropped = find_near_duplicates(docs)
    # Word-less texts are never near-duplicates; the one-word copies are (same shingle set).
    assert [(d.dropped.key, d.kept.key) for d in dropped] == [("c", "d")]  # "hello." is longer


def test_band_keys_differ_by_band_index():
    hasher = MinHasher(MinHashConfig(bands=4, rows=2))
    keys = hasher.band_keys(np.zeros(8, dtype=np.uint32))  # four identical bands
    assert len(set(keys.tolist())) == 4


def test_planted_near_duplicates():
    """Edited and reordered copies are dropped (the longest copy kept); documents that share
    a licence header but not their bodies, and unrelated documents, are kept."""
    base = paragraphs(1)
    licence = " ".join(prose(99, 120)) + "."
    docs = [
        ref("base", "\n\n".join(base)),
        ref("edits", edited("\n\n".join(base), 100, seed=2)),  # 1 word in 100 replaced
        ref("reordered", "\n\n".join([base[2], base[0], base[3], base[1]]) + " See the appendix on page twelve for the details."),
        ref("header-a", licence + "\n\n" + "\n\n".join(paragraphs(2, 2))),
        ref("header-b", licence + "\n\n" + "\n\n".join(paragraphs(3, 2))),
        ref("other", "\n\n".join(paragraphs(4))),
    ]
    dropped = find_near_duplicates(docs)
    assert docs[2][0].length > docs[1][0].length > docs[0][0].length
    assert [(d.dropped.key, d.kept.key, d.group_size) for d in dropped] == [
        ("base", "reordered", 3),
        ("edits", "reordered", 3),
    ]
    assert dropped[0].kept.id == "id-reordered"


def test_result_does_not_depend_on_input_order():
    texts = ["\n\n".join(paragraphs(s)) for s in range(6)]
    docs = [ref(f"k{i}", t) for i, t in enumerate(texts)]
    docs += [ref(f"e{i}", edited(t, 100, seed=i)) for i, t in enumerate(texts)]
    expected = find_near_duplicates(docs)
    assert len(expected) == 6
    rng = np.random.default_rng(0)
    for _ in range(3):
        assert find_near_duplicates([docs[i] for i in rng.permutation(len(docs))]) == expected


def test_large_buckets_compare_with_group_leaders():
    hasher = MinHasher()
    text_a, text_b = "\n\n".join(paragraphs(1)), "\n\n".join(paragraphs(2))
    members = [text_a, edited(text_a, 200, 1), text_b, edited(text_a, 150, 2), edited(text_b, 200, 3)]
    sigs = np.stack([hasher.signature(t) for t in members])
    full = bucket_pairs(sigs, 0.8, pairwise_limit=100)
    leaders = bucket_pairs(sigs, 0.8, pairwise_limit=2)
    assert {(i, j) for i, j, _ in full} == {(0, 1), (0, 3), (1, 3), (2, 4)}
    assert {(i, j) for i, j, _ in leaders} == {(0, 1), (0, 3), (2, 4)}  # same groups, fewer pairs
    assert all(j >= 0.8 for *_, j in full)
    assert bucket_pairs(sigs[:1], 0.8) == []


def test_groups_are_connected_components_with_a_deterministic_keeper():
    a, b, c = DocRef("a", 10, "A"), DocRef("b", 30, "B"), DocRef("c", 30, "C")
    d, e = DocRef("d", 5, "D"), DocRef("e", 5, "E")
    dropped = group_duplicates([(a, b), (c, b), (e, d), (a, b)])
    # a-b-c is one group (a chain): b and c are equally long, b has the smaller key.
    assert [(x.dropped.key, x.kept.key, x.group_size) for x in dropped] == [
        ("a", "b", 3), ("c", "b", 3), ("e", "d", 2)]
    assert group_duplicates([(d, e), (b, c), (b, a)]) == dropped
    assert group_duplicates([]) == []


def test_semantic_pairs_need_shared_text():
    """A cosine-1 kNN edge between documents that share only a licence header is kept apart;
    one between near-copies is a duplicate."""
    hasher = MinHasher()
    licence = " ".join(prose(99, 120)) + "."
    body = "\n\n".join(paragraphs(5, 2))
    texts = [licence + "\n\n" + body, licence + "\n\n" + "\n\n".join(paragraphs(6, 2)),
             licence + "\n\n" + edited(body, 60, 1), "", "..."]
    sigs = np.stack([hasher.signature_or_empty(t) for t in texts])
    neighbors = np.array([[1, 2], [0, 2], [0, 1], [4, -1], [3, -1]])
    similarities = np.array([[0.99, 0.99], [0.99, 0.99], [0.99, 0.99], [1.0, -np.inf], [1.0, -np.inf]], np.float32)
    pairs = semantic_pairs(neighbors, similarities, sigs, cos=0.95)
    assert [(i, j) for i, j, _ in pairs] == [(0, 2)]  # word-less texts never confirm
    assert semantic_pairs(neighbors, similarities, sigs, cos=0.995) == []


def test_lsh_defaults_find_pairs_at_the_threshold():
    config = MinHashConfig()
    assert config.num_perm == 128
    assert candidate_probability(0.8, config.bands, config.rows) > 0.94
    assert candidate_probability(0.5, config.bands, config.rows) < 0.07


@pytest.mark.parametrize("bad", [dict(shingle_words=0), dict(bands=0), dict(threshold=0.0), dict(threshold=1.5)])
def test_bad_config_is_refused(bad):
    with pytest.raises(ValueError):
        MinHasher(MinHashConfig(**bad))
