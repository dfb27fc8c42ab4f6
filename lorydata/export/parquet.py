"""Parquet for SQL engines and dataframe tools (DuckDB, Spark, BigQuery, pandas, polars).

`part-NNNNN.parquet` files, zstd-compressed, with the shard columns (`input_ids` as a list of
`seq_len` int32, `doc_starts`, `domains`, `seq_id`), rows in `seq_id` order across the files.
pyarrow writes them.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from lorydata.export.target import ExportTarget


class ParquetWriter:
    """Writes one zstd Parquet file per chunk.

    Args:
        target: the output folder and corpus facts.
    """

    def __init__(self, target: ExportTarget):
        self.target = target
        self.files: list[str] = []

    def write(self, chunk: pa.Table) -> None:
        name = f"part-{len(self.files):05d}.parquet"
        chunk = chunk.replace_schema_metadata({"lory.export": "parquet", "lory.seq_len": str(self.target.seq_len)})
        pq.write_table(chunk, self.target.out / name, compression="zstd")
        self.files.append(name)

    def finish(self) -> list[str]:
        return list(self.files)

    def describe(self) -> dict:
        return {"compression": "zstd", "columns": ["input_ids", "doc_starts", "domains", "seq_id"]}
