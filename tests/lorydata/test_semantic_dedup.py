"""Semantic dedup on the kNN graph: graph compaction and the choice of drops against naive
references, and `order_cell` walking only the kept documents."""

import numpy as np

from lorydata.knn import KnnConfig, KnnGraph, build_knn_graph, compact_graph
from lorydata.minhash import MinHasher
from lorydata.near_dedup import DocRef, semantic_duplicates
from lorydata.partition import order_cell
from lorydata.walk import WalkConfig, walk
from tests.lorydata.test_near_dedup import edited, paragraphs


def random_graph(n: int, k: int, seed: int) -> KnnGraph:
    """Rows best first, self excluded, some rows padded with -1 / -inf."""
    rng = np.random.default_rng(seed)
    neighbors = np.full((n, k), -1, np.int64)
    similarities = np.full((n, k), -np.inf, np.float32)
    for i in range(n):
        width = int(rng.integers(0, k + 1))
        ids = rng.choice(np.delete(np.arange(n), i), size=width, replace=False)
        neighbors[i, :width] = ids
        similarities[i, :width] = np.sort(rng.uniform(0.5, 1.0, width))[::-1]
    return KnnGraph(neighbors, similarities)


def naive_compact(graph: KnnGraph, keep: np.ndarray):
    kept = [i for i in range(len(keep)) if keep[i]]
    new = {old: new for new, old in enumerate(kept)}
    neighbors = np.full((len(kept), graph.k), -1, np.int64)
    similarities = np.full((len(kept), graph.k), -np.inf, np.float32)
    for r, old in enumerate(kept):
        entries = [(new[j], s) for j, s in zip(graph.neighbors[old], graph.similarities[old], strict=True)
                   if j >= 0 and keep[j]]
        for c, (j, s) in enumerate(entries):
            neighbors[r, c], similarities[r, c] = j, s
    return neighbors, similarities


def test_compact_graph_matches_naive_reference():
    for seed in range(5):
        graph = random_graph(40, 6, seed)
        keep = np.random.default_rng(100 + seed).random(40) < 0.7
        compact = compact_graph(graph, keep)
        neighbors, similarities = naive_compact(graph, keep)
        assert np.array_equal(compact.neighbors, neighbors)
        assert np.array_equal(compact.similarities, similarities)
        assert compact.similarities.dtype == np.float32 and compact.index == graph.index
    graph = random_graph(10, 3, 9)
    everything = compact_graph(graph, np.ones(10, bool))
    assert np.array_equal(everything.neighbors, graph.neighbors)


def naive_drops(graph: KnnGraph, signatures, refs, cos, confirm):
    """Every graph edge checked one by one; components by repeated merging; keeper longest,
    then smaller key."""
    edges = set()
    for i in range(len(refs)):
        for j, s in zip(graph.neighbors[i], graph.similarities[i], strict=True):
            if j >= 0 and j != i and s >= cos:
                edges.add((min(i, j), max(i, j)))
    confirmed = [(i, j) for i, j in sorted(edges)
                 if np.mean(signatures[i] == signatures[j]) >= confirm
                 and not (signatures[i] == 2**32 - 1).all() and not (signatures[j] == 2**32 - 1).all()]
    components = [{i, j} for i, j in confirmed]
    merged = True
    while merged:
        merged = False
        for a in range(len(components)):
            for b in range(a + 1, len(components)):
                if components[a] & components[b]:
                    components[a] |= components.pop(b)
                    merged = True
                    break
            if merged:
                break
    drops = {}
    for members in components:
        keeper = min(members, key=lambda m: (-refs[m].length, refs[m].key))
        drops.update({m: (keeper, len(members)) for m in members if m != keeper})
    return len(edges), len(confirmed), len(components), drops


def test_semantic_drops_match_naive_reference():
    hasher = MinHasher()
    rng = np.random.default_rng(0)
    bases = ["\n\n".join(paragraphs(s, 2)) for s in range(6)]
    texts = bases + [edited(bases[s % 6], 30 + 10 * s, seed=s) for s in range(10)] + ["", "..."]
    n = len(texts)
    signatures = np.stack([hasher.signature_or_empty(t) for t in texts])
    refs = [DocRef(f"{int(rng.integers(1 << 30)):08x}", len(t), f"id{i}") for i, t in enumerate(texts)]
    x = rng.normal(size=(n, 8)).astype(np.float32)
    for seed in range(4):
        graph = random_graph(n, 5, seed)
        graph.neighbors[16, 0], graph.similarities[16, 0] = 17, 1.0  # the word-less pair never confirms
        for c in range(10):  # each edited copy linked to its base (a chain through each base)
            graph.neighbors[6 + c, -1], graph.similarities[6 + c, -1] = c % 6, 0.97
        for cos, confirm in ((0.8, 0.5), (0.6, 0.3), (0.95, 0.9)):
            found = semantic_duplicates(graph.neighbors, graph.similarities, signatures, refs, x, cos, confirm)
            edges, confirmed, groups, drops = naive_drops(graph, signatures, refs, cos, confirm)
            assert (found.edges_above_cos, found.confirmed_pairs, found.groups) == (edges, confirmed, groups)
            assert {d.index: (d.kept, d.group_size) for d in found.drops} == drops
            for d in found.drops:
                assert np.isclose(d.jaccard, np.mean(signatures[d.index] == signatures[d.kept]))
                unit = x / np.linalg.norm(x, axis=1, keepdims=True)
                assert np.isclose(d.cosine, unit[d.index] @ unit[d.kept], atol=1e-6)
            assert np.array_equal(found.keep_mask(n), ~np.isin(np.arange(n), list(drops)))
            if cos == 0.8:
                assert len(found.drops) >= 6 and found.groups >= 4


def test_order_cell_walks_only_the_kept_documents():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(60, 16)).astype(np.float32)
    lengths = rng.integers(10, 200, 60)
    knn, walk_config = KnnConfig(k=5, device="cpu"), WalkConfig(seq_len=256)
    plain = order_cell(x, knn, walk_config, token_lengths=lengths)
    assert plain.keep is None and sorted(plain.order.tolist()) == list(range(60))
    assert np.array_equal(order_cell(x, knn, walk_config, lengths, keep=lambda g, v: None).order, plain.order)
    mask = rng.random(60) < 0.75
    seen = {}

    def keep(graph, unit):
        seen["graph"], seen["unit"] = graph, unit
        return mask

    cell = order_cell(x, knn, walk_config, token_lengths=lengths, keep=keep)
    assert sorted(cell.order.tolist()) == np.flatnonzero(mask).tolist()
    assert cell.keep is mask and cell.graph is seen["graph"] and len(cell.graph.neighbors) == 60
    assert np.allclose(np.linalg.norm(seen["unit"], axis=1), 1.0)
    # The walk over the compacted graph of the kept documents, mapped back to cell ids.
    walked = compact_graph(build_knn_graph(seen["unit"], knn), mask)
    alone = walk(walked.neighbors, walked.similarities, walk_config, embeddings=seen["unit"][mask],
                 token_lengths=lengths[mask])
    assert np.array_equal(cell.order, np.flatnonzero(mask)[alone.order])
