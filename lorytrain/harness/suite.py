"""The paper's downstream suite as lm-eval tasks on local files, and the Table-1-style report.

Every task is a YAML file in `tasks/` (lm-eval's task config plus a `lory:` block naming its
group, headline metric and jsonl layout). Its data are `DATA_DIR/<task>/test.jsonl` (scored)
and `DATA_DIR/<task>/train.jsonl` (few-shot demonstrations, needed when the task uses shots),
one JSON object per line in the layout the YAML states. Nothing is downloaded.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from lorytrain.errors import LoryTrainError

TASKS_DIR = Path(__file__).with_name("tasks")
GROUPS = {  # the paper's Table 1 groups, in its order
    "commonsense": ("commonsense reasoning", ("boolq", "piqa", "siqa", "hellaswag", "winogrande")),
    "reading": ("reading comprehension", ("race_m", "race_h", "arc_e", "arc_c")),
    "closed_book_qa": ("closed-book QA", ("nq", "triviaqa")),
    "classification": ("text classification", ("agnews", "amazon", "sst2", "yelp", "fever", "mrpc")),
}
PAPER_SUITE = tuple(name for _, names in GROUPS.values() for name in names)


def macro_f1(items) -> float:
    """Macro-averaged F1 over (gold, prediction) pairs (Min et al. 2022's classification metric)."""
    from sklearn.metrics import f1_score

    golds, preds = zip(*items, strict=True)
    return float(f1_score(golds, preds, average="macro"))


AGGREGATIONS = {"macro_f1": macro_f1}


@dataclass
class TaskSpec:
    """One task of the suite.

    Args:
        name: short name (the YAML file's stem).
        group: Table 1 group key.
        metric: the headline metric.
        layout: the jsonl layout of its files.
        config: the lm-eval task config (data files not yet filled in).
    """

    name: str
    group: str
    metric: str
    layout: str
    config: dict

    @property
    def shots(self) -> int:
        return int(self.config.get("num_fewshot") or 0)


def load_spec(name: str) -> TaskSpec:
    """The shipped task `name`; `LoryTrainError` names the known ones otherwise."""
    path = TASKS_DIR / f"{name}.yaml"
    if not path.is_file():
        raise LoryTrainError(f"unknown task {name!r} (known: {', '.join(PAPER_SUITE)})")
    config = yaml.safe_load(path.read_text(encoding="utf-8"))
    meta = config.pop("lory")
    return TaskSpec(name, meta["group"], meta["metric"], meta["layout"], config)


def resolve_tasks(tasks: str | list[str]) -> list[str]:
    """`paper`, a group key, or comma-separated task names → task names."""
    names = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    out = []
    for name in (n.strip() for n in names if n.strip()):
        if name == "paper":
            out += PAPER_SUITE
        elif name in GROUPS:
            out += GROUPS[name][1]
        else:
            load_spec(name)
            out.append(name)
    return list(dict.fromkeys(out))


def task_config(spec: TaskSpec, data_dir: str | Path, num_fewshot: int | None = None) -> dict:
    """The lm-eval config dict of `spec` reading `data_dir/<name>/{test,train}.jsonl`.

    Raises:
        LoryTrainError: a missing test file, or demonstrations asked for without train.jsonl.
    """
    folder = Path(data_dir) / spec.name
    test, train = folder / "test.jsonl", folder / "train.jsonl"
    if not test.is_file():
        raise LoryTrainError(f"task {spec.name}: {test} not found (layout, one object per line: {spec.layout})")
    config = copy.deepcopy(spec.config)
    if num_fewshot is not None:
        config["num_fewshot"] = num_fewshot
    files = {"test": str(test)}
    if config.get("num_fewshot"):
        if not train.is_file():
            raise LoryTrainError(f"task {spec.name} uses {config['num_fewshot']} demonstrations: "
                                 f"put them in {train} (same layout as test.jsonl)")
        files["train"] = str(train)
        config["fewshot_split"] = "train"
    config.update(dataset_path="json", dataset_kwargs={"data_files": files}, test_split="test")
    for metric in config.get("metric_list", []):
        if metric.get("aggregation") in AGGREGATIONS:
            metric["aggregation"] = AGGREGATIONS[metric["aggregation"]]
    return config


def available(names: list[str], data_dir: str | Path) -> tuple[list[str], list[str]]:
    """Split task names into those with a test.jsonl under data_dir and those without."""
    have = [n for n in names if (Path(data_dir) / n / "test.jsonl").is_file()]
    return have, [n for n in names if n not in have]


def run_suite(lm, names: list[str], data_dir: str | Path, num_fewshot: int | None = None, limit: int | None = None,
              seed: int = 1234) -> dict:
    """Evaluate `lm` (an lm-eval `LM`) on the named tasks through `lm_eval.simple_evaluate`.

    Returns:
        {"tasks": {name: {"metric", "value", "stderr", "metrics", "samples", "shots"}},
         "groups": {key: mean headline value}, "average": mean over tasks}.
    """
    from lm_eval import simple_evaluate

    specs = [load_spec(n) for n in names]
    configs = [task_config(s, data_dir, num_fewshot) for s in specs]
    output = simple_evaluate(model=lm, tasks=configs, task_manager=_task_manager(), limit=limit,
                             bootstrap_iters=0, log_samples=False, random_seed=seed, numpy_random_seed=seed,
                             torch_random_seed=seed, fewshot_random_seed=seed)
    results = {}
    for spec, config in zip(specs, configs, strict=True):
        raw = output["results"][config["task"]]
        metrics = {k.split(",")[0]: v for k, v in raw.items() if "," in k and not k.split(",")[0].endswith("_stderr")}
        results[spec.name] = {"group": spec.group, "metric": spec.metric, "value": float(metrics[spec.metric]),
                              "metrics": metrics, "samples": int(output["n-samples"][config["task"]]["effective"]),
                              "shots": int(config.get("num_fewshot") or 0)}
    return summarise(results)


def summarise(tasks: dict) -> dict:
    """Add per-group and overall means of the headline metrics."""
    groups = {}
    for key, (_, names) in GROUPS.items():
        values = [tasks[n]["value"] for n in names if n in tasks]
        if values:
            groups[key] = sum(values) / len(values)
    values = [t["value"] for t in tasks.values()]
    return {"tasks": tasks, "groups": groups, "average": sum(values) / len(values) if values else None}


def _task_manager():
    from lm_eval.tasks import TaskManager

    try:  # the built-in task index is not needed and takes seconds to build
        return TaskManager(include_defaults=False)
    except TypeError:  # lm-eval versions without include_defaults
        return TaskManager()


def table_rows(result: dict, other: dict | None = None) -> list[tuple[str, ...]]:
    """Rows (label, metric, value[, other, change]) grouped like Table 1; values in %."""

    def cells(value, other_value):
        row = [f"{100 * value:.1f}" if value is not None else "–"]
        if other is not None:
            row.append(f"{100 * other_value:.1f}" if other_value is not None else "–")
            change = None if value is None or other_value is None else 100 * (other_value - value)
            row.append(f"{change:+.1f}" if change is not None else "–")
        return row

    rows = []
    for key, (title, names) in GROUPS.items():
        present = [n for n in names if n in result["tasks"] or (other and n in other["tasks"])]
        if not present:
            continue
        for name in present:
            mine = result["tasks"].get(name, {})
            theirs = (other or {}).get("tasks", {}).get(name, {})
            metric = mine.get("metric") or theirs.get("metric")
            rows.append((f"  {name}", f"{metric} ({mine.get('shots', theirs.get('shots', 0))}-shot)",
                         *cells(mine.get("value"), theirs.get("value"))))
        rows.append((f"{title} avg", "", *cells(result["groups"].get(key), (other or {}).get("groups", {}).get(key))))
    rows.append(("average", "", *cells(result["average"], (other or {}).get("average"))))
    return rows


def write_json(path: str | Path, payload: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
