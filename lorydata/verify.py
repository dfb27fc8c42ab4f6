"""Verification of a shard folder against its manifest, and random access to its rows."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from lorydata.errors import MismatchError, ShardError
from lorydata.folder_tokenizer import known_tokenizer_file, shard_tokenizer_file
from lorydata.hashing import file_sha256
from lorydata.manifest import Manifest
from lorydata.shards import read_shard
from lorydata.token_ids import manifest_vocab_size, token_id_problem
from lorydata.tokenizer import Tokenizer


@dataclass
class ShardCheck:
    """Result of checking one shard file."""

    file: str
    ok: bool
    rows: int | None = None
    error: str = ""


@dataclass
class VerifyReport:
    """Result of checking a whole folder: one `ShardCheck` per manifest entry, plus one for the
    tokenizer file the folder carries (when its manifest names one)."""

    folder: str
    checks: list[ShardCheck] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def failed(self) -> list[ShardCheck]:
        return [c for c in self.checks if not c.ok]

    def to_dict(self) -> dict:
        return {"folder": self.folder, "ok": self.ok, "shards": [asdict(c) for c in self.checks]}


def check_shard(folder: Path, entry, seq_len: int, vocab_size: int | None = None) -> ShardCheck:
    """Check existence, size, sha256, schema, row count and (given `vocab_size`) the token id
    range of one shard."""
    path = folder / entry.file
    if not path.is_file():
        return ShardCheck(entry.file, False, error="missing")
    size = path.stat().st_size
    if size != entry.bytes:
        return ShardCheck(entry.file, False, error=f"size {size} bytes, manifest says {entry.bytes} (truncated?)")
    if file_sha256(path) != entry.sha256:
        return ShardCheck(entry.file, False, error="sha256 does not match the manifest (corrupted)")
    try:
        table = read_shard(path, seq_len)
    except ShardError as exc:
        return ShardCheck(entry.file, False, error=str(exc))
    if table.num_rows != entry.rows:
        return ShardCheck(entry.file, False, table.num_rows, f"{table.num_rows} rows, manifest says {entry.rows}")
    if vocab_size is not None:
        ids = table.column("input_ids").combine_chunks().values.to_numpy()
        problem = token_id_problem(ids, vocab_size, seq_len)
        if problem is not None:
            return ShardCheck(entry.file, False, table.num_rows, problem)
    return ShardCheck(entry.file, True, table.num_rows)


def verify_folder(folder: str | Path) -> tuple[Manifest, VerifyReport]:
    """Check every shard listed in `folder/manifest.json` (token ids included), and the
    tokenizer file the folder carries.

    Raises:
        ShardError: when the manifest itself is missing or unreadable (shard problems are
            reported in the returned report instead).
    """
    folder = Path(folder)
    manifest = Manifest.read(folder)
    vocab = manifest_vocab_size(manifest)
    report = VerifyReport(str(folder), [check_shard(folder, s, manifest.seq_len, vocab) for s in manifest.shards])
    if "file" in manifest.tokenizer:  # the tokenizer the folder carries: present and the one recorded
        try:
            shard_tokenizer_file(folder, manifest)
            report.checks.append(ShardCheck(manifest.tokenizer["file"], True))
        except ShardError as exc:
            report.checks.append(ShardCheck(manifest.tokenizer["file"], False, error=str(exc)))
    return manifest, report


def read_row(folder: str | Path, index: int, manifest: Manifest | None = None) -> dict:
    """Row `index` of the folder, counting across shards in manifest order.

    Returns:
        A dict with `input_ids` (list), `doc_starts`, `domains`, `seq_id` and the `shard` name.

    Raises:
        ShardError: for an index out of range or an unreadable shard.
    """
    folder = Path(folder)
    manifest = manifest or Manifest.read(folder)
    if not 0 <= index < manifest.num_rows:
        raise ShardError(f"sequence {index} out of range: {folder} holds {manifest.num_rows} sequences")
    for entry in manifest.shards:
        if index < entry.rows:
            row = read_shard(folder / entry.file, manifest.seq_len).slice(index, 1).to_pylist()[0]
            return {**row, "shard": entry.file}
        index -= entry.rows
    raise AssertionError("unreachable: index checked against num_rows")


def _manifest_summary(manifest: Manifest) -> dict:
    return {
        "split": manifest.split,
        "format_version": manifest.format_version,
        "seq_len": manifest.seq_len,
        "sequences": manifest.num_rows,
        "shards": len(manifest.shards),
        "bytes": sum(s.bytes for s in manifest.shards),
        "tokenizer": manifest.tokenizer,
        "order": manifest.order.get("method", "unknown"),
        "order_metrics": manifest.order.get("metrics", {}),
        "embedder": manifest.embedder,
        "index": manifest.index,
        "counts": {k: v for k, v in manifest.counts.items() if k != "pipeline"},
        "pipeline_counts": manifest.counts.get("pipeline", {}),
    }


def inspect_folder(folder: str | Path, show: int | None = None, tokenizer: str | None = None) -> dict:
    """Everything `lory inspect` prints: manifest summary, verification, optionally one
    sequence decoded back to text.

    Args:
        folder: a shard folder.
        show: index of a sequence to decode (counting across shards in manifest order).
        tokenizer: tokenizer to decode with; default the `tokenizer.json` the folder carries
            (`lorydata.folder_tokenizer`), or the bundled one when it made the shards.

    Raises:
        ShardError: missing/unreadable manifest, `show` out of range or unreadable, or no
            tokenizer to decode with.
        MismatchError: the decoding tokenizer is not the one that made the shards.
    """
    manifest, report = verify_folder(folder)
    result = {"folder": str(folder), "summary": _manifest_summary(manifest), "verification": report.to_dict()}
    result["verification"]["failed"] = [c.file for c in report.failed]
    if show is not None:
        # never the manifest's recorded path: only the tokenizer the folder carries (or one given)
        tokenizer = tokenizer or known_tokenizer_file(folder, manifest)
        if tokenizer is None:
            raise ShardError(f"{folder} carries no tokenizer.json (built by an older lory); pass --tokenizer to decode")
        tok = Tokenizer(tokenizer)
        if tok.sha256 != manifest.tokenizer["sha256"]:
            raise MismatchError(f"tokenizer {tok.path} is not the one that made {folder} (sha256 differs)")
        row = read_row(folder, show, manifest)
        ids = row["input_ids"]
        pad = manifest.tokenizer.get("pad_id")
        if pad is not None and pad != manifest.tokenizer.get("eos_id"):
            ids = [i for i in ids if i != pad]
        result["sequence"] = {
            "index": show,
            "seq_id": row["seq_id"],
            "shard": row["shard"],
            "doc_starts": row["doc_starts"],
            "domains": row["domains"],
            "text": tok.decode(ids),
        }
    return result
