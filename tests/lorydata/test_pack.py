import numpy as np
import pytest

from lorydata.clean import normalize_text
from lorydata.errors import LoryDataError
from lorydata.pack import PackStats, pack_documents

EOS, PAD = 0, 1


def docs_of(lengths, start=10):
    """Documents of the given lengths with distinct, recognisable token values."""
    out, value = [], start
    for i, n in enumerate(lengths):
        out.append((np.arange(value, value + n), f"d{i}"))
        value += n
    return out


def test_exact_layout_with_continuations_and_eos():
    docs = docs_of([3, 6, 1])  # + EOS each: 4, 7, 2 = 13 tokens
    seqs = list(pack_documents(docs, seq_len=5, eos_id=EOS, pad_id=PAD, tail="pad"))
    assert [s.input_ids.tolist() for s in seqs] == [
        [10, 11, 12, EOS, 13],
        [14, 15, 16, 17, 18],
        [EOS, 19, EOS, PAD, PAD],
    ]
    assert [s.doc_starts for s in seqs] == [[0, 4], [0], [0, 1]]
    assert [s.domains for s in seqs] == [["d0", "d1"], ["d1"], ["d1", "d2"]]
    assert [s.seq_id for s in seqs] == [0, 1, 2]
    assert [s.pad_tokens for s in seqs] == [0, 0, 2]


def test_tail_drop_counts_the_dropped_tokens():
    stats = PackStats()
    seqs = list(pack_documents(docs_of([3, 6, 1]), 5, EOS, PAD, tail="drop", stats=stats))
    assert len(seqs) == 2
    assert stats.tail_tokens_dropped == 3 and stats.pad_tokens == 0
    assert stats.tokens == 13 and stats.documents == 3 and stats.continued_documents == 2


@pytest.mark.parametrize("seq_len", [2, 3, 7, 64])
def test_stream_is_preserved_for_any_seq_len(seq_len):
    rng = np.random.default_rng(seq_len)
    docs = docs_of(rng.integers(1, 40, size=30).tolist())
    stats = PackStats()
    seqs = list(pack_documents(docs, seq_len, EOS, PAD, tail="drop", stats=stats))
    stream = np.concatenate([np.append(tokens, EOS) for tokens, _ in docs])
    packed = np.concatenate([s.input_ids for s in seqs])
    kept = len(stream) - stats.tail_tokens_dropped
    assert kept % seq_len == 0 and np.array_equal(packed, stream[:kept])
    # every token's domain follows from doc_starts/domains
    token_domain = np.concatenate([[d] * (len(t) + 1) for t, d in docs])[:kept]
    rebuilt = []
    for s in seqs:
        bounds = [*s.doc_starts, seq_len]
        for a, b, dom in zip(bounds[:-1], bounds[1:], s.domains, strict=True):
            rebuilt += [dom] * (b - a)
    assert rebuilt == token_domain.tolist()


def test_bad_packing_options_are_user_errors():
    with pytest.raises(LoryDataError, match="tail"):
        list(pack_documents([], 8, EOS, PAD, tail="truncate"))
    with pytest.raises(LoryDataError, match="seq_len"):
        list(pack_documents([], 1, EOS, PAD))


def test_normalisation_keeps_indentation():
    raw = "\ufeffdef f():\r\n    return\u00a01  \r\n\r\n\r\n\r\n\tx = 'caf\u0065\u0301'\x07\n"
    assert normalize_text(raw) == "def f():\n    return 1\n\n\tx = 'caf\u00e9'"


def test_block_starts_cut_on_sequence_boundaries_when_they_can():
    from lorydata.pack import block_starts

    # Documents of 7 tokens (+EOS = 8) with seq_len 16: every second one starts a sequence.
    cuts = block_starts(np.full(20, 7), seq_len=16, block_tokens=40)
    starts = np.arange(20) * 8
    assert cuts[0] == 0 and all(starts[c] % 16 == 0 for c in cuts)
    assert all(np.diff(starts[cuts]) >= 40)
    # 13-token documents (12 + EOS) never start on a boundary of 1000-token sequences within
    # twice the block size: cut there anyway.
    cuts = block_starts(np.full(30, 12), seq_len=1000, block_tokens=26)
    assert list(cuts) == [0, 4, 8, 12, 16, 20, 24, 28]
    assert block_starts(np.zeros(0, np.int64), 16, 40).size == 0
    assert list(block_starts(np.full(3, 5), 16, 1000)) == [0]
