"""Megatron-LM / NeMo: an indexed dataset (`<split>_text_document.bin` + `.idx`) written by
megatron-core's own `IndexedDatasetBuilder`.

One lory sequence is one item and one document of the indexed dataset, in `seq_id` order, in
the dtype Megatron's `preprocess_data.py` picks for the vocabulary (uint16 below 65,500
tokens, else int32). Megatron's `GPTDataset` cuts samples of `--seq-length` tokens from the
concatenated items, so with `--seq-length` equal to lory's `seq_len` every sample's input is
exactly one lory sequence (its shuffle moves whole sequences). Document boundaries travel as
the EOS token after every document: give Megatron a tokenizer whose EOD is lory's EOS (the
export writes one to `tokenizer/`: `--tokenizer-type HuggingFaceTokenizer --tokenizer-model
OUT/tokenizer`) and `--reset-position-ids --reset-attention-mask` to attend within documents.
"""

from __future__ import annotations

import warnings

import pyarrow as pa
import torch

from lorydata.export.target import ExportTarget, missing_extra, token_matrix, write_tokenizer_folder


def _indexed_dataset_module():
    try:
        with warnings.catch_warnings():  # megatron.core warns at import that Apex/TE are absent: irrelevant here
            warnings.simplefilter("ignore")
            from megatron.core.datasets import indexed_dataset  # heavy, optional: imported on use
    except ImportError:
        raise missing_extra("megatron", "megatron-core", "megatron") from None
    return indexed_dataset


class MegatronWriter:
    """Appends sequences to one megatron-core indexed dataset.

    Args:
        target: the output folder and corpus facts.
    """

    def __init__(self, target: ExportTarget):
        self._mod = _indexed_dataset_module()
        self.target = target
        self.prefix = str(target.out / f"{target.split}_text_document")
        self.dtype = self._mod.DType.optimal_dtype(target.vocab_size)
        self._builder = self._mod.IndexedDatasetBuilder(self._mod.get_bin_path(self.prefix), dtype=self.dtype)
        self.tokenizer_written = False

    def write(self, chunk: pa.Table) -> None:
        for row in token_matrix(chunk, self.target.seq_len):
            self._builder.add_item(torch.from_numpy(row.copy()))  # the staged rows are a read-only map
            self._builder.end_document()  # one lory sequence = one Megatron document

    def finish(self) -> list[str]:
        self._builder.finalize(self._mod.get_idx_path(self.prefix))
        name = f"{self.target.split}_text_document"
        self.tokenizer_written = write_tokenizer_folder(self.target.tokenizer, self.target.tokenizer_file,
                                                        self.target.out / "tokenizer")
        extra = ["tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json"] if self.tokenizer_written else []
        return [f"{name}.bin", f"{name}.idx", *extra]

    def describe(self) -> dict:
        tokenizer = ("tokenizer/" if self.tokenizer_written else
                     "not written: the corpus carries no tokenizer.json of its sha256; "
                     f"use a tokenizer whose EOD id is {self.target.eos_id}")
        return {"dtype": self.dtype.__name__, "path_prefix": f"{self.target.split}_text_document",
                "tokenizer": tokenizer, "eod_id": self.target.eos_id}
