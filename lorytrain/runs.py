"""Loading a finished (or running) training run for evaluation, generation and analysis."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from lorydata.confine import OutsideFolderError, inside
from lorytrain.errors import LoryTrainError
from lorytrain.model import LoryLM
from lorytrain.training.checkpoint import (
    MODEL_FILE,
    STATE_FILE,
    find_valid_checkpoint,
    read_model_weights,
    read_state,
    verify_checkpoint,
)
from lorytrain.training.model_setup import check_size, check_weights_fit, config_from_state, empty_model
from lorytrain.training.run_folder import RUN_TOKENIZER

# What reading a run's model needs of a checkpoint (state.json is checked by reading it).
MODEL_FILES = (MODEL_FILE,)
log = logging.getLogger("lory")


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


def find_checkpoint(run_dir: str | Path, checkpoint: str | Path | None = None) -> Path:
    """The checkpoint to load, its model files verified against their recorded sha256:
    `checkpoint` (a folder, or a name under the run's checkpoints/), else the run's newest
    valid one (a damaged newer one is reported as a warning, naming it).

    Raises:
        LoryTrainError: the run folder or checkpoint does not exist, the requested checkpoint
            is damaged, or no checkpoint of the run is intact.
    """
    run_dir = Path(run_dir)
    if checkpoint is not None:
        for candidate in (Path(checkpoint), run_dir / "checkpoints" / str(checkpoint)):
            if (candidate / "state.json").is_file():
                problem = verify_checkpoint(candidate, MODEL_FILES)
                if problem:
                    raise LoryTrainError(f"checkpoint {candidate} is damaged: {problem}")
                return candidate
        raise LoryTrainError(f"checkpoint {checkpoint} not found (looked in {run_dir / 'checkpoints'})")
    if not run_dir.is_dir():
        raise LoryTrainError(f"run folder not found: {run_dir}")
    found = find_valid_checkpoint(run_dir, log.warning, only=MODEL_FILES)
    if found is None:
        raise LoryTrainError(f"{run_dir} holds no checkpoint; is it a `lory train --out` folder?")
    return found


def load_run(run_dir: str | Path, checkpoint: str | Path | None = None, device: str | torch.device = "cpu",
             dtype: torch.dtype | None = None) -> LoadedRun:
    """Build the run's model from its checkpoint's config and load the weights.

    The config in `state.json` is validated and checked against the tensors in
    `model.safetensors` (header only) before any memory is allocated: a hostile or damaged
    config is one line, not a hang.

    Args:
        run_dir: a `lory train --out` folder.
        checkpoint: a specific checkpoint (default: the latest).
        device: where to put the model.
        dtype: cast the weights (default: as saved, float32).
    """
    path = find_checkpoint(run_dir, checkpoint)
    state = read_state(path)
    config = config_from_state(state, path / STATE_FILE)
    log.info(f"{path}: {check_size(config)}")
    check_weights_fit(config, path / MODEL_FILE)
    model = empty_model(config, device)
    missing, unexpected = model.load_state_dict(read_model_weights(path), strict=False)
    if missing or unexpected:
        raise LoryTrainError(f"checkpoint {path} does not fit its own config (missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]})")
    if dtype is not None:
        model = model.to(dtype)
    try:  # a symlink out of the run folder is not the run's tokenizer
        tokenizer = inside(run_dir, RUN_TOKENIZER, source=Path(run_dir), entry="tokenizer")
    except OutsideFolderError as exc:
        raise LoryTrainError(str(exc)) from None
    return LoadedRun(model.eval(), state, path, tokenizer if tokenizer.is_file() else None)
