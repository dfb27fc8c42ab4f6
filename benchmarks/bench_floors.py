"""Library floors of a build: MinHash signing and BPE tokenization, old path against new, on
the same documents in one process.

(a) MinHash: today's per-document numpy signing (`MinHasher.reference_signature`) against
    the compiled batch `MinHasher.signatures`, one core; bit-identity is checked on every
    document.
(b) datasketch and rensa (if installed: `pip install lory[bench]`) on the same 5-word
    shingles: the whole path from text (lory's word split, shingle strings, the library) and
    the library alone on prepared shingles. Their hash families differ from lory's, so their
    signatures are not lory's; they are timed to see whether a library would be faster.
(c) Tokenization: `tokenizers` as the documents stage used it (batch encode on all cores,
    ids as Python lists, then Arrow), one text at a time (one core), and two variants that
    show what `tokenizers` itself can gain (ids left untouched; `encode_batch_fast` without
    offsets, parallelism off), against
    `Tokenizer.encode_batch_arrow` on tiktoken, on one thread and on all cores; ids are
    checked equal on every document. tokie and fastokens (if installed) are timed beside.

Each measurement runs `--repeats` times, each on fresh objects (no cache carried over);
printed: median MB/s (UTF-8 bytes) with the min-max spread, MB per CPU-second (the figure
that survives a shared, loaded machine for one-core runs), documents per second, and ratios.

Usage:
    python benchmarks/bench_floors.py --corpus PATH/train.jsonl.zst --docs 1000 --png floors.png
"""

from __future__ import annotations

import argparse
import importlib
import io
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# tokenizers' batch encode uses every core only with parallelism on (tests turn it off).
os.environ["TOKENIZERS_PARALLELISM"] = "true"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import pyarrow as pa
import zstandard
from tokenizers import Tokenizer as HFTokenizer

from lorydata.minhash import MinHasher, words
from lorydata.tokenizer import DEFAULT_TOKENIZER, Tokenizer
from lorydata.tokenizer_fast import default_threads

SAMPLE = Path(__file__).resolve().parents[1] / "lorydata" / "assets" / "sample" / "sample.jsonl.zst"


def load_texts(path: str, docs: int) -> list[str]:
    """The `text` field of the first `docs` lines of a .jsonl or .jsonl.zst file."""
    raw = open(path, "rb")  # noqa: SIM115  (closed with the reader below)
    stream = zstandard.ZstdDecompressor().stream_reader(raw) if path.endswith(".zst") else raw
    texts = []
    with io.TextIOWrapper(stream, encoding="utf-8") as lines:
        for line in lines:
            texts.append(json.loads(line)["text"])
            if len(texts) >= docs:
                break
    return texts


class Timing:
    """Repeated runs of one measurement: wall and CPU seconds of each."""

    def __init__(self, name: str, megabytes: float, docs: int):
        self.name, self.megabytes, self.docs = name, megabytes, docs
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def run(self, make: Callable[[], Callable[[], object]], repeats: int) -> object:
        """Time `make()()` `repeats` times (`make` builds fresh objects, untimed)."""
        out = None
        for _ in range(repeats):
            fn = make()
            wall, cpu = time.perf_counter(), time.process_time()
            out = fn()
            self.wall.append(time.perf_counter() - wall)
            self.cpu.append(time.process_time() - cpu)
        return out

    @property
    def mb_s(self) -> float:
        return self.megabytes / statistics.median(self.wall)

    def row(self) -> str:
        rates = sorted(self.megabytes / w for w in self.wall)
        cpu_rate = self.megabytes / statistics.median(self.cpu)
        docs_s = self.docs / statistics.median(self.wall)
        return (f"  {self.name:<48} {self.mb_s:8.2f} MB/s [{rates[0]:.2f}-{rates[-1]:.2f}]"
                f" {cpu_rate:8.2f} MB/cpu-s {docs_s:9.0f} docs/s")


def shingle_strings(hasher: MinHasher, text: str) -> list[str]:
    """lory's shingles as strings (lower-cased `\\w+` words, `shingle_words` at a time)."""
    found = words(text)
    n = min(hasher.config.shingle_words, len(found))
    return [" ".join(found[i : i + n]) for i in range(len(found) - n + 1)] if found else []


def each(fn: Callable[[str], object], texts: list[str]) -> list:
    return [fn(text) for text in texts]


def bench_minhash(texts: list[str], megabytes: float, repeats: int) -> tuple[list[Timing], str]:
    hasher = MinHasher()
    hasher.signatures(texts[:2])  # compile (or load the cached kernel) before the clock
    new = Timing("lory batch MinHasher.signatures (1 core)", megabytes, len(texts))
    signatures, has_words = new.run(lambda: partial(MinHasher().signatures, texts), repeats)
    old = Timing("lory per-document numpy (today's, 1 core)", megabytes, len(texts))
    reference = old.run(lambda: partial(each, MinHasher().reference_signature, texts), repeats)
    one = Timing("lory MinHasher.signature per document", megabytes, len(texts))
    one.run(lambda: partial(each, MinHasher().signature, texts), repeats)
    for i, row in enumerate(reference):
        assert has_words[i] == (row is not None), i
        assert row is None or np.array_equal(signatures[i], row), f"signature of document {i} differs"
    timings = [old, new, one]
    shingles = [shingle_strings(hasher, t) for t in texts]
    try:
        import datasketch
    except ImportError:
        print("  datasketch not installed (pip install lory[bench])")
    else:
        def datasketch_sign(sets):
            out = []
            for s in sets:
                m = datasketch.MinHash(num_perm=hasher.config.num_perm, seed=1)
                m.update_batch([x.encode() for x in s])
                out.append(m.digest())
            return out

        whole = Timing("datasketch from text (lory shingles, 1 core)", megabytes, len(texts))
        whole.run(lambda: lambda: datasketch_sign([shingle_strings(hasher, t) for t in texts]), repeats)
        alone = Timing("datasketch alone on prepared shingles", megabytes, len(texts))
        alone.run(lambda: lambda: datasketch_sign(shingles), repeats)
        timings += [whole, alone]
    try:
        import rensa
    except ImportError:
        print("  rensa not installed (pip install lory[bench])")
    else:
        def rensa_sign(sets):
            return rensa.RMinHash.digest_matrix_from_token_sets(sets, hasher.config.num_perm, 1)

        whole = Timing("rensa RMinHash from text (lory shingles)", megabytes, len(texts))
        whole.run(lambda: lambda: rensa_sign([shingle_strings(hasher, t) for t in texts]), repeats)
        alone = Timing("rensa RMinHash alone on prepared shingles", megabytes, len(texts))
        alone.run(lambda: lambda: rensa_sign(shingles), repeats)
        hashes = [hasher.shingle_hashes(t) for t in texts]
        flat = np.concatenate(hashes)
        offsets = np.concatenate([[0], np.cumsum([len(h) for h in hashes])]).astype(np.uint64)
        hashed = Timing("rensa RMinHash alone on lory's shingle hashes", megabytes, len(texts))
        hashed.run(lambda: lambda: rensa.RMinHash.digest_matrix_from_flat_token_hashes(
            flat, offsets, hasher.config.num_perm, 1), repeats)
        timings += [whole, alone, hashed]
    summary = (f"  ratio batch / per-document: {new.mb_s / old.mb_s:.1f}x "
               f"(CPU: {statistics.median(old.cpu) / statistics.median(new.cpu):.1f}x); "
               f"signatures bit-identical on {len(texts)} documents")
    return timings, summary


def hf_stage_path(path: str, texts: list[str]) -> Callable[[], pa.Array]:
    """What pipelines/documents/dedup.py did per chunk: batch encode, Python lists, Arrow."""
    hf = HFTokenizer.from_file(path)
    return lambda: pa.array([e.ids for e in hf.encode_batch(texts, add_special_tokens=False)], pa.list_(pa.int32()))


def hf_batch_fast(path: str, texts: list[str]) -> Callable[[], object]:
    hf = HFTokenizer.from_file(path)
    return lambda: hf.encode_batch_fast(texts, add_special_tokens=False)


def hf_one_at_a_time(path: str, texts: list[str]) -> Callable[[], object]:
    hf = HFTokenizer.from_file(path)
    return lambda: [hf.encode(t, add_special_tokens=False).ids for t in texts]


def hf_encodings_only(path: str, texts: list[str]) -> Callable[[], object]:
    """Batch encode without touching the ids: what the Python lists and Arrow cost on top."""
    hf = HFTokenizer.from_file(path)
    return lambda: hf.encode_batch(texts, add_special_tokens=False)


def hf_serial_batch(path: str, texts: list[str]) -> Callable[[], object]:
    """encode_batch_fast with tokenizers' parallelism off (it reads the variable per call)."""
    hf = HFTokenizer.from_file(path)

    def run():
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        try:
            return hf.encode_batch_fast(texts, add_special_tokens=False)
        finally:
            os.environ["TOKENIZERS_PARALLELISM"] = "true"

    return run


def lory_arrow(path: str, texts: list[str], threads: int) -> Callable[[], pa.Array]:
    tok = Tokenizer(path)
    assert tok.engine == "tiktoken", tok.fallback_reason
    tok.encode("warm")  # builds the engine (checks the merges) outside the clock
    return lambda: tok.encode_batch_arrow(texts, threads=threads)


def other_one_at_a_time(load: Callable[[], object], texts: list[str]) -> Callable[[], list[list[int]]]:
    tok = load()
    return lambda: [list(tok.encode(t, add_special_tokens=False).ids) for t in texts]


def other_batch(load: Callable[[], object], texts: list[str]) -> Callable[[], object]:
    tok = load()
    return lambda: tok.encode_batch(texts, add_special_tokens=False)


def bench_tokenizers(texts: list[str], megabytes: float, repeats: int) -> tuple[list[Timing], str]:
    path = str(DEFAULT_TOKENIZER)
    cores = default_threads()
    hf_batch = Timing(f"tokenizers encode_batch -> Arrow ({cores} cores)", megabytes, len(texts))
    expected = hf_batch.run(partial(hf_stage_path, path, texts), repeats).to_pylist()
    hf_fast = Timing(f"tokenizers encode_batch_fast ({cores} cores)", megabytes, len(texts))
    hf_fast.run(partial(hf_batch_fast, path, texts), repeats)
    hf_one = Timing("tokenizers encode one text at a time (1 core)", megabytes, len(texts))
    hf_one.run(partial(hf_one_at_a_time, path, texts), repeats)
    hf_bare = Timing(f"tokenizers encode_batch, ids untouched ({cores} cores)", megabytes, len(texts))
    hf_bare.run(partial(hf_encodings_only, path, texts), repeats)
    hf_serial = Timing("tokenizers encode_batch_fast, parallelism off", megabytes, len(texts))
    hf_serial.run(partial(hf_serial_batch, path, texts), repeats)
    tt_one = Timing("lory encode_batch_arrow, tiktoken (1 thread)", megabytes, len(texts))
    assert tt_one.run(partial(lory_arrow, path, texts, 1), repeats).to_pylist() == expected, "tiktoken ids differ"
    tt_all = Timing(f"lory encode_batch_arrow, tiktoken ({cores} threads)", megabytes, len(texts))
    assert tt_all.run(partial(lory_arrow, path, texts, cores), repeats).to_pylist() == expected, "tiktoken ids differ"
    timings = [hf_batch, hf_fast, hf_bare, hf_serial, hf_one, tt_one, tt_all]
    for name, loader in (("tokie", "from_json"), ("fastokens", "from_file")):
        try:
            module = importlib.import_module(name)
        except ImportError:
            print(f"  {name} not installed (pip install lory[bench])")
            continue
        load = partial(getattr(module.Tokenizer, loader), path)
        one = Timing(f"{name} encode one text at a time (1 core)", megabytes, len(texts))
        ids = one.run(partial(other_one_at_a_time, load, texts), repeats)
        batch = Timing(f"{name} encode_batch ({cores} cores)", megabytes, len(texts))
        batch.run(partial(other_batch, load, texts), repeats)
        print(f"  {name}: ids equal to tokenizers on these documents: {ids == expected}")
        timings += [one, batch]
    summary = (f"  ratio tiktoken 1 thread / tokenizers 1 core: {tt_one.mb_s / hf_one.mb_s:.1f}x "
               f"(CPU: {statistics.median(hf_one.cpu) / statistics.median(tt_one.cpu):.1f}x); "
               f"all cores / all cores: {tt_all.mb_s / hf_batch.mb_s:.1f}x; ids identical on {len(texts)} documents")
    return timings, summary


def plot(timings: list[Timing], path: str) -> None:
    """Bars of MB per CPU-second (what one core does, whatever the machine's load); lory's
    own paths in orange."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 0.4 * len(timings) + 1.2))
    shown = timings[::-1]
    rates = [t.megabytes / statistics.median(t.cpu) for t in shown]
    colors = ["#DD8452" if t.name.startswith("lory") else "#4C72B0" for t in shown]
    ax.barh([t.name for t in shown], rates, color=colors)
    for y, rate in enumerate(rates):
        ax.text(rate, y, f" {rate:.1f}", va="center", fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("MB of text per CPU-second (median of repeats, log scale)")
    ax.set_title(f"Library floors on the same {timings[0].docs} documents")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", default=str(SAMPLE), help="jsonl(.zst) with a text field")
    parser.add_argument("--docs", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", choices=("minhash", "tokenizer"), help="run one half")
    parser.add_argument("--png", help="write a bar chart of MB/s here")
    args = parser.parse_args(argv)

    texts = load_texts(args.corpus, args.docs)
    megabytes = sum(len(t.encode("utf-8", "surrogatepass")) for t in texts) / 1e6
    print(f"{len(texts)} documents, {megabytes:.1f} MB, {megabytes * 1e6 / len(texts):,.0f} bytes each; "
          f"{default_threads()} cores; {args.repeats} repeats")
    timings: list[Timing] = []
    for half, title, bench in (("minhash", "MinHash (128 permutations, 5-word shingles)", bench_minhash),
                               ("tokenizer", "Tokenization (bundled byte-level BPE, vocab 8192)", bench_tokenizers)):
        if args.only in (None, half):
            print(title)
            measured, summary = bench(texts, megabytes, args.repeats)
            for t in measured:
                print(t.row())
            print(summary)
            timings += measured
    if args.png:
        plot(timings, args.png)


if __name__ == "__main__":
    main()
