"""Pipeline benchmark: the whole `lory build-corpus --order similarity` against its library
floor, timed in one process on the same documents with the same cores.

- **Library floor**: the calls no build can avoid, each timed alone on the documents the
  build keeps: BPE tokenization (`Tokenizer.encode_batch_arrow`, every core), MinHash
  signing (`MinHasher.signatures`, near-dedup) and the embedder (`Embedder.encode`, or
  `encode_ids` over the BPE ids for `static-bpe` and `lsa`; model loaded before the clock
  starts; `lsa`'s fit on the BPE ids, which the build's embed stage does, is in the clock).
- **Build**: `build_corpus` end to end into a fresh folder (model load and every stage).
- **Per stage**: each stage's seconds against its own library calls: documents vs
  tokenization + MinHash, embeddings vs the embedder, order vs lory's kNN graph + walk on
  the same vectors (`order_cell`), shards vs packing and writing the same sequences.
- **Order quality** (`--quality`): for each embedder listed, the share of adjacent documents
  along lory's walk (and of nearest neighbours) that share a domain, so speed never hides a
  worse order.

The floor runs before and after the build and the faster run counts (a shared box can slow
either one down). Goals (issue 21): the build at >= 0.8 of the floor's docs/s; every stage at
>= 0.8 of its own library calls; >= 125 docs/s with the static embedder on the dev corpus
(8x the 15.6 docs/s of the MiniLM build before).

Usage:
    python benchmarks/bench_pipeline.py                                       # the bundled sample, MiniLM
    python benchmarks/bench_pipeline.py PATH/dev_corpus/train.jsonl.zst --embedder static
    python benchmarks/bench_pipeline.py PATH/dev_corpus/train.jsonl.zst --embedder static --quality minilm,onnx,static
    python benchmarks/bench_pipeline.py PATH/dev_corpus/train.jsonl.zst --embedder lsa --quality minilm,static,lsa
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import pyarrow.parquet as pq

from lorydata.clean import CleanConfig, clean_document
from lorydata.documents import Document
from lorydata.readers import ReaderConfig, read_inputs

SAMPLE = Path(__file__).resolve().parents[1] / "lorydata" / "assets" / "sample" / "sample.jsonl.zst"
BEFORE_DOCS_PER_S = 15.6  # the MiniLM build of the dev corpus before issue 21 (README)
# --quality names → (--embedder, --embed-backend)
EMBEDDERS = {"minilm": (None, "torch"), "onnx": (None, "onnx"), "onnx-int8": (None, "onnx-int8"),
             "static": ("static", "torch"), "static-bpe": ("static-bpe", "torch"), "lsa": ("lsa", "torch")}


def load_documents(paths: list[str], limit: int | None) -> list[dict]:
    """The first `limit` documents that survive cleaning and exact dedup, as the pipeline
    keeps them (text, domain)."""
    seen, docs = set(), []
    for record in read_inputs(paths, ReaderConfig(domain_field="domain")):
        if not isinstance(record, Document):
            continue
        cleaned = clean_document(record, CleanConfig())
        if isinstance(cleaned, Document) and cleaned.content_hash not in seen:
            seen.add(cleaned.content_hash)
            docs.append({"text": cleaned.text, "domain": cleaned.domain})
            if limit and len(docs) == limit:
                break
    return docs


def timed(fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - start, result


def fit_lsa_embedder(config, ids: list):
    """Model "lsa" fitted on the first `LSA_FIT_DOCS` documents' ids (cut at its window), loaded."""
    from lorydata.embed import Embedder, fit_lsa_model, lsa_fit_window
    from lorydata.lexical_embed import LSA_FIT_DOCS

    window = lsa_fit_window(config)
    folder = Path(tempfile.mkdtemp(prefix="bench-lsa-"))
    try:
        return Embedder(fit_lsa_model(config, [i[:window] for i in ids[:LSA_FIT_DOCS]], folder / "lsa"))
    finally:
        shutil.rmtree(folder, ignore_errors=True)  # loaded: the files are no longer read


def library_floor(texts: list[str], embedder) -> dict:
    """Seconds of each unavoidable call on `texts` (see the module docstring)."""
    from lorydata.embed import EmbedderConfig
    from lorydata.minhash import MinHasher
    from lorydata.tokenizer import Tokenizer

    tokenizer, hasher = Tokenizer(), MinHasher()
    tokenizer.encode_batch_arrow(texts[:8])  # engine and kernel built before the clock
    hasher.signatures(texts[:8])
    tokenize, tokens = timed(tokenizer.encode_batch_arrow, texts)
    minhash, _ = timed(hasher.signatures, texts)
    offsets, values = tokens.offsets.to_numpy(), tokens.values.to_numpy()
    ids = [values[offsets[i]: offsets[i + 1]] for i in range(len(texts))]
    fit = 0.0
    if isinstance(embedder, EmbedderConfig):  # model "lsa": fitted on the stored ids, as the embed stage does
        fit, embedder = timed(fit_lsa_embedder, embedder, ids)
    if embedder.tokenizer_sha256 == tokenizer.sha256:  # static-bpe, lsa: the ids the stage stored
        embedder.encode_ids(ids[:8])
        embed, _ = timed(embedder.encode_ids, ids)
        embed += fit
    else:
        embedder.encode(texts[:8])
        embed, _ = timed(embedder.encode, texts)
    return {"tokenize": tokenize, "minhash": minhash, "embed": embed, "total": tokenize + minhash + embed}


def stage_floors(out: Path, options, documents: int) -> dict:
    """Seconds of the order and shards stages' own library calls on the build's train split:
    kNN graph + walk over its vectors, and packing + writing its sequences."""
    from lorydata.pack import SequencePacker
    from lorydata.partition import order_cell
    from lorydata.shards import sequences_to_table, table_to_ipc_bytes
    from lorydata.tokenizer import Tokenizer
    from pipelines.build_corpus import order_config

    files = sorted((out / "_work" / "documents").glob("b*.parquet"))
    tables = [pq.read_table(f, columns=["split", "tokens"]) for f in files]
    xs = [np.load(out / "_work" / "embeddings" / f"{f.stem}.npy") for f in files]
    chosen = [np.asarray(t.column("split").to_pylist()) == "train" for t in tables]
    x = np.concatenate([v[c] for v, c in zip(xs, chosen, strict=True)])
    tokens = [np.asarray(ids, np.int32) for t, c in zip(tables, chosen, strict=True)
              for ids, keep in zip(t.column("tokens").to_pylist(), c, strict=True) if keep]
    lengths = np.array([len(t) for t in tokens])
    config = order_config(options)
    order_s, cell = timed(order_cell, x, config.knn_config(len(x)), config.walk_config(), lengths)
    tok = Tokenizer(options.tokenizer)

    def pack_and_write():
        packer = SequencePacker(options.seq_len, tok.eos_id, tok.pad_id, options.tail)
        sequences = [s for i in cell.order for s in packer.add(tokens[i], "")] + list(packer.finish())
        rows = options.rows_per_shard
        return sum(len(table_to_ipc_bytes(sequences_to_table(sequences[i: i + rows], options.seq_len)))
                   for i in range(0, len(sequences), rows))

    shards_s, _ = timed(pack_and_write)
    return {"order": order_s, "shards": shards_s}


def quality(docs: list[dict], names: list[str]) -> list[dict]:
    """Order quality and speed of each embedder on the documents."""
    from lorydata.embed import Embedder, EmbedderConfig
    from lorydata.order_metrics import domain_agreement

    texts, domains = [d["text"] for d in docs], [d["domain"] for d in docs]
    rows = []
    for name in names:
        model, backend = EMBEDDERS[name]
        config = EmbedderConfig(model=model, backend=backend, device="cpu")
        if model == "lsa":  # fitted on these documents' BPE ids first (as a build fits on its split)
            from lorydata.lexical_embed import LSA_FIT_DOCS
            from lorydata.tokenizer import Tokenizer

            fit, embedder = timed(fit_lsa_embedder, config, Tokenizer().encode_batch(texts))
            print(f"  {name:12s} fitted on {min(len(texts), LSA_FIT_DOCS)} documents in {fit:.1f} s (not in docs/s)")
        else:
            embedder = Embedder(config)
        embedder.encode(texts[:8])
        seconds, x = timed(embedder.encode, texts)
        rows.append({"embedder": name, "docs_per_s": len(texts) / seconds, **domain_agreement(x, domains)})
        print(f"  {name:12s} {rows[-1]['docs_per_s']:9.1f} docs/s   walk same domain "
              f"{rows[-1]['walk_same_domain']:.3f}   nearest neighbour same domain {rows[-1]['nearest_same_domain']:.3f}")
    return rows


def shown_args(args) -> dict:
    """The arguments as results record them: a path outside the repository by its last two
    components (results name no folder of this machine)."""
    root = Path(__file__).resolve().parents[1]

    def shown(value):
        if isinstance(value, list):
            return [shown(v) for v in value]
        if isinstance(value, str) and os.path.isabs(value):
            path = Path(value)
            return str(path.relative_to(root)) if path.is_relative_to(root) else str(Path(*path.parts[-2:]))
        return value

    return {name: shown(value) for name, value in vars(args).items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("input", nargs="*", default=[str(SAMPLE)],
                        help="jsonl(.zst/.gz) corpus (default: the sample); several files (a dump) are built as "
                             "they are, one file or --docs N from a rewritten jsonl of the documents kept")
    parser.add_argument("--docs", type=int, default=None, help="use the first N documents (default: all)")
    parser.add_argument("--embedder", default=None, help="the build's --embedder (default: the bundled MiniLM)")
    parser.add_argument("--embed-backend", default="torch", choices=["torch", "onnx", "onnx-int8"])
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--beam-arg", action="append", default=[], help="extra Beam flag (repeatable)")
    parser.add_argument("--quality", default="", help=f"embedders to compare the order of: {','.join(EMBEDDERS)}")
    parser.add_argument("--json", default=None, help="write the figures as JSON here")
    args = parser.parse_args(argv)

    from lorydata.embed import Embedder, lsa_fit_window
    from pipelines.build_corpus import build_corpus, embedder_config
    from pipelines.options import BuildOptions

    docs = load_documents(args.input, args.docs)
    n, texts = len(docs), [d["text"] for d in docs]
    mb = sum(len(t.encode()) for t in texts) / 1e6
    work = Path(tempfile.mkdtemp(prefix="bench_pipeline_"))
    try:
        if len(args.input) > 1 and not args.docs:
            # a dump's own files: their compression, and the runner's choice of worker
            # processes by input size, as a build of them sees it
            inputs = [str(Path(p).resolve()) for p in args.input]
        else:
            src = work / "docs.jsonl"
            src.write_text("".join(json.dumps(d) + "\n" for d in docs))
            inputs = [str(src)]
        options = BuildOptions(inputs=inputs, out=str(work / "corpus"), domain_field="domain",
                               seq_len=args.seq_len, k=args.k, embedder=args.embedder,
                               embed_backend=args.embed_backend, beam_args=args.beam_arg)
        config = embedder_config(options)
        embedder = config if config.model == "lsa" else Embedder(config)  # lsa: fitted in the floor's clock
        shown_input = args.input[0] if len(args.input) == 1 else f"{len(args.input)} files ({args.input[0]} ...)"
        print(f"{n} documents ({mb:.1f} MB) from {shown_input}; embedder {getattr(embedder, 'name', 'lsa')} "
              f"({args.embed_backend}), window {getattr(embedder, 'window', lsa_fit_window(config))} tokens, "
              f"{os.cpu_count()} cores")
        floors = [library_floor(texts, embedder)]
        build_s, summary = timed(lambda: build_corpus(options, log=lambda *_: None))
        stages = {name: s["seconds"] for name, s in summary.stages.items()}
        own = stage_floors(work / "corpus", options, n)
        floors.append(library_floor(texts, embedder))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    floor = min(floors, key=lambda f: f["total"])
    floor_rate, build_rate = n / floor["total"], n / build_s
    print(f"library floor  : {floor['total']:7.1f} s {floor_rate:8.1f} docs/s  (tokenize {floor['tokenize']:.1f} s, "
          f"MinHash {floor['minhash']:.1f} s, embed {floor['embed']:.1f} s)")
    print(f"build_corpus   : {build_s:7.1f} s {build_rate:8.1f} docs/s {mb / build_s:6.2f} MB/s")
    print(f"build / floor  : {build_rate / floor_rate:.2f}  (goal >= 0.80)")
    print(f"build / before : {build_rate / BEFORE_DOCS_PER_S:.1f}x the {BEFORE_DOCS_PER_S} docs/s MiniLM build (goal >= 8x)")
    library = {"documents": floor["tokenize"] + floor["minhash"], "embeddings": floor["embed"],
               "order/train": own["order"], "shards/train": own["shards"]}
    print("stage            seconds   library s   library/stage (goal >= 0.80)")
    for name, seconds in stages.items():
        lib = library.get(name)
        ratio = f"{lib / seconds:.2f}" if lib is not None and seconds else "-"
        print(f"  {name:14s} {seconds:8.1f}   {lib if lib is not None else float('nan'):9.1f}   {ratio}")
    rows = quality(docs, [q for q in args.quality.split(",") if q]) if args.quality else []
    if args.json:
        Path(args.json).write_text(json.dumps({"documents": n, "mb": mb, "floors": floors, "build_seconds": build_s,
                                               "stages": stages, "stage_library": library, "quality": rows,
                                               "args": shown_args(args)}, indent=2))


if __name__ == "__main__":
    main()
