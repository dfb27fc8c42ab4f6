import json

import pytest
import zstandard

from lorydata.clean import CleanConfig, ExactDeduper, clean_document
from lorydata.documents import DeadLetter, Document
from lorydata.errors import InputNotFoundError, LoryDataError
from lorydata.readers import ReaderConfig, decode_utf8, expand_inputs, read_file, read_inputs
from tests.lorydata.badcorpus import GOOD, MAX_CHARS, write_bad_corpus, write_formats


def split(records):
    docs = [r for r in records if isinstance(r, Document)]
    dead = [r for r in records if isinstance(r, DeadLetter)]
    return docs, dead


@pytest.mark.parametrize("fmt", ["jsonl", "jsonl.gz", "jsonl.zst", "parquet", "txt"])
def test_every_format_reads_the_same_texts(tmp_path, fmt):
    paths = write_formats(tmp_path)
    config = ReaderConfig(domain_field="domain", id_field="id")
    docs, dead = split(list(read_inputs([paths[fmt]], config)))
    assert dead == []
    assert sorted(d.text for d in docs) == sorted(g["text"] for g in GOOD[:2])
    if fmt != "txt":  # txt files carry no fields
        assert {d.id: d.domain for d in docs} == {"g1": "animals", "g2": "sql"}
        assert all(d.line >= 1 for d in docs)


def test_bad_records_become_dead_letters_and_good_ones_all_arrive(tmp_path):
    expected = write_bad_corpus(tmp_path)
    config = ReaderConfig(domain_field="domain", id_field="id", max_chars=MAX_CHARS)
    docs, dead = split(list(read_file(str(tmp_path / "bad.jsonl"), config)))
    cleaned, dedup = [], ExactDeduper()
    for doc in docs:
        result = clean_document(doc, CleanConfig(max_chars=MAX_CHARS))
        if isinstance(result, DeadLetter):
            dead.append(result)
        elif dedup.first_of(result) is None:
            cleaned.append(result)
        else:
            dead.append(DeadLetter(result.source, result.line, "duplicate"))
    assert {d.id for d in cleaned} == expected["good_ids"]
    assert {(d.line, d.reason) for d in dead} == expected["dead"]
    assert all((d.source.endswith("bad.jsonl") and d.detail) or d.reason == "duplicate" for d in dead)
    latin1 = next(d for d in cleaned if d.id == "latin1")
    assert latin1.replacements == expected["replacements"]
    assert "\ufffd" in latin1.text


def test_decode_counts_only_new_replacements():
    assert decode_utf8("already \ufffd here".encode()) == ("already \ufffd here", 0)
    text, n = decode_utf8(b"\xff ok " + "\ufffd".encode())
    assert n == 1 and text == "\ufffd ok \ufffd"


def test_enormous_line_is_skipped_without_parsing(tmp_path):
    config = ReaderConfig(max_chars=100, max_line_bytes=1000)
    path = tmp_path / "big.jsonl"
    huge = json.dumps({"text": "y" * 3_000_000})
    path.write_text(json.dumps({"text": "before"}) + "\n" + huge + "\n" + json.dumps({"text": "after"}) + "\n")
    docs, dead = split(list(read_file(str(path), config)))
    assert [d.text for d in docs] == ["before", "after"]
    assert [(d.line, d.reason) for d in dead] == [(2, "line_too_long")]
    assert dead[0].detail == f"line of {len(huge) + 1} bytes > max_line_bytes 1000"
    assert dead[0].snippet.startswith('{"text": "yyy')


def test_line_limit_is_exact_and_separate_from_max_chars(tmp_path):
    fits = json.dumps({"text": "z" * 80})
    path = tmp_path / "edge.jsonl"
    path.write_bytes((fits + "\n" + fits + " \n" + fits).encode())  # the last line has no newline
    docs, dead = split(list(read_file(str(path), ReaderConfig(max_line_bytes=len(fits)))))
    assert [d.line for d in docs] == [1, 3]
    assert [(d.line, d.reason) for d in dead] == [(2, "line_too_long")]
    # a long line within max_line_bytes is parsed, and its text judged by max_chars
    docs, dead = split(list(read_file(str(path), ReaderConfig(max_chars=50))))
    assert docs == [] and {d.reason for d in dead} == {"too_long"}


def test_truncated_zstd_keeps_documents_before_the_damage(tmp_path):
    payload = "".join(json.dumps({"text": f"document number {i} " * 20}) + "\n" for i in range(2000)).encode()
    blob = zstandard.ZstdCompressor().compress(payload)
    path = tmp_path / "cut.jsonl.zst"
    path.write_bytes(blob[: len(blob) // 2])
    docs, dead = split(list(read_file(str(path), ReaderConfig())))
    assert 0 < len(docs) < 2000
    assert [d.reason for d in dead] == ["unreadable"]
    assert dead[0].line == len(docs) + 1


def test_missing_inputs_are_named_before_any_work(tmp_path):
    (tmp_path / "real.jsonl").write_text('{"text": "x"}\n')
    with pytest.raises(InputNotFoundError, match=r"missing\.jsonl.*nope/\*\.zst"):
        expand_inputs([str(tmp_path / "real.jsonl"), str(tmp_path / "missing.jsonl"), str(tmp_path / "nope/*.zst")])


def test_globs_and_folders_expand_to_supported_files(tmp_path):
    paths = write_formats(tmp_path)
    (tmp_path / "notes.md").write_text("ignored inside a folder")
    files = expand_inputs([str(tmp_path)])
    assert set(files) == {paths[k] for k in ("jsonl", "jsonl.gz", "jsonl.zst", "parquet")} | {
        str(tmp_path / "texts" / "g1.txt"), str(tmp_path / "texts" / "g2.txt")}
    assert expand_inputs([str(tmp_path / "*.jsonl*")]) == sorted([paths["jsonl"], paths["jsonl.gz"], paths["jsonl.zst"]])
    with pytest.raises(LoryDataError, match=r"notes\.md \(not a data file\); data files end in \.json "):
        expand_inputs([str(tmp_path / "notes.md")])


def test_parquet_without_text_column_is_one_dead_letter(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["a", "b"]}), tmp_path / "x.parquet")
    docs, dead = split(list(read_file(str(tmp_path / "x.parquet"), ReaderConfig())))
    assert docs == [] and [d.reason for d in dead] == ["missing_text"]
