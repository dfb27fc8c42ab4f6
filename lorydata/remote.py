"""Shard folders behind a URL (`s3://bucket/prefix/train`, `gs://…`): names and filesystems.

Reads go through pyarrow's filesystems (`pyarrow.fs`), which lory already depends on, so
`lorydata` needs neither Beam nor boto3 to stream a corpus from a bucket. pyarrow serves
`s3://` (AWS, MinIO, any S3 API), `gs://` and `hdfs://`; other fsspec filesystems can be
handed in wrapped as `pyarrow.fs.PyFileSystem(FSSpecHandler(fs))`.

Credentials and endpoint come from the standard places only, never from lory's own flags or
files: for S3 the AWS SDK's chain (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY/AWS_SESSION_TOKEN,
AWS_PROFILE and ~/.aws, instance or pod roles); the endpoint from AWS_ENDPOINT_URL_S3 or
AWS_ENDPOINT_URL, and the region from AWS_REGION or AWS_DEFAULT_REGION, which pyarrow's
`S3FileSystem` does not read itself (without `endpoint_override` it goes to AWS whatever
AWS_ENDPOINT_URL says).
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs

from lorydata.errors import LoryDataError

ATTEMPTS = 5  # tries of a read before it is reported
BACKOFF_S = 0.5  # first retry delay; doubles per attempt up to MAX_BACKOFF_S
MAX_BACKOFF_S = 8.0
# AWS errors that another try cannot fix (pyarrow names the SDK's error in its message)
_PERMANENT = ("ACCESS_DENIED", "INVALID_ACCESS_KEY_ID", "SIGNATURE_DOES_NOT_MATCH")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
          "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def is_url(folder: str | Path) -> bool:
    """True for `scheme://…` other than `file://` (a local path is never a URL)."""
    found = _SCHEME.match(str(folder)) if isinstance(folder, str) else None
    return found is not None and found.group(1).lower() != "file"


def join(url: str, name: str) -> str:
    """`url/name` with exactly one slash between them."""
    return f"{url.rstrip('/')}/{name}"


def s3_filesystem() -> pafs.S3FileSystem:
    """An S3 filesystem configured from the standard AWS environment (see the module docstring)."""
    options = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        options["endpoint_override"] = endpoint
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        options["region"] = region
    return pafs.S3FileSystem(**options)


def filesystem_for(url: str, filesystem: pafs.FileSystem | None = None) -> tuple[pafs.FileSystem, str]:
    """The filesystem that serves `url` and the path of `url` inside it.

    Args:
        url: `s3://bucket/prefix`, `gs://bucket/prefix`, `hdfs://…`.
        filesystem: use this filesystem instead of one made from the URL's scheme (its paths
            are then `bucket/prefix`).

    Raises:
        LoryDataError: pyarrow has no filesystem for the scheme, or cannot set it up.
    """
    scheme, _, rest = url.partition("://")
    path = rest.strip("/")
    if filesystem is not None:
        return filesystem, path
    if scheme.lower() == "s3":
        return s3_filesystem(), path
    try:
        return pafs.FileSystem.from_uri(url)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise LoryDataError(f"cannot open {url}: {one_line(exc)}") from None


def read_bytes(filesystem: pafs.FileSystem, path: str, url: str) -> bytes | None:
    """The whole object at `path` (one GET), or None when it does not exist. Errors are
    retried `ATTEMPTS` times with backoff (`pause`).

    Raises:
        LoryDataError: the object exists but cannot be read (permissions, network), in one line.
    """
    for attempt in range(1, ATTEMPTS + 1):
        try:
            with filesystem.open_input_file(path) as f:
                return f.read()
        except FileNotFoundError:
            return None
        except OSError as exc:
            if attempt == ATTEMPTS or permanent(exc):
                raise LoryDataError(f"cannot read {url} after {attempt} attempt(s): {one_line(exc)}") from None
            pause(attempt)
    raise AssertionError("unreachable")


def permanent(exc: OSError) -> bool:
    """Whether an error is one that retrying cannot fix (credentials, permissions)."""
    return any(code in str(exc) for code in _PERMANENT)


def pause(attempt: int) -> None:
    """Wait before retry number `attempt` (exponential backoff)."""
    time.sleep(min(BACKOFF_S * 2 ** (attempt - 1), MAX_BACKOFF_S))


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (pyarrow's AWS errors span several)."""
    return " ".join(str(exc).split()) or type(exc).__name__


def parse_size(value: int | str | None) -> int | None:
    """Bytes from `123`, `"500MB"`, `"2GiB"`, `"1.5g"`; None stays None.

    Raises:
        LoryDataError: not a size, or not positive.
    """
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        size = value
    else:
        found = _SIZE.match(str(value))
        unit = (found.group(2) or "").lower().removesuffix("b") if found else None
        if found is None or unit not in _UNITS:
            raise LoryDataError(f"cache limit {value!r} is not a size (e.g. 20GB, 512MiB or a number of bytes)")
        size = int(float(found.group(1)) * _UNITS[unit])
    if size is not None and size <= 0:
        raise LoryDataError(f"cache limit must be positive, got {value!r}")
    return size


def default_cache_dir() -> Path:
    """Where streamed shards are cached unless told: `$XDG_CACHE_HOME/lory/shards`
    (`~/.cache/lory/shards`)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lory" / "shards"
