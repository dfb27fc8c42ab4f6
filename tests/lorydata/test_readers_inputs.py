"""Input selection that says what it does: data files only from folders, the rest skipped
and counted; non-data files named explicitly or by a glob are an error; the output folder
is never read; pluggable lister and opener (the object-store file layer)."""

import io
import json
import os

import pytest

from lorydata.documents import Document
from lorydata.errors import InputNotFoundError, LoryDataError
from lorydata.inputs import FORMATS, InputSelection, accepted_suffixes, file_format, select_inputs
from lorydata.readers import ReaderConfig, expand_inputs, read_file


def make_dump(root):
    """A Hugging Face-style folder: data, metadata and clutter."""
    (root / "data").mkdir(parents=True)
    (root / "data" / "train.jsonl").write_text('{"text": "a"}\n')
    (root / "data" / "more.json").write_bytes(b'\xef\xbb\xbf{"text": "b"}\n{"text": "c"}\n')  # JSON lines, a BOM
    (root / "data" / "dataset_info.json").write_text('{"description": "x", "features": {}}')
    (root / "data" / "pretty.json").write_text('{\n  "citation": "",\n  "splits": {}\n}\n')
    (root / "data" / "array.json").write_text('[{"text": "an array document"}]\n')
    (root / "README.md").write_text("# a dataset card")
    (root / "LICENSE").write_text("MIT")
    (root / ".hidden.jsonl").write_text('{"text": "hidden"}\n')
    (root / ".git").mkdir()
    (root / ".git" / "x.jsonl").write_text('{"text": "git"}\n')
    (root / "_work").mkdir()
    (root / "_work" / "y.jsonl").write_text('{"text": "work"}\n')
    return root


def test_folder_takes_data_files_and_counts_the_rest(tmp_path):
    root = make_dump(tmp_path / "dump")
    selection = select_inputs([str(root)])
    assert [os.path.relpath(f, root) for f in selection.files] == ["data/more.json", "data/train.jsonl"]
    rel = {reason: sorted(os.path.relpath(p, root) + ("/" if p.endswith("/") else "") for p in paths)
           for reason, paths in selection.skipped.items()}
    assert rel == {
        "hidden": [".git/", ".hidden.jsonl", "_work/"],
        "metadata": ["data/array.json", "data/dataset_info.json", "data/pretty.json"],
        "not_data": ["LICENSE", "README.md"],
    }
    assert selection.counts() == {"hidden": 3, "metadata": 3, "not_data": 2}
    assert selection.describe() == ("2 input files; skipped 8: 3 hidden (.git/, .hidden.jsonl, …), "
                                    "3 metadata (array.json, dataset_info.json, …), 2 not_data (LICENSE, README.md)")
    assert expand_inputs([str(root)]) == selection.files  # the list API of existing callers


def test_named_or_globbed_non_data_files_are_one_line_errors(tmp_path):
    root = make_dump(tmp_path / "dump")
    with pytest.raises(LoryDataError, match=r"glob '.*/dump/\*' matches .*LICENSE \(not a data file\)") as err:
        select_inputs([str(root / "*")])
    assert "\n" not in str(err.value) and accepted_suffixes() in str(err.value)
    with pytest.raises(LoryDataError, match=r"README\.md \(not a data file\)"):
        select_inputs([str(root / "README.md")])
    with pytest.raises(LoryDataError, match=r"pretty\.json \(a JSON document, not JSON lines"):
        select_inputs([str(root / "data" / "*.json")])
    with pytest.raises(LoryDataError, match=r"dataset_info\.json \(dataset_info\.json is dataset metadata\)"):
        select_inputs([str(root / "data" / "dataset_info.json")])
    assert select_inputs([str(root / "data" / "*.jsonl")]).files == [str(root / "data" / "train.jsonl")]


def test_globs_skip_hidden_names_like_folders(tmp_path):
    root = make_dump(tmp_path / "dump")
    selection = select_inputs([str(root / "**" / "*.jsonl")])
    assert selection.files == [str(root / "data" / "train.jsonl")]
    assert selection.skipped == {"hidden": [str(root / ".git") + "/", str(root / ".hidden.jsonl"), str(root / "_work") + "/"]}


def test_folder_of_only_clutter_says_what_it_skipped(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "README.md").write_text("x")
    with pytest.raises(InputNotFoundError, match=r"docs \(no data files; skipped 1 not_data\)"):
        select_inputs([str(tmp_path / "docs")])


def test_output_folder_inside_an_input_folder_is_left_out(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_text('{"text": "a"}\n')
    out = tmp_path / "in" / "corpus"
    (out / "dead_letters").mkdir(parents=True)
    (out / "dead_letters" / "read.jsonl").write_text('{"source": "x", "reason": "empty"}\n')
    (out / "train").mkdir()
    (out / "train" / "manifest.json").write_text('{"format": 1}')
    selection = select_inputs([str(tmp_path / "in")], exclude=str(out))
    assert selection.files == [str(tmp_path / "in" / "a.jsonl")]
    assert selection.skipped == {"output": [str(out) + "/"]}
    # a glob reaching into it, and the same folder through another spelling
    selection = select_inputs([str(tmp_path / "in" / "**" / "*.jsonl")], exclude=str(tmp_path / "in" / "." / "corpus"))
    assert selection.files == [str(tmp_path / "in" / "a.jsonl")] and selection.counts() == {"output": 1}
    with pytest.raises(LoryDataError, match="inside the output folder"):
        select_inputs([str(out)], exclude=str(out))


def test_accepted_suffixes_are_the_formats():
    assert sorted(accepted_suffixes().split()) == sorted(FORMATS)
    for suffix in FORMATS:
        assert file_format("x" + suffix.upper()) == FORMATS[suffix]
    assert file_format("x.md") is None and file_format("x.json.bz2") is None


class MemoryStore:
    """An object store in a dict: a lister (`*` within a folder, `**` across) and an opener,
    like the pair a Beam pipeline builds on FileSystems."""

    def __init__(self, objects: dict[str, bytes]):
        self.objects, self.opened = objects, []

    def lister(self, pattern: str) -> list[str]:
        import re

        if "*" not in pattern:
            return [pattern] if pattern in self.objects else []
        regex = re.escape(pattern).replace(r"\*\*", ".*").replace(r"\*", "[^/]*")
        return sorted(k for k in self.objects if re.fullmatch(regex, k))

    def opener(self, path: str):
        self.opened.append(path)
        return io.BytesIO(self.objects[path])


def test_lister_and_opener_serve_another_file_layer(tmp_path):
    store = MemoryStore({
        "mem://b/dump/a.jsonl": b'{"text": "from the store"}\n',
        "mem://b/dump/sub/b.json": b'{"text": "also"}\n',
        "mem://b/dump/dataset_info.json": b'{\n "x": 1\n}\n',
        "mem://b/dump/.cache/c.jsonl": b'{"text": "hidden"}\n',
        "mem://b/dump/out/x.jsonl": b'{"text": "output"}\n',
    })
    selection = select_inputs(["mem://b/dump"], exclude="mem://b/dump/out", lister=store.lister, opener=store.opener)
    assert selection.files == ["mem://b/dump/a.jsonl", "mem://b/dump/sub/b.json"]
    assert selection.skipped == {"hidden": ["mem://b/dump/.cache/"], "metadata": ["mem://b/dump/dataset_info.json"],
                                 "output": ["mem://b/dump/out/"]}
    assert "mem://b/dump/sub/b.json" in store.opened  # its first line was looked at through the opener
    assert select_inputs(["mem://b/dump/*.jsonl"], lister=store.lister).files == ["mem://b/dump/a.jsonl"]
    with pytest.raises(InputNotFoundError):
        select_inputs(["mem://b/nothing"], lister=store.lister)
    docs = [d for d in read_file("mem://b/dump/a.jsonl", ReaderConfig(), opener=store.opener) if isinstance(d, Document)]
    assert [d.text for d in docs] == ["from the store"]


def test_opener_is_used_by_every_format(tmp_path):
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    payload = json.dumps({"text": "via opener"}).encode() + b"\n"
    sink = io.BytesIO()
    pq.write_table(pa.table({"text": ["via opener"]}), sink)
    store = MemoryStore({"m://a.jsonl": payload, "m://a.jsonl.gz": gzip.compress(payload),
                         "m://a.jsonl.zst": zstandard.ZstdCompressor().compress(payload),
                         "m://a.parquet": sink.getvalue(), "m://a.txt": b"via opener"})
    for path in store.objects:
        docs = [d for d in read_file(path, ReaderConfig(), opener=store.opener) if isinstance(d, Document)]
        assert [d.text for d in docs] == ["via opener"], path
    assert sorted(store.opened) == sorted(store.objects)


def test_selection_is_a_plain_result():
    selection = InputSelection(["a.jsonl"], {})
    assert selection.describe() == "1 input file" and selection.counts() == {}
