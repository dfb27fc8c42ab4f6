"""Loading a finished (or running) training run for evaluation, generation and analysis."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from lorytrain.errors import LoryTrainError
from lorytrain.model import LoryLM, ModelConfig
from lorytrain.training.checkpoint import latest_checkpoint, load_checkpoint
from lorytrain.training.model_setup import empty_model

RUN_TOKENIZER = "tokenizer.json"


@dataclass
class LoadedRun:
    """A run's model at one checkpoint.

    Args:
        model: the model in eval mode, on the requested device.
        state: the checkpoint's `state.json` (step, tokens, config, tokenizer identity, ...).
        checkpoint: the checkpoint folder.
        tokenizer_path: the run's copy of its tokenizer (None when the run has none).
    """

    model: LoryLM
    state: dict
    checkpoint: Path
    tokenizer_path: Path | None

    @property
    def tokenizer_sha256(self) -> str | None:
        return self.state.get("tokenizer", {}).get("sha256")


def keep_tokenizer(run_dir: str | Path, tokenizer: dict) -> Path | None:
    """Copy the shards' tokenizer into the run folder, so the run can be decoded on its own.

    Returns the copy, or None when the tokenizer file recorded in the manifest is gone.
    """
    target = Path(run_dir) / RUN_TOKENIZER
    if target.exists():
        return target
    source = Path(tokenizer.get("path", ""))
    if source.is_dir():
        source = source / RUN_TOKENIZER
    if not source.is_file():
        return None
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    shutil.copyfile(source, tmp)
    tmp.rename(target)
    return target


def find_checkpoint(run_dir: str | Path, checkpoint: str | Path | None = None) -> Path:
    """The checkpoint to load: `checkpoint` (a folder, or a name under the run's
    checkpoints/), else the run's latest.

    Raises:
        LoryTrainError: the run folder or checkpoint does not exist.
    """
    run_dir = Path(run_dir)
    if checkpoint is not None:
        for candidate in (Path(checkpoint), run_dir / "checkpoints" / str(checkpoint)):
            if (candidate / "state.json").is_file():
                return candidate
        raise LoryTrainError(f"checkpoint {checkpoint} not found (looked in {run_dir / 'checkpoints'})")
    if not run_dir.is_dir():
        raise LoryTrainError(f"run folder not found: {run_dir}")
    found = latest_checkpoint(run_dir)
    if found is None:
        raise LoryTrainError(f"{run_dir} holds no checkpoint; is it a `lory train --out` folder?")
    return found


def load_run(run_dir: str | Path, checkpoint: str | Path | None = None, device: str | torch.device = "cpu",
             dtype: torch.dtype | None = None) -> LoadedRun:
    """Build the run's model from its checkpoint's config and load the weights.

    Args:
        run_dir: a `lory train --out` folder.
        checkpoint: a specific checkpoint (default: the latest).
        device: where to put the model.
        dtype: cast the weights (default: as saved, float32).
    """
    path = find_checkpoint(run_dir, checkpoint)
    loaded = load_checkpoint(path)
    state = loaded["state"]
    config = ModelConfig.from_dict(state["model_config"])
    model = empty_model(config, device)
    missing, unexpected = model.load_state_dict(loaded["model"], strict=False)
    if missing or unexpected:
        raise LoryTrainError(f"checkpoint {path} does not fit its own config (missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]})")
    if dtype is not None:
        model = model.to(dtype)
    tokenizer = Path(run_dir) / RUN_TOKENIZER
    return LoadedRun(model.eval(), state, path, tokenizer if tokenizer.is_file() else None)
