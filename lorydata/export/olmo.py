"""OLMo-core: fixed-length token arrays as its `NumpyFSLDataset` reads them.

`part-NNNNN.npy` files hold raw tokens (no `.npy` header: OLMo memory-maps the bytes) in the
smallest unsigned dtype that holds the vocabulary (uint16 up to 65,536 ids, else uint32), the
dtype OLMo-core assumes from `vocab_size`. Every file holds whole sequences,
so OLMo's instance i (tokens `[i * seq_len, (i + 1) * seq_len)` across the files in order,
with `sequence_length = seq_len`) is lory's `seq_id` i. Beside each array,
`part-NNNNN.csv.gz` lists its documents Dolma-style, one line `start,end,seq_id,domain` per
document piece (token offsets in the file, end exclusive), which OLMo reads for document
indices when it does not infer them from EOS tokens. No library writes these files (OLMo's
data comes from the Dolma toolkit): numpy writes the arrays in OLMo's documented layout.
"""

from __future__ import annotations

import csv
import gzip
import io

import numpy as np
import pyarrow as pa

from lorydata.export.target import ExportTarget, token_matrix


def olmo_token_dtype(vocab_size: int) -> type[np.unsignedinteger]:
    """The smallest of OLMo's unsigned token dtypes that holds every id: the dtype OLMo-core's
    dataset config assumes from the vocabulary size when none is given."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if vocab_size - 1 <= np.iinfo(dtype).max:
            return dtype
    return np.uint64


def document_spans(chunk: pa.Table, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Start and end (exclusive) token offsets of every document piece of a chunk, laid end to end."""
    starts_col = chunk.column("doc_starts").combine_chunks()
    lengths = np.diff(starts_col.offsets.to_numpy())
    rows = np.repeat(np.arange(len(starts_col)), lengths)
    starts = rows * seq_len + starts_col.values.to_numpy()
    # every sequence starts with a piece at 0, so a piece ends where the next one (in this or the
    # next sequence) starts
    ends = np.append(starts[1:], len(starts_col) * seq_len)
    return starts, ends


class OlmoWriter:
    """Writes one token array and one document metadata file per chunk.

    Args:
        target: the output folder and corpus facts.
    """

    def __init__(self, target: ExportTarget):
        self.target = target
        self.dtype = olmo_token_dtype(target.vocab_size)
        self.files: list[str] = []

    def write(self, chunk: pa.Table) -> None:
        name = f"part-{len(self.files) // 2:05d}"
        token_matrix(chunk, self.target.seq_len).astype(self.dtype).tofile(self.target.out / f"{name}.npy")
        starts, ends = document_spans(chunk, self.target.seq_len)
        pieces = np.diff(chunk.column("doc_starts").combine_chunks().offsets.to_numpy())
        seq_ids = np.repeat(chunk.column("seq_id").to_numpy(), pieces)
        domains = chunk.column("domains").combine_chunks().values.to_pylist()
        text = io.StringIO()
        csv.writer(text, lineterminator="\n").writerows(
            zip(starts.tolist(), ends.tolist(), seq_ids.tolist(), domains, strict=True))
        with open(self.target.out / f"{name}.csv.gz", "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
            f.write(text.getvalue().encode())  # mtime=0: the same corpus gives the same bytes
        self.files += [f"{name}.npy", f"{name}.csv.gz"]

    def finish(self) -> list[str]:
        return list(self.files)

    def describe(self) -> dict:
        return {"dtype": np.dtype(self.dtype).name, "metadata_columns": ["start", "end", "seq_id", "domain"]}
