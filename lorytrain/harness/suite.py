"""The paper's downstream suite as lm-eval tasks on local files, and the Table-1-style report.

Every task is a plain lm-eval YAML file in `tasks/` named `lory_<task>` (never one of lm-eval's
own hub tasks): its `custom_dataset` (`tasks/lory_tasks.py`) reads `DATA_DIR/<task>/test.jsonl`
(scored) and `DATA_DIR/<task>/train.jsonl` (few-shot demonstrations), one JSON object per line
in the layout the YAML states, with DATA_DIR from lm-eval's task metadata (`--metadata
'{"data_dir": …}'`). lory's own facts about a task (Table 1 group, headline metric, layout,
default shots) sit in the YAML's `metadata.lory`, which lm-eval ignores. `run_suite` loads the
tasks exactly as `lm_eval --include_path` does. Nothing is downloaded.
"""

from __future__ import annotations

import json
import logging
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


class _TaskYamlLoader(yaml.SafeLoader):
    """Reads the task YAMLs without lm-eval: `!function module.name` stays a string."""


_TaskYamlLoader.add_constructor("!function", lambda loader, node: f"!function {loader.construct_scalar(node)}")


@dataclass
class TaskSpec:
    """One task of the suite.

    Args:
        name: short name (the YAML file's stem and the data folder's name).
        group: Table 1 group key.
        metric: the headline metric.
        layout: the jsonl layout of its files.
        shots: the task's default number of demonstrations.
    """

    name: str
    group: str
    metric: str
    layout: str
    shots: int

    @property
    def task(self) -> str:
        """The lm-eval task name."""
        return f"lory_{self.name}"


def load_spec(name: str) -> TaskSpec:
    """The shipped task `name`; `LoryTrainError` names the known ones otherwise."""
    path = TASKS_DIR / f"{name}.yaml"
    if not path.is_file():
        raise LoryTrainError(f"unknown task {name!r} (known: {', '.join(PAPER_SUITE)})")
    meta = yaml.load(path.read_text(encoding="utf-8"), Loader=_TaskYamlLoader)["metadata"]["lory"]
    return TaskSpec(name, meta["group"], meta["metric"], meta["layout"], int(meta["shots"]))


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
            load_spec(name.removeprefix("lory_"))
            out.append(name.removeprefix("lory_"))
    return list(dict.fromkeys(out))


def check_data(spec: TaskSpec, data_dir: str | Path, num_fewshot: int | None = None) -> None:
    """Refuse, in one line, a task whose files under data_dir are missing.

    Raises:
        LoryTrainError: a missing test file, or demonstrations asked for without train.jsonl.
    """
    folder = Path(data_dir) / spec.name
    test, train = folder / "test.jsonl", folder / "train.jsonl"
    if not test.is_file():
        raise LoryTrainError(f"task {spec.name}: {test} not found (layout, one object per line: {spec.layout})")
    shots = spec.shots if num_fewshot is None else num_fewshot
    if shots and not train.is_file():
        raise LoryTrainError(f"task {spec.name} uses {shots} demonstrations: "
                             f"put them in {train} (same layout as test.jsonl)")


def task_manager(data_dir: str | Path):
    """An lm-eval `TaskManager` holding the bundled tasks (and not lm-eval's own), reading data_dir:
    what `lm_eval --include_path lorytrain/harness/tasks --metadata '{"data_dir": …}'` builds."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASKS_DIR), include_defaults=False,
                       metadata={"data_dir": str(Path(data_dir).resolve())})


def available(names: list[str], data_dir: str | Path) -> tuple[list[str], list[str]]:
    """Split task names into those with a test.jsonl under data_dir and those without."""
    have = [n for n in names if (Path(data_dir) / n / "test.jsonl").is_file()]
    return have, [n for n in names if n not in have]


def run_suite(lm, names: list[str], data_dir: str | Path, num_fewshot: int | None = None, limit: int | None = None,
              seed: int = 1234) -> dict:
    """Evaluate `lm` (an lm-eval `LM`) on the named tasks through `lm_eval.simple_evaluate`.

    Returns:
        {"tasks": {name: {"metric", "value", "metrics", "samples", "shots"}},
         "groups": {key: mean headline value}, "average": mean over tasks}.

    Raises:
        LoryTrainError: a task's files are missing (see `check_data`).
    """
    from lm_eval import simple_evaluate

    specs = [load_spec(n) for n in names]
    for spec in specs:
        check_data(spec, data_dir, num_fewshot)
    task_logger = logging.getLogger("lm_eval.api.task")
    task_logger.addFilter(_quiet_custom_dataset)
    try:
        output = simple_evaluate(model=lm, tasks=[s.task for s in specs], task_manager=task_manager(data_dir),
                                 num_fewshot=num_fewshot, limit=limit, bootstrap_iters=0, log_samples=False,
                                 random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                                 fewshot_random_seed=seed)
    finally:
        task_logger.removeFilter(_quiet_custom_dataset)
    results = {}
    for spec in specs:
        raw = output["results"][spec.task]
        metrics = {k.split(",")[0]: v for k, v in raw.items() if "," in k and not k.split(",")[0].endswith("_stderr")}
        results[spec.name] = {"group": spec.group, "metric": spec.metric, "value": float(metrics[spec.metric]),
                              "metrics": metrics, "samples": int(output["n-samples"][spec.task]["effective"]),
                              "shots": int(output["n-shot"].get(spec.task, spec.shots))}
    return summarise(results)


def _quiet_custom_dataset(record: logging.LogRecord) -> bool:
    """Drop lm-eval's advice, printed once per task, on passing kwargs to a `custom_dataset`:
    lory benchmark passes the only one (data_dir) itself."""
    return "Custom kwargs can be passed" not in record.getMessage()


def summarise(tasks: dict) -> dict:
    """Add per-group and overall means of the headline metrics."""
    groups = {}
    for key, (_, names) in GROUPS.items():
        values = [tasks[n]["value"] for n in names if n in tasks]
        if values:
            groups[key] = sum(values) / len(values)
    values = [t["value"] for t in tasks.values()]
    return {"tasks": tasks, "groups": groups, "average": sum(values) / len(values) if values else None}


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
