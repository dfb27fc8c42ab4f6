"""The training loop: shards in, checkpoints and metrics out.

One `Trainer` serves a single CPU process and every rank of a torchrun job. MoE runs start
as the parameter-matched dense model for `dense_warmup` of the steps, then `upcycle` copies
each dense FFN into every expert and training continues (Lory's recipe); the optimizer
state follows the parameters across the switch so the loss does not jump.
"""

from __future__ import annotations

import json
import math
import time
import weakref
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from lorydata.dataset import ShardDataset
from lorydata.errors import LoryError, MismatchError, ShardError
from lorydata.hashing import bytes_sha256
from lorydata.lock import FolderLock
from lorydata.manifest import Manifest
from lorytrain.agreement import from_main
from lorytrain.errors import LoryTrainError
from lorytrain.evaluation import evaluate, loss_pad_id
from lorytrain.training import model_setup
from lorytrain.training.checkpoint import (
    checkpoint_dirs,
    find_checkpoint_on_all_ranks,
    load_model_weights,
    load_optimizer_state,
    load_rng_state,
    read_state,
    save_checkpoint,
)
from lorytrain.training.config import TrainConfig
from lorytrain.training.diagnostics import moe_diagnostics, router_grad_norms
from lorytrain.training.distributed import (
    DistEnv,
    all_reduce_mean,
    full_state_dict,
    init_distributed,
    shard_model,
    shards_in_place,
    synchronize,
    to_device,
    wrap_model,
)
from lorytrain.training.metrics_log import MetricsLog
from lorytrain.training.preemption import Preempted, PreemptionGuard
from lorytrain.training.run_folder import keep_tokenizer
from lorytrain.training.schedule import lr_at, warmup_steps


class NonFiniteLossError(LoryTrainError):
    """The loss became NaN or infinite; the run stops before the optimizer step."""


@dataclass
class Plan:
    """Step arithmetic derived from the config, the shards and the world size."""

    seq_len: int
    accum: int
    steps: int
    warmup: int
    upcycle_step: int  # first MoE step; 0 = MoE from the start, steps = never


def make_plan(config: TrainConfig, seq_len: int, world_size: int) -> Plan:
    per_micro = config.batch_size * seq_len * world_size
    accum = 1
    if config.tokens_per_step:
        accum = max(1, round(config.tokens_per_step / per_micro))
    per_step = per_micro * accum
    steps = config.steps if config.steps is not None else max(1, math.ceil(config.tokens / per_step))
    upcycle = round(config.dense_warmup_fraction * steps) if config.is_moe else steps
    return Plan(seq_len, accum, steps, warmup_steps(config.warmup, steps), upcycle)


def lm_loss(logits: torch.Tensor, input_ids: torch.Tensor, pad_id: int | None) -> torch.Tensor:
    """Mean next-token cross entropy, padding excluded."""
    targets = input_ids[:, 1:]
    if pad_id is not None:
        targets = targets.masked_fill(targets == pad_id, -100)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=-100)


class Trainer:
    """Runs one training job as configured.

    Args:
        config: the validated training config.
        log: where human-readable progress lines go (rank 0 only).
    """

    def __init__(self, config: TrainConfig, log=print):
        self.config = config
        self.env: DistEnv = init_distributed(config.device)
        self.log = log if self.env.is_main else (lambda *a, **k: None)
        self.out = Path(config.out)
        self._load_data_manifest()
        self._lock = self._lock_out()
        # released when training ends, and when the trainer is dropped without training
        self._unlock = weakref.finalize(self, self._lock.release) if self._lock else None
        try:
            self._setup()
        except BaseException:
            self.close()
            raise

    def _setup(self) -> None:
        config = self.config
        self.plan = make_plan(config, self.seq_len, self.env.world_size)
        self.dtype = self._autocast_dtype()
        self.step, self.tokens, self._saved_step = 0, 0, None
        checkpoint = self._find_checkpoint()
        self._on_main_for_all(self._keep_tokenizer)
        self.log(f"model: {model_setup.check_size(model_setup.model_config(config, self.tokenizer['vocab_size']))}")
        torch.manual_seed(config.seed)
        self.dataset = ShardDataset(
            config.data, seed=config.seed, rank=self.env.rank, world_size=self.env.world_size,
            batch_size=config.batch_size, expected_seq_len=self.seq_len, cache_dir=config.cache_dir,
            cache_limit=config.cache_limit,
        )
        phase = "moe" if self.plan.upcycle_step == 0 else "dense"
        if checkpoint is not None:
            phase = checkpoint["state"]["phase"]
        self._build(phase, checkpoint)
        if checkpoint is not None:
            self._restore(checkpoint)

    def close(self) -> None:
        """Give the run folder's lock back (idempotent; `train` does it when it ends)."""
        if self._unlock is not None:
            self._unlock()

    # ---- setup ------------------------------------------------------------------------
    def _lock_out(self) -> FolderLock | None:
        """One writer per run folder: rank 0 takes the lock on --out and every rank learns
        whether it did, so under torchrun all ranks stop together with the same message."""
        return self._on_main_for_all(lambda: FolderLock(self.out, command="lory train").acquire(log=self.log))

    def _on_main_for_all(self, work):
        """`work()` on rank 0 only; its failure is raised on every rank (one line), so that no
        rank trains on, or waits for a collective, alone."""
        result, error = None, None
        if self.env.is_main:
            try:
                result = work()
            except LoryError as exc:
                error = str(exc)
            except OSError as exc:
                error = f"{exc.strerror or exc}" + (f" ({exc.filename})" if exc.filename else "")
        error = from_main(error)
        if error:
            raise LoryTrainError(error)
        return result

    def _keep_tokenizer(self) -> None:
        if keep_tokenizer(self.out, self.config.data, self.manifest) is None:
            self.log(f"note: {self.config.data} carries no tokenizer.json (built by an older lory) and was not made "
                     "with the bundled tokenizer; `lory generate` will need --tokenizer")

    def _load_data_manifest(self) -> None:
        try:
            manifest = Manifest.read(self.config.data)
        except ShardError as exc:
            raise LoryTrainError(f"--data: {exc}") from None
        if self.config.seq_len is not None and self.config.seq_len != manifest.seq_len:
            raise LoryTrainError(
                f"--seq-len {self.config.seq_len} does not match the shards in {self.config.data} "
                f"(seq_len {manifest.seq_len}); rebuild the corpus or change --seq-len"
            )
        self.seq_len = manifest.seq_len
        self.manifest = manifest
        self.data_sha256 = data_digest(manifest)
        self.tokenizer = manifest.tokenizer
        self.pad_id = loss_pad_id(manifest.tokenizer)
        if self.config.eval_data:
            try:
                evaluation = Manifest.read(self.config.eval_data)
            except ShardError as exc:
                raise LoryTrainError(f"--eval-data: {exc}") from None
            if evaluation.tokenizer.get("sha256") != manifest.tokenizer.get("sha256"):
                raise LoryTrainError(f"--eval-data {self.config.eval_data} was made with another tokenizer than --data")

    def _autocast_dtype(self) -> torch.dtype | None:
        precision = self.config.precision
        if precision == "auto":
            precision = "bf16" if self.env.device.type == "cuda" else "fp32"
        return torch.bfloat16 if precision == "bf16" else None

    def _find_checkpoint(self) -> dict | None:
        """{"path", "state"} of the newest valid checkpoint to resume (verified by rank 0,
        damaged newer ones reported and set aside), or None to start fresh."""
        if not self.config.resume:
            if checkpoint_dirs(self.out):
                raise LoryTrainError(f"{self.out} already holds a run; pass --resume to continue it or choose "
                                     "another --out")
            return None
        found = find_checkpoint_on_all_ranks(self.out, self.log, self.env.rank)
        if found is None:
            self.log(f"no checkpoint in {self.out}: starting from scratch")
            return None
        state = read_state(found)
        model_setup.check_compatible(state, self.config, self.tokenizer, self.seq_len)
        self._check_same_data(state, found)
        self.log(f"resuming from {found}")
        return {"path": found, "state": state}

    def _check_same_data(self, state: dict, found: Path) -> None:
        """Resume on the run's own corpus only, unless told otherwise (checkpoints written
        before the corpus was recorded are not checked)."""
        saved = state.get("data_sha256")
        if saved is None or saved == self.data_sha256:
            return
        if not self.config.allow_data_change:
            raise LoryTrainError(f"cannot resume: --data {self.config.data} is not the corpus this run trained on "
                                 f"(its shards differ from those recorded in {found / 'state.json'}); pass "
                                 "--allow-data-change to continue on it")
        self.log(f"note: --data {self.config.data} is not the corpus this run trained on; continuing on it "
                 "(--allow-data-change)")

    def _build(self, phase: str, checkpoint: dict | None) -> None:
        self.phase = phase
        model = model_setup.build(self.config, phase, self.tokenizer["vocab_size"], self.seq_len)
        self._install(model)
        if checkpoint is not None:  # after wrapping: under FSDP each rank reads only its shards
            load_model_weights(self.model, checkpoint["path"])

    def _install(self, model: torch.nn.Module) -> None:
        model.to(self.env.device)
        self.raw_model = model
        wrapped = wrap_model(model, self.env, self.config.parallel, param_dtype=self.dtype)
        self.model = torch.compile(wrapped) if self.config.compile else wrapped
        self.optimizer = model_setup.make_optimizer(model, self.config)

    def _restore(self, checkpoint: dict) -> None:
        state = checkpoint["state"]
        load_optimizer_state(self.raw_model, self.optimizer, checkpoint["path"])
        try:
            self.dataset.load_state_dict(state["data"])
        except MismatchError:
            if state.get("data_sha256") in (None, self.data_sha256) or not self.config.allow_data_change:
                raise
            self.log(f"the data position of the old corpus does not apply to {self.config.data}: reading it from "
                     "its start")
        except (KeyError, TypeError, ValueError) as exc:
            raise LoryTrainError(f"cannot resume: the data position in {checkpoint['path'] / 'state.json'} is not "
                                 f"one lory wrote ({type(exc).__name__}: {exc})") from None
        load_rng_state(checkpoint["path"], self.env.rank, self.env.device)
        self.step, self.tokens = state["step"], state["tokens"]
        self._saved_step = self.step  # the checkpoint resumed from is this step's

    # ---- the loop ---------------------------------------------------------------------
    def _batches(self):
        # A private generator: DataLoader draws a base seed per iterator, which must not
        # shift the global RNG (router initialisation at upcycling) on resume.
        loader = DataLoader(self.dataset, batch_size=self.config.batch_size, num_workers=self.config.num_workers,
                            collate_fn=ShardDataset.collate, generator=torch.Generator().manual_seed(self.config.seed),
                            pin_memory=self.env.device.type == "cuda")
        yield from loader

    def _micro_step(self, ids: torch.Tensor, last: bool) -> tuple[torch.Tensor, dict]:
        sync = nullcontext() if last or not hasattr(self.model, "no_sync") else self.model.no_sync()
        with sync:
            with torch.autocast(self.env.device.type, dtype=self.dtype, enabled=self.dtype is not None):
                logits = self.model(ids)
                loss = lm_loss(logits, ids, self.pad_id)
                aux = model_setup.aux_losses(self.raw_model)
                total = loss + sum(aux.values(), torch.zeros((), device=loss.device))
            (total / self.plan.accum).backward()
        return loss.detach(), {k: v.detach() for k, v in aux.items()}

    def _upcycle(self) -> None:
        self.log(f"step {self.step}: upcycling the dense model to {self.config.ffn} × {self.config.experts} experts")
        # Under FSDP the MoE model is sharded before it takes memory and each rank fills only
        # its shards of the experts and of their Adam moments (collective: all ranks do it).
        dense, dense_optimizer = self.raw_model, self.optimizer
        shard = None
        if shards_in_place(self.env, self.config.parallel):
            shard = partial(shard_model, param_dtype=self.dtype)
        moe = model_setup.upcycle_model(dense, self.config, shard)
        self.phase = "moe"
        self._install(moe)
        model_setup.carry_optimizer_state(dense, dense_optimizer, self.raw_model, self.optimizer)

    def train(self) -> dict:
        """Run to the configured number of steps.

        Returns:
            The last step's record (step, loss, lr, tokens, ...), with the final evaluation
            under "eval" when there is eval data.
        """
        metrics = MetricsLog(self.out, resume_step=self.step if self.config.resume else None) if self.env.is_main else None
        if self.config.record_samples:
            self._truncate_samples()
        batches = self._batches()
        last_record: dict = {}
        progress = _progress(self.plan.steps, self.step, self.env.is_main)
        preemption = PreemptionGuard().install()
        try:
            while self.step < self.plan.steps:
                if self.phase == "dense" and self.step >= self.plan.upcycle_step:
                    self._upcycle()
                record = self._optimizer_step(batches)
                if self.env.is_main and self._logs(self.step):
                    metrics.log(record)
                last_record = dict(record)
                if preemption.requested():  # every rank stops after this same step
                    self.save()
                    raise Preempted(preemption.signal_name, self.step)
                if self.config.eval_data and self.config.eval_every and self.step % self.config.eval_every == 0:
                    last_record["eval"] = self._evaluate(metrics)["eval"]
                if self.config.save_every and self.step % self.config.save_every == 0:
                    self.save()
                progress.update(record)
            if self.config.eval_data and not (self.config.eval_every and self.step % self.config.eval_every == 0):
                last_record["eval"] = self._evaluate(metrics)["eval"]
            if self.config.save_final and self._saved_step != self.step:  # not twice when save_every hit it
                self.save()
        finally:
            preemption.uninstall()
            progress.close()
            if metrics is not None:
                metrics.close()
            self.close()
        return last_record

    def _optimizer_step(self, batches) -> dict:
        started = time.perf_counter()
        lr = lr_at(self.step, self.config.lr, self.plan.steps, self.plan.warmup, self.config.min_lr_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        losses, aux_sums, position, seq_ids = [], {}, None, []
        for micro in range(self.plan.accum):
            batch = next(batches)
            position = ShardDataset.next_position(batch)
            seq_ids.extend(batch["seq_id"].tolist())
            loss, aux = self._micro_step(to_device(batch["input_ids"], self.env.device), micro == self.plan.accum - 1)
            losses.append(loss)
            for key, value in aux.items():
                aux_sums[key] = aux_sums.get(key, 0.0) + value / self.plan.accum
        loss = all_reduce_mean(torch.stack(losses).mean())
        if not torch.isfinite(loss):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLossError(
                f"non-finite loss ({loss.item()}) at step {self.step + 1}; stopped before the optimizer step. "
                f"The last good checkpoint in {self.out / 'checkpoints'} is intact; resume with a lower --lr"
            )
        logged = self.phase == "moe" and self._logs(self.step + 1)
        router_grad = router_grad_norms(self.raw_model) if logged else None  # before clipping and zero_grad
        grad_norm = torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), self.config.grad_clip or float("inf"))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.dataset.position = position
        self.step += 1
        if self.config.record_samples:
            self._record_samples(seq_ids)
        step_tokens = self.config.batch_size * self.seq_len * self.plan.accum * self.env.world_size
        self.tokens += step_tokens
        synchronize(self.env.device)  # on CUDA the optimizer step is only queued: time it too
        seconds = time.perf_counter() - started
        record = {
            "step": self.step,
            "loss": loss.item(),
            "lr": lr,
            "tokens": self.tokens,
            "tokens_per_s": step_tokens / max(seconds, 1e-9),
            "grad_norm": float(grad_norm),
            "phase": self.phase,
        }
        if aux_sums:
            record["aux"] = {k: float(all_reduce_mean(v)) for k, v in aux_sums.items()}
        usage = model_setup.expert_use(self.raw_model)
        if usage is not None:
            record["expert_use"] = usage
        if logged:  # collective under FSDP: every rank computes it, rank 0 logs it
            record["diagnostics"] = moe_diagnostics(self.raw_model, router_grad)
        if self.env.device.type == "cuda":
            utilisation = model_setup.mfu(self.raw_model, record["tokens_per_s"] / self.env.world_size, self.env.device,
                                          self.seq_len)
            if utilisation is not None:
                record["mfu"] = utilisation
        return record

    def _logs(self, step: int) -> bool:
        """Whether the record of `step` goes to metrics.jsonl."""
        return step % self.config.log_every == 0 or step == self.plan.steps

    def _truncate_samples(self) -> None:
        """Drop sample records after the resumed step, so the file reads as one run."""
        path = self.out / "samples" / f"rank-{self.env.rank}.jsonl"
        if path.exists():
            kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= self.step]
            path.write_text("".join(line + "\n" for line in kept))

    def _record_samples(self, seq_ids: list[int]) -> None:
        folder = self.out / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / f"rank-{self.env.rank}.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": self.step, "seq_ids": seq_ids}) + "\n")

    def _evaluate(self, metrics: MetricsLog | None) -> dict:
        result = evaluate(self.model, self.config.eval_data, batch_size=self.config.batch_size, device=self.env.device,
                          max_batches=self.config.eval_batches, expected_seq_len=self.seq_len,
                          expected_tokenizer=self.tokenizer["sha256"], autocast_dtype=self.dtype,
                          cache_dir=self.config.cache_dir, cache_limit=self.config.cache_limit)
        record = {"step": self.step, "tokens": self.tokens, "eval": result}
        if metrics is not None:
            metrics.log(record)
        overall = result["overall"]
        self.log(f"step {self.step}: eval loss {overall['loss']:.4f}, ppl {overall['ppl']:.2f}")
        return record

    # ---- checkpoints ------------------------------------------------------------------
    def save(self) -> Path | None:
        """Checkpoint the current step (collective: rank 0 writes the weights, every rank its
        optimizer shards and RNG state)."""
        weights = full_state_dict(self.model)
        state = {
            "step": self.step,
            "tokens": self.tokens,
            "phase": self.phase,
            "data": self.dataset.state_dict(),
            "config": self.config.to_dict(),
            "model_config": model_setup.model_config_dict(self.raw_model),
            "tokenizer": self.tokenizer,
            "seq_len": self.seq_len,
            "data_sha256": self.data_sha256,
        }
        saved = save_checkpoint(self.out, self.step, weights if self.env.is_main else None, state,
                                self.config.keep_last, model=self.raw_model, optimizer=self.optimizer,
                                device=self.env.device, rank=self.env.rank)
        self._saved_step = self.step
        return saved


def data_digest(manifest: Manifest) -> str:
    """The identity of a corpus: sha256 over its sequence length, tokenizer and every shard's
    name, rows, size and sha256 (what resuming compares; the manifest's other fields, such as
    where it was built, may differ between copies of one corpus)."""
    shards = [[s.file, s.rows, s.bytes, s.sha256] for s in manifest.shards]
    identity = {"seq_len": manifest.seq_len, "tokenizer": manifest.tokenizer.get("sha256"), "shards": shards}
    return bytes_sha256(json.dumps(identity, sort_keys=True).encode())


class _Progress:
    def __init__(self, total: int, done: int):
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        self._bar = Progress(TextColumn("train"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                             TextColumn("{task.fields[info]}"), TimeRemainingColumn(), transient=False)
        self._task = self._bar.add_task("train", total=total, completed=done, info="")
        self._bar.start()

    def update(self, record: dict) -> None:
        info = f"loss {record['loss']:.3f} lr {record['lr']:.2e} {record['tokens_per_s']:,.0f} tok/s"
        self._bar.update(self._task, completed=record["step"], info=info)

    def close(self) -> None:
        self._bar.stop()


class _NoProgress:
    def update(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, done: int, main: bool):
    from lorydata.progress import progress_enabled

    return _Progress(total, done) if main and progress_enabled() else _NoProgress()
