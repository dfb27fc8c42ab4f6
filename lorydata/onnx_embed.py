"""ONNX Runtime backend for transformer embedders on CPU.

sentence-transformers' own `backend="onnx"` goes through optimum-onnx, whose releases
require transformers < 4.58 while lory runs sentence-transformers on transformers 5, so the
export is done here with the libraries optimum itself wraps:

1. `torch.onnx.export` of the model's transformer (token embeddings out), with eager
   attention so that the graph has the pattern ONNX Runtime fuses;
2. `onnxruntime.transformers.optimizer` fuses attention, LayerNorm and GELU for BERT-like
   models (what optimum's O2 level does);
3. for int8, `onnxruntime.quantization.quantize_dynamic` with per-channel int8 weights on
   the MatMuls (per-tensor quantisation costs MiniLM ~0.06 cosine, per-channel ~0.005).

Everything else stays sentence-transformers': its tokenizer and truncation window, then
its own Pooling/Dense/Normalize modules on the ONNX token embeddings. The export checks
itself on probe texts (cosine >= 0.999 to torch) before it is cached.
"""

from __future__ import annotations

import inspect
import json
import logging
import sys
import warnings
from pathlib import Path

import numpy as np

from lorydata.errors import LoryDataError
from lorydata.model_cache import cached_folder, folder_fingerprint

ONNX_FILE = "model.onnx"
INT8_FILE = "model_int8.onnx"
INFO_FILE = "lory_onnx.json"
_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
# config.model_type values whose graphs ONNX Runtime's "bert" fusions handle
_BERT_LIKE = {"bert", "roberta", "xlm-roberta", "camembert", "electra", "distilbert", "mpnet"}
_PROBES = ["A short probe.", "Exporting a transformer to ONNX must not change the vectors it makes, "
           "for short or long inputs, padded or not, in any batch.", "git rebase --onto main feature"]
_EXTRA_HINT = "install the onnx extra: pip install 'lory[onnx]'"


def _preprocess(model, texts: list[str]) -> dict:
    # sentence-transformers 6 renamed tokenize() to preprocess()
    return (getattr(model, "preprocess", None) or model.tokenize)(texts)


def _transformer_of(model):
    core = getattr(model[0], "auto_model", None)
    if core is None:
        raise LoryDataError("the onnx backend needs a transformer model (its first module is "
                            f"{type(model[0]).__name__}); static models already run at table-lookup speed")
    return core


def _export(source: Path, out: Path) -> None:
    """Export, fuse and verify the fp32 ONNX graph of the source's transformer into `out`."""
    import torch
    from onnxruntime.transformers.optimizer import optimize_model
    from sentence_transformers import SentenceTransformer

    print(f"exporting {source.name} to ONNX (once)", file=sys.stderr)
    model = SentenceTransformer(str(source), device="cpu", model_kwargs={"attn_implementation": "eager"})
    core = _transformer_of(model).eval()
    features = _preprocess(model, _PROBES[:2])
    names = [name for name in _INPUTS if name in features]

    class TokenEmbeddings(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.core = core

        def forward(self, *inputs):
            return self.core(**dict(zip(names, inputs, strict=True)), return_dict=True).last_hidden_state

    raw = out / "raw.onnx"
    axes = {name: {0: "batch", 1: "tokens"} for name in [*names, "token_embeddings"]}
    # The TorchScript exporter: the dynamo one needs onnxscript and is the default from torch 2.9.
    legacy = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
    with warnings.catch_warnings():  # tracer and deprecation chatter of that exporter
        warnings.simplefilter("ignore")
        torch.onnx.export(TokenEmbeddings().eval(), tuple(features[name] for name in names), str(raw),
                          input_names=names, output_names=["token_embeddings"], dynamic_axes=axes,
                          opset_version=17, **legacy)
    config = core.config
    if config.model_type in _BERT_LIKE:
        fused = optimize_model(str(raw), model_type="bert", num_heads=config.num_attention_heads,
                               hidden_size=config.hidden_size)
        fused.save_model_to_file(str(out / ONNX_FILE))
        raw.unlink()
    else:  # ONNX Runtime still applies its generic graph optimisations when it loads the model
        raw.rename(out / ONNX_FILE)
    (out / INFO_FILE).write_text(json.dumps({"source": source.name, "source_fingerprint": folder_fingerprint(source),
                                             "model_type": config.model_type, "fused": config.model_type in _BERT_LIKE},
                                            indent=1, sort_keys=True) + "\n")
    torch_vectors = model.encode(_PROBES, normalize_embeddings=True, convert_to_numpy=True)
    onnx_vectors = OnnxEncoder(model, out / ONNX_FILE, threads=1).encode(_PROBES)
    cosine = float(np.min(np.sum(torch_vectors * onnx_vectors, axis=1)))
    if cosine < 0.999:
        raise LoryDataError(f"the ONNX export of {source.name} does not reproduce its torch vectors "
                            f"(cosine {cosine:.4f}); use the torch backend")


def _quantize(fp32: Path, out: Path) -> None:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # quantize_dynamic logs advice on the root logger (pre-processing)
    try:
        quantize_dynamic(str(fp32 / ONNX_FILE), str(out / INT8_FILE), weight_type=QuantType.QInt8, per_channel=True,
                         op_types_to_quantize=["MatMul"],
                         # fused contrib ops carry no ONNX type information; their outputs are float
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    finally:
        root.setLevel(level)
    info = json.loads((fp32 / INFO_FILE).read_text())
    (out / INFO_FILE).write_text(json.dumps({**info, "int8": "dynamic, per-channel QInt8 MatMul weights"},
                                            indent=1, sort_keys=True) + "\n")


def onnx_model(source: str | Path, int8: bool = False) -> Path:
    """The cached ONNX export of a sentence-transformers folder (exported on first use).

    Args:
        source: a transformer sentence-transformers folder.
        int8: the dynamically int8-quantised graph instead of the fp32 one.

    Returns:
        The cache folder holding `model.onnx` (fp32) or `model_int8.onnx`.
    """
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        raise LoryDataError(f"the onnx backend needs onnx and onnxruntime: {_EXTRA_HINT}") from None
    source = Path(source)
    key = folder_fingerprint(source)
    fp32 = cached_folder("onnx", key, lambda work: _export(source, work))
    if not int8:
        return fp32
    return cached_folder("onnx", f"{key}-int8", lambda work: _quantize(fp32, work))


class OnnxEncoder:
    """A sentence-transformers model whose transformer runs in ONNX Runtime.

    Args:
        model: the loaded SentenceTransformer (tokenizer, window and pooling modules are used;
            its torch transformer is not run).
        onnx_file: the exported graph.
        threads: ONNX Runtime intra-op threads (the torch thread count, for like-for-like runs).
    """

    def __init__(self, model, onnx_file: Path, threads: int):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.model = model
        self.session = onnxruntime.InferenceSession(str(onnx_file), options, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]

    def encode(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """(len(texts), dim) float32 unit vectors, longest texts batched together like
        sentence-transformers' encode()."""
        import torch

        order = np.argsort([-len(text) for text in texts], kind="stable")
        out: np.ndarray | None = None
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                rows = order[start: start + batch_size]
                features = _preprocess(self.model, [texts[i] for i in rows])
                tokens = self.session.run(None, {name: features[name].numpy() for name in self.inputs})[0]
                features = {key: value for key, value in features.items() if key in _INPUTS}
                features["token_embeddings"] = torch.from_numpy(tokens)
                for module in list(self.model)[1:]:  # Pooling, Dense, Normalize... as in torch
                    features = module(features)
                vectors = features["sentence_embedding"].float().numpy()
                if out is None:
                    out = np.empty((len(texts), vectors.shape[1]), np.float32)
                out[rows] = vectors
        if out is None:
            return np.zeros((0, 0), np.float32)
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
