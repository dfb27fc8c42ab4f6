"""Static embedders: one vector per token, a document is the mean of its tokens' vectors.

They run through sentence-transformers' own `StaticEmbedding` module (a torch EmbeddingBag
behind a `tokenizers` tokenizer), so a sentence-transformers StaticEmbedding folder and a
model2vec folder (which ships the same `modules.json`) load the same way. Two recipes make
one from a transformer sentence-transformer, both with model2vec's distillation:

- `distill_static`: model2vec's `distill` over the source's own vocabulary (each token
  embedded alone between the model's special tokens, mean-pooled, PCA to `dims`, then
  weighted by SIF weights of a Zipf estimate of the token frequency from its rank).
- `distill_static_bpe`: the same steps over the vocabulary of a lory BPE tokenizer: row i is
  what the source model makes of token i's text, so a document's vector is a weighted mean
  of table rows over the token ids lory already computed for the shards (no second
  tokenization). The folder's tokenizer is that BPE tokenizer, so texts embed the same way.

`static_model` / `static_bpe_model` distil once per source (and tokenizer, dims) into the
model cache (`lorydata.model_cache`) and reuse that folder afterwards.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import numpy as np

from lorydata.errors import LoryDataError
from lorydata.model_cache import cached_folder, folder_fingerprint

DEFAULT_DIMS = 256
SIF_COEFFICIENT = 1e-4  # model2vec's default weighting
INFO_FILE = "lory_static.json"  # what a lory-made static folder was distilled from
_EXTRA_HINT = "install the static extra: pip install 'lory[static]'"


def _static_embedding_class():
    try:
        from sentence_transformers.sentence_transformer.modules import StaticEmbedding
    except ImportError:  # sentence-transformers < 6 keeps its modules here
        from sentence_transformers.models import StaticEmbedding
    return StaticEmbedding


def is_static_folder(folder: Path) -> bool:
    """True for a sentence-transformers folder whose first module is a StaticEmbedding, or a
    model2vec folder (config.json with model_type "model2vec")."""
    modules_file = folder / "modules.json"
    if modules_file.is_file():
        modules = json.loads(modules_file.read_text())
        return bool(modules) and "StaticEmbedding" in modules[0].get("type", "")
    config_file = folder / "config.json"
    return config_file.is_file() and json.loads(config_file.read_text()).get("model_type") == "model2vec"


def static_info(folder: Path) -> dict:
    """The recipe a lory-made static folder records ({} for folders made elsewhere)."""
    info = folder / INFO_FILE
    return json.loads(info.read_text()) if info.is_file() else {}


def static_dimension(folder: Path) -> int | None:
    """Vector size of a static folder, read from the safetensors header (no weights loaded)."""
    from safetensors import safe_open

    weights = folder / "model.safetensors"
    if not weights.is_file():
        return None
    with safe_open(str(weights), framework="numpy") as f:
        for key in ("embedding.weight", "embeddings"):
            if key in f.keys():  # noqa: SIM118 (safe_open handles are not containers)
                return int(f.get_slice(key).get_shape()[1])
    return None


def load_static(folder: Path, device: str = "cpu"):
    """A SentenceTransformer whose first module is the folder's StaticEmbedding."""
    from sentence_transformers import SentenceTransformer

    if (folder / "modules.json").is_file():
        return SentenceTransformer(str(folder), device=device)
    # A model2vec folder from before model2vec wrote modules.json.
    return SentenceTransformer(modules=[_static_embedding_class().load(str(folder))], device=device)


def _save(static_embedding, out: Path, info: dict) -> None:
    from sentence_transformers import SentenceTransformer

    out.mkdir(parents=True, exist_ok=True)
    SentenceTransformer(modules=[static_embedding], device="cpu").save(str(out))
    (out / INFO_FILE).write_text(json.dumps(info, indent=1, sort_keys=True) + "\n")


def _distill_device(device: str) -> str:
    import torch

    return "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)


def _check_source(source: str | Path) -> Path:
    folder = Path(source).expanduser()
    if not folder.is_dir():
        raise LoryDataError(f"distillation source must be a sentence-transformers folder, got {source}")
    if is_static_folder(folder):
        raise LoryDataError(f"{source} is already a static model; distil from a transformer model")
    return folder.resolve()


def distill_static(source: str | Path, out: str | Path, dims: int = DEFAULT_DIMS,
                   remove_tokens: str | None = r"\[unused\d+\]", device: str = "auto") -> Path:
    """Distil a static model from a sentence-transformers folder with model2vec, offline.

    Args:
        source: a transformer sentence-transformers folder.
        out: folder to write the static sentence-transformers model into.
        dims: PCA dimensions of the token vectors (at most the source's dimension).
        remove_tokens: regex of vocabulary tokens to leave out (model2vec's default drops
            BERT's [unusedN] tokens).
        device: "auto", "cpu" or "cuda" for the source model's forward passes.

    Returns:
        The written folder.
    """
    folder = _check_source(source)
    try:
        from model2vec.distill import distill  # noqa: F401 (checks the optional dependency early)
    except ImportError:
        raise LoryDataError(f"distilling a static model needs model2vec: {_EXTRA_HINT}") from None
    static_class = _static_embedding_class()
    print(f"distilling a {dims}-dim static model from {folder.name} (model2vec; minutes on a CPU)", file=sys.stderr)
    # sentence-transformers warns about distill() arguments this model2vec version lacks
    # (apply_zipf, use_subword: both folded into sif_coefficient since model2vec 0.5).
    st_logger = logging.getLogger(static_class.__module__)
    level = st_logger.level
    st_logger.setLevel(logging.ERROR)
    try:
        static = static_class.from_distillation(str(folder), device=_distill_device(device), pca_dims=dims,
                                                sif_coefficient=SIF_COEFFICIENT, token_remove_pattern=remove_tokens)
    except Exception as exc:
        raise LoryDataError(f"cannot distil {source}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
    finally:
        st_logger.setLevel(level)
    out = Path(out)
    _save(static, out, {"recipe": "model2vec", "source": folder.name, "source_fingerprint": folder_fingerprint(folder),
                        "dims": int(static.embedding_dim), "remove_tokens": remove_tokens})
    return out


def bpe_token_vectors(source: str | Path, tokenizer: str | Path | None = None, device: str = "auto") -> np.ndarray:
    """model2vec's first step over a lory BPE vocabulary: row i is the source model's
    mean-pooled output for token i's text alone between the source's special tokens.

    Args:
        source: a transformer sentence-transformers folder.
        tokenizer: the lory tokenizer.json (or its folder); None = lory's bundled tokenizer.
        device: "auto", "cpu" or "cuda" for the source model's forward passes.

    Returns:
        (vocab_size, source dim) float32 vectors, before PCA and weighting.
    """
    from lorydata.tokenizer import Tokenizer

    folder = _check_source(source)
    try:
        from model2vec.distill.inference import create_embeddings
    except ImportError:
        raise LoryDataError(f"distilling a static model needs model2vec: {_EXTRA_HINT}") from None
    from sentence_transformers import SentenceTransformer

    bpe = Tokenizer(tokenizer)
    device = _distill_device(device)
    try:
        model = SentenceTransformer(str(folder), device=device)
    except Exception as exc:
        raise LoryDataError(f"cannot load {source}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
    texts = [bpe.decode([token_id]) for token_id in range(bpe.vocab_size)]
    ids = model.tokenizer(texts, add_special_tokens=True, truncation=True, max_length=32)["input_ids"]
    vectors = create_embeddings(model=model[0].auto_model, tokenized=ids, device=device,
                                pad_token_id=model.tokenizer.pad_token_id or 0, pooling="mean")
    return np.asarray(vectors, dtype=np.float32)


def distill_static_bpe(source: str | Path, out: str | Path, tokenizer: str | Path | None = None,
                       dims: int = DEFAULT_DIMS, device: str = "auto", batch_size: int = 256) -> Path:
    """Distil a static model indexed by a lory BPE tokenizer's ids (model2vec's recipe).

    Row i is the source model's mean-pooled output for token i's text alone between the
    source's special tokens (`bpe_token_vectors`); rows are PCA-reduced to `dims` and scaled
    by model2vec's SIF/Zipf weight of rank i (BPE ids are in merge order, which follows
    frequency). The tokenizer's special tokens (EOS, pad) get zero rows.

    Args:
        source: a transformer sentence-transformers folder.
        out: folder to write the static sentence-transformers model into.
        tokenizer: the lory tokenizer.json (or its folder); None = lory's bundled tokenizer.
        dims: PCA dimensions.
        device: "auto", "cpu" or "cuda" for the source model's forward passes.
        batch_size: token texts per forward pass.

    Returns:
        The written folder.
    """
    from lorydata.tokenizer import Tokenizer

    folder = _check_source(source)
    try:
        from model2vec.distill.inference import apply_pca, compute_weights
    except ImportError:
        raise LoryDataError(f"distilling a static model needs model2vec: {_EXTRA_HINT}") from None
    from tokenizers import Tokenizer as HFTokenizer

    bpe = Tokenizer(tokenizer)
    print(f"distilling a {dims}-dim static model over {bpe.vocab_size} BPE tokens from {folder.name}", file=sys.stderr)
    vectors = bpe_token_vectors(folder, bpe.path, device)
    # model2vec's remaining steps: PCA, Zipf-rank SIF weights.
    vectors = apply_pca(vectors, dims) * compute_weights(len(vectors), SIF_COEFFICIENT)[:, None]
    vectors[[bpe.eos_id, bpe.pad_id]] = 0.0
    static = _static_embedding_class()(HFTokenizer.from_file(str(bpe.path)), embedding_weights=vectors.astype(np.float32))
    out = Path(out)
    _save(static, out, {"recipe": "model2vec-bpe", "source": folder.name, "source_fingerprint": folder_fingerprint(folder),
                        "dims": int(vectors.shape[1]), "tokenizer_sha256": bpe.sha256})
    return out


def static_model(source: str | Path, dims: int = DEFAULT_DIMS) -> Path:
    """The cached `distill_static` model of `source` (distilled on first use)."""
    folder = _check_source(source)
    key = f"{folder_fingerprint(folder)}-{dims}d"
    return cached_folder("static", key, lambda work: distill_static(folder, work, dims))


def static_bpe_model(source: str | Path, tokenizer: str | Path | None = None, dims: int = DEFAULT_DIMS) -> Path:
    """The cached `distill_static_bpe` model of `source` over `tokenizer` (distilled on first use)."""
    from lorydata.tokenizer import Tokenizer

    folder = _check_source(source)
    bpe = Tokenizer(tokenizer)
    key = f"{folder_fingerprint(folder)}-{bpe.sha256[:16]}-{dims}d"
    return cached_folder("static-bpe", key, lambda work: distill_static_bpe(folder, work, bpe.path, dims))

