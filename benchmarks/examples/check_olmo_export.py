"""Read a `lory export-corpus --format olmo` folder with OLMo-core itself and compare it with the
shards it came from.

    lory export-corpus SHARDS OUT --format olmo
    python benchmarks/examples/check_olmo_export.py SHARDS OUT

Needs `ai2-olmo-core` (tested with 3.0.0). It is not one of lory's extras: it pins
`filelock<4`, which makes pip downgrade huggingface_hub (2.x to 1.x) under lory's
transformers, so install it in an environment of its own (with lory) to run this check.
Checks, through OLMo-core's `NumpyFSLDatasetConfig` (as an OLMo training config builds its
data): instance i is lory's seq_id i token for token; OLMo's EOS-derived `doc_lens` are lory's
documents; `iter_document_indices` from the `.csv.gz` metadata gives the same documents.
"""

import argparse
import tempfile
from pathlib import Path

import numpy as np
from olmo_core.data import NumpyFSLDatasetConfig, TokenizerConfig
from olmo_core.data.utils import iter_document_indices

from lorydata.manifest import Manifest
from lorydata.shards import read_shard


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("shards", help="the lory shard folder that was exported")
    parser.add_argument("out", help="the olmo export folder")
    args = parser.parse_args(argv)
    manifest, out = Manifest.read(args.shards), Path(args.out)
    rows = {r["seq_id"]: r for e in manifest.shards for r in read_shard(Path(args.shards) / e.file).to_pylist()}
    tok, seq_len = manifest.tokenizer, manifest.seq_len
    with tempfile.TemporaryDirectory() as work:
        dataset = NumpyFSLDatasetConfig(
            paths=[str(out / "part-*.npy")], expand_glob=True, sequence_length=seq_len, generate_doc_lengths=True,
            tokenizer=TokenizerConfig(vocab_size=tok["vocab_size"], eos_token_id=tok["eos_id"], pad_token_id=tok["pad_id"]),
            work_dir=work,
        ).build()
        dataset.prepare()
        instances = [dataset[i] for i in range(len(dataset))]
    documents = {i: np.diff([*rows[i]["doc_starts"], seq_len]).tolist() for i in rows}
    unpadded = [i for i in rows if rows[i]["input_ids"][-1] != tok["pad_id"]]
    same_tokens = len(instances) == len(rows) and all(
        x["input_ids"].tolist() == rows[i]["input_ids"] for i, x in enumerate(instances))
    same_docs = all(instances[i]["doc_lens"].tolist() == documents[i] for i in unpadded)
    spans, offset = [], 0
    for path in sorted(out.glob("part-*.npy")):
        spans += [(offset + s, offset + e) for s, e in iter_document_indices(str(path), use_array_if_local=False)]
        offset += path.stat().st_size // np.dtype(dataset.dtype).itemsize
    lory_spans = [(i * seq_len + s, i * seq_len + s + n) for i in sorted(rows)
                  for s, n in zip(rows[i]["doc_starts"], documents[i], strict=True)]
    print(f"{len(instances)} OLMo instances ({np.dtype(dataset.dtype).name}); tokens equal lory's in seq_id order: "
          f"{same_tokens}; EOS doc_lens equal lory's documents: {same_docs}; "
          f".csv.gz document indices equal lory's: {spans == lory_spans}")
    if not (same_tokens and same_docs and spans == lory_spans):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
