"""`build-corpus --semantic-dedup COS`: with the real MiniLM embedder, FAISS and the walk, an
edited near-copy is dropped in the order stage (dead letter, counts, never packed), two
documents that share a long licence header but not their bodies are both kept although they
embed alike, the result is the same for one global walk and for k-means cells, changing the
option reruns only the order and shards stages, and bad values are refused in one line."""

import json
from collections import Counter

import numpy as np
import pytest

from lorydata.clean import normalize_text
from lorydata.embed import Embedder
from lorydata.errors import LoryDataError
from lorydata.manifest import Manifest
from lorydata.minhash import MinHasher, estimated_jaccard
from lorydata.tokenizer import Tokenizer
from pipelines.build_corpus import build_corpus, embedder_config
from pipelines.options import BuildOptions
from tests.pipelines.test_build_random import _jsonl_lines, run_cli
from tests.pipelines.test_build_similarity import documents_in

COS = 0.9
# ≈ 300 words: more than the 256 tokens of MiniLM's view, so two files that start with it
# embed alike whatever follows.
LICENCE = normalize_text(" ".join([
    "Permission is hereby granted, free of charge, to any person obtaining a copy of this software and associated",
    "documentation files (the Software), to deal in the Software without restriction, including without limitation",
    "the rights to use, copy, modify, merge, publish, distribute, sublicense, and/or sell copies of the Software, and",
    "to permit persons to whom the Software is furnished to do so, subject to the following conditions: The above",
    "copyright notice and this permission notice shall be included in all copies or substantial portions of the",
    "Software. THE SOFTWARE IS PROVIDED AS IS, WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED, INCLUDING BUT NOT",
    "LIMITED TO THE WARRANTIES OF MERCHANTABILITY, FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT",
    "SHALL THE AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER LIABILITY, WHETHER IN AN ACTION",
    "OF CONTRACT, TORT OR OTHERWISE, ARISING FROM, OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER",
    "DEALINGS IN THE SOFTWARE. Licensed under the Apache License, Version 2.0 (the License); you may not use this file",
    "except in compliance with the License. You may obtain a copy of the License from the project. Unless required by",
    "applicable law or agreed to in writing, software distributed under the License is distributed on an AS IS BASIS,",
    "WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied. See the License for the specific",
    "language governing permissions and limitations under the License. Redistribution and use in source and binary",
    "forms, with or without modification, are permitted provided that the following conditions are met:",
    "Redistributions of source code must retain the above copyright notice, this list of conditions and the following",
    "disclaimer. Redistributions in binary form must reproduce the above copyright notice, this list of conditions and",
    "the following disclaimer in the documentation and/or other materials provided with the distribution. Neither the",
    "name of the copyright holder nor the names of its contributors may be used to endorse or promote products",
    "derived from this software without specific prior written permission.",
]))


def near_copy(text: str) -> str:
    """`text` with three words changed (one in about a hundred)."""
    words = text.split(" ")
    for i in (len(words) // 4, len(words) // 2, 3 * len(words) // 4):
        words[i] = "altered"
    return " ".join(words)


@pytest.fixture(scope="module")
def planted(tmp_path_factory, sample_corpus):
    """(path, {name: cleaned text}): 30 cuts of the sample (6 per domain), an edited copy of
    the first, and two licence-headed files with different code bodies."""
    texts, taken = {}, Counter()
    bodies = []
    for line in _jsonl_lines(sample_corpus):
        doc = json.loads(line)
        if doc["domain"] == "perlcode" and len(bodies) < 2 and len(doc["text"]) > 6000:
            bodies.append(normalize_text(doc["text"][:5000]))
            continue
        if taken[doc["domain"]] < 6 and len(doc["text"]) > 1500:
            texts[f"{doc['domain']}{taken[doc['domain']]}"] = normalize_text(doc["text"][:1500])
            taken[doc["domain"]] += 1
    texts["copy"] = near_copy(texts["bible0"])
    texts["header-a"] = LICENCE + "\n\n" + bodies[0]
    texts["header-b"] = LICENCE + "\n\n" + bodies[1]
    path = tmp_path_factory.mktemp("planted") / "docs.jsonl"
    path.write_text("".join(json.dumps({"id": name, "text": text}) + "\n" for name, text in texts.items()))
    return path, texts


def options(path, out, **changes) -> BuildOptions:
    base = dict(inputs=[str(path)], out=str(out), id_field="id", seq_len=256, tail="pad", k=5, seed=1,
                near_dedup="off", overwrite=True)
    return BuildOptions(**{**base, **changes})


def snapshot(out, summary) -> dict:
    letters = [json.loads(line) for f in sorted((out / "dead_letters").glob("*.jsonl"))
               for line in f.read_text().splitlines()]
    return {"summary": summary, "manifest": Manifest.read(out / "train"), "documents": Counter(documents_in(out / "train")),
            "letters": [d for d in letters if d["reason"] == "semantic_duplicate"]}


@pytest.fixture(scope="module")
def builds(planted, tmp_path_factory):
    """One corpus folder built three times: without the option, with it (one global walk),
    with it on 2 k-means cells; each time what the folder then held."""
    out = tmp_path_factory.mktemp("sem") / "corpus"
    found = {}
    for name, changes in (("off", {}), ("global", dict(semantic_dedup=COS)),
                          ("cells", dict(semantic_dedup=COS, partitions=2))):
        summary = build_corpus(options(planted[0], out, **changes), log=lambda *_: None)
        found[name] = snapshot(out, summary)
    found["out"] = out  # holds the last build, "cells"
    return found


def expected_documents(texts: dict, dropped: set) -> Counter:
    tokenizer = Tokenizer()
    return Counter(tuple(tokenizer.encode(t)) for name, t in texts.items() if name not in dropped)


def test_licence_pair_embeds_alike_so_the_test_is_not_vacuous(planted):
    _, texts = planted
    x = Embedder(embedder_config(options("x", "y"))).encode([texts["header-a"], texts["header-b"], texts["bible0"],
                                                            texts["copy"]])
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    assert x[0] @ x[1] >= COS and x[2] @ x[3] >= COS


@pytest.mark.parametrize("name", ["global", "cells"])
def test_the_near_copy_is_dropped_and_the_licence_pair_kept(builds, planted, name):
    _, texts = planted
    # the keeper is the longer text ("altered" is longer than the words it replaced or not)
    dropped = "bible0" if len(texts["copy"]) > len(texts["bible0"]) else "copy"
    kept = ({"bible0", "copy"} - {dropped}).pop()
    build = builds[name]
    assert build["documents"] == expected_documents(texts, {dropped})
    (letter,) = build["letters"]
    line = list(texts).index(dropped) + 1
    assert letter["line"] == line and letter["snippet"] == texts[dropped][:200]
    hasher = MinHasher()
    jaccard = estimated_jaccard(hasher.signature(texts["bible0"]), hasher.signature(texts["copy"]))
    assert letter["detail"].startswith(f"semantic duplicate of id {kept}: cosine 0.9")
    assert letter["detail"].endswith(f", estimated Jaccard {jaccard:.3f}, the document kept of a group of 2")

    counts = build["summary"].documents
    assert counts["dropped"] == {"semantic_duplicate": 1}
    assert counts["documents_kept"] == counts["documents_per_split"]["train"] == len(texts) - 1
    tokenizer = Tokenizer()
    tokens = sum(len(tokenizer.encode(t)) for n, t in texts.items() if n != dropped)
    assert counts["tokens"] == counts["tokens_per_split"]["train"] == tokens
    manifest = build["manifest"]
    assert manifest.counts["documents"] == len(texts) - 1 and manifest.counts["pipeline"] == counts
    assert manifest.order["metrics"]["documents"] == len(texts) - 1
    record = manifest.order["semantic_dedup"]
    assert record["cos"] == COS and record["confirm_jaccard"] == 0.5
    assert record["dropped"] == 1 and record["groups"] == 1 and record["confirmed_pairs"] == 1
    assert record["edges_above_cos"] >= 2  # the licence pair's edge is above COS but unconfirmed
    assert build["summary"].splits["train"]["documents"] == len(texts) - 1


def test_global_walk_and_cells_agree(builds):
    assert builds["cells"]["manifest"].order["partitions"]["used"] == 2
    assert builds["cells"]["documents"] == builds["global"]["documents"]
    assert builds["cells"]["letters"] == builds["global"]["letters"]


def test_option_off_changes_nothing_and_on_reruns_only_order_and_shards(builds, planted):
    off = builds["off"]
    assert off["documents"] == expected_documents(planted[1], set()) and not off["letters"]
    assert "semantic_dedup" not in off["manifest"].order
    assert "semantic_duplicate" not in off["summary"].documents["dropped"]
    stages = builds["global"]["summary"].stages
    assert stages["documents"]["status"].startswith("skipped") and stages["embeddings"]["status"].startswith("skipped")
    assert stages["order/train"]["status"] == "ran"


@pytest.mark.slow
def test_dask_workers_give_the_same_cells_result(builds, planted, dask_cluster, tmp_path, capsys):
    """The cells build again on a 2-process Dask cluster: signing, cell files carrying the
    signatures and the per-cell drops run in worker processes."""
    args = ["build-corpus", planted[0], "--id-field", "id", "--seq-len", 256, "--tail", "pad", "--k", 5, "--seed", 1,
            "--near-dedup", "off", "--semantic-dedup", COS, "--partitions", 2]
    code, _, err = run_cli([*args, "--out", tmp_path / "dask", "--runner", "dask", "--dask-address",
                            dask_cluster.scheduler_address], capsys)
    assert code == 0, err
    dask = snapshot(tmp_path / "dask", None)
    local = builds["cells"]
    assert [s.sha256 for s in dask["manifest"].shards] == [s.sha256 for s in local["manifest"].shards]
    assert dask["manifest"].counts == local["manifest"].counts and dask["manifest"].order == local["manifest"].order
    assert dask["letters"] == local["letters"] and len(local["letters"]) == 1


def test_bad_values_are_refused_in_one_line(planted, tmp_path, capsys):
    for args, message in ((["--semantic-dedup", "1.5"], "--semantic-dedup must be a cosine in (0, 1], got 1.5"),
                          (["--semantic-dedup", "0.9", "--order", "random"],
                           "--semantic-dedup works on the kNN graph of --order similarity, not --order random"),
                          (["--semantic-dedup", "0.9", "--semantic-dedup-jaccard", "0"],
                           "--semantic-dedup-jaccard must be in (0, 1], got 0.0")):
        code, _, err = run_cli(["build-corpus", planted[0], "--out", tmp_path / "bad", *args], capsys)
        assert code == 2 and err.strip() == f"error: {message}"
    with pytest.raises(LoryDataError, match="semantic-dedup"):
        options(planted[0], tmp_path, semantic_dedup=0.0).validate()
