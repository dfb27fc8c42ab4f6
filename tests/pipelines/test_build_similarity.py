"""`lory build-corpus --order similarity` end to end: the real MiniLM embedder, FAISS and the
compiled walk on Beam's in-process runner, over a 150-document, 5-domain cut of the bundled
sample (documents cut to 300-900 characters, so a 256-token sequence holds several)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lorydata.clean import content_hash, normalize_text
from lorydata.errors import LoryDataError
from lorydata.knn import index_for
from lorydata.manifest import Manifest
from lorydata.shards import read_shard
from lorydata.tokenizer import Tokenizer
from lorydata.verify import verify_folder
from pipelines.build_corpus import build_corpus, order_config
from pipelines.documents.dedup import DOCUMENT_SCHEMA, heldout_split
from pipelines.layout import routes_file
from pipelines.options import BuildOptions
from pipelines.order.config import partitions_for
from pipelines.order.similarity import similarity_order
from pipelines.runner.beam import BeamRunner
from tests.pipelines.test_build_random import _jsonl_lines, run_cli

ROOT = Path(__file__).resolve().parents[2]
PER_DOMAIN = 30
COMMON = {"seq_len": 256, "k": 5, "tail": "pad", "domain_field": "domain", "heldout_fraction": 0.1, "seed": 1,
          "rows_per_shard": 40}
TWO_WORKERS = ["--direct_num_workers=2", "--direct_running_mode=multi_processing"]


def options(corpus, out, **changes) -> BuildOptions:
    return BuildOptions(inputs=[str(corpus)], out=str(out), **{**COMMON, **changes})


def quiet(*_):
    pass


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, sample_corpus):
    """(path, records): PER_DOMAIN documents of each domain, each a 300-900 character cut."""
    records, taken = [], Counter()
    for i, line in enumerate(_jsonl_lines(sample_corpus)):
        doc = json.loads(line)
        if taken[doc["domain"]] == PER_DOMAIN:
            continue
        taken[doc["domain"]] += 1
        start = (i * 7919) % max(1, len(doc["text"]) - 1000)
        records.append({"text": doc["text"][start: start + 300 + (i * 37) % 600], "domain": doc["domain"]})
    path = tmp_path_factory.mktemp("src") / "cut.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path, records


@pytest.fixture(scope="module")
def built(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("sim") / "corpus"
    return out, build_corpus(options(corpus[0], out), log=quiet)


def shard_rows(folder):
    """All rows of a shard folder in packing (seq_id) order."""
    manifest = Manifest.read(folder)
    tables = [read_shard(folder / s.file, manifest.seq_len) for s in manifest.shards]
    rows = pa.concat_tables(tables).to_pylist()
    return sorted(rows, key=lambda r: r["seq_id"]), manifest


def documents_in(folder):
    """Token tuples of every document in a shard folder, cut at `doc_starts`.

    A start at a row's offset 0 that does not follow an EOS is a continuation, not a new
    document; every document must end with EOS. Padding (the tail of a packing unit) ends a
    row and is dropped.
    """
    rows, manifest = shard_rows(folder)
    eos, pad = manifest.tokenizer["eos_id"], manifest.tokenizer["pad_id"]
    pieces, starts, offset = [], [], 0
    for r in rows:
        ids = np.asarray(r["input_ids"])
        body = len(ids)
        while body and ids[body - 1] == pad:
            body -= 1
        starts.extend(offset + s for s in r["doc_starts"] if s < body)
        pieces.append(ids[:body])
        offset += body
    stream = np.concatenate(pieces)
    starts = sorted(p for p in set(starts) if p == 0 or stream[p - 1] == eos)
    assert set(starts) == {0} | {p + 1 for p in np.flatnonzero(stream == eos) if p + 1 < len(stream)}
    docs = []
    for first, last in zip(starts, [*starts[1:], len(stream)], strict=True):
        piece = stream[first:last]
        assert piece[-1] == eos, "a document does not end with EOS"
        docs.append(tuple(int(t) for t in piece[:-1]))
    return docs


def expected_documents(records):
    """{split: Counter of token tuples} computed from the input independently of the pipeline."""
    tokenizer = Tokenizer()
    expected = {"train": Counter(), "heldout": Counter()}
    for record in records:
        text = normalize_text(record["text"])
        split = heldout_split(content_hash(text)[:16], COMMON["heldout_fraction"])
        expected[split][tuple(tokenizer.encode(text))] += 1
    return expected


def mean_purity(folder) -> float:
    """Mean share of the majority domain among the documents of each sequence holding several."""
    rows, _ = shard_rows(folder)
    shares = [Counter(r["domains"]).most_common(1)[0][1] / len(r["domains"]) for r in rows if len(r["domains"]) > 1]
    return float(np.mean(shares))


def checksums(out):
    return {split: [s.sha256 for s in Manifest.read(out / split).shards] for split in ("train", "heldout")}


def copies(out, tmp_path, *names) -> list[Path]:
    """Copies of the built corpus folder `out` under `tmp_path`, one per name (to rebuild
    with other options and compare)."""
    folders = [tmp_path / name for name in names]
    for folder in folders:
        shutil.copytree(out, folder)
    return folders


def test_shards_hold_every_document_once_and_heldout_apart(built, corpus):
    out, summary = built
    expected = expected_documents(corpus[1])
    assert sum(expected["heldout"].values()) > 0
    for split in ("train", "heldout"):
        manifest, report = verify_folder(out / split)
        assert report.ok, report.failed
        found = Counter(documents_in(out / split))
        assert found == expected[split], f"{split}: documents lost, duplicated or altered"
        assert summary.splits[split]["documents"] == sum(expected[split].values())
        assert manifest.order["method"] == "similarity"
        assert manifest.embedder["model"] == "all-MiniLM-L6-v2" and manifest.embedder["dim"] == 384
        assert manifest.index["index"] == "Flat" and manifest.index["knn_recall"] == 1.0
    assert not set(documents_in(out / "train")) & set(expected["heldout"]), "held-out documents in training shards"
    metrics = Manifest.read(out / "train").order["metrics"]
    assert metrics["documents"] == sum(expected["train"].values()) and 0 <= metrics["break_rate"] <= 1
    assert (out / "_work" / "order" / "train" / "knn" / "neighbors.npy").is_file()


def test_similarity_order_groups_domains_better_than_random(built, corpus, tmp_path):
    out, _ = built
    random_out = tmp_path / "random"
    build_corpus(options(corpus[0], random_out, order="random"), log=quiet)
    similar, shuffled = mean_purity(out / "train"), mean_purity(random_out / "train")
    assert similar > shuffled + 0.2, (similar, shuffled)
    sim_metrics = Manifest.read(out / "train").order["metrics"]
    assert sim_metrics["adjacent_similarity"]["mean"] > sim_metrics["break_threshold"]


def test_partitions_keep_every_document_once(built, corpus, tmp_path):
    out, _ = built
    copy = tmp_path / "parts"
    shutil.copytree(out, copy)
    summary = build_corpus(options(corpus[0], copy, partitions=3, overwrite=True), log=quiet)
    stages = summary.stages
    assert stages["documents"]["status"].startswith("skipped") and stages["embeddings"]["status"].startswith("skipped")
    assert stages["order/train"]["status"] == "ran"
    manifest = Manifest.read(copy / "train")
    parts = manifest.order["partitions"]
    n = summary.splits["train"]["documents"]
    assert parts["requested"] == 3 and parts["used"] == 3 and sum(parts["cell_sizes"]) == n
    # k-means puts 76 of the 133 documents in one cell (the sample is the whole split here):
    # over 1.5 mean cells, so it is split, and no cell is left above the cap.
    assert parts["split"] >= 1 and parts["cells"] == len(parts["cell_sizes"]) > 3
    assert max(parts["cell_sizes"]) <= parts["max_cell_factor"] * n / 3 and min(parts["cell_sizes"]) > 0
    assert sorted(parts["cell_order"]) == list(range(parts["cells"])) and manifest.order["units"] == parts["cells"]
    assert 0 < manifest.index["knn_recall"] <= 1.0
    assert Counter(documents_in(copy / "train")) == Counter(documents_in(out / "train"))
    assert not (copy / "_work" / "order" / "train" / "cells").exists()


def test_a_cell_larger_than_a_packing_block_is_packed_as_several_units(built, corpus, tmp_path, monkeypatch):
    # Blocks of ~2,000 tokens: each cell's walk is cut where a document starts a sequence, so
    # the pack step holds one block, not a whole (possibly oversized) k-means cell.
    out, _ = built
    whole, blocked = copies(out, tmp_path, "whole", "blocked")
    build_corpus(options(corpus[0], whole, partitions=3, overwrite=True), log=quiet)
    monkeypatch.setattr("pipelines.order.cell_steps.UNIT_TOKENS", 2000)
    build_corpus(options(corpus[0], blocked, partitions=3, overwrite=True), log=quiet)
    one, many = Manifest.read(whole / "train"), Manifest.read(blocked / "train")
    assert one.order["units"] == one.order["partitions"]["cells"] and many.order["units"] > 6
    assert Counter(documents_in(blocked / "train")) == Counter(documents_in(whole / "train"))
    assert many.order["partitions"]["cell_sizes"] == one.order["partitions"]["cell_sizes"]
    assert many.order["metrics"]["adjacent_similarity"] == one.order["metrics"]["adjacent_similarity"]


@pytest.mark.parametrize("earlier_cap", [1.5, None], ids=["same-lory", "lory-before-the-cap"])
def test_a_build_interrupted_after_assigning_cells_resumes_to_the_same_shards(built, corpus, tmp_path, monkeypatch,
                                                                             earlier_cap):
    # The centroids (split cells included) are computed again from the same sample on the
    # rerun, so the committed AssignCells files still match them; files of a run that did
    # not split the oversized cell (3 cells, not 4) are assigned again.
    out, _ = built
    whole, resumed = copies(out, tmp_path, "whole", "resumed")
    build_corpus(options(corpus[0], whole, partitions=3, overwrite=True), log=quiet)
    with monkeypatch.context() as patch:
        def interrupted(self, element, out):
            raise RuntimeError("interrupted while ordering the cells")

        patch.setattr("pipelines.order.cell_steps.OrderCellFn.run", interrupted)
        patch.setattr("pipelines.order.cells.MAX_CELL_FACTOR", earlier_cap)
        with pytest.raises(Exception, match="interrupted while ordering"):
            build_corpus(options(corpus[0], resumed, partitions=3, overwrite=True), log=quiet)
    summary = build_corpus(options(corpus[0], resumed, partitions=3, overwrite=True), log=quiet)
    assign = summary.partitions["train/AssignCells"]
    assert assign["done_before"] == (assign["partitions"] if earlier_cap else 0) and assign["partitions"] > 0
    assert Manifest.read(resumed / "train").order["partitions"]["split"] >= 1
    assert checksums(resumed) == checksums(whole)


def test_without_an_oversized_cell_the_cap_changes_nothing(built, corpus, tmp_path, monkeypatch):
    # Two cells of 78 and 55 documents: both within 1.5 mean cells.
    out, _ = built
    capped, uncapped = copies(out, tmp_path, "capped", "uncapped")
    build_corpus(options(corpus[0], capped, partitions=2, overwrite=True), log=quiet)
    monkeypatch.setattr("pipelines.order.cells.MAX_CELL_FACTOR", None)
    build_corpus(options(corpus[0], uncapped, partitions=2, overwrite=True), log=quiet)
    parts = Manifest.read(capped / "train").order["partitions"]
    assert parts["split"] == 0 and parts["cells"] == parts["used"] == 2
    assert checksums(capped) == checksums(uncapped)


def test_a_cell_result_without_blocks_is_one_block_less_its_semantic_drops():
    from pipelines.order.cells import cell_blocks

    with_blocks = {"blocks": {"starts": [0, 7], "counts": [[7, 900], [3, 400]]}}
    assert cell_blocks(with_blocks, np.array([10, 1300]))[0] == [0, 7]
    assert cell_blocks(with_blocks, np.array([10, 1300]))[1].tolist() == [[7, 900], [3, 400]]
    old = {"semantic_dedup": {"dropped": 2, "tokens_dropped": 150}}
    starts, counts = cell_blocks(old, np.array([10, 1300]))
    assert starts == [0] and counts.tolist() == [[8, 1148]]
    assert cell_blocks({}, np.array([10, 1300]))[1].tolist() == [[10, 1300]]


@pytest.mark.slow
def test_partition_cells_on_two_worker_processes_give_identical_shards(built, corpus, tmp_path):
    out, _ = built
    one, two = copies(out, tmp_path, "one", "two")
    build_corpus(options(corpus[0], one, partitions=3, overwrite=True), log=quiet)
    build_corpus(options(corpus[0], two, partitions=3, overwrite=True, beam_args=TWO_WORKERS), log=quiet)
    assert Manifest.read(two / "train").order["partitions"]["used"] == 3
    assert checksums(one) == checksums(two)


def test_cli_reports_a_bad_index_in_one_line(corpus, tmp_path, capsys):
    code, _, err = run_cli(["build-corpus", corpus[0], "--out", tmp_path / "o", "--index", "Nonsense"], capsys)
    assert code == 2 and err.strip().startswith("error: bad --index 'Nonsense'") and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_two_worker_processes_give_identical_shards(built, corpus, tmp_path):
    out, _ = built
    two = tmp_path / "two"
    build_corpus(options(corpus[0], two, beam_args=TWO_WORKERS), log=quiet)
    assert checksums(two) == checksums(out)


@pytest.mark.slow
def test_rerun_after_a_kill_during_embedding_embeds_only_the_rest(corpus, tmp_path):
    buckets = {"buckets": 4}  # four partitions to embed
    reference = tmp_path / "reference"
    build_corpus(options(corpus[0], reference, **buckets), log=quiet)
    killed = tmp_path / "killed"
    script = ("import json, sys; from pipelines.build_corpus import build_corpus; from pipelines.options import "
              "BuildOptions; build_corpus(BuildOptions(**json.loads(sys.argv[1])))")
    payload = json.dumps({**COMMON, **buckets, "inputs": [str(corpus[0])], "out": str(killed)})
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", script, payload], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    embeddings = killed / "_work" / "embeddings"
    try:
        deadline = time.monotonic() + 180
        while len(list((embeddings / "_commits" / "Embed").glob("*.json"))) < 2 and proc.poll() is None \
                and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)  # two buckets are embedded and committed
    finally:
        proc.wait()
    committed = sorted((embeddings / "_commits" / "Embed").glob("*.json"))
    assert 2 <= len(committed) < 4 and not (embeddings / "_DONE.json").exists(), \
        "the kill did not land inside the embeddings stage"
    damaged = embeddings / f"{committed[0].stem}.npy"  # a committed output cut short: embedded again
    damaged.write_bytes(damaged.read_bytes()[:100])
    summary = build_corpus(options(corpus[0], killed, **buckets), log=quiet)
    stages = summary.stages
    assert stages["documents"]["status"].startswith("skipped") and stages["embeddings"]["status"] == "ran"
    embed = summary.partitions["embeddings/Embed"]
    assert (embed["partitions"], embed["done_before"]) == (4, len(committed) - 1)
    assert not (embeddings / "_commits").exists()
    assert checksums(killed) == checksums(reference)


def test_bad_index_string_fails_in_one_line_before_any_stage(corpus, tmp_path):
    out = tmp_path / "bad"
    with pytest.raises(LoryDataError) as exc:
        build_corpus(options(corpus[0], out, index="IVF4x,Bogus"), log=quiet)
    assert "--index" in str(exc.value) and "\n" not in str(exc.value)
    assert not (out / "_work" / "documents").exists()


def _tiny_split(tmp_path, n, dim=8):
    """Documents and embeddings stage folders holding one held-out split of n documents with
    hand-made embeddings."""
    rng = np.random.default_rng(n)
    documents, embeddings = tmp_path / "docs", tmp_path / "emb"
    documents.mkdir()
    embeddings.mkdir()
    lengths = rng.integers(1, 50, n)
    rows = [{"content_hash": f"{i:032x}", "id": str(i), "domain": "d", "source": "s", "line": i, "split": "heldout",
             "text": "t", "tokens": [1] * int(lengths[i])} for i in range(n)]
    pq.write_table(pa.Table.from_pylist(rows, schema=DOCUMENT_SCHEMA), documents / "b00000.parquet")
    np.save(embeddings / "b00000.npy", rng.standard_normal((n, dim)).astype(np.float32))
    return documents, embeddings, lengths


@pytest.mark.parametrize("n", [1, 2, 4])
def test_tiny_splits_get_a_full_order(tmp_path, n):
    documents, embeddings, lengths = _tiny_split(tmp_path, n)
    out = tmp_path / "order"
    out.mkdir()
    opts = options("x", tmp_path, k=20, partitions=3, index="IVF64,Flat")
    info = similarity_order(order_config(opts), BeamRunner(), str(documents), str(embeddings), "heldout", str(out), n)
    routes = np.load(routes_file(str(out), str(documents / "b00000.parquet")))
    assert sorted(routes[:, 1].tolist()) == list(range(n)) and (routes[:, 0] == 0).all()
    assert np.load(out / "units.npy").tolist() == [[n, int(lengths.sum()) + n]]  # one unit, EOS counted
    assert info["order"]["partitions"]["used"] == 1 and info["index"]["index"] == "Flat"
    assert info["order"]["metrics"]["documents"] == n
    json.dumps(info)  # it goes into the manifest


def test_small_inputs_fall_back_to_exact_search_and_one_cell():
    assert index_for("IVF1024,Flat", 500) == "Flat" and index_for("IVF1024,Flat", 5000) == "IVF1024,Flat"
    assert index_for("IVF64,PQ8", 100) == "Flat" and index_for("HNSW32", 3) == "HNSW32"
    assert index_for(None, 3) is None
    assert partitions_for(8, 10, 20) == 1 and partitions_for(8, 1000, 20) == 8 and partitions_for(3, 90, 5) == 3
