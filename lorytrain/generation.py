"""Text generation with a `LoryLM`: KV-cached, batched, seeded sampling.

Routing (the paper's inference rules, plus a strictly causal one): "prompt" (the paper's
default) routes every MoE layer once on the mean FFN input of the prompt and keeps that merged
FFN for the whole generation; "segment" re-routes every `segment_len` tokens from the previous
segment, as in training; "causal" does the same but routes the first segment token by token on
its running mean (see `lorytrain.model.routing`), the rule lm-eval scoring and `export-hf`
folders use by default. Token-level layers (top-k, token-level expert choice) route per token
in every mode.

Prompts of different lengths are decoded together: one prefill call over the right-padded
prompts with their lengths, then one call per step that appends one token to every sequence
at its own position. Each step's logits equal those of a full forward pass over the final
sequence with the same routing (`full_forward_logits`), which the tests check.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from lorytrain.errors import LoryTrainError
from lorytrain.model.cache import ROUTING_MODES

# Longest sequence (prompt + new tokens) `generate` accepts unless told otherwise: the paper's
# training length. RoPE has no hard limit, but the KV cache is allocated up front
# (B × max_len × layers × 2d values), so an unbounded request must not allocate silently.
DEFAULT_MAX_LEN = 4096


@dataclass
class SamplingConfig:
    """How to pick each new token.

    Args:
        max_new_tokens: tokens to generate per prompt at most (≥ 1).
        temperature: divides the logits; 0 means greedy (argmax, no randomness).
        top_k: keep only the k most likely tokens (0: off).
        top_p: keep the smallest set of most likely tokens whose probability reaches top_p
            (nucleus sampling; 1.0: off).
        seed: seed of the sampling generator, so that a run can be repeated exactly.
    """

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def validate(self) -> SamplingConfig:
        """Raise `LoryTrainError` naming every bad value; returns self."""
        problems = []
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            problems.append(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not self.temperature >= 0:  # also catches NaN
            problems.append(f"temperature must be >= 0 (0: greedy), got {self.temperature!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            problems.append(f"top_k must be an integer >= 0 (0: off), got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1] (1: off), got {self.top_p!r}")
        if problems:
            raise LoryTrainError("; ".join(problems))
        return self


@dataclass
class Generation:
    """What `generate_with_logits` returns.

    Args:
        tokens: the new tokens of every prompt (the EOS that stopped a sequence included).
        logits: per prompt, float32 logits (n_new, vocab) on the CPU of the distribution each
            new token was drawn from, before temperature and filtering.
    """

    tokens: list[list[int]]
    logits: list[torch.Tensor] = field(default_factory=list)


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set the logits of tokens outside the top-k and outside the nucleus to -inf.

    Args:
        logits: (B, V) float logits (already divided by the temperature).
        top_k: keep the k largest logits per row (0: off); ties with the k-th are kept.
        top_p: keep the minimal set of most likely tokens whose total probability is ≥ top_p
            (1.0: off). The most likely token is always kept.

    Returns:
        A filtered copy of `logits`.
    """
    logits = logits.clone()
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits[logits < kth] = float("-inf")
    if top_p < 1.0:
        ordered, index = logits.sort(dim=-1, descending=True)
        probs = ordered.softmax(-1)
        # a token is dropped when the tokens ranked above it already hold top_p: that leaves
        # exactly the smallest prefix reaching top_p, and never drops the first token
        before = probs.cumsum(-1) - probs
        drop = before >= top_p
        drop[:, 0] = False
        logits.scatter_(-1, index, ordered.masked_fill(drop, float("-inf")))
    return logits


def sample_next(logits: torch.Tensor, config: SamplingConfig, generator: torch.Generator | None) -> torch.Tensor:
    """Next token ids (B,) from the logits (B, V) under `config`."""
    logits = logits.float()
    if config.temperature == 0:
        return logits.argmax(-1)
    filtered = filter_logits(logits / config.temperature, config.top_k, config.top_p)
    return torch.multinomial(filtered.softmax(-1), 1, generator=generator).squeeze(1)


def _check_prompts(prompts: Sequence[Sequence[int]], vocab_size: int) -> list[list[int]]:
    """Plain lists of token ids, or `LoryTrainError` naming the first bad prompt."""
    if hasattr(prompts, "tolist"):  # a (B, L) tensor or array
        prompts = prompts.tolist()
    if isinstance(prompts, str | bytes) or not isinstance(prompts, Sequence) or len(prompts) == 0:
        raise LoryTrainError("give at least one prompt (a list of token-id lists)")
    checked = []
    for index, prompt in enumerate(prompts):
        ids = prompt.tolist() if hasattr(prompt, "tolist") else prompt  # tensors and numpy arrays
        if isinstance(ids, str | bytes) or not isinstance(ids, Sequence) or not all(
                isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in ids):
            raise LoryTrainError(f"prompt {index} must be a list of integer token ids (encode text first)")
        if not ids:
            raise LoryTrainError(f"prompt {index} is empty: a prompt needs at least one token")
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise LoryTrainError(f"prompt {index} holds token id {bad[0]} outside the vocabulary 0..{vocab_size - 1}")
        checked.append([int(t) for t in ids])
    return checked


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def generate_with_logits(model, prompts: Sequence[Sequence[int]], config: SamplingConfig | None = None,
                         routing: str = "prompt", eos_id: int | None = None,
                         max_len: int | None = None) -> Generation:
    """Generate continuations of a batch of prompts, keeping the logits of every step.

    Keeping logits costs new tokens × vocab floats per prompt; use `generate` when only the
    tokens matter.

    Args:
        model: a `LoryLM` (any FFN); it runs in eval mode and is put back as it was.
        prompts: token ids of each prompt (lengths may differ; none may be empty).
        config: sampling settings (default `SamplingConfig()`).
        routing: "prompt" (route once on the prompt), "segment" (re-route every segment) or
            "causal" (as "segment", the first segment token by token).
        eos_id: a sequence stops after emitting this token (None: always max_new_tokens).
        max_len: longest prompt + max_new_tokens allowed (default `DEFAULT_MAX_LEN`); the
            KV cache holds the longest prompt + max_new_tokens positions.

    Returns:
        `Generation` with the new tokens and their logits per prompt.

    Raises:
        LoryTrainError: empty or out-of-vocabulary prompts, bad settings, or a request longer
            than max_len.
    """
    return _decode(model, prompts, config, routing, eos_id, max_len, keep_logits=True)


def generate(model, prompts: Sequence[Sequence[int]], config: SamplingConfig | None = None, routing: str = "prompt",
             eos_id: int | None = None, max_len: int | None = None) -> list[list[int]]:
    """The new tokens of every prompt (arguments as for `generate_with_logits`).

    A sequence that emits `eos_id` stops there; its output ends with that EOS.
    """
    return _decode(model, prompts, config, routing, eos_id, max_len, keep_logits=False).tokens


@torch.no_grad()
def _decode(model, prompts, config, routing, eos_id, max_len, keep_logits: bool) -> Generation:
    config = (config or SamplingConfig()).validate()
    vocab = model.config.vocab_size
    prompts = _check_prompts(prompts, vocab)
    if routing not in ROUTING_MODES:
        raise LoryTrainError(f"routing must be one of {', '.join(ROUTING_MODES)}, got {routing!r}")
    if eos_id is not None and not 0 <= eos_id < vocab:
        raise LoryTrainError(f"eos_id {eos_id} is outside the vocabulary 0..{vocab - 1}")
    limit = max_len or DEFAULT_MAX_LEN
    longest, steps = max(len(p) for p in prompts), config.max_new_tokens
    if longest + steps > limit:
        raise LoryTrainError(f"the longest prompt ({longest} tokens) plus max_new_tokens ({steps}) "
                             f"exceeds the {limit} positions generation allows; shorten them or raise max_len")

    device = _model_device(model)
    batch = len(prompts)
    lens = torch.tensor([len(p) for p in prompts], device=device)
    padded = torch.zeros(batch, longest, dtype=torch.long, device=device)
    for row, prompt in enumerate(prompts):
        padded[row, : len(prompt)] = torch.tensor(prompt, device=device)
    generator = torch.Generator(device=device).manual_seed(config.seed)
    chosen_steps, logit_steps = [], []
    was_training = model.training
    model.eval()
    try:
        cache = model.new_cache(batch, longest + steps, routing)
        logits = model(padded, cache=cache, prompt_lens=lens)[torch.arange(batch, device=device), lens - 1]
        done = torch.zeros(batch, dtype=torch.bool, device=device)
        for step in range(steps):
            chosen = sample_next(logits, config, generator)
            chosen_steps.append(chosen)
            if keep_logits:
                logit_steps.append(logits.float().cpu())
            if eos_id is not None:
                done |= chosen == eos_id
                if bool(done.all()):
                    break
            if step < steps - 1:
                # finished sequences keep being fed (their outputs are cut below): the cache
                # advances every sequence together, and any valid token id will do
                logits = model(chosen.unsqueeze(1), cache=cache)[:, 0]
    finally:
        model.train(was_training)
    table = torch.stack(chosen_steps, dim=1).cpu()  # (B, steps taken)
    tokens = []
    for row in table.tolist():
        tokens.append(row[: row.index(eos_id) + 1] if eos_id in row else row)
    logits_per_row = []
    if keep_logits:
        stacked = torch.stack(logit_steps, dim=1)  # (B, steps taken, V)
        logits_per_row = [stacked[row, : len(ids)] for row, ids in enumerate(tokens)]
    return Generation(tokens, logits_per_row)


def generate_text(model, tokenizer, texts: Sequence[str], config: SamplingConfig | None = None,
                  routing: str = "prompt", max_len: int | None = None) -> list[str]:
    """Continue each text; returns the generated text only (without the prompt or the final EOS).

    An empty text starts a new document: its prompt is the EOS token, which is what precedes
    every document in the packed training sequences.

    Args:
        model: a `LoryLM` whose vocabulary matches the tokenizer.
        tokenizer: a `lorydata.tokenizer.Tokenizer` (encode, decode, eos_id).
        texts: the prompts.
        config: sampling settings.
        routing: "prompt", "segment" or "causal".
        max_len: see `generate_with_logits`.
    """
    if isinstance(texts, str):
        texts = [texts]
    prompts = [tokenizer.encode(text) if text else [tokenizer.eos_id] for text in texts]
    outputs = generate(model, prompts, config, routing, tokenizer.eos_id, max_len)
    return [tokenizer.decode(ids[:-1] if ids and ids[-1] == tokenizer.eos_id else ids) for ids in outputs]


@torch.no_grad()
def full_forward_logits(model, sequences: Sequence[Sequence[int]], prompt_lens: Sequence[int],
                        routing: str = "prompt") -> list[torch.Tensor]:
    """Logits of one uncached forward pass over every full sequence (prompt + generated).

    With the same routing and prompt lengths, these are the logits cached decoding produced:
    position `prompt_lens[b] - 1 + i` of sequence b predicted its i-th new token.

    Args:
        model: a `LoryLM`.
        sequences: prompt + generated tokens of each sequence.
        prompt_lens: the prompt length of each sequence (bounds what routing may look at).
        routing: "prompt", "segment" or "causal".

    Returns:
        Per sequence, float32 logits (len, vocab) on the CPU.
    """
    sequences = _check_prompts(sequences, model.config.vocab_size)
    device = _model_device(model)
    longest = max(len(s) for s in sequences)
    # right padding is harmless: attention is causal, and routing reads only the prompt
    # (prompt routing, segment 0) or earlier segments
    ids = torch.zeros(len(sequences), longest, dtype=torch.long, device=device)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq, device=device)
    was_training = model.training
    model.eval()
    try:
        logits = model(ids, routing=routing, prompt_lens=torch.tensor(list(prompt_lens), device=device))
    finally:
        model.train(was_training)
    return [logits[row, : len(seq)].float().cpu() for row, seq in enumerate(sequences)]
