"""Fields by path (jsonl objects and Parquet structs), non-string domains as canonical JSON,
and domains taken from the file's path."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lorydata.documents import DeadLetter, Document
from lorydata.errors import LoryDataError
from lorydata.fields import MISSING, PathDomain, field_text, get_field, schema_column
from lorydata.readers import ReaderConfig, read_file

PILE = [  # The Pile keeps its domain in meta.pile_set_name
    {"text": "def f(): pass", "meta": {"pile_set_name": "Github"}},
    {"text": "Abstract. We study", "meta": {"pile_set_name": "ArXiv"}},
]
REDPAJAMA = [  # RedPajama keeps an object in meta, keys in any order
    {"text": "first", "meta": {"source": "c4", "lang": "en"}},
    {"text": "second", "meta": {"lang": "en", "source": "c4"}},
]


def docs_of(path, config):
    records = list(read_file(str(path), config))
    return [r for r in records if isinstance(r, Document)], [r for r in records if isinstance(r, DeadLetter)]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_get_field_rule():
    record = {"a": {"b": {"c": 1}}, "a.b": {"c": 2}, "x.y": 3, "x": {"y": 4}, "n": None, "m": {"k": None}}
    assert get_field(record, "x.y") == 3  # a literal key wins
    assert get_field(record, "a.b.c") == 2  # the longest key prefix first
    assert get_field({"a": {"b": {"c": 1}}, "a.b": {"z": 2}}, "a.b.c") == 1  # then shorter ones
    assert get_field(record, "n") is None and get_field(record, "m.k") is None  # present nulls
    assert get_field(record, "a.q") is MISSING and get_field(record, "n.k") is MISSING
    assert get_field({"l": [{"a": 1}]}, "l.0.a") is MISSING  # lists are not indexed


def test_dotted_text_domain_and_id_fields_in_jsonl(tmp_path):
    rows = [{"id": {"n": 7}, "meta": {"pile_set_name": "Github", "body": {"text": "nested text"}}}]
    path = write_jsonl(tmp_path / "a.jsonl", rows)
    config = ReaderConfig(text_field="meta.body.text", domain_field="meta.pile_set_name", id_field="id.n")
    docs, dead = docs_of(path, config)
    assert dead == [] and [(d.text, d.domain, d.id) for d in docs] == [("nested text", "Github", "7")]


def test_pile_domains_and_redpajama_objects(tmp_path):
    docs, _ = docs_of(write_jsonl(tmp_path / "pile.jsonl", PILE), ReaderConfig(domain_field="meta.pile_set_name"))
    assert [d.domain for d in docs] == ["Github", "ArXiv"]
    docs, _ = docs_of(write_jsonl(tmp_path / "rp.jsonl", REDPAJAMA), ReaderConfig(domain_field="meta"))
    assert [d.domain for d in docs] == ['{"lang":"en","source":"c4"}'] * 2  # one domain, never a repr


def test_literal_dotted_key_wins_over_the_path(tmp_path):
    rows = [{"text": "t", "meta.source": "literal", "meta": {"source": "nested"}},
            {"text": "u", "meta": {"source": "nested"}}]
    docs, _ = docs_of(write_jsonl(tmp_path / "a.jsonl", rows), ReaderConfig(domain_field="meta.source"))
    assert [d.domain for d in docs] == ["literal", "nested"]


def test_field_text_is_canonical_json():
    assert field_text("plain") == "plain" and field_text(None) == "" and field_text(MISSING) == ""
    assert field_text(3) == "3" and field_text(1.5) == "1.5" and field_text(True) == "true"
    assert field_text({"b": [1, None], "a": "é"}) == '{"a":"é","b":[1,null]}'
    assert field_text(["x", {"z": 1, "y": 2}]) == '["x",{"y":2,"z":1}]'
    assert field_text({"when": b"\xff raw"}) == '{"when":"\ufffd raw"}'


def test_missing_nested_text_is_a_dead_letter_naming_fields(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"content": "x", "meta": {"a": 1}}])
    _, dead = docs_of(path, ReaderConfig(text_field="meta.text"))
    assert [(d.reason, d.detail, d.fields) for d in dead] == [("missing_text", "no field 'meta.text'", ("content", "meta"))]


def write_parquet(path, rows, schema=None):
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


def test_parquet_struct_columns(tmp_path):
    path = write_parquet(tmp_path / "pile.parquet", PILE)
    docs, dead = docs_of(path, ReaderConfig(domain_field="meta.pile_set_name"))
    assert dead == [] and [(d.text, d.domain, d.line) for d in docs] == [
        ("def f(): pass", "Github", 1), ("Abstract. We study", "ArXiv", 2)]
    docs, _ = docs_of(write_parquet(tmp_path / "rp.parquet", REDPAJAMA), ReaderConfig(domain_field="meta"))
    assert {d.domain for d in docs} == {'{"lang":"en","source":"c4"}'}


def test_parquet_text_inside_a_struct_and_literal_dotted_columns(tmp_path):
    rows = [{"doc": {"body": "in a struct", "n": 1}, "a.b": "literal column", "a": {"b": "struct child"}}]
    path = write_parquet(tmp_path / "x.parquet", rows)
    docs, _ = docs_of(path, ReaderConfig(text_field="doc.body", domain_field="a.b"))
    assert [(d.text, d.domain) for d in docs] == [("in a struct", "literal column")]
    schema = pq.read_schema(path)
    assert schema_column(schema, "doc.body") == "doc" and schema_column(schema, "a.b") == "a.b"
    assert schema_column(schema, "doc.missing") is None and schema_column(schema, "doc.body.deeper") is None


def test_parquet_missing_struct_child_is_one_dead_letter_for_the_file(tmp_path):
    path = write_parquet(tmp_path / "x.parquet", PILE)
    docs, dead = docs_of(path, ReaderConfig(text_field="meta.text"))
    assert docs == []
    assert [(d.reason, d.line, d.records, d.fields) for d in dead] == [("missing_text", 0, 2, ("meta", "text"))]


def test_parquet_batches_follow_the_declared_row_size(tmp_path, monkeypatch):
    import lorydata.readers as readers

    rows = [{"text": f"{i} " + "w" * 5000} for i in range(40)]
    path = write_parquet(tmp_path / "wide.parquet", rows)
    monkeypatch.setattr(readers, "PARQUET_BATCH_BYTES", 20_000)  # four rows' worth
    sizes = []
    original = pq.ParquetFile.iter_batches

    def spy(self, batch_size, **kwargs):
        sizes.append(batch_size)
        return original(self, batch_size=batch_size, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    docs, _ = docs_of(path, ReaderConfig())
    assert [d.text for d in docs] == [r["text"] for r in rows]
    assert sizes == [3]  # 20,000 bytes / ~5,007 bytes a row


@pytest.mark.parametrize(("spec", "path", "domain"), [
    ("parent", "pile/Github/00.jsonl", "Github"),
    ("parent", "s3://bucket/wiki/part-0.parquet", "wiki"),
    ("corpus/([^/]+)/", "data/corpus/wiki/part-0.txt", "wiki"),
    (r"(?P<lang>\w\w)/(?P<domain>[^/]+)\.jsonl", "x/en/news.jsonl", "news"),
    ("corpus/([^/]+)/", "elsewhere/a.txt", None),
])
def test_path_domain(spec, path, domain):
    assert PathDomain(spec).domain_of(path) == domain


def test_bad_domain_from_path_is_an_error_at_configuration():
    with pytest.raises(LoryDataError, match="not a regular expression"):
        ReaderConfig(domain_from_path="corpus/([^/]+")
    with pytest.raises(LoryDataError, match="needs a capture group"):
        ReaderConfig(domain_from_path="corpus/")
    assert PathDomain("x/(a)").unmatched(["x/a/1.txt", "y/b.txt"]) == ["y/b.txt"]
    config = ReaderConfig(domain_from_path="x/(a)")
    config.check_paths(["x/a/1.txt"])
    with pytest.raises(LoryDataError, match=r"^--domain-from-path 'x/\(a\)' does not match y/b\.txt, y/c\.txt$"):
        config.check_paths(["x/a/1.txt", "y/b.txt", "y/c.txt"])
    ReaderConfig(domain_from_path="parent").check_paths(["a.txt", "/b.txt"])  # parent always answers


def test_txt_tree_takes_its_domain_from_the_folder(tmp_path):
    for domain in ("law", "code"):
        (tmp_path / "corpus" / domain).mkdir(parents=True)
        (tmp_path / "corpus" / domain / "doc.txt").write_text(f"a {domain} document")
    for spec in ("parent", "corpus/([^/]+)/"):
        config = ReaderConfig(domain_from_path=spec)
        for domain in ("law", "code"):
            docs, _ = docs_of(tmp_path / "corpus" / domain / "doc.txt", config)
            assert [(d.text, d.domain) for d in docs] == [(f"a {domain} document", domain)]


def test_domain_field_wins_and_the_path_fills_in(tmp_path):
    (tmp_path / "books").mkdir()
    path = write_jsonl(tmp_path / "books" / "a.jsonl", [{"text": "x", "src": "given"}, {"text": "y"}, {"text": "z", "src": ""}])
    docs, _ = docs_of(path, ReaderConfig(domain_field="src", domain_from_path="parent"))
    assert [d.domain for d in docs] == ["given", "books", "books"]
