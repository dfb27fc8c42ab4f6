"""`lory benchmark`: a run (and optionally a second one) on the paper's suite from local files."""

from __future__ import annotations

from pathlib import Path

from lorytrain.errors import LoryTrainError
from lorytrain.harness.suite import available, resolve_tasks, run_suite


def select_tasks(tasks: str, data_dir: str | Path) -> tuple[list[str], list[str]]:
    """Tasks to run and tasks skipped for lack of data.

    `paper` and group names run whatever has a test.jsonl under data_dir; explicitly named
    tasks must all have data.

    Raises:
        LoryTrainError: data_dir missing, a named task without data, or nothing to run.
    """
    if not Path(data_dir).is_dir():
        raise LoryTrainError(f"--data-dir {data_dir} is not a folder")
    names = resolve_tasks(tasks)
    have, missing = available(names, data_dir)
    explicit = [n.strip().removeprefix("lory_") for n in tasks.split(",")
                if n.strip().removeprefix("lory_") in missing]
    if explicit:
        raise LoryTrainError(f"no {Path(data_dir) / explicit[0] / 'test.jsonl'} for task {explicit[0]}")
    if not have:
        raise LoryTrainError(f"none of the tasks {', '.join(names)} has a test.jsonl under {data_dir}")
    return have, missing


def benchmark_run(run_dir: str | Path, names: list[str], data_dir: str | Path, checkpoint: str | None = None,
                  routing: str = "causal", device: str = "cpu", batch_size: int = 8,
                  num_fewshot: int | None = None, limit: int | None = None) -> dict:
    """Score one run on the named tasks; the result of `run_suite` plus the run and checkpoint."""
    from lorytrain.harness.lm import LoryHarnessLM

    lm = LoryHarnessLM(run=str(run_dir), checkpoint=checkpoint, routing=routing, device=device,
                       batch_size=batch_size)
    result = run_suite(lm, names, data_dir, num_fewshot=num_fewshot, limit=limit)
    result["run"] = {"path": str(run_dir), "routing": routing}
    return result


def compare(first: dict, second: dict) -> dict:
    """Change (second − first) of every task's headline value, every group mean and the average."""
    tasks = {n: second["tasks"][n]["value"] - first["tasks"][n]["value"]
             for n in first["tasks"] if n in second["tasks"]}
    groups = {g: second["groups"][g] - first["groups"][g] for g in first["groups"] if g in second["groups"]}
    return {"tasks": tasks, "groups": groups, "average": second["average"] - first["average"]}


def plot(result: dict, path: str | Path, other: dict | None = None, labels: tuple[str, str] = ("run", "compare")) -> Path:
    """Bar chart (PNG) of every task's headline value and the group averages, one bar per run."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from lorytrain.harness.suite import GROUPS

    names = [n for _, tasks in GROUPS.values() for n in tasks if n in result["tasks"]]
    names += [f"{key} avg" for key in GROUPS if key in result["groups"]]
    runs = [(labels[0], result)] + ([(labels[1], other)] if other else [])

    def value(payload: dict, name: str) -> float:
        if name.endswith(" avg"):
            return 100 * payload["groups"].get(name[:-4], float("nan"))
        return 100 * payload["tasks"].get(name, {}).get("value", float("nan"))

    figure = Figure(figsize=(max(6.0, 0.6 * len(names) * len(runs)), 4.0))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    width = 0.8 / len(runs)
    for index, (label, payload) in enumerate(runs):
        axes.bar([i + index * width for i in range(len(names))], [value(payload, n) for n in names], width,
                 label=label)
    axes.set_xticks([i + width * (len(runs) - 1) / 2 for i in range(len(names))], names, rotation=45, ha="right")
    axes.set_ylabel("headline metric (%)")
    axes.legend()
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=120)
    return path
