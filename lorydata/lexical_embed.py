"""A lexical static embedder: latent semantic analysis (LSA) of sublinear TF-IDF over token ids.

A document's vector is

    v = sum over the distinct tokens t of its first `window` ids of (1 + log tf_t) * table[t],

L2-normalised, where `table = idf[:, None] * V` and V holds the top `dims` right singular
vectors of the unit-length sublinear TF-IDF rows of a fit sample of documents (Deerwester
et al. 1990's LSA over Salton & Buckley's TF-IDF with sublinear term frequency, as
scikit-learn's `TfidfVectorizer(sublinear_tf=True)` + `TruncatedSVD` compute it). It is a
static embedder like model2vec's: one row per token, a weighted bag of rows per document,
no second tokenization when the ids are lory's own (the documents stage stores them).

Unlike `static` / `static-bpe` (rows distilled from MiniLM), the rows are fitted to the
corpus being ordered: `fit_lsa` reads a sample of the build's own token ids (a per-split
statistic, computed once by the driver) and writes a folder that every worker loads, so all
workers embed with the same bits. Encoding is a scipy sparse-dense product (no BLAS, no
threads): the same ids give the same vector on any worker. Why it exists: on the dev corpus
(5 domains) it puts documents of one domain next to each other at least as often as MiniLM
does, where the distilled tables do not (benchmarks/bench_static_levers.py).

The folder holds `lsa_table.npy` (vocab, dims) float32, the tokenizer (`tokenizer.json`, so
texts embed too) and `lory_lsa.json` (recipe, sizes, sha256 of the table and tokenizer).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from lorydata.errors import LoryDataError
from lorydata.hashing import file_sha256

TABLE_FILE = "lsa_table.npy"
INFO_FILE = "lory_lsa.json"
RECIPE = "lsa-sublinear-tfidf"
DEFAULT_LSA_DIMS = 256
LSA_FIT_DOCS = 10_000  # documents a build fits on (ample: 300 already order the dev corpus as well)
LSA_WINDOW = 256  # tokens read per document, at fit and at encoding


def term_counts(token_ids: list, vocab_size: int, window: int | None = LSA_WINDOW) -> sp.csr_matrix:
    """(documents, vocab_size) counts of each document's first `window` ids (all with None).

    Args:
        token_ids: one integer array (or list) per document.
        vocab_size: ids must lie in [0, vocab_size).
        window: ids read per document; None reads all.

    Returns:
        A CSR matrix with sorted column indices and summed duplicates (float64 counts).
    """
    cut = [np.asarray(ids, dtype=np.int64).reshape(-1)[:window] for ids in token_ids]
    lengths = np.fromiter((len(c) for c in cut), np.int64, len(cut))
    flat = np.concatenate(cut) if cut else np.zeros(0, np.int64)
    if len(flat) and (flat.min() < 0 or flat.max() >= vocab_size):
        raise LoryDataError(f"token ids must lie in [0, {vocab_size}), got {int(flat.min())}..{int(flat.max())}")
    indptr = np.concatenate([[0], np.cumsum(lengths)])
    counts = sp.csr_matrix((np.ones(len(flat)), flat, indptr), shape=(len(cut), vocab_size))
    counts.sum_duplicates()  # also sorts each row's column indices: a fixed summation order
    return counts


def sublinear_tf(counts: sp.csr_matrix) -> sp.csr_matrix:
    """1 + log(count) for every token present (zero stays zero)."""
    out = counts.copy()
    out.data = 1.0 + np.log(out.data)
    return out


def document_frequencies(counts: sp.csr_matrix) -> np.ndarray:
    """(vocab,) number of documents holding each token (sums across files: a mergeable statistic)."""
    return np.bincount(counts.indices, minlength=counts.shape[1]).astype(np.int64)


def idf_weights(df: np.ndarray, documents: int) -> np.ndarray:
    """Smoothed inverse document frequency, ln((1 + n) / (1 + df)) + 1 (scikit-learn's)."""
    return np.log((1.0 + documents) / (1.0 + np.asarray(df, dtype=np.float64))) + 1.0


def truncated_svd_class():
    """scikit-learn's TruncatedSVD (imported here: heavy, and only fitting needs it).

    Raises:
        LoryDataError: scikit-learn is not installed.
    """
    try:
        from sklearn.decomposition import TruncatedSVD
    except ImportError:
        raise LoryDataError("fitting an LSA model needs scikit-learn: install the static extra: "
                            "pip install 'lory[static]'") from None
    return TruncatedSVD


def fit_lsa_table(token_ids: list, vocab_size: int, dims: int = DEFAULT_LSA_DIMS, window: int | None = LSA_WINDOW,
                  skip_ids: tuple[int, ...] = ()) -> np.ndarray:
    """The LSA table of a fit sample (module docstring).

    Args:
        token_ids: the fit documents' token ids (one array per document).
        vocab_size: the tokenizer's vocabulary size.
        dims: columns of the table. A sample of lower rank (fewer documents or distinct
            tokens) leaves the last columns zero, so the size never depends on the data.
        window: ids read per document (as at encoding).
        skip_ids: ids whose rows stay zero (special tokens: EOS, padding).

    Returns:
        (vocab_size, dims) float32; tokens absent from the sample get zero rows.
    """
    svd_class = truncated_svd_class()
    if dims < 1:
        raise LoryDataError(f"LSA dims must be positive, got {dims}")
    counts = term_counts(token_ids, vocab_size, window)
    if skip_ids:
        counts.data[np.isin(counts.indices, skip_ids)] = 0.0
        counts.eliminate_zeros()
    counts = counts[np.diff(counts.indptr) > 0]  # documents with no token carry nothing
    if counts.shape[0] < 2:
        raise LoryDataError(f"fitting an LSA table needs at least 2 documents with tokens, got {counts.shape[0]}")
    df = document_frequencies(counts)
    present = np.flatnonzero(df)  # the SVD runs on the tokens seen; the others keep zero rows
    idf = idf_weights(df[present], counts.shape[0])
    rows = sublinear_tf(counts[:, present]) @ sp.diags(idf)
    norms = np.sqrt(np.asarray(rows.multiply(rows).sum(axis=1)).ravel())
    rows = sp.diags(1.0 / norms) @ rows  # every fit document weighs the same
    rank = min(dims, counts.shape[0] - 1, len(present) - 1)
    table = np.zeros((vocab_size, dims), np.float32)
    if rank >= 1:
        svd = svd_class(rank, algorithm="randomized", n_iter=7, random_state=0).fit(rows)
        table[present, :rank] = (svd.components_.T * idf[:, None]).astype(np.float32)
    return table


def embed_lsa(table: np.ndarray, token_ids: list, window: int | None = LSA_WINDOW) -> np.ndarray:
    """Unit vectors of documents given as token ids (module docstring; zero for a document
    without a token the table knows).

    Args:
        table: (vocab, dims) LSA table.
        token_ids: one integer array (or list) per document.
        window: ids read per document; None reads all.

    Returns:
        (documents, dims) float32.
    """
    counts = term_counts(token_ids, table.shape[0], window)
    vectors = np.asarray(sublinear_tf(counts).astype(np.float32) @ table, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


def is_lsa_folder(folder: Path) -> bool:
    """True for a folder written by `write_lsa_folder`."""
    return (Path(folder) / INFO_FILE).is_file() and (Path(folder) / TABLE_FILE).is_file()


def lsa_info(folder: Path) -> dict:
    """The recipe an LSA folder records."""
    return json.loads((Path(folder) / INFO_FILE).read_text())


def write_lsa_folder(out: str | Path, table: np.ndarray, tokenizer: str | Path, info: dict) -> Path:
    """Write an LSA model folder (table, tokenizer, recipe).

    Args:
        out: the folder (created; files in it are replaced).
        table: (vocab, dims) float32 LSA table.
        tokenizer: the tokenizer.json whose ids index the table.
        info: what the table was fitted on (kept in `lory_lsa.json`).

    Returns:
        The folder.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / TABLE_FILE, np.ascontiguousarray(table, dtype=np.float32))
    shutil.copyfile(tokenizer, out / "tokenizer.json")
    record = {**info, "recipe": RECIPE, "vocab_size": int(table.shape[0]), "dims": int(table.shape[1]),
              "table_sha256": file_sha256(out / TABLE_FILE), "tokenizer_sha256": file_sha256(out / "tokenizer.json")}
    (out / INFO_FILE).write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    return out


def fit_lsa(token_ids: list, out: str | Path, tokenizer: str | Path | None = None, dims: int = DEFAULT_LSA_DIMS,
            window: int | None = LSA_WINDOW, max_documents: int | None = LSA_FIT_DOCS) -> Path:
    """Fit an LSA table on documents' ids of a lory tokenizer and write its folder.

    Args:
        token_ids: documents' ids of `tokenizer`, in a fixed order (the first
            `max_documents` are used: pass them in an order that does not depend on the runner).
        out: the folder to write.
        tokenizer: the lory tokenizer.json (or its folder); None = lory's bundled tokenizer.
        dims: columns of the table.
        window: ids read per document, at fit and at encoding.
        max_documents: at most this many documents are fitted on; None = all.

    Returns:
        The written folder (load it with `lorydata.embed.Embedder`).
    """
    from lorydata.tokenizer import Tokenizer

    bpe = Tokenizer(tokenizer)
    sample = list(token_ids[:max_documents] if max_documents else token_ids)
    table = fit_lsa_table(sample, bpe.vocab_size, dims, window, skip_ids=(bpe.eos_id, bpe.pad_id))
    return write_lsa_folder(out, table, bpe.path, {"fit_documents": len(sample), "window": window})


class LsaModel:
    """A loaded LSA folder.

    Attributes:
        table: (vocab, dims) float32.
        tokenizer: the `tokenizers` tokenizer whose ids index the table.
        dim: vector size.
        tokenizer_sha256: sha256 of the folder's tokenizer.json.
        info: the folder's recipe record.

    Args:
        folder: a folder written by `write_lsa_folder`.
    """

    def __init__(self, folder: str | Path):
        from tokenizers import Tokenizer as HFTokenizer

        folder = Path(folder)
        self.info = lsa_info(folder)
        self.table = np.load(folder / TABLE_FILE)
        if self.info.get("table_sha256") != file_sha256(folder / TABLE_FILE):
            raise LoryDataError(f"{folder / TABLE_FILE} does not match its recorded sha256 (a damaged copy?)")
        if self.table.ndim != 2 or self.table.dtype != np.float32:
            raise LoryDataError(f"{folder / TABLE_FILE} must hold a 2-d float32 table")
        self.tokenizer = HFTokenizer.from_file(str(folder / "tokenizer.json"))
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        self.dim = int(self.table.shape[1])
        self.tokenizer_sha256 = self.info["tokenizer_sha256"]

    @property
    def vocab_size(self) -> int:
        return int(self.table.shape[0])

    def embed_ids(self, token_ids: list, window: int | None) -> np.ndarray:
        """Unit vectors of documents' ids (`embed_lsa`)."""
        return embed_lsa(self.table, token_ids, window)
