"""Small-scale replication of Lory's claims on the 5-domain dev corpus.

Builds a similarity-ordered and a random-ordered training corpus from the same documents
(plus a held-out corpus), trains at the same active size and token budget:

- dense                   (similarity corpus)
- lory-8E                 (similarity corpus)
- expert-choice-8E, token (similarity corpus)
- dense, lory-8E          (random corpus)
- with `--dedup`: dense and lory-8E again on both orders of the near-deduplicated corpus
  (`build-corpus --near-dedup on`; the runs above use `--near-dedup off`), the issue-14
  axis: does dedup remove the dense penalty of similarity order?

then evaluates every run per domain on the held-out text (packed in similarity order, so
sequences stay within a domain as in the paper's per-domain held-out sets, and in random
order) and prints tables in the paper's form (perplexity per domain and its change
relative to the dense run trained on the same corpus), writes
`results.json`, `table.md`, `loss_curves.png`, and the routing analysis of both lory runs
(heatmaps + JSON) under `--out`.

`--plant-copies 0.13` first gives 13% of the training documents one edited near-copy each (the
dev corpus has none, so without it the dedup axis has nothing to remove).

`--seeds 0,1,2` trains every run once per seed (a seed changes the model's initialisation and
the data order), writes each run's per-seed results to `per_seed/<run>[-s<seed>].json`, and
reports every change against dense as mean ± 95% confidence interval over the seeds (paired
by seed; "n.s." where the interval spans 0; see `seed_stats.py`), with a table of how far
each MoE run's experts and routing moved from the upcycled copies (training diagnostics and
routing divergence between domains) and `diagnostics.png` of their curves over training.

`--set KEY=VALUE` (repeatable) changes every MoE run's training or model option (a lever:
`upcycle_noise=0.01`, `router_init_std=0.2`, `dense_warmup=0.2`, `segment_len=32`...);
`--tag NAME` then names those runs `lory-8E+NAME` so they sit beside the plain ones and are
compared with the same dense runs; their tables and plots go to `levers/NAME/`. All runs'
per-seed files together: `python benchmarks/seed_stats.py --per-seed OUT/per_seed`.

Every stage is skipped when its output exists, so an interrupted reproduction continues
where it stopped. Usage:

    python benchmarks/reproduce.py --corpus /path/to/dev_corpus --out runs/reproduce [--preset cpu|gpu]
    python benchmarks/reproduce.py --corpus ... --out runs/seeds --seeds 0,1,2 --runs dense,lory-8E --threads 1
    python benchmarks/reproduce.py --corpus ... --out runs/seeds --seeds 0,1 --runs dense,lory-8E \
        --set upcycle_noise=0.01 --tag noise
    python benchmarks/reproduce.py --corpus ... --out runs/dedup --dedup --seeds 0,1 --runs dense,lory-8E,\
        dense-random,lory-8E-random,dense-dedup,lory-8E-dedup,dense-random-dedup,lory-8E-random-dedup

`--corpus` is a folder with `train.jsonl.zst` and `heldout.jsonl.zst` (fields text, domain).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

from seed_stats import ci_table, seed_table, specialisation_record, specialisation_table

DOMAINS_FIELD = "domain"


@dataclass
class Preset:
    """One replication size.

    Args:
        model: ModelConfig overrides on top of `base` (the same for every run).
        base: the lorytrain preset they start from.
        seq_len: tokens per training sequence.
        segment_len: Lory routing segment length T.
        batch_size: sequences per step.
        tokens: training tokens per run.
        lr: peak learning rate.
    """

    model: dict
    base: str
    seq_len: int
    segment_len: int
    batch_size: int
    tokens: int
    lr: float
    experts: int = 8
    eval_sequences: int = 1024
    # (name, training corpus, ffn, the dense run it is compared with)
    runs: list = field(default_factory=lambda: [
        ("dense", "similarity", "dense", "dense"),
        ("lory-8E", "similarity", "lory", "dense"),
        ("ec-token-8E", "similarity", "expert-choice", "dense"),
        ("dense-random", "random", "dense", "dense-random"),
        ("lory-8E-random", "random", "lory", "dense-random"),
    ])


# The near-dedup axis (`--dedup`): the same models on the near-deduplicated corpus.
DEDUP_RUNS = [
    ("dense-dedup", "similarity-dedup", "dense", "dense-dedup"),
    ("lory-8E-dedup", "similarity-dedup", "lory", "dense-dedup"),
    ("dense-random-dedup", "random-dedup", "dense", "dense-random-dedup"),
    ("lory-8E-random-dedup", "random-dedup", "lory", "dense-random-dedup"),
]

PRESETS = {
    # 2-core CPU, under an hour for all four runs: 4 layers of d=128, 4 segments of 64 per sequence
    "cpu": Preset(model={"d_model": 128, "n_layers": 4, "n_heads": 4, "ffn_dim": 352}, base="small", seq_len=256,
                  segment_len=64, batch_size=4, tokens=2_000_000, lr=2e-3),
    # one GPU, a few hours: 12 layers of d=768, 4 segments of 256 per sequence
    "gpu": Preset(model={"d_model": 768, "n_layers": 12, "n_heads": 12, "ffn_dim": 2048}, base="small",
                  seq_len=1024, segment_len=256, batch_size=32, tokens=1_000_000_000, lr=6e-4),
}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def short_document_corpus(corpus: Path, out: Path, piece_chars: int, keep_every: int) -> Path:
    """A copy of the corpus whose documents are cut into pieces of about `piece_chars`
    characters (at line breaks), keeping every `keep_every`-th document (by id hash).

    Pieces of one document are new, separate documents: similarity order can put them back
    side by side, random order scatters them. With pieces shorter than a sequence, sequences
    hold several documents, which is where the two orders differ (as with the paper's web text).
    """
    import hashlib

    import zstandard

    target = out / "source"
    done = target / "_DONE"
    if done.exists():
        return target
    target.mkdir(parents=True, exist_ok=True)
    for name in ("train.jsonl.zst", "heldout.jsonl.zst"):
        with open(corpus / name, "rb") as f:
            lines = zstandard.ZstdDecompressor().stream_reader(f).read().decode("utf-8").splitlines()
        pieces = []
        for line in lines:
            record = json.loads(line)
            if int(hashlib.sha256(record["id"].encode()).hexdigest(), 16) % keep_every:
                continue
            text, start = record["text"], 0
            while start < len(text):
                end = text.find("\n", start + piece_chars)
                end = len(text) if end < 0 else end + 1
                pieces.append({"id": f"{record['id']}-{start}", "text": text[start:end],
                               DOMAINS_FIELD: record[DOMAINS_FIELD]})
                start = end
        data = "".join(json.dumps(p) + "\n" for p in pieces).encode()
        (target / name).write_bytes(zstandard.ZstdCompressor().compress(data))
        log(f"short documents: {name}: {len(pieces)} pieces")
    done.write_text("")
    return target


def _edited_copy(text: str, rng) -> str:
    """A near-copy of `text`: about 1% of its words replaced by other words of the text and,
    for half of the copies, two of its line blocks swapped (the edits of a changelog or a
    re-released page; the 5-word-shingle Jaccard of the pair stays near 0.9)."""
    import re

    words = list(re.finditer(r"\w+", text))
    if len(words) < 2:
        return text + "\n"
    pieces, last = [], 0
    edits = set(rng.choice(len(words), size=max(1, len(words) // 100), replace=False).tolist())
    for i, match in enumerate(words):
        if i in edits:
            pieces += [text[last:match.start()], words[int(rng.integers(len(words)))].group()]
            last = match.end()
    copy = "".join(pieces) + text[last:]
    lines = copy.split("\n")
    if len(lines) >= 4 and rng.random() < 0.5:
        half = len(lines) // 2
        lines = lines[half:] + lines[:half]
    return "\n".join(lines)


def planted_copies_corpus(corpus: Path, out: Path, fraction: float, seed: int = 0) -> Path:
    """A copy of the corpus where a seeded `fraction` of the training documents (by id hash)
    gain one edited near-copy (`_edited_copy`), appended at the end of the file as a new
    document of the same domain; the held-out split is copied unchanged. This plants the
    condition issue 14 measured on Debian text (13% of documents with a near-copy) into a
    corpus that has none, so the dedup axis has something to remove.
    """
    import hashlib

    import numpy as np
    import zstandard

    target = out / "planted"
    done = target / "_DONE"
    if done.exists():
        return target
    target.mkdir(parents=True, exist_ok=True)
    (target / "heldout.jsonl.zst").write_bytes((corpus / "heldout.jsonl.zst").read_bytes())
    with open(corpus / "train.jsonl.zst", "rb") as f:
        lines = zstandard.ZstdDecompressor().stream_reader(f).read().decode("utf-8").splitlines()
    copies = []
    for line in lines:
        record = json.loads(line)
        digest = int(hashlib.sha256(f"{seed}:{record['id']}".encode()).hexdigest(), 16)
        if (digest % 10_000) < fraction * 10_000:
            rng = np.random.default_rng(digest % 2**63)
            copies.append(json.dumps({"id": f"{record['id']}-copy", "text": _edited_copy(record["text"], rng),
                                      DOMAINS_FIELD: record[DOMAINS_FIELD]}))
    data = "\n".join([*lines, *copies]) + "\n"
    (target / "train.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(data.encode()))
    (target / "planted.json").write_text(json.dumps({"documents": len(lines), "copies": len(copies),
                                                     "fraction": fraction, "seed": seed}))
    log(f"planted {len(copies)} near-copies into {len(lines)} training documents")
    done.write_text("")
    return target


def build_corpora(corpus: Path, out: Path, preset: Preset) -> tuple[dict[str, Path], dict[str, dict]]:
    """The training corpora the runs need and the held-out corpora (cached).

    Returns:
        (corpus name → shard folder, corpus name → the build's document counts).
    """
    from pipelines.build_corpus import build_corpus
    from pipelines.options import BuildOptions

    folders, counts = {}, {}
    train, heldout = corpus / "train.jsonl.zst", corpus / "heldout.jsonl.zst"
    # Held-out text packed both ways: similarity order keeps sequences within a domain (like
    # the paper's per-domain held-out sets), random order mixes domains inside sequences.
    # Held-out corpora are never near-deduplicated: every run is scored on the same text.
    needed = {order for _, order, _, _ in preset.runs}
    jobs = [(name, train, name.removesuffix("-dedup")) for name in
            ("similarity", "random", "similarity-dedup", "random-dedup") if name in needed]
    jobs += [("heldout-similarity", heldout, "similarity"), ("heldout-random", heldout, "random")]
    for name, source, order in jobs:
        target = out / "corpora" / name
        options = BuildOptions(inputs=[str(source)], out=str(target), domain_field=DOMAINS_FIELD,
                               seq_len=preset.seq_len, order=order, rows_per_shard=512, tail="pad",
                               near_dedup="on" if name.endswith("-dedup") else "off")
        started = time.perf_counter()
        summary = build_corpus(options, log=lambda *a, **k: None)
        log(f"corpus {name}: {summary.splits['train']['sequences']} sequences "
            f"({time.perf_counter() - started:.0f} s)")
        folders[name], counts[name] = target / "train", summary.documents
    return folders, counts


def near_duplicate_rate(counts: dict[str, dict]) -> str | None:
    """'N of M documents (x%)' dropped as near-duplicates by a deduplicated build, or None."""
    for name, documents in counts.items():
        found = documents.get("near_dedup")
        if name.endswith("-dedup") and found:
            total = documents["documents_kept"] + found["dropped"]
            return (f"{found['dropped']} of {total} training documents ({100 * found['dropped'] / max(1, total):.1f}%) "
                    f"in {found['groups']} groups, estimated Jaccard >= {found['config']['threshold']}")
    return None


def seed_name(name: str, seed: int) -> str:
    """A run's name for one seed (seed 0 keeps the plain name, so earlier runs are reused)."""
    return name if seed == 0 else f"{name}-s{seed}"


def split_overrides(overrides: dict) -> tuple[dict, dict]:
    """`--set` values split into (ModelConfig overrides, TrainConfig options)."""
    from lorytrain.model.config import ModelConfig
    from lorytrain.training.config import TrainConfig

    model_keys = {f.name for f in fields(ModelConfig)} - {f.name for f in fields(TrainConfig)}
    model = {k: v for k, v in overrides.items() if k in model_keys}
    return model, {k: v for k, v in overrides.items() if k not in model_keys}


def train_run(name: str, data: Path, ffn: str, preset: Preset, out: Path, seed: int = 0,
              overrides: dict | None = None) -> Path:
    """Train one run unless its final checkpoint exists (resumes an interrupted one).

    Args:
        overrides: `--set` values for this run (model options go into its model overrides).
    """
    from lorytrain.training.config import make_config
    from lorytrain.training.trainer import Trainer

    name = seed_name(name, seed)
    run_dir = out / "runs" / name
    model, options = split_overrides(overrides or {})
    config = make_config(None, {
        "data": str(data), "out": str(run_dir), "preset": preset.base, "ffn": ffn, "experts": preset.experts,
        "segment_len": preset.segment_len, "model_overrides": {**preset.model, **model},
        "batch_size": preset.batch_size, "tokens": preset.tokens, "lr": preset.lr, "save_every": 100, "log_every": 5,
        "resume": True, "seed": seed, **options,
    })
    trainer = Trainer(config, log=lambda *a, **k: None)
    if trainer.step >= trainer.plan.steps:
        log(f"{name}: trained earlier, skipped")
        return run_dir
    started = time.perf_counter()
    record = trainer.train()
    log(f"{name}: {trainer.step} steps, {trainer.tokens:,} tokens, final loss {record['loss']:.3f} "
        f"({time.perf_counter() - started:.0f} s)")
    return run_dir


def evaluate_run(run_dir: Path, heldout: Path, name: str, sequences: int) -> dict:
    """Per-domain held-out loss of a run on the first `sequences` held-out sequences (cached)."""
    from lorytrain.evaluation import evaluate
    from lorytrain.runs import load_run

    cached = run_dir / f"{name}_eval.json"
    if cached.exists():
        return json.loads(cached.read_text())
    run = load_run(run_dir)
    result = evaluate(run.model, heldout, batch_size=8, max_batches=max(1, sequences // 8),
                      expected_tokenizer=run.tokenizer_sha256)
    cached.write_text(json.dumps(result, indent=2))
    return result


def table(results: dict[str, dict], references: dict[str, str]) -> str:
    """Markdown table: perplexity per domain, and % change vs the run's dense reference."""
    domains = sorted(next(iter(results.values()))["domains"])
    lines = ["| model | " + " | ".join(domains) + " | overall |", "|---" * (len(domains) + 2) + "|"]
    for name, result in results.items():
        cells = []
        for domain in [*domains, None]:
            entry = result["overall"] if domain is None else result["domains"][domain]
            reference = results.get(references[name])  # absent when --runs left it out
            if reference is None or references[name] == name:
                cells.append(f"{entry['ppl']:.2f}")
                continue
            base = reference["overall"] if domain is None else reference["domains"][domain]
            cells.append(f"{entry['ppl']:.2f} ({100 * (entry['ppl'] / base['ppl'] - 1):+.1f}%)")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_losses(run_dirs: dict[str, Path], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lorytrain.training.metrics_log import read_metrics

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, run_dir in run_dirs.items():
        records = [r for r in read_metrics(run_dir) if "loss" in r]
        tokens = [r["tokens"] for r in records]
        losses = [r["loss"] for r in records]
        window = max(1, len(losses) // 25)
        smooth = [sum(losses[max(0, i - window + 1): i + 1]) / len(losses[max(0, i - window + 1): i + 1])
                  for i in range(len(losses))]
        ax.plot(tokens, smooth, label=name)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("training loss (smoothed)")
    ax.set_title("Lory small-scale replication")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def analyse(run_dir: Path, heldout: Path, out: Path, sequences: int) -> dict:
    """Routing analysis of a run's final checkpoint on held-out text (heatmaps, routing divergence,
    training_diagnostics.png), cached in `out` (redone when the run has a newer checkpoint)."""
    from lorytrain.analysis import ANALYSIS_FILE, run_analysis
    from lorytrain.runs import find_checkpoint

    cached = out / ANALYSIS_FILE
    if cached.exists():
        found = json.loads(cached.read_text())
        if found.get("checkpoint") == str(find_checkpoint(run_dir, None)):
            return found
    return run_analysis(run_dir, heldout, out, max_batches=max(1, sequences // 8))


def last_diagnostics(run_dir: Path, share: float = 0.1) -> list[dict]:
    """The "diagnostics" of the last `share` of a run's logged steps (at least one)."""
    from lorytrain.training.metrics_log import read_metrics

    found = [r["diagnostics"] for r in read_metrics(run_dir) if r.get("diagnostics")]
    return found[-max(1, round(share * len(found))):] if found else []


def plot_diagnostics(run_dirs: dict[str, Path], path: Path) -> Path | None:
    """Every MoE run's expert spread and routing entropy / log E over training (means over
    the MoE layers; one line per seed, one colour per run)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lorytrain.training.metrics_log import read_metrics

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    colours: dict[str, str] = {}
    for name, run_dir in run_dirs.items():
        records = [r for r in read_metrics(run_dir) if r.get("diagnostics")]
        if not records:
            continue
        base = name.rsplit("-s", 1)[0] if name.rsplit("-s", 1)[-1].isdigit() else name
        label = None if base in colours else base  # one legend entry per run, not per seed
        colour = colours.setdefault(base, f"C{len(colours)}")
        tokens = [r["tokens"] for r in records]
        for ax, key in zip(axes, ("expert_spread", "routing_entropy", "top1_off_mode"), strict=True):
            values = [sum(r["diagnostics"][key]) / len(r["diagnostics"][key]) for r in records]
            if key == "routing_entropy":
                values = [v / r["diagnostics"]["log_experts"] for v, r in zip(values, records, strict=True)]
            ax.plot(tokens, values, color=colour, lw=1, alpha=0.8, label=label)
    if not colours:
        plt.close(fig)
        return None
    titles = ("expert spread (RMS distance from the mean expert / its norm)", "routing entropy / log E",
              "share of segments off the batch's top expert")
    for ax, title in zip(axes, titles, strict=True):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("training tokens")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("MoE diagnostics during training (mean over MoE layers; one line per seed)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", required=True, help="folder with train/heldout .jsonl.zst (benchmarks/data/make_dev_corpus.py makes one)")
    parser.add_argument("--out", default="runs/reproduce")
    parser.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    parser.add_argument("--tokens", type=int, default=None, help="override the preset's tokens per run")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice). On a small CPU run this alone: two "
                             "multi-threaded torch processes on the same cores slow each other down by 10-100x")
    parser.add_argument("--piece-chars", type=int, default=0,
                        help="cut documents into pieces of about this many characters first (0: off)")
    parser.add_argument("--keep-every", type=int, default=1, help="with --piece-chars: keep every k-th document")
    parser.add_argument("--plant-copies", type=float, default=0.0,
                        help="give this share of the training documents one edited near-copy first (0: off)")
    parser.add_argument("--runs", default=None, help="comma-separated run names to train (default: all)")
    parser.add_argument("--dedup", action="store_true",
                        help="add the near-dedup axis: dense and lory-8E on both orders of the deduplicated corpus")
    parser.add_argument("--seeds", default="0",
                        help="comma-separated seeds (model init and data order); each run once per seed")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a training or model option of every MoE run (repeatable); needs --tag")
    parser.add_argument("--tag", default=None, help="suffix of the MoE runs' names with --set: lory-8E+TAG")
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("LORY_PROGRESS", "0")
    from lorytrain.training.config import parse_overrides

    overrides = parse_overrides(args.overrides)
    if overrides and not args.tag:
        raise SystemExit("error: --set changes the MoE runs: give them a name with --tag")
    preset = PRESETS[args.preset]
    if args.tokens:
        preset.tokens = args.tokens
    corpus, out = Path(args.corpus), Path(args.out)
    for name in ("train.jsonl.zst", "heldout.jsonl.zst"):
        if not (corpus / name).is_file():
            raise SystemExit(f"error: {corpus / name} not found; pass --corpus")
    started = time.perf_counter()
    if args.dedup:
        preset.runs = [*preset.runs, *DEDUP_RUNS]
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.runs:
        wanted = set(args.runs.split(","))
        preset.runs = [run for run in preset.runs if run[0] in wanted]
    if args.tag:  # the MoE runs under their lever's name, compared with the same dense runs
        preset.runs = [(name if ffn == "dense" else f"{name}+{args.tag}", order, ffn, reference)
                       for name, order, ffn, reference in preset.runs]
    if args.piece_chars:
        corpus = short_document_corpus(corpus, out, args.piece_chars, args.keep_every)
    if args.plant_copies:
        corpus = planted_copies_corpus(corpus, out, args.plant_copies)
    folders, corpus_counts = build_corpora(corpus, out, preset)
    planted = json.loads((corpus / "planted.json").read_text()) if args.plant_copies else None
    moe = {name for name, _, ffn, _ in preset.runs if ffn != "dense"}
    run_dirs = {(name, seed): train_run(name, folders[order], ffn, preset, out, seed,
                                        overrides if name in moe else None)
                for seed in seeds for name, order, ffn, _ in preset.runs}  # seed-major: pairs finish together
    references = {name: reference for name, _, _, reference in preset.runs}
    results, by_seed, texts = {}, {}, []
    rate = near_duplicate_rate(corpus_counts)
    if planted:
        texts.append(f"planted: {planted['copies']} edited near-copies added to {planted['documents']} training "
                     f"documents ({100 * planted['copies'] / max(1, planted['documents']):.1f}%)")
    if rate:
        texts.append(f"near-duplicates in the training split: {rate}")
    if overrides:
        texts.append(f"lever `{args.tag}`: MoE runs trained with " + ", ".join(f"{k}={v}" for k, v in overrides.items()))
    for heldout in ("heldout-similarity", "heldout-random"):
        by_seed[heldout] = {}
        for (name, seed), run_dir in run_dirs.items():
            result = evaluate_run(run_dir, folders[heldout], heldout, preset.eval_sequences)
            by_seed[heldout].setdefault(name, {})[seed] = result
        results[heldout] = {name: found[seeds[0]] for name, found in by_seed[heldout].items()}
        budget = f"{preset.tokens:,} training tokens per run"
        if len(seeds) > 1:
            texts.append(f"held-out perplexity, {heldout} packing ({budget}): % change vs the dense run on the same "
                         f"training corpus, mean ± 95% confidence interval (t) over seeds {args.seeds}, paired by "
                         "seed; n.s. = not significant (the interval spans 0)\n\n"
                         + ci_table(by_seed[heldout], references))
            texts.append(f"overall held-out perplexity, {heldout} packing, mean ± 95% confidence interval over seeds "
                         f"{args.seeds}\n\n" + seed_table(by_seed[heldout], preset.runs))
        else:
            texts.append(f"held-out perplexity, {heldout} packing ({budget}, single seed {seeds[0]}: differences "
                         "of a few percent may be seed noise; in parentheses: change vs the dense run on the same "
                         "training corpus)\n\n" + table(results[heldout], references))
    analysis, special = {}, {}
    for (name, seed), run_dir in run_dirs.items():
        if name in moe:
            found = analyse(run_dir, folders["heldout-similarity"], out / "analysis" / seed_name(name, seed),
                            preset.eval_sequences)
            analysis[seed_name(name, seed)] = found.get("summary", {})
            special.setdefault(name, {})[seed] = specialisation_record(last_diagnostics(run_dir), found)
    if special:
        texts.append("how far the experts and the routing moved from the upcycled copies (mean over MoE layers; "
                     "mean ± 95% CI over seeds): expert spread and cosine of the final weights, routing entropy and "
                     "off-top share over the last 10% of logged steps, routing divergence (JS) and MI between "
                     "domains on heldout-similarity in excess of shuffled domain labels\n\n"
                     + specialisation_table(special))
    per_seed = out / "per_seed"
    per_seed.mkdir(parents=True, exist_ok=True)
    for (name, seed), run_dir in run_dirs.items():
        # the run folder relative to the results folder: results name no folder of this machine
        record = {"run": name, "seed": seed, "run_dir": os.path.relpath(run_dir, out), "tokens": preset.tokens,
                  "overrides": overrides if name in moe else {},
                  "eval": {heldout: by_seed[heldout][name][seed] for heldout in by_seed},
                  "specialisation": special.get(name, {}).get(seed)}
        (per_seed / f"{seed_name(name, seed)}.json").write_text(json.dumps(record, indent=2, default=_json_default))
    text = "\n\n".join(texts)
    run_dirs = {seed_name(name, seed): run_dir for (name, seed), run_dir in run_dirs.items()}
    report = out / "levers" / args.tag if args.tag else out  # a lever's tables beside the plain ones
    report.mkdir(parents=True, exist_ok=True)
    plot_losses(run_dirs, report / "loss_curves.png")
    plot_diagnostics(run_dirs, report / "diagnostics.png")
    (report / "table.md").write_text(text + "\n")
    (report / "results.json").write_text(json.dumps({"preset": args.preset, "tokens": preset.tokens, "seeds": seeds,
                                                   "overrides": overrides, "tag": args.tag, "eval": results,
                                                   "eval_by_seed": by_seed, "near_duplicates": rate, "planted": planted,
                                                   "specialisation": special, "analysis": analysis},
                                                  indent=2, default=_json_default))
    print(text)
    log(f"done in {time.perf_counter() - started:.0f} s; results in {report}")


def _json_default(value):
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    return number if math.isfinite(number) else None


if __name__ == "__main__":
    main()
