"""Per-file read summaries: records read, documents kept and dropped per reason, and the
one-line warning for a file that lost most of its records (an error under `--strict`).

A text field missing in some input files drops every record of those files; counted only
in a total, that loss is invisible. The read step keeps one `FileSummary` per input file
(`add` each reader record after cleaning), the driver merges them and prints
`loss_warnings`; with `--strict` `check_losses` raises instead.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from lorydata.documents import DeadLetter, Document
from lorydata.errors import LoryDataError

MAX_DROPPED_SHARE = 0.5
_MAX_FIELDS = 12


@dataclass
class FileSummary:
    """What reading one file gave.

    Args:
        source: the file.
        records: records read (documents plus dead letters; a whole-file dead letter counts
            the records it stands for).
        kept: documents that passed the reader and cleaning.
        dropped: reason → records dropped.
        details: reason → the first dead letter's detail (it names the field).
        fields_seen: top-level field names of records that lacked the wanted field
            (at most 12, sorted).
        without_domain: kept documents whose domain came out empty.
    """

    source: str
    records: int = 0
    kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    details: dict[str, str] = field(default_factory=dict)
    fields_seen: list[str] = field(default_factory=list)
    without_domain: int = 0

    def add(self, record: Document | DeadLetter) -> None:
        """Count one record: a cleaned document or the dead letter that replaced it."""
        if isinstance(record, Document):
            self.records += 1
            self.kept += 1
            self.without_domain += not record.domain
            return
        self.records += record.records
        self.dropped[record.reason] = self.dropped.get(record.reason, 0) + record.records
        self.details.setdefault(record.reason, record.detail)
        if record.fields and len(self.fields_seen) < _MAX_FIELDS:
            self.fields_seen = sorted(set(self.fields_seen) | set(record.fields))[:_MAX_FIELDS]

    def merge(self, other: FileSummary) -> FileSummary:
        """The sum of two summaries of the same file (parts read by different workers)."""
        merged = FileSummary.from_dict(self.to_dict())
        merged.records += other.records
        merged.kept += other.kept
        merged.without_domain += other.without_domain
        for reason, n in other.dropped.items():
            merged.dropped[reason] = merged.dropped.get(reason, 0) + n
        for reason, detail in other.details.items():
            merged.details.setdefault(reason, detail)
        merged.fields_seen = sorted(set(merged.fields_seen) | set(other.fields_seen))[:_MAX_FIELDS]
        return merged

    @property
    def dropped_total(self) -> int:
        return sum(self.dropped.values())

    def to_dict(self) -> dict:
        return {"source": self.source, "records": self.records, "kept": self.kept, "dropped": dict(self.dropped),
                "details": dict(self.details), "fields_seen": list(self.fields_seen),
                "without_domain": self.without_domain}

    @classmethod
    def from_dict(cls, data: dict) -> FileSummary:
        return cls(data["source"], data["records"], data["kept"], dict(data["dropped"]), dict(data["details"]),
                   list(data["fields_seen"]), data["without_domain"])


def loss_warning(summary: FileSummary, domain_wanted: bool = False,
                 max_dropped_share: float = MAX_DROPPED_SHARE) -> str | None:
    """One line for a file that lost more than `max_dropped_share` of its records, naming
    the main reason and its field, or None. With `domain_wanted` (a domain field or
    `--domain-from-path` was given), a file whose kept documents mostly have no domain
    is reported too.

    `f.jsonl: 350 of 350 records dropped: missing_text (no field 'text'; fields seen: content, meta)`
    """
    name = summary.source
    if summary.records and summary.dropped_total > max_dropped_share * summary.records:
        ranked = sorted(summary.dropped.items(), key=lambda kv: (-kv[1], kv[0]))
        reason, _ = ranked[0]
        why = summary.details.get(reason, "")
        if summary.fields_seen:
            why = f"{why}; fields seen: {', '.join(summary.fields_seen)}" if why else f"fields seen: {', '.join(summary.fields_seen)}"
        line = f"{name}: {summary.dropped_total} of {summary.records} records dropped: {reason}"
        if len(ranked) > 1:
            line += f" {ranked[0][1]}"
        line += f" ({why})" if why else ""
        if len(ranked) > 1:
            line += "; also " + ", ".join(f"{r} {n}" for r, n in ranked[1:])
        return line
    if domain_wanted and summary.kept and summary.without_domain > max_dropped_share * summary.kept:
        return f"{name}: {summary.without_domain} of {summary.kept} documents have no domain (the domain field is missing or empty)"
    return None


def loss_warnings(summaries: Iterable[FileSummary], domain_wanted: bool = False,
                  max_dropped_share: float = MAX_DROPPED_SHARE) -> list[str]:
    """`loss_warning` of every file that has one, in source order."""
    lines = (loss_warning(s, domain_wanted, max_dropped_share) for s in sorted(summaries, key=lambda s: s.source))
    return [line for line in lines if line]


def check_losses(summaries: Iterable[FileSummary], strict: bool, domain_wanted: bool = False,
                 max_dropped_share: float = MAX_DROPPED_SHARE) -> list[str]:
    """The warnings of `loss_warnings`; under `strict` any warning is an error instead.

    Raises:
        LoryDataError: when `strict` and a file lost most of its records (or its domains):
            one line with the first file's warning and how many files are affected.
    """
    lines = loss_warnings(summaries, domain_wanted, max_dropped_share)
    if strict and lines:
        more = f" (and {len(lines) - 1} more file{'s' * (len(lines) > 2)})" if len(lines) > 1 else ""
        raise LoryDataError(f"--strict: {lines[0]}{more}")
    return lines
