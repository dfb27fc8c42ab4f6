"""Attention inputs for packed sequences: each document attends only to itself.

A lory sequence packs several documents (`doc_starts`, from `ShardDataset(with_metadata=True)`
and `ShardDataset.collate`). Trained as one causal stream, a document attends to the
documents before it in the sequence. These helpers turn `doc_starts` into what attention
implementations take so that every document is computed as if it were alone:

- `position_ids`: 0, 1, 2, ... restarting at every document start;
- `block_causal_mask`: the dense (batch, 1, T, T) block-diagonal causal mask for eager or
  SDPA attention (additive float, or boolean with True = may attend);
- `varlen_metadata`: `cu_seqlens` / `max_seqlen` of the batch flattened to one row, for varlen
  flash attention (`flash_attn_varlen_func`, `torch.nn.attention.varlen.varlen_attn`, or a
  Hugging Face model with `attn_implementation="flash_attention_2"`);
- `hf_attention_kwargs`: the keyword arguments of a Hugging Face causal LM's forward;
- `packed_labels`: labels that do not ask a document's last token (EOS) to predict the next
  document's first token.

Torch only: no model code is imported here.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

import torch

from lorydata.errors import LoryDataError

DocStarts = Sequence[Sequence[int]] | torch.Tensor


def _start_flags(doc_starts: DocStarts, seq_len: int) -> torch.Tensor:
    """(batch, seq_len) bool, True where a document (or a continued piece of one) starts."""
    if isinstance(doc_starts, torch.Tensor):
        doc_starts = doc_starts.tolist()
    if seq_len < 1:
        raise LoryDataError(f"seq_len must be positive, got {seq_len}")
    if len(doc_starts) == 0:
        raise LoryDataError("doc_starts is empty: pass one list of document starts per sequence")
    flags = torch.zeros(len(doc_starts), seq_len, dtype=torch.bool)
    for row, starts in enumerate(doc_starts):
        starts = [int(s) for s in starts]
        if not starts or starts[0] != 0:
            raise LoryDataError(f"doc_starts of sequence {row} must begin with 0, got {starts[:4]}")
        if any(b <= a for a, b in pairwise(starts)) or starts[-1] >= seq_len:
            raise LoryDataError(f"doc_starts of sequence {row} must increase and stay below {seq_len}: {starts}")
        flags[row, starts] = True
    return flags


def document_ids(doc_starts: DocStarts, seq_len: int) -> torch.Tensor:
    """(batch, seq_len) int64: the index of the document each token belongs to, per sequence.

    Args:
        doc_starts: per sequence, the offsets where documents start (beginning with 0).
        seq_len: tokens per sequence.
    """
    return _start_flags(doc_starts, seq_len).long().cumsum(dim=1) - 1


def position_ids(doc_starts: DocStarts, seq_len: int) -> torch.Tensor:
    """(batch, seq_len) int64 positions that restart at 0 at every document start.

    Args:
        doc_starts: per sequence, the offsets where documents start (beginning with 0).
        seq_len: tokens per sequence.
    """
    flags = _start_flags(doc_starts, seq_len)
    index = torch.arange(seq_len).expand_as(flags)
    start_of_own_doc = torch.where(flags, index, torch.zeros_like(index)).cummax(dim=1).values
    return index - start_of_own_doc


def block_causal_mask(doc_starts: DocStarts, seq_len: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(batch, 1, seq_len, seq_len) mask letting token i attend to token j iff j <= i in its document.

    Args:
        doc_starts: per sequence, the offsets where documents start (beginning with 0).
        seq_len: tokens per sequence.
        dtype: `torch.bool` for a boolean mask (True = may attend; SDPA, flex), or a float
            dtype for an additive mask (0 where allowed, the dtype's minimum elsewhere), which
            eager attention adds to the scores; use the model's dtype.
    """
    docs = document_ids(doc_starts, seq_len)
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool).tril()
    allowed = (docs[:, :, None] == docs[:, None, :]) & causal
    allowed = allowed[:, None]
    if dtype == torch.bool:
        return allowed
    if not dtype.is_floating_point:
        raise LoryDataError(f"mask dtype must be torch.bool or a float dtype, got {dtype}")
    mask = torch.zeros(allowed.shape, dtype=dtype)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)


def varlen_metadata(doc_starts: DocStarts, seq_len: int) -> tuple[torch.Tensor, int]:
    """`cu_seqlens` (int32, documents + 1) and `max_seqlen` of the batch flattened row-major to
    batch * seq_len tokens, as varlen flash attention takes them.

    Args:
        doc_starts: per sequence, the offsets where documents start (beginning with 0).
        seq_len: tokens per sequence.
    """
    flags = _start_flags(doc_starts, seq_len).reshape(-1)
    starts = flags.nonzero().squeeze(1)
    cu_seqlens = torch.cat([starts, torch.tensor([flags.numel()])]).to(torch.int32)
    return cu_seqlens, int(cu_seqlens.diff().max())


def packed_labels(input_ids: torch.Tensor, doc_starts: DocStarts, ignore_index: int = -100) -> torch.Tensor:
    """Labels for a causal LM that shifts labels itself (Hugging Face): `input_ids` with the
    first token of every document but the sequence's first set to `ignore_index`, so no loss
    asks a document's EOS to predict the next, unrelated document.

    Args:
        input_ids: (batch, seq_len) token ids.
        doc_starts: per sequence, the offsets where documents start (beginning with 0).
        ignore_index: the label the loss skips.
    """
    flags = _start_flags(doc_starts, input_ids.shape[1])
    flags[:, 0] = False  # position 0 is never a target after the shift
    return input_ids.masked_fill(flags.to(input_ids.device), ignore_index)


def hf_attention_kwargs(doc_starts: DocStarts, seq_len: int, implementation: str = "sdpa",
                        dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> dict:
    """Keyword arguments that make a Hugging Face causal LM attend within documents.

    Args:
        doc_starts: per sequence, the offsets where documents start (beginning with 0).
        seq_len: tokens per sequence.
        implementation: the model's `attn_implementation`. "eager" and "sdpa" get the dense
            4D mask and `position_ids`; "flash_attention_2" / "flash_attention_3" get
            `position_ids` and the varlen metadata of the batch flattened to one row, so pass
            `input_ids.view(1, -1)` with them.
        dtype: the model's dtype (the additive mask is made in it).
        device: where the tensors go (the model's device).
    """
    positions = position_ids(doc_starts, seq_len).to(device)
    if implementation in ("eager", "sdpa"):
        return {"attention_mask": block_causal_mask(doc_starts, seq_len, dtype).to(device), "position_ids": positions}
    if implementation.startswith("flash_attention"):
        cu_seqlens, max_seqlen = varlen_metadata(doc_starts, seq_len)
        cu_seqlens = cu_seqlens.to(device)
        return {"position_ids": positions.reshape(1, -1), "cu_seq_lens_q": cu_seqlens, "cu_seq_lens_k": cu_seqlens,
                "max_length_q": max_seqlen, "max_length_k": max_seqlen}
    raise LoryDataError(f"unknown attention implementation {implementation!r}: eager, sdpa or flash_attention_2")
