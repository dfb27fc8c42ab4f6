"""torchrun entries for the FSDP tests, run as

    torchrun --nproc-per-node 2 -m tests.lorytrain.fsdp_probe upcycle|precision OUT CONFIG_JSON

- upcycle: dense steps, then `Trainer._upcycle` while counting the bytes each rank
  allocates; rank 0 saves what the test compares with one process.
- precision: one training step, noting the dtype of the weights the forward pass computes
  with and of the sharded weights, gradients and Adam moments.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_leaves


def _dense_parts(tensor: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors holding a tensor's memory (a DTensor's local shard, an async
    collective's result), skipping the meta device."""
    if is_traceable_wrapper_subclass(tensor):
        names, _ = tensor.__tensor_flatten__()
        inner = [getattr(tensor, name) for name in names]
        return [part for t in inner if isinstance(t, torch.Tensor) for part in _dense_parts(t)]
    return [] if tensor.device.type == "meta" else [tensor]


class AllocatedBytes(TorchDispatchMode):
    """Counts the memory every aten op newly allocates on this process: the outputs that are
    neither views nor in-place results of an input (a DTensor counts its local shard).

    `total` bounds the peak from above (nothing freed is subtracted); `largest` is the
    biggest single allocation.
    """

    def __init__(self):
        super().__init__()
        self.total = 0
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {part.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor) for part in _dense_parts(t)}
        for tensor in tree_leaves(out):
            if not isinstance(tensor, torch.Tensor):
                continue
            for part in _dense_parts(tensor):
                storage = part.untyped_storage()
                if storage.data_ptr() in inputs:
                    continue
                inputs.add(storage.data_ptr())
                self.total += storage.nbytes()
                self.largest = max(self.largest, storage.nbytes())
        return out


def upcycle(out: Path, options: dict) -> None:
    from lorytrain.training.config import make_config
    from lorytrain.training.distributed import full_optimizer_state, full_state_dict, shutdown_distributed
    from lorytrain.training.trainer import Trainer, lm_loss

    trainer = Trainer(make_config(None, options), log=lambda *a, **k: None)
    batches = trainer._batches()
    while trainer.step < trainer.plan.upcycle_step:
        trainer._optimizer_step(batches)
    ids = torch.randint(2, trainer.tokenizer["vocab_size"], (2, trainer.seq_len), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = lm_loss(trainer.model(ids), ids, None)
    dense = full_state_dict(trainer.model)
    dense_optimizer = full_optimizer_state(trainer.raw_model, trainer.optimizer)
    rng = torch.get_rng_state()
    with AllocatedBytes() as counter:
        trainer._upcycle()
    with torch.no_grad():
        after = lm_loss(trainer.model(ids), ids, None)
    moe = full_state_dict(trainer.model)
    moe_optimizer = full_optimizer_state(trainer.raw_model, trainer.optimizer)
    rank = trainer.env.rank
    (out / f"bytes-{rank}.json").write_text(json.dumps({"total": counter.total, "largest": counter.largest}))
    if trainer.env.is_main:
        torch.save({"ids": ids, "before": before.item(), "after": after.item(), "rng": rng, "dense": dense,
                    "dense_optimizer": dense_optimizer, "moe": moe, "moe_optimizer": moe_optimizer},
                   out / "upcycle.pt")
    shutdown_distributed()


def precision(out: Path, options: dict) -> None:
    from lorytrain.training.config import make_config
    from lorytrain.training.distributed import shutdown_distributed
    from lorytrain.training.trainer import Trainer

    trainer = Trainer(make_config(None, options), log=lambda *a, **k: None)
    projection = trainer.raw_model.layers[0].attn.wqkv
    seen = {}

    def note_dtype(module, args):
        seen.setdefault("compute", str(module.weight.dtype))

    projection.register_forward_pre_hook(note_dtype)
    record = trainer._optimizer_step(trainer._batches())
    sharded = trainer.raw_model.layers[0].attn.wqkv.weight
    moments = trainer.optimizer.state[sharded]
    seen.update(sharded=str(sharded.dtype), moments=str(moments["exp_avg"].dtype), loss=record["loss"],
                sharded_type=type(sharded).__name__)
    (out / f"precision-{trainer.env.rank}.json").write_text(json.dumps(seen))
    shutdown_distributed()


if __name__ == "__main__":
    {"upcycle": upcycle, "precision": precision}[sys.argv[1]](Path(sys.argv[2]), json.loads(sys.argv[3]))
