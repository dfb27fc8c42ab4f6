"""The documents stage through content-hash bucket files: same documents for any bucket
count, exact dedup across input files, bucket files in hash order."""

import json

import pyarrow as pa
import pyarrow.parquet as pq

from lorydata.clean import content_hash
from lorydata.tokenizer_fast import default_threads
from pipelines.build_corpus import documents_config
from pipelines.documents import run_documents_stage
from pipelines.documents.dedup import DOCUMENT_SCHEMA, first_copies
from pipelines.documents.read import RAW_SCHEMA, bucket_of
from pipelines.layout import documents_files as bucket_files
from pipelines.options import BuildOptions
from pipelines.runner import beam as beam_runner
from pipelines.runner.beam import BeamRunner
from tests.lorydata.badcorpus import write_bad_corpus


def _stage(tmp_path, src, name, buckets):
    out = tmp_path / name
    out.mkdir()
    options = BuildOptions(inputs=[str(src)], out=str(out), buckets=buckets, domain_field="domain",
                           id_field="id", max_chars=2000, heldout_fraction=0.3)
    counts = run_documents_stage(documents_config(options, None), BeamRunner(), sorted(str(p) for p in src.glob("*.jsonl")),
                                 str(out))
    return out, counts


def _letters(folder):
    return sorted((d["source"].rsplit("/", 1)[-1], d["line"], d["reason"], d["detail"])
                  for f in (folder / "dead_letters").glob("*.jsonl")
                  for d in map(json.loads, f.read_text().splitlines()))


def test_bucket_count_changes_nothing_but_the_files(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    expected = write_bad_corpus(src)
    # A second file repeating two documents: the copies in bad.jsonl come first by source.
    (src / "more.jsonl").write_text("".join(json.dumps(d) + "\n" for d in [
        {"id": "m1", "text": "The quick brown fox jumps over the lazy dog."},
        {"id": "m2", "text": "A document that only this file holds."},
        {"id": "m3", "text": "SELECT * FROM pg_class WHERE relkind = 'r';"}]))
    one, counts_one = _stage(tmp_path, src, "one", 1)
    many, counts_many = _stage(tmp_path, src, "many", 5)
    assert counts_one["documents_kept"] == counts_many["documents_kept"] == len(expected["good_ids"]) + 1
    assert counts_one["dropped"] == counts_many["dropped"] and counts_many["dropped"]["duplicate"] == 3
    assert {k: v for k, v in counts_one.items() if k != "buckets"} == {k: v for k, v in counts_many.items()
                                                                       if k != "buckets"}
    assert _letters(one) == _letters(many)
    dups = [letter for letter in _letters(many) if letter[2] == "duplicate"]
    assert [(d[0], d[1]) for d in dups] == [("bad.jsonl", 13), ("more.jsonl", 1), ("more.jsonl", 3)]
    tables = [pq.read_table(f) for f in bucket_files(str(many))]
    assert len(tables) > 1 and all(t.schema.equals(DOCUMENT_SCHEMA) for t in tables)
    merged = pa.concat_tables(tables)
    hashes = merged.column("content_hash").to_pylist()
    assert hashes == sorted(hashes), "bucket files in name order must list documents in hash order"
    assert merged.equals(pq.read_table(bucket_files(str(one))[0]))
    for i, path in enumerate(bucket_files(str(many))):
        assert {bucket_of(h, 5) for h in pq.read_table(path).column("content_hash").to_pylist()} == \
            {int(path.rsplit("/b", 1)[1][:5])}, i
    assert counts_many["documents_per_split"]["heldout"] > 0
    assert sum(counts_many["tokens_per_split"].values()) == counts_many["tokens"]


def test_first_copies_keeps_the_earliest_by_source_and_line():
    text = "same text"
    rows = [{"content_hash": content_hash(text), "id": str(i), "domain": "", "source": src, "line": line,
             "text": text} for i, (src, line) in enumerate([("b.jsonl", 1), ("a.jsonl", 9), ("a.jsonl", 2)])]
    rows.append({"content_hash": content_hash("other"), "id": "x", "domain": "", "source": "b.jsonl", "line": 5,
                 "text": "other"})
    kept, letters = first_copies(pa.Table.from_pylist(rows, schema=RAW_SCHEMA))
    assert sorted(kept.column("id").to_pylist()) == ["2", "x"]
    assert sorted((d.source, d.line, d.detail) for d in letters) == [
        ("a.jsonl", 9, "same text as a.jsonl:2"), ("b.jsonl", 1, "same text as a.jsonl:2")]


def test_a_large_input_goes_to_worker_processes_on_the_default_runner_only():
    big, small = beam_runner.PROCESSES_FROM_BYTES, beam_runner.PROCESSES_FROM_BYTES - 1
    cores = default_threads()
    assert BeamRunner().local_processes(big) == cores and BeamRunner().local_processes(small) == 1
    assert BeamRunner().threads_per_worker(cores) == (1 if cores > 1 else None)
    # what the user chose is left as it is: their own --direct_* flags, another runner
    assert BeamRunner(flags=["--direct_num_workers=1"]).local_processes(big) == 1
    assert BeamRunner(name="DaskRunner").local_processes(big) == 1


def test_worker_processes_write_the_same_documents_quietly(tmp_path, monkeypatch, capfd):
    src = tmp_path / "src"
    src.mkdir()
    write_bad_corpus(src)
    here, counts_here = _stage(tmp_path, src, "here", 3)
    capfd.readouterr()
    monkeypatch.setattr(beam_runner, "PROCESSES_FROM_BYTES", 0)  # this tiny input counts as large
    monkeypatch.setattr(beam_runner, "default_threads", lambda: 2)
    asked = []
    pipeline = BeamRunner.pipeline
    monkeypatch.setattr(BeamRunner, "pipeline", lambda self, processes=1: asked.append(processes) or
                        pipeline(self, processes))
    there, counts_there = _stage(tmp_path, src, "there", 3)
    assert asked[0] == 2 and set(asked[1:]) == {1}  # read + dedup on two processes, near-dedup here
    assert counts_there == counts_here and _letters(there) == _letters(here)
    files = bucket_files(str(there))
    assert [f.rsplit("/", 1)[-1] for f in files] == [f.rsplit("/", 1)[-1] for f in bucket_files(str(here))]
    for a, b in zip(files, bucket_files(str(here)), strict=True):
        assert pq.read_table(a).equals(pq.read_table(b))
    output = capfd.readouterr()
    assert "sdk_worker" not in output.err + output.out and "Worker:" not in output.err + output.out
