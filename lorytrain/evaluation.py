"""Held-out loss and perplexity, overall and per domain.

The model runs exactly as in training (causal segment routing over the whole sequence);
each predicted token is attributed to the domain of the document it belongs to, from the
shard's `doc_starts`/`domains`. Padding is excluded.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from lorydata.dataset import ShardDataset
from lorytrain.agreement import max_over_ranks

UNKNOWN_DOMAIN = "(unknown)"


def token_domains(doc_starts: list[int], domains: list[str], seq_len: int) -> np.ndarray:
    """The domain of every position of a sequence (object array), from its document starts."""
    lengths = np.diff(np.array([*doc_starts, seq_len]))
    names = np.array([d or UNKNOWN_DOMAIN for d in domains], dtype=object)
    return np.repeat(names, lengths)


def loss_pad_id(tokenizer: dict) -> int | None:
    """The token id whose targets the loss skips: the pad id of a manifest's tokenizer
    identity, unless it is also the EOS id (EOS targets are real predictions)."""
    pad = tokenizer.get("pad_id")
    return pad if pad != tokenizer.get("eos_id") else None


def sequence_losses(logits: torch.Tensor, input_ids: torch.Tensor, pad_id: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position next-token losses (B, L-1) and a mask of positions that count."""
    targets = input_ids[:, 1:]
    losses = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets, reduction="none")
    mask = torch.ones_like(targets, dtype=torch.bool) if pad_id is None else targets != pad_id
    return losses, mask


class DomainLossTotals:
    """Sums of loss and token counts per domain, mergeable across ranks."""

    def __init__(self):
        self.loss: dict[str, float] = defaultdict(float)
        self.tokens: dict[str, int] = defaultdict(int)

    def add(self, losses: torch.Tensor, mask: torch.Tensor, doc_starts: list, domains: list, seq_len: int) -> None:
        losses, mask = losses.double().cpu(), mask.cpu()
        for row in range(losses.shape[0]):
            # the target at position t+1 belongs to the document of position t+1
            names = token_domains(doc_starts[row], domains[row], seq_len)[1:]
            for name in set(names):
                select = torch.from_numpy(names == name) & mask[row]
                self.loss[name] += float(losses[row][select].sum())
                self.tokens[name] += int(select.sum())

    def all_reduce(self) -> None:
        """Sum totals over all ranks (every rank must call this)."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        gathered: list = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, (dict(self.loss), dict(self.tokens)))
        self.loss, self.tokens = defaultdict(float), defaultdict(int)
        for loss, tokens in gathered:
            for name in loss:
                self.loss[name] += loss[name]
                self.tokens[name] += tokens[name]

    def summary(self) -> dict:
        def entry(loss: float, tokens: int) -> dict:
            mean = loss / max(tokens, 1)
            return {"loss": mean, "ppl": math.exp(min(mean, 50.0)), "tokens": tokens}

        total_tokens = sum(self.tokens.values())
        return {
            "overall": entry(sum(self.loss.values()), total_tokens),
            "domains": {name: entry(self.loss[name], self.tokens[name]) for name in sorted(self.tokens)},
        }


@torch.no_grad()
def evaluate(model: torch.nn.Module, folder: str | Path, batch_size: int = 8, device: str | torch.device = "cpu",
             max_batches: int = 0, expected_seq_len: int | None = None, expected_tokenizer=None,
             autocast_dtype: torch.dtype | None = None, cache_dir: str | Path | None = None,
             cache_limit: int | str | None = None) -> dict:
    """Loss and perplexity of `model` on a shard folder, overall and per domain.

    Args:
        model: maps input_ids (B, L) to logits (B, L, V).
        folder: held-out shard folder, or its URL (`s3://bucket/prefix/heldout`).
        batch_size: sequences per forward pass.
        device: where to run.
        max_batches: stop after this many batches (0: the whole folder).
        expected_seq_len: refuse shards of another length.
        expected_tokenizer: refuse shards of another tokenizer (sha256 or object with one).
        autocast_dtype: run under autocast with this dtype (e.g. bfloat16 on GPU).
        cache_dir, cache_limit: for a URL, the local shard cache (`lorydata.dataset.ShardDataset`).

    Returns:
        {"overall": {"loss", "ppl", "tokens"}, "domains": {name: {...}}}.
    """
    dataset = ShardDataset(folder, shuffle=False, epochs=1, even=False, with_metadata=True, batch_size=batch_size,
                           expected_seq_len=expected_seq_len, expected_tokenizer=expected_tokenizer,
                           cache_dir=cache_dir, cache_limit=cache_limit)
    pad_id = loss_pad_id(dataset.manifest.tokenizer)
    # own generator: evaluating must not move the global RNG that training depends on
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=ShardDataset.collate, generator=torch.Generator())
    was_training = model.training
    model.eval()
    totals = DomainLossTotals()
    device = torch.device(device)
    # Every rank runs the same number of forward passes: under FSDP each one is a round of
    # all-gathers, and a rank with one batch more than the others would wait for them forever.
    local_batches = math.ceil(dataset.total_samples / batch_size)
    passes = max_over_ranks(min(local_batches, max_batches) if max_batches else local_batches)
    batches = iter(loader)
    for _ in range(passes):
        batch = next(batches, None)
        if batch is None:  # this rank has run out of rows: a pass whose loss is not counted
            ids = torch.zeros(1, dataset.seq_len, dtype=torch.long, device=device)
        else:
            ids = batch["input_ids"].to(device)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = model(ids)
        if batch is not None:
            losses, mask = sequence_losses(logits, ids, pad_id)
            totals.add(losses, mask, batch["doc_starts"], batch["domains"], dataset.seq_len)
    totals.all_reduce()
    model.train(was_training)
    return totals.summary()
