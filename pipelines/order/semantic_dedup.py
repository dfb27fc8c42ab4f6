"""Semantic dedup in the order stage (`--semantic-dedup COS`, similarity order only).

Near-dedup (`pipelines.documents.near_dedup`) removes copies by their text alone before
embedding. This finer step, the In-Context Pretraining / SemDeDup variant, runs on the kNN
graph of each split: an edge at cosine ≥ COS whose pair also shares text (estimated MinHash
Jaccard ≥ `--semantic-dedup-jaccard`) marks a duplicate, and one document is kept per
connected component (longest, then smaller content hash, as near-dedup). The Jaccard
confirmation is what keeps documents that only embed alike, such as two files that share a
long licence header (most of what the embedder sees) but not their bodies.

1. sign (`SignSplitFn`, one documents file per element): signature
   (`MinHasher.signature_or_empty`, the near-dedup MinHash parameters), characters, content
   hash and id of each of the split's documents, row-aligned with the split's rows of the
   file (`split_data.split_rows`) → its signatures file (`layout.signatures_file`).
2. drop, where the walk runs (the driver with `--partitions 1`, `cell_steps.OrderCellFn` per cell
   with P > 1, so with P > 1 only duplicates within one cell are found): `SemanticFilter`
   is the `keep` function of `lorydata.partition.order_cell`, called once the graph is
   built; the walk, the metrics and the packing units cover the kept documents only, and
   the routes of the dropped ones stay (-1, -1), so the shards stage never packs them.
3. dead letters (`write_dead_letters`, per documents file with drops: the driver, or
   `cell_steps.MergeRoutesFn`) → `semantic_dedup-<split>-<bucket>.jsonl` in the order stage
   folder's dead letters, copied into the corpus' `dead_letters/` by `build_corpus`.

Memory: a signing worker holds one bucket; the driver of a global walk holds N signatures
(4 × 128 bytes each at the default 128 permutations) beside the N embeddings it holds anyway.
"""

from __future__ import annotations

import numpy as np

from lorydata.documents import DeadLetter, DropReason
from lorydata.minhash import MinHashConfig, MinHasher
from lorydata.near_dedup import DocRef, SemanticDedup, semantic_duplicates
from pipelines import fileio, layout
from pipelines.commits import Commit, PartitionFn
from pipelines.order.config import SemanticDedupConfig
from pipelines.order.split_data import split_rows
from pipelines.runner.beam import BeamRunner

COLUMNS = ("signatures", "chars", "keys", "ids")  # what a cell file carries besides the vectors


class SignSplitFn(PartitionFn):
    """documents file → its signatures file: signatures, characters, content hashes and ids
    of the split's documents, in the order of their rows.

    Args:
        order_dir: the order stage folder.
        split: the split being ordered.
        config: MinHash parameters.
    """

    def __init__(self, order_dir: str, split: str, config: MinHashConfig):
        self.order_dir, self.split, self.config = order_dir, split, config

    def setup(self):
        self.hasher = MinHasher(self.config)

    def run(self, path: str, out: Commit) -> None:
        table = fileio.read_table(path, ["content_hash", "id", "text", "split"])
        chosen = table.take(split_rows(table, self.split))
        texts = chosen.column("text").to_pylist()
        signatures, _ = self.hasher.signatures(texts)  # the empty signature for texts without words
        out.save_npz(layout.signatures_file(self.order_dir, path), signatures=signatures,
                        chars=np.array([len(t) for t in texts], np.int64),
                        keys=np.array(chosen.column("content_hash").to_pylist(), dtype=str),
                        ids=np.array(chosen.column("id").to_pylist(), dtype=str))
        out.count("semantic_dedup.signed", len(texts))


def sign_split(config: SemanticDedupConfig, runner: BeamRunner, files: list[str], split: str, order_dir: str) -> None:
    """Step 1 over every documents file, on the runner."""
    runner.run_each(order_dir, "SignSplit", files, SignSplitFn(order_dir, split, config.minhash))


def load_signatures(order_dir: str, files: list[str]) -> dict[str, np.ndarray]:
    """The signature files of `files`, concatenated in that order (the order of
    `split_data.load_split_vectors`)."""
    parts = [fileio.load_npz(layout.signatures_file(order_dir, path)) for path in files]
    return {name: np.concatenate([p[name] for p in parts]) for name in COLUMNS}


class SemanticFilter:
    """The `keep` function of `order_cell`: the semantic duplicates of the graph left out.
    What it found stays in `found` for the caller.

    Args:
        carried: `signatures`, `chars`, `keys`, `ids` of the graph's documents, row-aligned.
        cos: minimum cosine of a duplicate edge.
        confirm_jaccard: estimated Jaccard that confirms it.
    """

    def __init__(self, carried: dict[str, np.ndarray], cos: float, confirm_jaccard: float):
        self.carried, self.cos, self.confirm_jaccard = carried, cos, confirm_jaccard
        self.found: SemanticDedup | None = None

    def __call__(self, graph, x: np.ndarray) -> np.ndarray:
        c = self.carried
        refs = [DocRef(str(k), int(n), str(i)) for k, n, i in zip(c["keys"], c["chars"], c["ids"], strict=True)]
        self.found = semantic_duplicates(graph.neighbors, graph.similarities, c["signatures"], refs, x, self.cos,
                                         self.confirm_jaccard)
        return self.found.keep_mask(len(x))

    def records(self) -> list[dict]:
        """One record per dropped document: its row in the graph, the kept id, cosine,
        estimated Jaccard and group size (what its dead letter says)."""
        ids = self.carried["ids"]
        return [{"index": d.index, "kept": str(ids[d.kept]), "cosine": d.cosine, "jaccard": d.jaccard,
                 "group": d.group_size} for d in (self.found.drops if self.found else [])]

    def counts(self, token_lengths: np.ndarray) -> dict:
        """Edges, pairs, groups, dropped documents and their tokens (EOS excluded)."""
        found = self.found or SemanticDedup([], 0, 0, 0)
        return {"edges_above_cos": found.edges_above_cos, "confirmed_pairs": found.confirmed_pairs,
                "groups": found.groups, "dropped": len(found.drops),
                "tokens_dropped": int(np.asarray(token_lengths)[[d.index for d in found.drops]].sum())}


def summary(config: SemanticDedupConfig, counts: list[dict]) -> dict:
    """The manifest's `order.semantic_dedup` record: parameters and the counts of every
    graph (cell) added up."""
    keys = ("edges_above_cos", "confirmed_pairs", "groups", "dropped", "tokens_dropped")
    return {"cos": config.cos, "confirm_jaccard": config.confirm_jaccard,
            **{k: sum(int(c.get(k, 0)) for c in counts) for k in keys}}


def drops_in(drops: dict[int, dict], start: int, rows: np.ndarray) -> list[dict]:
    """The drop records of one documents file, with their row in it.

    Args:
        drops: `SemanticFilter.records` keyed by graph index.
        start: graph index of the file's first document.
        rows: the file's rows of those documents, in graph order.
    """
    return [{**drops[i], "row": int(rows[i - start])} for i in range(start, start + len(rows)) if i in drops]


def dead_letters_of(path: str, drops: list[dict]) -> list[DeadLetter]:
    """`semantic_duplicate` dead letters of one documents file.

    Args:
        path: the documents file.
        drops: records of `SemanticFilter.records` with `row` (the file's row) added.
    """
    if not drops:
        return []
    drops = sorted(drops, key=lambda d: d["row"])
    table = fileio.read_table(path, ["source", "line", "text"]).take([d["row"] for d in drops])
    sources, lines, texts = (table.column(c).to_pylist() for c in ("source", "line", "text"))
    return [
        DeadLetter(source, line, DropReason.SEMANTIC_DUPLICATE,
                   f"semantic duplicate of id {d['kept']}: cosine {d['cosine']:.4f}, estimated Jaccard "
                   f"{d['jaccard']:.3f}, the document kept of a group of {d['group']}", text[:200])
        for d, source, line, text in zip(drops, sources, lines, texts, strict=True)
    ]

