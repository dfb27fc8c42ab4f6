"""No silent loss: a per-file summary of the read step, a one-line warning for a file whose
records were mostly dropped (naming reason and field), and --strict turning it into an error."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lorydata.clean import CleanConfig, clean_document
from lorydata.documents import DeadLetter, Document
from lorydata.errors import LoryDataError
from lorydata.read_summary import FileSummary, check_losses, loss_warning, loss_warnings
from lorydata.readers import ReaderConfig, read_file


def summarise(path, config, cleaner=CleanConfig()) -> FileSummary:
    """What the read step does per file: read, clean, count."""
    summary = FileSummary(str(path))
    for record in read_file(str(path), config):
        summary.add(record if isinstance(record, DeadLetter) else clean_document(record, cleaner))
    return summary


def write_lines(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def two_files(tmp_path):
    """400 good records in one file; 350 records whose text is under another key in the other."""
    good = write_lines(tmp_path / "good.jsonl", [{"text": f"document {i}"} for i in range(400)])
    bad = write_lines(tmp_path / "f.jsonl", [{"content": f"document {i}", "meta": {"i": i}} for i in range(350)])
    return good, bad


def test_a_partly_wrong_text_field_is_one_warning_line(tmp_path):
    good, bad = two_files(tmp_path)
    summaries = [summarise(good, ReaderConfig()), summarise(bad, ReaderConfig())]
    assert (summaries[0].records, summaries[0].kept, summaries[0].dropped) == (400, 400, {})
    assert (summaries[1].records, summaries[1].kept, summaries[1].dropped) == (350, 0, {"missing_text": 350})
    assert loss_warnings(summaries) == [
        f"{bad}: 350 of 350 records dropped: missing_text (no field 'text'; fields seen: content, meta)"]
    assert check_losses(summaries, strict=False) == loss_warnings(summaries)
    with pytest.raises(LoryDataError, match=r"^--strict: .*f\.jsonl: 350 of 350 records dropped: missing_text"):
        check_losses(summaries, strict=True)


def test_mixed_reasons_name_the_main_one_and_the_rest(tmp_path):
    rows = [{"text": "x"}] * 2 + [{"body": "y"}] * 5 + [{"text": 3}] * 2 + [{"text": "   "}]
    path = write_lines(tmp_path / "m.jsonl", rows)
    summary = summarise(path, ReaderConfig())
    assert summary.dropped == {"missing_text": 5, "non_string_text": 2, "empty": 1}
    assert loss_warning(summary) == (f"{path}: 8 of 10 records dropped: missing_text 5 (no field 'text'; fields seen:"
                                     " body); also non_string_text 2, empty 1")


def test_a_file_losing_at_most_half_is_quiet(tmp_path):
    rows = [{"text": "kept"}] * 5 + [{"body": "lost"}] * 5
    summary = summarise(write_lines(tmp_path / "half.jsonl", rows), ReaderConfig())
    assert loss_warning(summary) is None and check_losses([summary], strict=True) == []
    assert loss_warning(summary, max_dropped_share=0.4) is not None


def test_parquet_without_the_column_counts_every_row(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"body": ["a", "b", "c"], "meta": [1, 2, 3]}), path)
    summary = summarise(path, ReaderConfig())
    assert (summary.records, summary.dropped) == (3, {"missing_text": 3})
    assert loss_warning(summary) == f"{path}: 3 of 3 records dropped: missing_text (no column 'text' (3 rows); fields seen: body, meta)"


def test_missing_domains_warn_when_a_domain_was_asked_for(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [{"text": f"t{i}", "meta": {"set": "x"}} for i in range(4)])
    summary = summarise(path, ReaderConfig(domain_field="meta.subset"))
    assert summary.without_domain == 4
    assert loss_warning(summary) is None  # no domain asked for: nothing to say
    assert loss_warning(summary, domain_wanted=True) == f"{path}: 4 of 4 documents have no domain (the domain field is missing or empty)"


def test_summaries_merge_and_travel_as_json(tmp_path):
    _, bad = two_files(tmp_path)
    whole = summarise(bad, ReaderConfig())
    part = FileSummary(str(bad))
    part.add(Document("i", "t", str(bad), 1))
    part.add(DeadLetter(str(bad), 2, "too_short", "1 chars < min_chars 5", fields=("zeta",)))
    merged = whole.merge(part)
    assert (merged.records, merged.kept, merged.dropped) == (352, 1, {"missing_text": 350, "too_short": 1})
    assert merged.fields_seen == ["content", "meta", "zeta"]
    assert FileSummary.from_dict(json.loads(json.dumps(merged.to_dict()))) == merged
    assert (whole.records, whole.kept) == (350, 0)  # merge leaves its inputs alone
