"""Seeds as an axis of the small-scale replication (`reproduce.py --seeds 0,1,2`).

A seed changes a run's model initialisation and its data order. At the CPU scale one seed
measures the data order as much as the method, so every comparison here is reported as
mean ± the half-width of a two-sided 95% confidence interval (Student's t with n - 1 degrees
of freedom) over seeds, and called "n.s." (not significant) when the interval spans 0.

A model's change relative to its dense reference is paired by seed: seed s of lory-8E is
compared with seed s of dense on the same training corpus (the same data order), and the
per-seed changes are then averaged.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
NOT_SIGNIFICANT = "n.s."


def mean_ci(values, confidence: float = CONFIDENCE) -> tuple[float, float, int]:
    """Mean, half-width of the two-sided t confidence interval, and the number of values.

    With one value the half-width is NaN (no interval from a single seed).
    """
    data = np.asarray(list(values), dtype=float)
    n = len(data)
    if n == 0:
        return math.nan, math.nan, 0
    if n == 1:
        return float(data[0]), math.nan, 1
    half = stats.t.ppf(0.5 + confidence / 2, n - 1) * data.std(ddof=1) / math.sqrt(n)
    return float(data.mean()), float(half), n


def spans_zero(mean: float, half: float) -> bool:
    """Whether the interval mean ± half contains 0 (or there is no interval)."""
    return not math.isfinite(half) or mean - half <= 0 <= mean + half


def relative_changes(by_seed: dict[str, dict[int, dict]], name: str, reference: str) -> dict[str, list[float]]:
    """Per domain and "overall", the % change of `name`'s perplexity against `reference`'s,
    one value per seed that both runs have, in seed order.

    Args:
        by_seed: run name → seed → evaluation result ({"overall": {"ppl"}, "domains": {d: {"ppl"}}}).
        name: the run.
        reference: its dense reference run.
    """
    runs, bases = by_seed.get(name, {}), by_seed.get(reference, {})
    seeds = sorted(set(runs) & set(bases))
    changes: dict[str, list[float]] = {}
    for seed in seeds:
        run, base = runs[seed], bases[seed]
        for domain in [*sorted(run["domains"]), "overall"]:
            entry = run["overall"] if domain == "overall" else run["domains"][domain]
            ref = base["overall"] if domain == "overall" else base["domains"].get(domain)
            if ref is not None:
                changes.setdefault(domain, []).append(100 * (entry["ppl"] / ref["ppl"] - 1))
    return changes


def change_cell(values: list[float]) -> str:
    """'-3.9 ± 1.2%', with ' n.s.' when the interval spans 0; '+0.8% (1 seed)' for one value."""
    mean, half, n = mean_ci(values)
    if n == 0:
        return "—"
    if n == 1:
        return f"{mean:+.1f}% (1 seed)"
    return f"{mean:+.1f} ± {half:.1f}%" + (f" {NOT_SIGNIFICANT}" if spans_zero(mean, half) else "")


def ci_table(by_seed: dict[str, dict[int, dict]], references: dict[str, str]) -> str:
    """Markdown table of every run's perplexity change vs its dense reference, per domain and
    overall, mean ± 95% CI over the seeds both have (runs that are their own reference and
    runs whose reference is missing are left out)."""
    domains = sorted({d for runs in by_seed.values() for result in runs.values() for d in result["domains"]})
    lines = ["| model vs dense | seeds | " + " | ".join(domains) + " | overall |",
             "|---|---:" + "|---:" * (len(domains) + 1) + "|"]
    for name, reference in references.items():
        if reference == name or name not in by_seed or reference not in by_seed:
            continue
        changes = relative_changes(by_seed, name, reference)
        n = len(changes.get("overall", []))
        cells = [change_cell(changes.get(domain, [])) for domain in [*domains, "overall"]]
        lines.append(f"| {name} vs {reference} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def per_seed_table(by_seed: dict[str, dict[int, dict]], references: dict[str, str], domain: str = "overall") -> str:
    """Markdown table of every run's change vs its reference seed by seed (for screens of 2
    seeds, where the interval says little), with the mean ± 95% CI in the last column."""
    seeds = sorted({seed for runs in by_seed.values() for seed in runs})
    lines = ["| model vs dense | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± 95% CI |",
             "|---" + "|---:" * (len(seeds) + 1) + "|"]
    for name, reference in references.items():
        if reference == name or name not in by_seed or reference not in by_seed:
            continue
        runs, bases = by_seed[name], by_seed[reference]
        values = {}
        for seed in sorted(set(runs) & set(bases)):
            run = runs[seed]["overall"] if domain == "overall" else runs[seed]["domains"].get(domain)
            base = bases[seed]["overall"] if domain == "overall" else bases[seed]["domains"].get(domain)
            if run is not None and base is not None:
                values[seed] = 100 * (run["ppl"] / base["ppl"] - 1)
        cells = [f"{values[s]:+.1f}%" if s in values else "—" for s in seeds]
        lines.append(f"| {name} vs {reference} | " + " | ".join(cells) + f" | {change_cell(list(values.values()))} |")
    return "\n".join(lines)


def value_cell(values: list[float], digits: int = 2) -> str:
    """'114.58 ± 1.20 (3 seeds)', or the single value with '(1 seed)'."""
    mean, half, n = mean_ci(values)
    if n == 0:
        return "—"
    if n == 1:
        return f"{mean:.{digits}f} (1 seed)"
    return f"{mean:.{digits}f} ± {half:.{digits}f} ({n} seeds)"


def seed_table(by_seed: dict[str, dict[int, dict]], runs: list) -> str:
    """Markdown table of overall held-out perplexity, mean ± 95% CI over seeds: one row per
    training corpus, one column per model.

    Args:
        by_seed: run name → seed → evaluation result.
        runs: (name, training corpus, ffn, reference) of every run.
    """
    corpora = list(dict.fromkeys(order for _, order, _, _ in runs))
    models = list(dict.fromkeys(ffn for _, _, ffn, _ in runs))
    cell = {(order, ffn): name for name, order, ffn, _ in runs}
    # A column is named after its runs without the corpus suffixes: "lory-8E-random-dedup" → "lory-8E".
    labels = {ffn: name.replace("-random", "").replace("-dedup", "") for name, _, ffn, _ in reversed(runs)}
    lines = ["| training corpus | " + " | ".join(labels[m] for m in models) + " |", "|---" * (len(models) + 1) + "|"]
    for order in corpora:
        found = [by_seed.get(cell.get((order, ffn)), {}) for ffn in models]
        cells = [value_cell([result["overall"]["ppl"] for result in runs_.values()]) for runs_ in found]
        lines.append(f"| {order} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# (key of a run's per-seed specialisation record, column title, digits)
SPECIALISATION_COLUMNS = (
    ("expert_spread", "expert spread", 4),
    ("expert_cosine", "expert cosine", 6),
    ("entropy_ratio", "routing entropy / log E", 4),
    ("top1_off_mode", "segments off the top expert", 3),
    ("js_excess", "domain JS excess (nats)", 4),
    ("mi_excess", "domain MI excess (nats)", 3),
)


def specialisation_table(records: dict[str, dict[int, dict]]) -> str:
    """Markdown table of how far each MoE run's experts and routing moved from the upcycled
    copies, mean ± 95% CI over seeds (each value is a mean over the MoE layers).

    Args:
        records: run name → seed → {key of `SPECIALISATION_COLUMNS`: value}.
    """
    lines = ["| run | seeds | " + " | ".join(title for _, title, _ in SPECIALISATION_COLUMNS) + " |",
             "|---|---:" + "|---:" * len(SPECIALISATION_COLUMNS) + "|"]
    for name, seeds in records.items():
        cells = []
        for key, _, digits in SPECIALISATION_COLUMNS:
            values = [record[key] for record in seeds.values() if record.get(key) is not None]
            mean, half, n = mean_ci(values)
            cells.append("—" if n == 0 else f"{mean:.{digits}f}" if n == 1 else f"{mean:.{digits}f} ± {half:.{digits}f}")
        lines.append(f"| {name} | {len(seeds)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def specialisation_record(diagnostics: list[dict], analysis: dict | None) -> dict:
    """One run's specialisation numbers, each averaged over the MoE layers.

    Args:
        diagnostics: the "diagnostics" of the run's last logged steps (metrics.jsonl): expert
            spread and cosine are taken from the last one (the final weights), routing entropy
            and the off-top share, which are one micro-batch each, averaged over all of them.
        analysis: `lorytrain.analysis.run_analysis` of the final checkpoint on held-out text.
    """
    record = {}
    if diagnostics:
        last = diagnostics[-1]
        for key in ("expert_spread", "expert_cosine"):
            if last.get(key):
                record[key] = float(np.mean(last[key]))
        if all(d.get("routing_entropy") for d in diagnostics):
            entropy = np.mean([np.mean(d["routing_entropy"]) for d in diagnostics])
            record["entropy_ratio"] = float(entropy / last["log_experts"])
        if all(d.get("top1_off_mode") for d in diagnostics):
            record["top1_off_mode"] = float(np.mean([np.mean(d["top1_off_mode"]) for d in diagnostics]))
    if analysis:
        layers = analysis["layers"]
        record["js_excess"] = float(np.mean([layer["divergence"]["js_excess"] for layer in layers]))
        record["mi_excess"] = float(np.mean([layer["specialisation"]["mi_excess"] for layer in layers]))
    return record


def reference_of(name: str) -> str:
    """The dense run a replication run is compared with, from its name: "lory-8E-random+noise"
    → "dense-random", "ec-token-8E" → "dense"; dense runs are their own reference."""
    base = name.split("+", 1)[0]
    for prefix in ("lory-8E", "ec-token-8E"):
        if base.startswith(prefix):
            return "dense" + base[len(prefix):]
    return base


def tables_from_results(results: dict, pairs: list[tuple[str, str]] | None = None) -> str:
    """The mean ± 95% CI tables of a `reproduce.py` results.json (its "eval_by_seed"), for
    every run against its `reference_of`, or for the given (run, reference) pairs."""
    texts = []
    for heldout, runs in results["eval_by_seed"].items():
        by_seed = {name: {int(seed): found for seed, found in seeds.items()} for name, seeds in runs.items()}
        references = dict(pairs) if pairs else {name: reference_of(name) for name in by_seed}
        seeds = sorted({seed for found in by_seed.values() for seed in found})
        texts.append(f"{heldout}: % change in perplexity, mean ± 95% CI over seeds {seeds}, paired by seed "
                     f"(n.s.: the interval spans 0)\n\n" + ci_table(by_seed, references))
        texts.append(f"{heldout}: overall % change in perplexity seed by seed\n\n"
                     + per_seed_table(by_seed, references))
    return "\n\n".join(texts)


def results_from_per_seed(records: list[dict]) -> dict:
    """Per-seed records (`reproduce.py`'s per_seed/*.json) gathered into the results.json form
    {"eval_by_seed": {heldout: {run: {seed: result}}}, "specialisation": {run: {seed: record}}},
    runs in the order of their names."""
    evals: dict = {}
    special: dict = {}
    for record in sorted(records, key=lambda r: (r["run"], r["seed"])):
        for heldout, result in record["eval"].items():
            evals.setdefault(heldout, {}).setdefault(record["run"], {})[record["seed"]] = result
        if record.get("specialisation"):
            special.setdefault(record["run"], {})[record["seed"]] = record["specialisation"]
    return {"eval_by_seed": evals, "specialisation": special}


def main() -> None:
    import argparse
    import json
    from pathlib import Path

    parser = argparse.ArgumentParser(description="Mean ± 95% CI tables from reproduce.py's results.json or from "
                                                 "its per-seed files (every run, levers included).")
    parser.add_argument("results", nargs="?", help="results.json written by benchmarks/reproduce.py")
    parser.add_argument("--per-seed", default=None, help="a reproduce.py OUT/per_seed folder instead")
    parser.add_argument("--compare", default=None,
                        help="comma-separated RUN:REFERENCE pairs (default: every run vs its dense run)")
    args = parser.parse_args()
    if bool(args.results) == bool(args.per_seed):
        raise SystemExit("error: give a results.json or --per-seed FOLDER")
    pairs = [tuple(p.split(":", 1)) for p in args.compare.split(",")] if args.compare else None
    if args.per_seed:
        results = results_from_per_seed([json.loads(p.read_text()) for p in sorted(Path(args.per_seed).glob("*.json"))])
    else:
        results = json.loads(Path(args.results).read_text())
    print(tables_from_results(results, pairs))
    special = {name: {int(seed): record for seed, record in seeds.items()}
               for name, seeds in results.get("specialisation", {}).items()}
    if special:
        print("\nspecialisation of the MoE runs (mean over MoE layers; mean ± 95% CI over seeds)\n\n"
              + specialisation_table(special))


if __name__ == "__main__":
    main()
