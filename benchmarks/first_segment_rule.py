"""Which strictly causal rule should route the first segment at inference?

Lory trains segment 0 on its own mean (stop-gradient): in a plain forward pass its tokens see a
summary of later tokens. Scoring needs a causal rule; the candidates are uniform weights 1/E
and the running mean of tokens 0..t ("causal", what `--routing causal` does). This scores the
held-out shards of trained runs under each rule and reports the mean loss of the tokens
predicted inside segment 0 (positions 0..T-1), after it, and overall, plus how far the paper's
rule lets appended tokens move the logits of the first 50 tokens.

    python benchmarks/first_segment_rule.py runs/s1-lory-seed1 runs/s1-lory-seed2 runs/s1-lory-seed3 \
        --data runs/sample-corpus/heldout --max-batches 20 --out benchmarks/results/first-segment
"""

from __future__ import annotations

import argparse
import json
import statistics
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from lorydata.dataset import ShardDataset
from lorytrain.model.routing import SegmentRouting
from lorytrain.runs import load_run

RULES = ("paper (self, not causal)", "uniform", "running mean (causal)")


@contextmanager
def uniform_first_segment(model):
    """Route segment 0 of every segment-routed layer with weights 1/E while inside."""
    routers = [m for m in model.modules() if isinstance(m, SegmentRouting)]
    before = [r.first_segment for r in routers]
    for r in routers:
        r.first_segment = "uniform"
    try:
        yield
    finally:
        for r, rule in zip(routers, before, strict=True):
            r.first_segment = rule


def logits_under(model, ids: torch.Tensor, rule: str) -> torch.Tensor:
    if rule == "uniform":
        with uniform_first_segment(model):
            return model(ids, routing="segment")
    return model(ids, routing="causal" if rule.startswith("running") else "segment")


@torch.no_grad()
def score(run_dir: str, data: str, max_batches: int, batch_size: int = 8) -> dict:
    """Per rule: mean loss inside segment 0, after it, and overall; and the paper rule's leak."""
    run = load_run(run_dir)
    model = run.model.eval()
    T = model.config.segment_len
    sums = {rule: {"first": [0.0, 0], "rest": [0.0, 0]} for rule in RULES}
    dataset = ShardDataset(data, shuffle=False, epochs=1, even=False)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=ShardDataset.collate)
    leak = 0.0
    for index, batch in enumerate(tqdm(loader, desc=Path(run_dir).name, total=max_batches or None)):
        if max_batches and index >= max_batches:
            break
        ids = batch["input_ids"]
        inputs, targets = ids[:, :-1], ids[:, 1:]
        for rule in RULES:
            loss = F.cross_entropy(logits_under(model, inputs, rule).float().transpose(1, 2), targets, reduction="none")
            for part, span in (("first", slice(0, T)), ("rest", slice(T, None))):
                sums[rule][part][0] += float(loss[:, span].sum())
                sums[rule][part][1] += loss[:, span].numel()
        full, short = model(inputs), model(inputs[:, :50])  # the paper's rule, whole vs cut after 50 tokens
        leak = max(leak, float((full[:, :50] - short).abs().max()))
    out = {}
    for rule, parts in sums.items():
        first, rest = parts["first"], parts["rest"]
        out[rule] = {"first_segment": first[0] / first[1], "after": rest[0] / max(rest[1], 1),
                     "overall": (first[0] + rest[0]) / (first[1] + rest[1]), "tokens_first": first[1]}
    return {"run": run_dir, "step": run.state["step"], "segment_len": T, "rules": out,
            "paper_rule_max_logit_change_first_50": leak}


def mean_interval(values: list[float]) -> str:
    """mean ± half-width of a 95% t-interval (n ≤ 5), or the single value."""
    if len(values) == 1:
        return f"{values[0]:.4f} (single seed)"
    t = {2: 12.71, 3: 4.30, 4: 3.18, 5: 2.78}.get(len(values), 2.0)
    return f"{statistics.mean(values):.4f} ± {t * statistics.stdev(values) / len(values) ** 0.5:.4f}"


def plot(results: list[dict], path: Path) -> None:
    """Loss of the first segment's tokens per rule: one dot per run, a bar at the mean."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.5, 3.6))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for x, rule in enumerate(RULES):
        axes.bar(x, statistics.mean(r["rules"][rule]["first_segment"] for r in results), color="#bbb")
    for r in results:  # one line per run: the rules are compared on the same tokens
        axes.plot(range(len(RULES)), [r["rules"][rule]["first_segment"] for rule in RULES], "o-", color="#333",
                  label=Path(r["run"]).name)
    low = min(r["rules"][rule]["first_segment"] for r in results for rule in RULES)
    axes.set_ylim(low - 0.1, None)
    axes.set_xticks(range(len(RULES)), RULES)
    axes.set_ylabel(f"loss, first {results[0]['segment_len']} tokens")
    axes.set_title(f"first-segment routing at inference ({len(results)} runs)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="*")
    parser.add_argument("--data", help="held-out shard folder")
    parser.add_argument("--max-batches", type=int, default=0)
    parser.add_argument("--out", default=None, help="folder for results.json and first_segment.png")
    parser.add_argument("--from-json", default=None, help="report (and plot) an earlier results.json")
    args = parser.parse_args()
    if args.from_json:
        results = json.loads(Path(args.from_json).read_text())
    else:
        if not args.runs or not args.data:
            parser.error("give RUNS and --data (or --from-json)")
        results = [score(run, args.data, args.max_batches) for run in args.runs]
    print(f"mean loss per predicted token ({len(results)} runs; 95% t-interval over runs)")
    for part in ("first_segment", "after", "overall"):
        for rule in RULES:
            print(f"  {part:13s} {rule:26s} {mean_interval([r['rules'][rule][part] for r in results])}")
    for part in ("first_segment", "overall"):
        gaps = [r["rules"]["running mean (causal)"][part] - r["rules"]["uniform"][part] for r in results]
        print(f"  {part}: running mean − uniform = {mean_interval(gaps)}")
    leaks = [r["paper_rule_max_logit_change_first_50"] for r in results]
    print(f"paper's rule: appending tokens moves the logits of the first 50 tokens by up to {max(leaks):.2e}")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        plot(results, Path(args.out) / "first_segment.png")


if __name__ == "__main__":
    main()
