"""What makes a static embedder order a corpus as well as MiniLM: distillation and pooling
options measured on a labelled corpus, against MiniLM's own order.

Every variant is a document-by-token count matrix (first N tokens, or all) times a token
table (the MiniLM outputs of each token alone, model2vec-style, before or after PCA and
weighting) times optional per-token weights, L2-normalised; lexical variants add a fixed
random projection of TF-IDF vectors. All of them are a weighted bag of table rows, so each
runs at the speed of the plain static model (one EmbeddingBag lookup over the same ids).
Per variant, mean ± 95% t-interval over disjoint samples of
`lorydata.order_metrics.domain_agreement` (nearest neighbour and walk same-domain share)
and the overlap of its 10-NN lists with MiniLM's.

MiniLM's vectors and the raw token tables are computed once into `--cache`.

Usage:
    python benchmarks/bench_static_levers.py --corpus PATH/dev_corpus/train.jsonl.zst --docs 1000 --samples 3
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
import scipy.sparse as sp
from bench_embedders import interval, load_documents

from lorydata import lexical_embed
from lorydata.embed import Embedder, EmbedderConfig, _bundled_model
from lorydata.order_metrics import domain_agreement
from lorydata.tokenizer import Tokenizer

RESULTS = Path(__file__).resolve().parent / "results" / "embedders" / "static-levers"


def raw_tables(cache: Path) -> dict:
    """{"wp": (table, tokenizer), "bpe": (table, None)}: the source's mean-pooled output for
    each token alone, 384 dims, no PCA, no weights (model2vec's first step)."""
    from model2vec.distill import distill
    from tokenizers import Tokenizer as HFTokenizer

    from lorydata.static_embed import bpe_token_vectors

    cache.mkdir(parents=True, exist_ok=True)
    wp_file, wp_tok = cache / "wp_raw.npy", cache / "wp_tokenizer.json"
    if not wp_file.is_file():
        start = time.perf_counter()
        model = distill(_bundled_model(), pca_dims=None, sif_coefficient=None, quantize_to="float32", device="cpu")
        np.save(wp_file, np.asarray(model.embedding, dtype=np.float32))
        model.tokenizer.save(str(wp_tok))
        print(f"  raw WordPiece table {time.perf_counter() - start:.0f} s", flush=True)
    bpe_file = cache / "bpe_raw.npy"
    if not bpe_file.is_file():
        start = time.perf_counter()
        np.save(bpe_file, bpe_token_vectors(_bundled_model(), None, device="cpu"))
        print(f"  raw BPE table {time.perf_counter() - start:.0f} s", flush=True)
    wp = HFTokenizer.from_file(str(wp_tok))
    wp.no_truncation()
    wp.no_padding()
    return {"wp": (np.load(wp_file), wp), "bpe": (np.load(bpe_file), None)}


def minilm_vectors(samples: list[list[dict]], cache: Path) -> list[np.ndarray]:
    """MiniLM torch vectors of every sample, computed once per set of texts."""
    out = []
    embedder = None
    for sample in samples:
        key = hashlib.sha256("\0".join(d["text"] for d in sample).encode()).hexdigest()[:16]
        path = cache / f"minilm-{key}.npy"
        if not path.is_file():
            embedder = embedder or Embedder(EmbedderConfig(device="cpu"))
            start = time.perf_counter()
            np.save(path, embedder.encode([d["text"] for d in sample]))
            print(f"  MiniLM {len(sample)} documents {time.perf_counter() - start:.0f} s", flush=True)
        out.append(np.load(path))
    return out


def count_matrix(ids: list[list[int]], vocab: int, window: int | None) -> sp.csr_matrix:
    """(docs, vocab) token counts of each document's first `window` ids (all with None)."""
    cut = [np.asarray(i[:window] if window else i, dtype=np.int64) for i in ids]
    lengths = np.fromiter((len(c) for c in cut), np.int64, len(cut))
    indptr = np.concatenate([[0], np.cumsum(lengths)])
    flat = np.concatenate(cut) if cut else np.zeros(0, np.int64)
    matrix = sp.csr_matrix((np.ones(len(flat), np.float64), flat, indptr), shape=(len(ids), vocab))
    matrix.sum_duplicates()
    return matrix


def unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def pca(table: np.ndarray, dims: int | None) -> np.ndarray:
    from model2vec.distill.inference import apply_pca

    return apply_pca(table.copy(), dims) if dims else table


def zipf_sif(n: int, coefficient: float = 1e-4) -> np.ndarray:
    from model2vec.distill.inference import compute_weights

    return compute_weights(n, coefficient)


def idf(counts: sp.csr_matrix, smooth: bool = True) -> np.ndarray:
    df = np.asarray((counts > 0).sum(axis=0)).ravel()
    n = counts.shape[0]
    return np.log((1 + n) / (1 + df)) + 1 if smooth else np.log(np.maximum(n, 1) / np.maximum(df, 1))


def sif(counts: sp.csr_matrix, a: float) -> np.ndarray:
    freq = np.asarray(counts.sum(axis=0)).ravel()
    return a / (a + freq / max(freq.sum(), 1))


def knn_overlap(x: np.ndarray, reference: np.ndarray, k: int = 10) -> float:
    """Mean share of each document's k nearest neighbours under x that are among its k
    nearest under the reference vectors (exact cosine)."""
    def top(v):
        sims = v @ v.T
        np.fill_diagonal(sims, -np.inf)
        return np.argpartition(-sims, k, axis=1)[:, :k]

    a, b = top(unit(x)), top(unit(reference))
    return float(np.mean([len(np.intersect1d(a[i], b[i])) / k for i in range(len(x))]))


class Sample:
    """One sample's token counts and statistics, shared by the variants.

    Attributes:
        wp, bp: {window: (docs, vocab) counts} of WordPiece ("static") and BPE ids, window
            in (128, 256, 512, None = whole document).
        wp_idf, bp_idf: smoothed IDF of each token over the sample's whole documents.
        other: the same for the next sample (statistics estimated on other documents).
    """

    def __init__(self, wp_ids, bpe_ids, wp_vocab, bpe_vocab):
        self.wp = {w: count_matrix(wp_ids, wp_vocab, w) for w in (64, *WINDOWS)}
        self.bp = {w: count_matrix(bpe_ids, bpe_vocab, w) for w in (64, *WINDOWS)}
        self.wp_idf, self.bp_idf = idf(self.wp[None]), idf(self.bp[None])
        self.bpe_ids = bpe_ids
        self.others = []  # the other samples (statistics estimated on other documents)
        self.other = None


WINDOWS = (128, 256, 512, None)


def _tag(window):
    return "whole" if window is None else str(window)


def set_weights(t: dict, x: Sample) -> dict:
    """model2vec's recipe and its parts; token weights from the sample, another sample, a
    fixed reference corpus (the bundled sample); windows."""
    v = {}
    wp, bp = x.wp, x.bp
    v["static m2v 256 (baseline)"] = wp[256] @ t["wp_m2v"]
    v["static m2v whole"] = wp[None] @ t["wp_m2v"]
    v["static pca, no weights 256"] = wp[256] @ t["wp_pca"]
    v["static raw384, no weights 256"] = wp[256] @ t["wp_raw"]
    v["static pca x idf(split) 256"] = wp[256] @ (t["wp_pca"] * x.wp_idf[:, None])
    v["static pca x idf(split) whole"] = wp[None] @ (t["wp_pca"] * x.wp_idf[:, None])
    v["static pca x idf0(split) 256"] = wp[256] @ (t["wp_pca"] * idf(wp[None], smooth=False)[:, None])
    v["static pca x idf(ref) 256"] = wp[256] @ (t["wp_pca"] * idf(t["ref_wp"])[:, None])
    v["static pca x sif1e-3(split) 256"] = wp[256] @ (t["wp_pca"] * sif(wp[None], 1e-3)[:, None])
    v["static pca x sif1e-4(split) 256"] = wp[256] @ (t["wp_pca"] * sif(wp[None], 1e-4)[:, None])
    v["static pca x sif1e-4(ref) 256"] = wp[256] @ (t["wp_pca"] * sif(t["ref_wp"], 1e-4)[:, None])
    v["bpe m2v 256 (baseline)"] = bp[256] @ t["bpe_m2v"]
    v["bpe m2v whole"] = bp[None] @ t["bpe_m2v"]
    v["bpe pca, no weights 256"] = bp[256] @ t["bpe_pca"]
    v["bpe raw384, no weights 256"] = bp[256] @ t["bpe_raw"]
    for w in (256, 512, None):
        v[f"bpe pca x idf(split) {_tag(w)}"] = bp[w] @ (t["bpe_pca"] * x.bp_idf[:, None])
    v["bpe pca x idf0(split) whole"] = bp[None] @ (t["bpe_pca"] * idf(bp[None], smooth=False)[:, None])
    v["bpe raw384 x idf(split) whole"] = bp[None] @ (t["bpe_raw"] * x.bp_idf[:, None])
    v["bpe pca x idf(ref) whole"] = bp[None] @ (t["bpe_pca"] * idf(t["ref_bpe"])[:, None])
    v["bpe pca x idf(ref) 256"] = bp[256] @ (t["bpe_pca"] * idf(t["ref_bpe"])[:, None])
    v["bpe pca x sif1e-3(split) whole"] = bp[None] @ (t["bpe_pca"] * sif(bp[None], 1e-3)[:, None])
    v["bpe pca x sif1e-4(split) whole"] = bp[None] @ (t["bpe_pca"] * sif(bp[None], 1e-4)[:, None])
    v["bpe pca x sif1e-4(ref) whole"] = bp[None] @ (t["bpe_pca"] * sif(t["ref_bpe"], 1e-4)[:, None])
    return v


def set_lexical(t: dict, x: Sample) -> dict:
    """TF-IDF of BPE ids, exact and randomly projected, and mixes with the static vector."""
    v = {}
    bp = x.bp
    v["bpe tfidf exact whole"] = (bp[None] @ sp.diags(x.bp_idf)).toarray()
    v["bpe tfidf exact 256"] = (bp[256] @ sp.diags(x.bp_idf)).toarray()
    for d in (256, 1024):
        v[f"bpe tfidf proj{d} whole"] = bp[None] @ (t["projection"][d] * x.bp_idf[:, None])
    semantic = unit(bp[None] @ (t["bpe_pca"] * x.bp_idf[:, None]))
    lexical = unit(bp[None] @ (t["projection"][256] * x.bp_idf[:, None]))
    for beta in (0.25, 0.5):
        v[f"bpe idf + tfidf proj256 beta {beta} whole"] = np.hstack([np.sqrt(1 - beta) * semantic,
                                                                     np.sqrt(beta) * lexical])
    return v


def set_post(t: dict, x: Sample) -> dict:
    """Post-processing over the sample's vectors: centring, first principal component removed."""
    v = {}
    base = {"static pca x idf(split) 256": x.wp[256] @ (t["wp_pca"] * x.wp_idf[:, None]),
            "bpe pca x idf(split) whole": x.bp[None] @ (t["bpe_pca"] * x.bp_idf[:, None]),
            "bpe m2v 256 (baseline)": x.bp[256] @ t["bpe_m2v"]}
    for name, vectors in base.items():
        centred = unit(vectors) - unit(vectors).mean(axis=0)
        v[f"{name} centred"] = centred
        u = np.linalg.svd(centred, full_matrices=False)[2][0]
        v[f"{name} centred -pc1"] = centred - np.outer(centred @ u, u)
    return v


def set_tables(t: dict, x: Sample) -> dict:
    """Unweighted token tables (no SIF, no IDF): raw 384 dims, PCA 256, unit rows; windows."""
    v = {}
    for w in WINDOWS:
        v[f"static raw384 {_tag(w)}"] = x.wp[w] @ t["wp_raw"]
        v[f"bpe raw384 {_tag(w)}"] = x.bp[w] @ t["bpe_raw"]
    for w in (128, 256, 512):
        v[f"static pca256 {_tag(w)}"] = x.wp[w] @ t["wp_pca"]
        v[f"bpe pca256 {_tag(w)}"] = x.bp[w] @ t["bpe_pca"]
    v["static raw384 unit rows 256"] = x.wp[256] @ unit(t["wp_raw"])
    v["bpe raw384 unit rows 256"] = x.bp[256] @ unit(t["bpe_raw"])
    v["static raw384 256 centred"] = unit(x.wp[256] @ t["wp_raw"]) - unit(x.wp[256] @ t["wp_raw"]).mean(axis=0)
    v["bpe raw384 256 centred"] = unit(x.bp[256] @ t["bpe_raw"]) - unit(x.bp[256] @ t["bpe_raw"]).mean(axis=0)
    return v


def _tfidf(counts: sp.csr_matrix, weights: np.ndarray, sublinear: bool = False) -> sp.csr_matrix:
    counts = counts.copy()
    if sublinear:
        counts.data = 1 + np.log(counts.data)
    return counts @ sp.diags(weights)


def _lsa(counts: sp.csr_matrix, weights: np.ndarray, dims: int, sublinear: bool = False) -> np.ndarray:
    """(vocab, dims) LSA table: IDF times the top right singular vectors of the unit TF-IDF rows."""
    from sklearn.decomposition import TruncatedSVD

    rows = _tfidf(counts, weights, sublinear)
    norms = np.sqrt(np.asarray(rows.multiply(rows).sum(axis=1)).ravel())
    rows = sp.diags(1 / np.maximum(norms, 1e-12)) @ rows
    svd = TruncatedSVD(dims, algorithm="randomized", random_state=0).fit(rows)
    return svd.components_.T * weights[:, None]


def set_tfidf(t: dict, x: Sample) -> dict:
    """TF-IDF of token ids: exact (sparse cosine), windows, tf forms, idf sources; random
    projections and LSA tables to dense dims."""
    v = {}
    bp = x.bp
    for w in WINDOWS:
        v[f"bpe tfidf exact {_tag(w)}"] = _tfidf(bp[w], x.bp_idf).toarray()
    v["bpe tfidf exact sublinear 256"] = _tfidf(bp[256], x.bp_idf, sublinear=True).toarray()
    v["bpe tf only exact 256"] = bp[256].toarray()
    v["bpe tfidf exact idf0 256"] = _tfidf(bp[256], idf(bp[None], smooth=False)).toarray()
    v["bpe tfidf exact idf(other sample) 256"] = _tfidf(bp[256], x.other.bp_idf).toarray()
    v["bpe tfidf exact idf(ref) 256"] = _tfidf(bp[256], idf(t["ref_bpe"])).toarray()
    v["static tfidf exact 256"] = _tfidf(x.wp[256], x.wp_idf).toarray()
    v["static tfidf exact whole"] = _tfidf(x.wp[None], x.wp_idf).toarray()
    for d in (256, 512, 1024, 2048):
        v[f"bpe tfidf proj{d} 256"] = bp[256] @ (t["projection"][d] * x.bp_idf[:, None])
    v["bpe lsa256(split) 256"] = bp[256] @ _lsa(bp[256], x.bp_idf, 256)
    v["bpe lsa256(other sample) 256"] = bp[256] @ _lsa(x.other.bp[256], x.other.bp_idf, 256)
    v["bpe lsa256(ref) 256"] = bp[256] @ _lsa(t["ref_bpe_256"], idf(t["ref_bpe"]), 256)
    return v


def set_mix(t: dict, x: Sample) -> dict:
    """The unweighted static vector concatenated with a lexical one (weights sqrt(1-beta), sqrt(beta))."""
    v = {}
    semantic = unit(x.bp[256] @ t["bpe_raw"])
    exact = unit(_tfidf(x.bp[256], x.bp_idf).toarray())
    projected = unit(x.bp[256] @ (t["projection"][256] * x.bp_idf[:, None]))
    lsa = unit(x.bp[256] @ _lsa(x.bp[256], x.bp_idf, 256))
    for beta in (0.25, 0.5, 0.75):
        v[f"bpe raw384 + tfidf exact beta {beta} 256"] = np.hstack([np.sqrt(1 - beta) * semantic, np.sqrt(beta) * exact])
        v[f"bpe raw384 + tfidf proj256 beta {beta} 256"] = np.hstack([np.sqrt(1 - beta) * semantic,
                                                                     np.sqrt(beta) * projected])
    v["bpe raw384 + lsa256 beta 0.5 256"] = np.hstack([np.sqrt(0.5) * semantic, np.sqrt(0.5) * lsa])
    wp_semantic = unit(x.wp[256] @ t["wp_raw"])
    wp_exact = unit(_tfidf(x.wp[256], x.wp_idf).toarray())
    v["static raw384 + tfidf exact beta 0.5 256"] = np.hstack([np.sqrt(0.5) * wp_semantic, np.sqrt(0.5) * wp_exact])
    return v


def _tf(counts: sp.csr_matrix, form: str) -> sp.csr_matrix:
    """Term frequencies: "tf" counts, "log" 1 + log(count), "binary" presence."""
    counts = counts.copy()
    if form == "log":
        counts.data = 1 + np.log(counts.data)
    elif form == "binary":
        counts.data = np.ones_like(counts.data)
    return counts


def set_pool(t: dict, x: Sample) -> dict:
    """Pooling of the distilled (semantic) tables: tf form x IDF source x window; sublinear
    TF-IDF exact, projected and LSA; mixes."""
    v = {}
    for table_name, table, counts, weights, ref in (("bpe", t["bpe_raw"], x.bp, x.bp_idf, t["ref_bpe"]),
                                                     ("static", t["wp_raw"], x.wp, x.wp_idf, t["ref_wp"])):
        for form in ("tf", "log", "binary"):
            for w in (128, 256, None):
                v[f"{table_name} raw384 {form} x idf(split) {_tag(w)}"] = _tf(counts[w], form) @ (table * weights[:, None])
            v[f"{table_name} raw384 {form} 256"] = _tf(counts[256], form) @ table
        v[f"{table_name} raw384 log x idf(ref) 256"] = _tf(counts[256], "log") @ (table * idf(ref)[:, None])
        v[f"{table_name} raw384 log x idf(split) x zipf 256"] = _tf(counts[256], "log") @ (
            table * (weights * zipf_sif(len(table)))[:, None])
    v["bpe m2v log 256"] = _tf(x.bp[256], "log") @ t["bpe_m2v"]
    v["bpe pca256 log x idf(split) 256"] = _tf(x.bp[256], "log") @ (t["bpe_pca"] * x.bp_idf[:, None])
    for w in (128, 512, None):
        v[f"bpe tfidf exact log {_tag(w)}"] = (_tf(x.bp[w], "log") @ sp.diags(x.bp_idf)).toarray()
    v["bpe tfidf exact log idf(ref) 256"] = (_tf(x.bp[256], "log") @ sp.diags(idf(t["ref_bpe"]))).toarray()
    v["bpe tfidf exact log idf(other sample) 256"] = (_tf(x.bp[256], "log") @ sp.diags(x.other.bp_idf)).toarray()
    v["bpe tfidf exact binary 256"] = (_tf(x.bp[256], "binary") @ sp.diags(x.bp_idf)).toarray()
    v["static tfidf exact log 256"] = (_tf(x.wp[256], "log") @ sp.diags(x.wp_idf)).toarray()
    for d in (256, 512, 1024, 2048):
        v[f"bpe tfidf log proj{d} 256"] = _tf(x.bp[256], "log") @ (t["projection"][d] * x.bp_idf[:, None])
    return v


def set_dense(t: dict, x: Sample) -> dict:
    """Sublinear TF-IDF made dense: LSA tables (fit on the sample, on another sample, on part
    of the sample, on the reference corpus) and random projections; mixes with the static vector."""
    v = {}
    bp, log = x.bp, {w: _tf(x.bp[w], "log") for w in (128, 256)}
    for d in (128, 256, 384):
        v[f"bpe lsa{d} log(split) 256"] = log[256] @ _lsa(bp[256], x.bp_idf, d, True)
    v["bpe lsa256 log(split) 128"] = log[128] @ _lsa(bp[128], x.bp_idf, 256, True)
    v["bpe lsa256 log(other sample) 256"] = log[256] @ _lsa(x.other.bp[256], x.other.bp_idf, 256, True)
    v["bpe lsa256 log(300 of split) 256"] = log[256] @ _lsa(bp[256][:300], idf(bp[None][:300]), 256, True)
    v["bpe lsa256 log(ref) 256"] = log[256] @ _lsa(t["ref_bpe_256"], idf(t["ref_bpe"]), 256, True)
    for d in (512, 1024):
        v[f"bpe tfidf log proj{d} 128"] = log[128] @ (t["projection"][d] * x.bp_idf[:, None])
    semantic = unit(bp[128] @ t["bpe_raw"])
    for d in (256, 512):
        lexical = unit(log[256] @ (t["projection"][d] * x.bp_idf[:, None]))
        v[f"bpe raw384 128 + tfidf log proj{d} 256 beta 0.5"] = np.hstack([np.sqrt(0.5) * semantic, np.sqrt(0.5) * lexical])
    lsa = unit(log[256] @ _lsa(bp[256], x.bp_idf, 256, True))
    v["bpe raw384 128 + lsa256 log(split) 256 beta 0.5"] = np.hstack([np.sqrt(0.5) * semantic, np.sqrt(0.5) * lsa])
    wlog = _tf(x.wp[256], "log")
    v["static lsa256 log(split) 256"] = wlog @ _lsa(x.wp[256], x.wp_idf, 256, True)
    v["static tfidf log proj1024 256"] = wlog @ (t["wp_projection"] * x.wp_idf[:, None])
    return v


def set_window(t: dict, x: Sample) -> dict:
    """Short prefixes: model2vec's tables without SIF weights (PCA 256) and sublinear TF-IDF LSA."""
    v = {}
    for w in (64, 128, 256):
        v[f"static pca256 {w}"] = x.wp[w] @ t["wp_pca"]
        v[f"bpe pca256 {w}"] = x.bp[w] @ t["bpe_pca"]
        v[f"bpe lsa256 log(split) {w}"] = _tf(x.bp[w], "log") @ _lsa(x.bp[w], idf(x.bp[w]), 256, True)
    return v


def set_sif(t: dict, x: Sample) -> dict:
    """model2vec's Zipf-rank SIF weights at other coefficients (1e-4 is its default; None = no weights)."""
    v = {}
    for coefficient in (1e-4, 1e-3, 1e-2, 1e-1):
        v[f"static pca256 zipf-sif {coefficient:g} 256"] = x.wp[256] @ (t["wp_pca"] * zipf_sif(len(t["wp_pca"]), coefficient)[:, None])
        v[f"bpe pca256 zipf-sif {coefficient:g} 256"] = x.bp[256] @ (t["bpe_pca"] * zipf_sif(len(t["bpe_pca"]), coefficient)[:, None])
    v["static pca256 no weights 256"] = x.wp[256] @ t["wp_pca"]
    v["bpe pca256 no weights 256"] = x.bp[256] @ t["bpe_pca"]
    return v


def _lsa_build(ids: list, x: Sample, dims: int = lexical_embed.DEFAULT_LSA_DIMS,
               window: int | None = lexical_embed.LSA_WINDOW) -> np.ndarray:
    """The product's LSA (`lexical_embed.fit_lsa_table` + `embed_lsa`, special ids skipped)
    fitted on `ids`, embedding the sample's ids."""
    bpe = Tokenizer()
    table = lexical_embed.fit_lsa_table(ids, bpe.vocab_size, dims, window, skip_ids=(bpe.eos_id, bpe.pad_id))
    return lexical_embed.embed_lsa(table, x.bpe_ids, window)


def set_build(t: dict, x: Sample) -> dict:
    """What `lory build-corpus` runs: the product embedders ("static", "static-bpe" over the
    stored ids; "lsa" fitted on the split's own documents, as a build fits it), and the LSA
    levers: fitted on documents disjoint from the measured sample, dims, window, fit size."""
    v = {"static (product, 256 tokens)": t["static"].encode(x.texts),
         "static-bpe ids (product, 256 tokens)": t["static-bpe"].encode_ids(x.bpe_ids)}
    own = x.bpe_ids
    v["lsa (build: fit on the sample itself)"] = _lsa_build(own, x)
    disjoint = [ids for other in x.others for ids in other.bpe_ids]
    v[f"lsa fit on {len(x.others[0].bpe_ids)} disjoint docs"] = _lsa_build(x.others[0].bpe_ids, x)
    v[f"lsa fit on {len(disjoint)} disjoint docs"] = _lsa_build(disjoint, x)
    v["lsa fit on 300 of the sample"] = _lsa_build(own[:300], x)
    v["lsa fit on 300 disjoint docs"] = _lsa_build(x.others[0].bpe_ids[:300], x)
    for dims in (128, 384):
        v[f"lsa dims {dims} (fit on the sample)"] = _lsa_build(own, x, dims=dims)
    v["lsa window 128 (fit on the sample)"] = _lsa_build(own, x, window=128)
    v["lsa window 512 (fit on the sample)"] = _lsa_build(own, x, window=512)
    v["lsa whole documents (fit on the sample)"] = _lsa_build(own, x, window=None)
    return v


VARIANT_SETS = {"weights": set_weights, "lexical": set_lexical, "post": set_post, "tables": set_tables,
                "tfidf": set_tfidf, "mix": set_mix, "pool": set_pool,
                "dense": set_dense, "window": set_window,
                "sif": set_sif, "build": set_build}


def run(args) -> dict:
    docs = load_documents(args.corpus)
    rng = np.random.default_rng(args.seed)
    picked = rng.permutation(len(docs))[: args.docs * args.samples]
    samples = [[docs[i] for i in picked[s * args.docs: (s + 1) * args.docs]] for s in range(args.samples)]
    cache = Path(args.cache)
    tables = raw_tables(cache)
    minilm = minilm_vectors(samples, cache)
    wp_raw, wp_tok = tables["wp"]
    bpe_raw, _ = tables["bpe"]
    bpe = Tokenizer()
    wp_vocab, bpe_vocab = wp_raw.shape[0], bpe_raw.shape[0]
    t = {"wp_raw": wp_raw, "bpe_raw": bpe_raw, "wp_pca": pca(wp_raw, 256), "bpe_pca": pca(bpe_raw, 256)}
    # model2vec's recipe: PCA 256, then Zipf-rank SIF weights.
    t["wp_m2v"] = t["wp_pca"] * zipf_sif(wp_vocab)[:, None]
    t["bpe_m2v"] = t["bpe_pca"] * zipf_sif(bpe_vocab)[:, None]
    # Reference statistics from a fixed corpus (the bundled sample), as a distillation could ship them.
    ref_texts = [json.loads(line)["text"] for line in _sample_lines()]
    t["ref_wp"] = count_matrix([e.ids for e in wp_tok.encode_batch(ref_texts, add_special_tokens=False)], wp_vocab, None)
    ref_bpe_ids = bpe.encode_batch(ref_texts)
    t["ref_bpe"] = count_matrix(ref_bpe_ids, bpe_vocab, None)
    t["ref_bpe_256"] = count_matrix(ref_bpe_ids, bpe_vocab, 256)
    t["projection"] = {d: np.random.default_rng(0).standard_normal((bpe_vocab, d)).astype(np.float32) / np.sqrt(d)
                       for d in (256, 512, 1024, 2048)}
    t["wp_projection"] = np.random.default_rng(0).standard_normal((wp_vocab, 1024)).astype(np.float32) / 32
    prepared = []
    for sample in samples:
        texts = [d["text"] for d in sample]
        prepared.append(Sample([e.ids for e in wp_tok.encode_batch(texts, add_special_tokens=False)],
                               bpe.encode_batch(texts), wp_vocab, bpe_vocab))
    for s, (sample, x) in enumerate(zip(samples, prepared, strict=True)):
        x.other = prepared[(s + 1) % len(prepared)]
        x.others = [prepared[(s + i) % len(prepared)] for i in range(1, len(prepared))]
        x.texts = [d["text"] for d in sample]
    if "build" in args.sets:
        t["static"] = Embedder(EmbedderConfig(model="static", device="cpu"))
        t["static-bpe"] = Embedder(EmbedderConfig(model="static-bpe", device="cpu"))

    results, reference = {}, []
    for s, (sample, x) in enumerate(zip(samples, prepared, strict=True)):
        domains = [d["domain"] for d in sample]
        variants = {}
        for name in args.sets:
            variants.update(VARIANT_SETS[name](t, x))
        variants["minilm torch"] = minilm[s]
        for name, vectors in variants.items():
            vectors = unit(np.asarray(vectors))
            quality = domain_agreement(vectors, domains)
            row = results.setdefault(name, {"nearest": [], "walk": [], "overlap": []})
            row["nearest"].append(quality["nearest_same_domain"])
            row["walk"].append(quality["walk_same_domain"])
            row["overlap"].append(knn_overlap(vectors, minilm[s]))
        reference.append(quality["random_same_domain"])
        print(f"  sample {s + 1}/{len(samples)} done", flush=True)
    return {"corpus": Path(args.corpus).name, "documents_per_sample": args.docs, "samples": args.samples,
            "seed": args.seed, "sets": args.sets, "random_same_domain": interval(reference),
            "variants": {name: {"nearest_same_domain": interval(r["nearest"]), "walk_same_domain": interval(r["walk"]),
                                "knn10_overlap_minilm": interval(r["overlap"]), "raw": r}
                         for name, r in results.items()}}


def _sample_lines():
    import io

    import zstandard

    path = Path(__file__).resolve().parents[1] / "lorydata" / "assets" / "sample" / "sample.jsonl.zst"
    with open(path, "rb") as raw:
        yield from io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(raw), encoding="utf-8")


def report(results: dict) -> None:
    def fmt(pair):
        return f"{pair[0]:.3f} ± {pair[1]:.3f}"

    print(f"\nmean ± 95% t-interval over {results['samples']} samples of {results['documents_per_sample']} documents "
          f"({results['corpus']}); random order same-domain share {fmt(results['random_same_domain'])}")
    print(f"{'variant':48s} {'NN same domain':>16s} {'walk same domain':>17s} {'10-NN overlap MiniLM':>21s}")
    for name, row in results["variants"].items():
        print(f"{name:48s} {fmt(row['nearest_same_domain']):>16s} {fmt(row['walk_same_domain']):>17s} "
              f"{fmt(row['knn10_overlap_minilm']):>21s}")


def plot(results: dict, path: Path) -> None:
    """Nearest-neighbour and walk same-domain share of every variant (mean ± 95% interval),
    MiniLM's mean as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["variants"])
    fig, axes = plt.subplots(1, 2, figsize=(12, 1.2 + 0.28 * len(names)), sharey=True)
    for ax, key, title in ((axes[0], "nearest_same_domain", "nearest neighbour of the same domain"),
                           (axes[1], "walk_same_domain", "adjacent documents of one domain (walk)")):
        means = [results["variants"][n][key][0] for n in names]
        spans = [results["variants"][n][key][1] for n in names]
        for i, name in enumerate(names):
            colour = "C3" if name == "minilm torch" else "C2" if name.startswith("lsa") else "C0"
            ax.errorbar(means[i], i, xerr=spans[i], fmt="o", color=colour, capsize=3)
        if "minilm torch" in results["variants"]:
            ax.axvline(results["variants"]["minilm torch"][key][0], color="C3", ls="--", lw=1)
        ax.grid(axis="x", alpha=0.3)
        ax.set_title(title, fontsize=10)
    axes[0].set_yticks(range(len(names)), names, fontsize=8)
    axes[0].invert_yaxis()
    fig.suptitle(f"{results['corpus']}: {results['samples']} × {results['documents_per_sample']} documents "
                 "(mean ± 95% interval over samples)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", required=True, help="jsonl(.zst) corpus with a 'domain' field")
    parser.add_argument("--docs", type=int, default=1000, help="documents per sample")
    parser.add_argument("--samples", type=int, default=3, help="disjoint samples (the intervals' n)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the document draw (bench_embedders' default)")
    parser.add_argument("--sets", nargs="+", default=list(VARIANT_SETS), choices=list(VARIANT_SETS),
                        help="groups of variants to measure")
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "lory-bench" / "static-levers"),
                        help="folder for MiniLM's vectors and the raw token tables")
    parser.add_argument("--out", default=str(RESULTS), help="folder for results.json")
    args = parser.parse_args(argv)
    results = run(args)
    report(results)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    plot(results, out / "levers.png")
    print(f"wrote {out / 'results.json'} and {out / 'levers.png'}")


if __name__ == "__main__":
    main()
