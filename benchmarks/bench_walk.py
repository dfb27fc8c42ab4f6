"""Walk benchmark: lory's compiled similarity walk against a plain-Python reference of the
public In-Context Pretraining walk, timed in the same process on the same kNN graph.

Two graphs: synthetic clustered embeddings (default 1M documents, d=64, k=20; topics
with sub-topics of log-normal sizes and spreads, log-normal token lengths) and, with
`--corpus`, a real jsonl(.zst) corpus embedded with the default MiniLM embedder and
tokenized with the bundled tokenizer. For each it prints docs/s of both walks, the speed
ratio, and both orders' break rate and mean adjacent similarity (plus a random order).

The reference (`reference_walk`) follows the public sort.py: from the current document
step to the first unvisited of its 9 nearest neighbours; when there is none, restart at the
lowest unvisited id. Written the fast way for plain Python (rows turned into lists once,
a list of flags for "visited"); the public code's 21-document cap on a cluster and its
merge pass are left out, which only makes the reference look better.

Both walks get the same graph. "lory walk" also gets what the pipeline gives it
(embeddings and token lengths, token-aware layout); "lory walk, graph only" gets exactly
what the reference gets; "lory chains only" is step 1 of the walk alone (the greedy
chains, laid out token-aware) without re-homing or joining. Each walk runs --repeats times; the best time counts (the box is
shared), and lory's compiled functions are loaded by a warm-up call first.

Break rate: share of packed sequences (documents in order, one EOS each, cut every
--seq-len tokens) holding an adjacent pair whose cosine is below the 0.95 quantile of
random-pair cosines of that corpus (see lorydata.order_metrics); the same threshold for
every order of a corpus.

Usage:
    python benchmarks/bench_walk.py --corpus PATH/dev_corpus/train.jsonl.zst
    python benchmarks/bench_walk.py --synthetic-n 200000 --repeats 5
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lorydata.knn import KnnConfig, KnnGraph, build_knn_graph, knn_recall
from lorydata.order_metrics import break_threshold, ordering_metrics
from lorydata.walk import WalkConfig, random_order, walk


def reference_walk(neighbors: np.ndarray, candidates: int = 9) -> np.ndarray:
    """The public In-Context Pretraining walk in plain Python (module docstring)."""
    n = len(neighbors)
    rows = neighbors[:, :candidates].tolist()
    visited = [False] * n
    order = []
    lowest = 0
    while len(order) < n:
        while visited[lowest]:
            lowest += 1
        current = lowest
        visited[current] = True
        order.append(current)
        while True:
            for candidate in rows[current]:
                if candidate >= 0 and not visited[candidate]:
                    break
            else:
                break
            current = candidate
            visited[current] = True
            order.append(current)
    return np.asarray(order, dtype=np.int64)


def synthetic_corpus(n: int, d: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Clustered unit vectors and token lengths: 200 topics, 2000 sub-topics of log-normal
    size, each sub-topic its own spread; lengths log-normal with median 500 tokens."""
    rng = np.random.default_rng(seed)
    topics = rng.standard_normal((200, d)).astype(np.float32)
    subtopics = topics[rng.integers(0, 200, 2000)] + 0.7 * rng.standard_normal((2000, d)).astype(np.float32)
    weights = rng.lognormal(0, 1.0, 2000)
    labels = rng.choice(2000, n, p=weights / weights.sum())
    spread = rng.uniform(0.6, 1.4, 2000).astype(np.float32)
    x = subtopics[labels] + spread[labels][:, None] * rng.standard_normal((n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    lengths = np.clip(rng.lognormal(np.log(500), 1.0, n), 16, 32_000).astype(np.int64)
    return x, lengths


def read_texts(path: Path) -> list[str]:
    import zstandard

    with open(path, "rb") as raw:
        stream = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True) if path.suffix == ".zst" else raw
        return [json.loads(line)["text"] for line in io.TextIOWrapper(stream, encoding="utf-8") if line.strip()]


def corpus_inputs(path: Path, cache: Path) -> tuple[np.ndarray, np.ndarray, str]:
    """Embeddings (default embedder), token lengths (bundled tokenizer) and the file's hash;
    cached by that hash."""
    from lorydata.embed import Embedder, EmbedderConfig
    from lorydata.tokenizer import Tokenizer

    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    identity = Embedder.describe(EmbedderConfig())["fingerprint"]
    cached = cache / f"corpus-{digest}-{identity}.npz"
    if cached.exists():
        data = np.load(cached)
        return data["embeddings"], data["lengths"], digest
    texts = read_texts(path)
    start = time.perf_counter()
    lengths = np.array([len(ids) for ids in Tokenizer().encode_batch(texts)], dtype=np.int64)
    embeddings = Embedder(EmbedderConfig()).encode(texts)
    print(f"  embedded and tokenized {len(texts)} documents in {time.perf_counter() - start:.1f} s", flush=True)
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(cached, embeddings=embeddings, lengths=lengths)
    return embeddings, lengths, digest


def knn_graph(x: np.ndarray, config: KnnConfig, cache: Path, key: str) -> tuple[KnnGraph, float]:
    folder = cache / f"knn-{key}-k{config.k}-{config.index}-{config.nprobe}"
    if (folder / "knn.json").exists():
        return KnnGraph.load(folder), float("nan")
    start = time.perf_counter()
    graph = build_knn_graph(x, config)
    seconds = time.perf_counter() - start
    graph.save(folder)
    return graph, seconds


def best_time(function, repeats: int):
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        best = min(best, time.perf_counter() - start)
    return best, result


def run_case(name: str, x: np.ndarray, lengths: np.ndarray, args, cache: Path, key: str) -> dict:
    n = len(x)
    config = KnnConfig(k=args.k, index=args.index, nprobe=args.nprobe)
    graph, build_seconds = knn_graph(x, config, cache, key)
    recall = knn_recall(x, graph.neighbors, sample=1000)
    built = f"built in {build_seconds:.1f} s" if build_seconds == build_seconds else "cached"
    print(f"\n== {name}: N={n:,}, d={x.shape[1]}, k={graph.k}; {graph.index}"
          f"{f' nprobe {graph.nprobe}' if graph.nprobe else ''}, recall@{graph.k} {recall:.3f} ({built})")
    threshold = break_threshold(x)
    print(f"break threshold {threshold:.4f} (0.95 quantile of random-pair cosine), seq_len {args.seq_len}")

    ours_config = WalkConfig(seq_len=args.seq_len)
    walk(graph.neighbors, graph.similarities, ours_config, embeddings=x, token_lengths=lengths)  # compile / load
    rows = {}
    rows["reference (plain Python)"] = best_time(lambda: reference_walk(graph.neighbors), args.repeats)
    rows["lory walk"] = best_time(lambda: walk(graph.neighbors, graph.similarities, ours_config, embeddings=x,
                                               token_lengths=lengths).order, args.repeats)
    rows["lory walk, graph only"] = best_time(lambda: walk(graph.neighbors, graph.similarities).order, args.repeats)
    bare = WalkConfig(rehome=False, join_ends=False, seq_len=args.seq_len)
    rows["lory chains only"] = best_time(lambda: walk(graph.neighbors, graph.similarities, bare, embeddings=x,
                                                      token_lengths=lengths).order, args.repeats)
    rows["random"] = (float("nan"), random_order(n, seed=0))

    print(f"{'order':26s} {'docs/s':>12s} {'time':>9s} {'break rate':>11s} {'mean adj sim':>13s}"
          f" {'unrelated pairs':>16s} {'mean run':>9s}")
    results = {}
    for label, (seconds, order) in rows.items():
        m = ordering_metrics(order, x, token_lengths=lengths, seq_len=args.seq_len, threshold=threshold)
        speed = f"{n / seconds:12,.0f}" if seconds == seconds else f"{'-':>12s}"
        timing = f"{seconds:8.3f}s" if seconds == seconds else f"{'-':>9s}"
        print(f"{label:26s} {speed} {timing} {m['break_rate']:11.4f} {m['adjacent_similarity']['mean']:13.4f}"
              f" {m['unrelated_pair_share']:16.4f} {m['chain_length']['mean']:9.1f}")
        results[label] = {"seconds": seconds, "break_rate": m["break_rate"],
                          "adjacent_similarity": m["adjacent_similarity"]["mean"]}
    reference = results["reference (plain Python)"]["seconds"]
    print("speed ratio vs reference: " + ", ".join(
        f"{label} {reference / results[label]['seconds']:.1f}x"
        for label in ("lory walk", "lory walk, graph only", "lory chains only")))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--synthetic-n", type=int, default=1_000_000, help="synthetic documents (0 = skip)")
    parser.add_argument("--dim", type=int, default=64, help="synthetic embedding dimension")
    parser.add_argument("--corpus", type=Path, default=None, help="jsonl(.zst) corpus with a 'text' field")
    parser.add_argument("--k", type=int, default=20, help="neighbours per document")
    parser.add_argument("--index", default=None, help="FAISS factory string (default: by corpus size)")
    parser.add_argument("--nprobe", type=int, default=8, help="IVF cells probed (8 keeps the 1M graph near 40 s)")
    parser.add_argument("--seq-len", type=int, default=4096, help="tokens per packed sequence")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per walk (best counts)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic corpus")
    parser.add_argument("--cache-dir", type=Path, default=Path("runs/bench_walk"), help="kNN graphs and embeddings")
    args = parser.parse_args()
    if args.synthetic_n:
        x, lengths = synthetic_corpus(args.synthetic_n, args.dim, args.seed)
        run_case("synthetic clustered embeddings", x, lengths, args, args.cache_dir,
                 f"synthetic-{args.synthetic_n}-{args.dim}-{args.seed}")
    if args.corpus is not None:
        x, lengths, digest = corpus_inputs(args.corpus, args.cache_dir)
        run_case(f"corpus {args.corpus.name}", x, lengths, args, args.cache_dir, f"corpus-{digest}")


if __name__ == "__main__":
    main()
