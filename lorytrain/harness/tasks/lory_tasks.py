"""Functions the bundled lm-eval task YAMLs name with `!function lory_tasks.…`.

lm-eval imports this file by its path (it needs nothing from lory), so the tasks folder works
as a plain `--include_path`:

    lm_eval --model hf --model_args pretrained=OUT,trust_remote_code=True \
        --include_path lorytrain/harness/tasks --tasks lory_hellaswag --metadata '{"data_dir": "evaldata"}'

Every task reads `DATA_DIR/<task>/test.jsonl` (scored) and `DATA_DIR/<task>/train.jsonl`
(few-shot demonstrations), one JSON object per line; `lory benchmark --data-dir` passes the
same folder.
"""

from __future__ import annotations

from pathlib import Path


def local_jsonl(data_dir: str | None = None, lory_task: str | None = None, lory: dict | None = None, **_metadata):
    """The task's local splits as a `datasets.DatasetDict` ({"test", "train"}).

    lm-eval calls it with the task's metadata (`--metadata` JSON, the model arguments and the
    YAML's own `metadata`) and its `dataset_kwargs`.

    Args:
        data_dir: folder holding `<lory_task>/test.jsonl` (from `--metadata '{"data_dir": …}'`).
        lory_task: the task's folder name (its YAML's `dataset_kwargs`).
        lory: the YAML's `metadata.lory` block (layout and default shots, for messages).

    Raises:
        ValueError: no data_dir, or a missing file, named with the fix.
    """
    import datasets

    lory = lory or {}
    if not data_dir:
        raise ValueError(f"lory_{lory_task} reads local files: pass --metadata '{{\"data_dir\": \"DIR\"}}' "
                         f"with DIR/{lory_task}/test.jsonl (one object per line: {lory.get('layout')})")
    folder = Path(data_dir) / str(lory_task)
    test, train = folder / "test.jsonl", folder / "train.jsonl"
    if not test.is_file():
        raise ValueError(f"lory_{lory_task}: {test} not found (one object per line: {lory.get('layout')})")
    if lory.get("shots") and not train.is_file():
        raise ValueError(f"lory_{lory_task} uses {lory['shots']} demonstrations: put them in {train} "
                         "(same layout as test.jsonl)")
    files = {"test": str(test)}
    if train.is_file():
        files["train"] = str(train)
    loaded = datasets.load_dataset("json", data_files=files)
    if "train" not in loaded:  # zero-shot without demonstrations: an empty split keeps lm-eval's sampler quiet
        loaded["train"] = loaded["test"].select([])
    return loaded


def macro_f1(items) -> float:
    """Macro-averaged F1 over (gold, prediction) pairs (Min et al. 2022's classification metric)."""
    from sklearn.metrics import f1_score

    golds, preds = zip(*items, strict=True)
    return float(f1_score(golds, preds, average="macro"))
