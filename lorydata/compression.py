"""Opening input files as byte streams whose decompressed output is bounded per read.

A compressed file can expand without bound: a 66 KB `.jsonl.zst` of 128 concatenated
frames expands to 2 GiB, and decompressing a whole compressed chunk at once holds all of
it. Every stream here hands out its output in pieces of bounded size, so memory depends on
the read sizes the caller asks for (a line limit), never on the compression ratio.
"""

from __future__ import annotations

import gzip
import io
import zlib
from collections.abc import Callable
from typing import IO

import zstandard

Opener = Callable[[str], IO[bytes]]
"""path → binary file object. The default is `open_binary`; Beam pipelines pass
`FileSystems.open` with `compression_type=UNCOMPRESSED` (lory decompresses by suffix)."""

# What a damaged stream raises: truncation (EOFError), bad gzip headers (OSError),
# corrupt deflate data (zlib.error), corrupt zstd frames (ZstdError).
STREAM_ERRORS = (OSError, EOFError, ValueError, zlib.error, zstandard.ZstdError)

STREAM_BUFFER_BYTES = 1 << 20
# Compressed bytes fed to zstd per call. A zstd block holds at most 128 KiB and takes at
# least 4 bytes (an RLE block), so one call yields at most (1024 / 4 + 2) × 128 KiB ≈ 32 MiB
# however the input was made; decompressing in slices this small costs no measurable speed.
_ZSTD_INPUT_SLICE = 1024
_ZSTD_READ_BYTES = 1 << 20


def is_url(path: str) -> bool:
    """True for fsspec URLs (`s3://…`, `gs://…`); `file://` counts as a local path."""
    return "://" in path and not path.startswith("file://")


def open_binary(path: str) -> IO[bytes]:
    """Open a local path or fsspec URL for binary reading (the default opener)."""
    if is_url(path):
        import fsspec  # only URL inputs need it

        return fsspec.open(path, "rb").open()
    return open(path.removeprefix("file://"), "rb")


class ZstdStream(io.RawIOBase):
    """Decompresses a zstd file frame by frame, raising at EOF inside a frame.

    `zstandard`'s stream reader returns a short read for a truncated file without any
    error, and its decompressobj has no output limit; so frames are tracked here and the
    compressed input is fed in slices small enough that one call cannot yield more than
    about 32 MiB (see `_ZSTD_INPUT_SLICE`).

    Args:
        raw: the compressed binary stream (closed with this one).
    """

    def __init__(self, raw: IO[bytes]):
        self._raw = raw
        self._dctx = zstandard.ZstdDecompressor()
        self._frame = None  # decompressobj of the frame being read, None between frames
        self._chunk = memoryview(b"")  # compressed bytes read from `raw`
        self._pos = 0  # how much of `_chunk` was fed
        self._out = memoryview(b"")  # decompressed bytes not yet handed out

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        """Fill `buffer` as far as the stream goes; holds at most one slice's output more."""
        filled = 0
        while filled < len(buffer):
            if not len(self._out):
                if self._pos >= len(self._chunk):
                    chunk = self._raw.read(_ZSTD_READ_BYTES)
                    if not chunk:
                        if self._frame is not None and not filled:  # the next call raises if filled
                            raise EOFError("zstd stream is truncated (the last frame is incomplete)")
                        break
                    self._chunk, self._pos = memoryview(chunk), 0
                self._out = memoryview(self._decompress_slice())
            n = min(len(buffer) - filled, len(self._out))
            buffer[filled : filled + n] = self._out[:n]
            self._out = self._out[n:]
            filled += n
        return filled

    def _decompress_slice(self) -> bytes:
        data = self._chunk[self._pos : self._pos + _ZSTD_INPUT_SLICE]
        self._pos += len(data)
        if self._frame is None:
            self._frame = self._dctx.decompressobj()
        out = self._frame.decompress(data)
        if self._frame.eof:  # frame complete: its unused input starts the next one
            self._pos -= len(self._frame.unused_data)
            self._frame = None
        return out

    def close(self) -> None:
        self._raw.close()
        super().close()


class GzipStream(io.RawIOBase):
    """A gzip file (one or more members) as a raw stream; closes the underlying file too.

    `GzipFile` inflates at most what each read asks for (zlib's `max_length`), so reads
    through a buffer of bounded size stay bounded.

    Args:
        raw: the compressed binary stream (closed with this one).
    """

    def __init__(self, raw: IO[bytes]):
        self._raw = raw
        self._gzip = gzip.GzipFile(fileobj=raw)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        # read1: what is there now, so the data before a truncation is handed out before
        # the next call raises
        data = self._gzip.read1(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self._gzip.close()
        self._raw.close()
        super().close()


def open_stream(path: str, fmt: str, opener: Opener | None = None) -> IO[bytes]:
    """A buffered binary stream of the decompressed content of `path`.

    Args:
        path: the file (local path or URL, whatever `opener` takes).
        fmt: `jsonl.gz` and `jsonl.zst` are decompressed; anything else is read as is.
        opener: path → binary file object; `open_binary` when None.
    """
    raw = (opener or open_binary)(path)
    if fmt == "jsonl.gz":
        return io.BufferedReader(GzipStream(raw), buffer_size=STREAM_BUFFER_BYTES)
    if fmt == "jsonl.zst":
        return io.BufferedReader(ZstdStream(raw), buffer_size=STREAM_BUFFER_BYTES)
    if isinstance(raw, io.BufferedReader):
        return raw
    # Other file objects (fsspec, Beam) may read a line byte by byte: give them a buffer.
    return io.BufferedReader(raw, buffer_size=STREAM_BUFFER_BYTES)
