"""Verification of a shard folder against its manifest, and random access to its rows.

A folder behind a URL (`s3://bucket/prefix/train`) is verified through the local shard cache
(`lorydata.shard_source`): each shard is downloaded (the next one in the background while
the current one is checked), its sha256 checked against the manifest as it arrives, then its
schema, rows and token ids as for a local folder.
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow as pa

from lorydata.errors import MismatchError, ShardError
from lorydata.folder_tokenizer import known_tokenizer_bytes, known_tokenizer_file
from lorydata.hashing import file_sha256
from lorydata.manifest import Manifest
from lorydata.remote import is_url
from lorydata.shard_source import LocalShards, RemoteShards, open_shards
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
    return _check_table(entry, table, seq_len, vocab_size)


def _check_table(entry, table: pa.Table, seq_len: int, vocab_size: int | None) -> ShardCheck:
    """Row count and (given `vocab_size`) token id range of a shard read whole."""
    if table.num_rows != entry.rows:
        return ShardCheck(entry.file, False, table.num_rows, f"{table.num_rows} rows, manifest says {entry.rows}")
    if vocab_size is not None:
        ids = table.column("input_ids").combine_chunks().values.to_numpy()
        problem = token_id_problem(ids, vocab_size, seq_len)
        if problem is not None:
            return ShardCheck(entry.file, False, table.num_rows, problem)
    return ShardCheck(entry.file, True, table.num_rows)


def _check_remote(shards: RemoteShards, index: int, vocab_size: int | None) -> ShardCheck:
    """Check shard `index` of a folder behind a URL (fetched and sha256-verified by the cache)."""
    entries = shards.manifest.shards
    if index + 1 < len(entries):
        shards.prefetch(entries[index + 1])
    try:
        table = shards.table(entries[index])
    except ShardError as exc:
        return ShardCheck(entries[index].file, False, error=str(exc))
    return _check_table(entries[index], table, shards.manifest.seq_len, vocab_size)


def verify_folder(folder: str | Path, *, cache_dir: str | Path | None = None,
                  cache_limit: int | str | None = None) -> tuple[Manifest, VerifyReport]:
    """Check every shard listed in the folder's manifest (token ids included), and the
    tokenizer file the folder carries.

    Args:
        folder: a shard folder, or its URL.
        cache_dir, cache_limit: for a URL, the local cache (`lorydata.shard_source.RemoteShards`).

    Raises:
        ShardError: when the manifest itself is missing or unreadable (shard problems are
            reported in the returned report instead).
    """
    shards = open_shards(folder, cache_dir=cache_dir, cache_limit=cache_limit)
    manifest = shards.manifest
    vocab = manifest_vocab_size(manifest)
    if isinstance(shards, LocalShards):
        checks = [check_shard(shards.folder, s, manifest.seq_len, vocab) for s in manifest.shards]
    else:
        try:
            checks = [_check_remote(shards, index, vocab) for index in range(len(manifest.shards))]
        finally:
            shards.close()
    report = VerifyReport(str(shards.folder), checks)
    if "file" in manifest.tokenizer:  # the tokenizer the folder carries: present and the one recorded
        try:
            known_tokenizer_bytes(shards.folder, manifest)
            report.checks.append(ShardCheck(manifest.tokenizer["file"], True))
        except ShardError as exc:
            report.checks.append(ShardCheck(manifest.tokenizer["file"], False, error=str(exc)))
    return manifest, report


def read_row(folder: str | Path, index: int, manifest: Manifest | None = None, *,
             shards: LocalShards | RemoteShards | None = None) -> dict:
    """Row `index` of the folder, counting across shards in manifest order.

    Args:
        folder: a shard folder, or its URL.
        index: the row.
        manifest: its manifest, when already read.
        shards: how to read it (`lorydata.shard_source.open_shards`), e.g. with a cache.

    Returns:
        A dict with `input_ids` (list), `doc_starts`, `domains`, `seq_id` and the `shard` name.

    Raises:
        ShardError: for an index out of range or an unreadable shard.
    """
    shards = shards or open_shards(folder, manifest=manifest)
    manifest = shards.manifest
    if not 0 <= index < manifest.num_rows:
        raise ShardError(f"sequence {index} out of range: {shards.folder} holds {manifest.num_rows} sequences")
    for entry in manifest.shards:
        if index < entry.rows:
            row = shards.table(entry).slice(index, 1).to_pylist()[0]
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


def inspect_folder(folder: str | Path, show: int | None = None, tokenizer: str | None = None, *,
                   cache_dir: str | Path | None = None, cache_limit: int | str | None = None) -> dict:
    """Everything `lory inspect` prints: manifest summary, verification, optionally one
    sequence decoded back to text.

    Args:
        folder: a shard folder, or its URL (`s3://bucket/prefix/train`).
        show: index of a sequence to decode (counting across shards in manifest order).
        tokenizer: tokenizer to decode with; default the `tokenizer.json` the folder carries
            (`lorydata.folder_tokenizer`), or the bundled one when it made the shards.
        cache_dir, cache_limit: for a URL, the local cache the shards are fetched into.

    Raises:
        ShardError: missing/unreadable manifest, `show` out of range or unreadable, or no
            tokenizer to decode with.
        MismatchError: the decoding tokenizer is not the one that made the shards.
    """
    manifest, report = verify_folder(folder, cache_dir=cache_dir, cache_limit=cache_limit)
    result = {"folder": str(folder), "summary": _manifest_summary(manifest), "verification": report.to_dict()}
    result["verification"]["failed"] = [c.file for c in report.failed]
    if show is not None:
        tok = _decoding_tokenizer(folder, manifest, tokenizer)
        shards = open_shards(folder, cache_dir=cache_dir, cache_limit=cache_limit, manifest=manifest)
        row = read_row(folder, show, shards=shards)
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


def _decoding_tokenizer(folder: str | Path, manifest: Manifest, given: str | None) -> Tokenizer:
    """The tokenizer given, else the one the folder carries (never the manifest's recorded
    path), checked to be the one that made the shards."""
    if given is not None:
        tok = Tokenizer(given)
    elif is_url(folder):
        data = known_tokenizer_bytes(folder, manifest)
        if data is None:
            raise ShardError(f"{folder} carries no tokenizer.json (built by an older lory); pass --tokenizer to decode")
        with tempfile.TemporaryDirectory(prefix="lory-tokenizer-") as scratch:
            (Path(scratch) / "tokenizer.json").write_bytes(data)
            tok = Tokenizer(Path(scratch) / "tokenizer.json")
    else:
        found = known_tokenizer_file(folder, manifest)
        if found is None:
            raise ShardError(f"{folder} carries no tokenizer.json (built by an older lory); pass --tokenizer to decode")
        tok = Tokenizer(found)
    if tok.sha256 != manifest.tokenizer["sha256"]:
        raise MismatchError(f"tokenizer {tok.path} is not the one that made {folder} (sha256 differs)")
    return tok
