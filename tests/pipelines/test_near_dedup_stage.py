"""The near-dedup stage of `build-corpus`: planted near-duplicates dropped (with dead letters
and counts), the same result for any bucket count and worker count, `--near-dedup off`."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lorydata.errors import LoryDataError
from pipelines.build_corpus import build_corpus, documents_config, minhash_config
from pipelines.documents import run_documents_stage
from pipelines.documents.near_dedup import drop_near_duplicates
from pipelines.layout import documents_files as bucket_files
from pipelines.options import BuildOptions
from pipelines.runner.beam import BeamRunner
from tests.lorydata.test_near_dedup import edited, paragraphs, prose
from tests.pipelines.test_build_random import all_text

TWO_WORKERS = ["--direct_num_workers=2", "--direct_running_mode=multi_processing"]


def planted_documents() -> list[dict]:
    """Three copies of one text (edited, reordered: the reordered one is longest), two
    documents that share a licence header but not their bodies, and unrelated ones."""
    base = paragraphs(1)
    licence = " ".join(prose(99, 200)) + "."
    docs = [
        {"id": "base", "text": "\n\n".join(base)},
        {"id": "edits", "text": edited("\n\n".join(base), 100, seed=2)},
        {"id": "reordered", "text": "\n\n".join([base[2], base[0], base[3], base[1]])
         + " See the appendix on page twelve for the details."},
        {"id": "header-a", "text": licence + "\n\n" + "\n\n".join(paragraphs(2, 2))},
        {"id": "header-b", "text": licence + "\n\n" + "\n\n".join(paragraphs(3, 2))},
        {"id": "other-copy", "text": edited("\n\n".join(paragraphs(10)), 120, seed=3)},
    ]
    docs += [{"id": f"other{i}", "text": "\n\n".join(paragraphs(10 + i))} for i in range(5)]
    return docs


# dropped id → kept id (the longest of each group; an edit makes a text longer here)
DROPPED = {"base": "reordered", "edits": "reordered", "other0": "other-copy"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("planted")
    path = folder / "docs.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in planted_documents()))
    return path


def options(corpus, out, **changes) -> BuildOptions:
    base = dict(inputs=[str(corpus)], out=str(out), order="random", seq_len=64, tail="pad", id_field="id",
                heldout_fraction=0.3)
    return BuildOptions(**{**base, **changes})


def letters(folder) -> list[dict]:
    return [json.loads(line) for f in sorted(folder.glob("*.jsonl")) for line in f.read_text().splitlines()]


def test_planted_copies_are_dropped_with_dead_letters_and_counts(corpus, tmp_path):
    out = tmp_path / "corpus"
    summary = build_corpus(options(corpus, out), log=lambda *_: None)
    docs = {d["id"]: d for d in planted_documents()}
    by_line = {i + 1: d for i, d in enumerate(planted_documents())}
    dead = [d for d in letters(out / "dead_letters") if d["reason"] == "near_duplicate"]
    assert sorted((by_line[d["line"]]["id"], d["detail"].split()[3].rstrip(",")) for d in dead) == sorted(DROPPED.items())
    assert all(d["snippet"] == by_line[d["line"]]["text"][:200] for d in dead)
    counts = summary.documents
    assert counts["dropped"] == {"near_duplicate": 3}
    assert counts["documents_kept"] == len(docs) - 3 == sum(counts["documents_per_split"].values())
    assert counts["tokens"] == sum(counts["tokens_per_split"].values())
    assert counts["near_dedup"]["groups"] == 2 and counts["near_dedup"]["documents_signed"] == len(docs)
    assert counts["near_dedup"]["dropped"] == 3
    assert sum(info["documents"] for info in summary.splits.values()) == len(docs) - 3
    text = "".join(all_text(out / split) for split in summary.splits)
    for doc_id, doc in docs.items():
        assert text.count(doc["text"]) == (0 if doc_id in DROPPED else 1), doc_id


def test_near_dedup_off_keeps_everything(corpus, tmp_path):
    out = tmp_path / "corpus"
    summary = build_corpus(options(corpus, out, near_dedup="off"), log=lambda *_: None)
    assert summary.documents["documents_kept"] == len(planted_documents())
    assert "near_dedup" not in summary.documents and "near_duplicate" not in summary.documents["dropped"]
    assert not [d for d in letters(out / "dead_letters") if d["reason"] == "near_duplicate"]


def test_rerun_skips_the_stage_and_keeps_its_dead_letters(corpus, tmp_path):
    out = tmp_path / "corpus"
    build_corpus(options(corpus, out), log=lambda *_: None)
    again = build_corpus(options(corpus, out), log=lambda *_: None)
    assert again.stages["documents"]["status"].startswith("skipped")
    assert again.documents["dropped"] == {"near_duplicate": 3}
    assert len([d for d in letters(out / "dead_letters") if d["reason"] == "near_duplicate"]) == 3


def _dedup(tmp_path, corpus, name, buckets, beam_args=(), **kwargs):
    """The documents stage without near-dedup, then the near-dedup step on its files."""
    out = tmp_path / name
    out.mkdir()
    opts = options(corpus, tmp_path, buckets=buckets, near_dedup="off")
    counts = run_documents_stage(documents_config(opts, None), BeamRunner(), [str(corpus)], str(out))
    runner = BeamRunner(flags=list(beam_args))  # worker processes for the near-dedup step only
    info, changes = drop_near_duplicates(minhash_config(opts), runner, bucket_files(str(out)), counts["documents_kept"],
                                         str(out), str(out / "near_dedup"), **kwargs)
    rows = pa.concat_tables([pq.read_table(f) for f in bucket_files(str(out))]).sort_by("content_hash")
    dead = sorted((d["line"], d["detail"]) for d in letters(out / "dead_letters") if d["reason"] == "near_duplicate")
    return {k: info[k] for k in ("groups", "dropped", "documents_signed")}, changes, rows, dead


@pytest.fixture(scope="module")
def one_bucket(corpus, tmp_path_factory):
    found = _dedup(tmp_path_factory.mktemp("one"), corpus, "one", buckets=1)
    info, changes, rows, dead = found
    assert info["dropped"] == 3 and len(dead) == 3 and rows.num_rows == len(planted_documents()) - 3
    assert changes["documents_kept"] == -3 and changes["dropped.near_duplicate"] == 3
    return found


def test_same_result_for_any_bucket_count(corpus, tmp_path, one_bucket):
    # 4 documents buckets, 3 LSH buckets, group leaders instead of all pairs.
    many = _dedup(tmp_path, corpus, "many", buckets=4, lsh_buckets=3, pairwise_limit=1)
    assert len(bucket_files(str(tmp_path / "many"))) > 1
    assert many[0] == one_bucket[0] and many[1] == one_bucket[1] and many[3] == one_bucket[3]
    assert many[2].equals(one_bucket[2])


@pytest.mark.slow
def test_same_result_on_two_worker_processes(corpus, tmp_path, one_bucket):
    two = _dedup(tmp_path, corpus, "two", buckets=1, beam_args=TWO_WORKERS, lsh_buckets=2)
    assert two[0] == one_bucket[0] and two[1] == one_bucket[1] and two[3] == one_bucket[3]
    assert two[2].equals(one_bucket[2])


@pytest.mark.parametrize("bad", [dict(near_dedup="maybe"), dict(near_dedup_threshold=1.5),
                                 dict(near_dedup_threshold=0.0), dict(near_dedup_bands=0)])
def test_bad_near_dedup_options_are_refused_in_one_line(corpus, tmp_path, bad):
    with pytest.raises(LoryDataError, match="--near-dedup"):
        options(corpus, tmp_path, **bad).validate()
