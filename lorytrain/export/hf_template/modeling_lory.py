"""A Lory decoder for transformers (`AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)`).

Written by `lory export-hf`; self-contained (it imports nothing from lory). The parameter names
and layouts are those of lory's own checkpoints: every FFN is one tensor `w` (f, 3, d) with
gate, up and down rows per inner unit, a bank of E experts is (E, f, 3, d).

Routing (Zhong et al. 2024, "Lory"): each MoE layer of the lory family merges its experts in
parameter space, θ̄ = Σ_i e_i θ_i, with weights e = softmax(R(mean FFN input)). Segment k > 0 of
`segment_len` tokens is routed by segment k-1 (or, for `ffn="prefix"`, by segment 0). The
routing mode (`config.routing`, or the `routing=` keyword of `forward`) decides the rest:

- "causal" (default): segment 0's token t is routed by the running mean of tokens 0..t, so no
  token's logit depends on a later token. An uncached forward pass, a KV-cached `generate()`
  and `generate(use_cache=False)` all compute the same logits, and lm-eval's `--model hf`
  scores what lory's own harness scores.
- "segment" (the paper's training rule): segment 0 is routed by its own mean, which a token of
  segment 0 sees before its later tokens exist only in training; `generate()` bounds that mean
  to the prompt.
- "prompt" (the paper's generation rule): every MoE layer routes once on the mean of the
  prompt and keeps that merged FFN. `generate()` knows the prompt; an uncached forward pass
  without `prompt_length` takes its whole input as the prompt.

Padding (an `attention_mask` with zeros, left or right) is supported in every mode: each row is
routed on its own tokens at its own positions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_lory import ROUTING_MODES, LoryConfig

GATE, UP, DOWN = 0, 1, 2
TOKEN_CHUNK = 256  # tokens mixed at once when segment 0 is routed token by token (bounds memory)
# the name of the cache field of model outputs: "cache" in recent transformers, else "past_key_values"
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def _wide(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = _wide(x)
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * _wide(self.weight)).to(x.dtype)


def rope_angles(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.float().unsqueeze(-1) * inv_freq
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = _wide(x).chunk(2, dim=-1)
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def swiglu(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """FFN(x) for x (..., d) and one FFN w (f, 3, d); batched: x (B, n, d), w (B, f, 3, d)."""
    w = w.to(x.dtype)
    if w.dim() == 3:
        return (F.silu(x @ w[:, GATE].T) * (x @ w[:, UP].T)) @ w[:, DOWN]
    gated = F.silu(torch.bmm(x, w[:, :, GATE].transpose(1, 2))) * torch.bmm(x, w[:, :, UP].transpose(1, 2))
    return torch.bmm(gated, w[:, :, DOWN])


def masked_mean(x: torch.Tensor, hi: torch.Tensor, lo: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 mean (B, d) of x (B, L, d) over positions lo[b] <= t < hi[b] (lo: 0), and the sum."""
    positions = torch.arange(x.shape[1], device=x.device)
    mask = positions < hi.unsqueeze(1)
    if lo is not None:
        mask &= positions >= lo.unsqueeze(1)
    total = torch.einsum("bl,bld->bd", mask.float(), _wide(x))
    return total / mask.sum(1, keepdim=True).clamp(min=1), total


class LoryCache(DynamicCache):
    """Keys and values (a `DynamicCache`) plus the routing state of every MoE layer.

    Args:
        routing: "causal", "segment" or "prompt" (see the module docstring).
    """

    def __init__(self, routing: str = "causal"):
        super().__init__()
        self.routing = routing
        self.ffn_state: dict[int, dict] = {}
        self.valid_lengths: torch.Tensor | None = None  # real (unpadded) tokens seen per row
        self.started = False


class Routed:
    """How one forward pass routes: mode, padding, prompt lengths, positions, decoding state.

    Args:
        mode: "causal", "segment" or "prompt".
        valid: (B, n) True for real tokens, or None (no padding).
        prompt_lens: (B,) tokens of each row that "prompt" (and "segment"'s segment 0) may
            average over; None: all of them.
        positions: (B, n) position of every token among its row's real tokens.
    """

    def __init__(self, mode: str, valid: torch.Tensor | None, prompt_lens: torch.Tensor | None,
                 positions: torch.Tensor):
        self.mode, self.valid, self.prompt_lens, self.positions = mode, valid, prompt_lens, positions


def by_rows(x: torch.Tensor, routed: Routed, state: dict | None, full) -> torch.Tensor:
    """`full(x, prompt_lens, state)` -> (B, L, C) on unpadded rows: the whole batch when nothing is
    padded, else row by row over each row's real tokens (zeros at padding), stacking the states."""
    if routed.valid is None:
        return full(x, routed.prompt_lens, state)
    out, states = None, []
    for row in range(x.shape[0]):
        index = routed.valid[row].nonzero().squeeze(1)
        if not index.numel():
            raise ValueError(f"row {row} of the batch holds no real token (attention_mask is all 0)")
        lens = None if routed.prompt_lens is None else routed.prompt_lens[row : row + 1]
        row_state = None if state is None else {}
        result = full(x[row : row + 1, index], lens, row_state)[0]
        if out is None:
            out = result.new_zeros(*x.shape[:2], result.shape[-1])
        out[row, index] = result
        states.append(row_state)
    if state is not None:
        state.update({key: None if states[0][key] is None else torch.cat([s[key] for s in states])
                      for key in states[0]})
    return out


class SegmentRouter(nn.Module):
    """Router R: d → E on segment means, with Lory's causal shift or the prefix rule."""

    def __init__(self, config: LoryConfig, rule: str, first_segment: str):
        super().__init__()
        self.router = nn.Linear(config.hidden_size, config.n_experts, bias=False)
        self.n_experts, self.segment_len = config.n_experts, config.segment_len
        self.rule, self.first_segment = rule, first_segment

    def probs(self, means: torch.Tensor) -> torch.Tensor:
        return F.linear(_wide(means), _wide(self.router.weight)).softmax(-1)

    def forward(self, x: torch.Tensor, mode: str, prompt_lens: torch.Tensor | None):
        """Routing of unpadded rows x (B, L, d) from position 0.

        Returns:
            weights (B, N, E) per segment, the segment length, and per-token weights
            (B, min(T, L), E) of segment 0 under "causal" routing (else None).
        """
        batch, length, _ = x.shape
        if mode == "prompt":
            hi = prompt_lens if prompt_lens is not None else torch.full((batch,), length, device=x.device)
            return self.probs(masked_mean(x, hi)[0]).unsqueeze(1), length, None
        T = self.segment_len
        n_seg = -(-length // T)
        padded = F.pad(_wide(x), (0, 0, 0, n_seg * T - length))
        counts = torch.full((n_seg,), float(T), device=x.device)
        counts[-1] = length - (n_seg - 1) * T
        probs = self.probs(padded.view(batch, n_seg, T, -1).sum(2) / counts[:, None])
        running = None
        if self.first_segment == "uniform":
            first = torch.full_like(probs[:, :1], 1 / self.n_experts)
        elif mode == "causal":
            first = probs[:, :1]
            head = _wide(x[:, :T])
            seen = torch.arange(1, head.shape[1] + 1, device=x.device, dtype=head.dtype)
            running = self.probs(head.cumsum(1) / seen[:, None])
        elif prompt_lens is None:
            first = probs[:, :1]
        else:  # a decoder only sees the prompt: segment 0's own mean stops at its end
            first = self.probs(masked_mean(x, prompt_lens.clamp(max=min(T, length)))[0]).unsqueeze(1)
        rest = probs[:, :-1] if self.rule == "shift" else probs[:, :1].expand(-1, n_seg - 1, -1)
        return torch.cat([first, rest], dim=1), T, running

    def start(self, x: torch.Tensor, weights: torch.Tensor, mode: str) -> dict:
        """Decoding state after a prefill of unpadded rows x (B, L, d): the weights of the segment
        holding the last token ("current") and the running sum the next switch routes on."""
        if mode == "prompt":
            return {"current": weights[:, 0].clone(), "sum": None}
        length = x.shape[1]
        T = self.segment_len
        last = (length - 1) // T
        lo, hi = (last * T, length) if self.rule == "shift" else (0, min(length, T))
        total = _wide(x[:, lo:hi]).sum(1)
        current = weights[:, last].clone()
        if mode == "causal" and self.first_segment == "self" and last == 0:
            current = self.probs(total / length)
        return {"current": current, "sum": total}

    def step(self, state: dict, x: torch.Tensor, positions: torch.Tensor, mode: str) -> torch.Tensor | None:
        """Advance by one token per row, x (B, d) at `positions` (B,); the rows whose weights changed."""
        if mode == "prompt":
            return None
        T = self.segment_len
        switch = positions % T == 0 if self.rule == "shift" else positions == T
        if bool(switch.any()):
            state["current"] = torch.where(switch[:, None], self.probs(state["sum"] / T), state["current"])
            state["sum"] = torch.where(switch[:, None], torch.zeros_like(state["sum"]), state["sum"])
        keep = torch.ones_like(switch) if self.rule == "shift" else positions < T
        state["sum"] = state["sum"] + _wide(x) * keep[:, None]
        if mode == "causal" and self.first_segment == "self":
            inside = positions < T  # segment 0 re-routes at every token on its running mean
            if bool(inside.any()):
                running = self.probs(state["sum"] / (positions + 1)[:, None].to(state["sum"].dtype))
                state["current"] = torch.where(inside[:, None], running, state["current"])
                switch = switch | inside
        return switch


class ExpertBank(nn.Module):
    def __init__(self, config: LoryConfig):
        super().__init__()
        self.w = nn.Parameter(torch.empty(config.n_experts, config.intermediate_size, 3, config.hidden_size))

    def merged(self, coef: torch.Tensor) -> torch.Tensor:
        """One merged FFN (B, f, 3, d) per row of coef (B, E)."""
        return (coef.to(self.w.dtype) @ self.w.flatten(1)).view(-1, *self.w.shape[1:])

    def per_token(self, x: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
        """FFN(x_t; Σ_i coef_t,i θ_i) for x (n, d), coef (n, E), without building n merged FFNs:
        gate, up and down projections are linear in the merge weights."""
        out = torch.empty_like(x)
        w = self.w.to(x.dtype)
        for start in range(0, x.shape[0], TOKEN_CHUNK):
            xs, cs = x[start : start + TOKEN_CHUNK], coef[start : start + TOKEN_CHUNK].to(x.dtype)
            gate_up = torch.einsum("nd,ekfd,ne->nkf", xs, w[:, :, :DOWN].transpose(1, 2), cs)
            gated = F.silu(gate_up[:, 0]) * gate_up[:, 1]
            out[start : start + TOKEN_CHUNK] = torch.einsum("nf,efd,ne->nd", gated, w[:, :, DOWN], cs)
        return out

    def mixture(self, x: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """Σ_i gates_i · FFN_i(x) over the experts with a non-zero gate, x (n, d), gates (n, E)."""
        y = torch.zeros_like(x)
        for expert in range(gates.shape[1]):
            rows = (gates[:, expert] > 0).nonzero().squeeze(1)
            if rows.numel():
                out = swiglu(x[rows], self.w[expert]) * gates[rows, expert].unsqueeze(1).to(x.dtype)
                y.index_add_(0, rows, out)
        return y


class DenseFFN(nn.Module):
    def __init__(self, config: LoryConfig):
        super().__init__()
        self.w = nn.Parameter(torch.empty(config.intermediate_size, 3, config.hidden_size))

    def forward(self, x, routed, state):
        return swiglu(x, self.w)


class LoryMoE(nn.Module):
    """Soft merging of E experts per segment (lory) or by the first segment (prefix)."""

    def __init__(self, config: LoryConfig):
        super().__init__()
        rule = "prefix" if config.ffn == "prefix" else "shift"
        self.routing = SegmentRouter(config, rule, config.first_segment)
        self.experts = ExpertBank(config)

    def forward(self, x, routed, state):
        if state:
            return self._decode(x, routed, state)
        return by_rows(x, routed, state, lambda xs, lens, st: self._full(xs, routed.mode, lens, st))

    def _full(self, x, mode, prompt_lens, state):
        weights, seg_len, running = self.routing(x, mode, prompt_lens)
        batch, length, d = x.shape
        y = torch.empty_like(x)
        for k in range(weights.shape[1]):
            span = slice(k * seg_len, min((k + 1) * seg_len, length))
            if k == 0 and running is not None:
                n = span.stop
                y[:, span] = self.experts.per_token(x[:, span].reshape(batch * n, d),
                                                    running.reshape(batch * n, -1)).view(batch, n, d)
            else:
                y[:, span] = swiglu(x[:, span], self.experts.merged(weights[:, k]))
        if state is not None:
            state.update(self.routing.start(x, weights, mode))
            state["w"] = self.experts.merged(state["current"])
        return y

    def _decode(self, x, routed, state):
        outputs = []
        for i in range(x.shape[1]):
            changed = self.routing.step(state, x[:, i], routed.positions[:, i], routed.mode)
            if changed is not None and bool(changed.any()):
                rows = changed.nonzero().squeeze(1)
                w = state["w"].clone()
                w[rows] = self.experts.merged(state["current"][rows]).to(w.dtype)
                state["w"] = w
            outputs.append(swiglu(x[:, i : i + 1], state["w"]))
        return torch.cat(outputs, dim=1)


class TopKMoE(nn.Module):
    """Token-choice top-k: softmax router, top-k experts (k > 1: renormalised gates)."""

    def __init__(self, config: LoryConfig):
        super().__init__()
        self.router = nn.Linear(config.hidden_size, config.n_experts, bias=False)
        self.experts = ExpertBank(config)
        self.top_k = config.moe_top_k

    def forward(self, x, routed, state):
        flat = x.reshape(-1, x.shape[-1])
        probs = F.linear(_wide(flat), _wide(self.router.weight)).softmax(-1)
        top_p, top_i = probs.topk(self.top_k, dim=-1)
        if self.top_k > 1:
            top_p = top_p / top_p.sum(-1, keepdim=True)
        gates = torch.zeros_like(probs).scatter(1, top_i, top_p)
        return self.experts.mixture(flat, gates).view_as(x)


class ExpertChoiceMoE(nn.Module):
    """Expert choice at inference: an item goes to every expert whose score reaches that
    expert's threshold (learned in training), weighted by the score."""

    def __init__(self, config: LoryConfig):
        super().__init__()
        self.level = config.ec_level
        if self.level == "segment":
            self.routing = SegmentRouter(config, "shift", "self")
        else:
            self.router = nn.Linear(config.hidden_size, config.n_experts, bias=False)
        self.experts = ExpertBank(config)
        self.register_buffer("threshold", torch.full((config.n_experts,), 1.0 / config.n_experts))

    def gated(self, scores: torch.Tensor) -> torch.Tensor:
        return scores * (scores >= self.threshold)

    def forward(self, x, routed, state):
        if self.level == "token":
            gates = self.gated(F.linear(_wide(x), _wide(self.router.weight)).softmax(-1))
        elif state:
            rows = []
            for i in range(x.shape[1]):
                self.routing.step(state, x[:, i], routed.positions[:, i], routed.mode)
                rows.append(self.gated(state["current"]))
            gates = torch.stack(rows, dim=1)
        else:
            gates = by_rows(x, routed, state, lambda xs, lens, st: self._gates(xs, lens, st, routed.mode))
        return self.experts.mixture(x.reshape(-1, x.shape[-1]), gates.reshape(-1, gates.shape[-1])).view_as(x)

    def _gates(self, x, prompt_lens, state, mode):
        """Per-token gates (B, L, E) of unpadded rows x (B, L, d)."""
        weights, seg_len, running = self.routing(x, mode, prompt_lens)
        gates = self.gated(weights).repeat_interleave(seg_len, dim=1)[:, : x.shape[1]]
        if running is not None:
            gates = torch.cat([self.gated(running), gates[:, running.shape[1] :]], dim=1)
        if state is not None:
            state.update(self.routing.start(x, weights, mode))
        return gates


def make_ffn(config: LoryConfig) -> nn.Module:
    if config.ffn == "dense":
        return DenseFFN(config)
    if config.ffn in ("lory", "prefix"):
        return LoryMoE(config)
    if config.ffn == "topk":
        return TopKMoE(config)
    return ExpertChoiceMoE(config)


class Attention(nn.Module):
    def __init__(self, config: LoryConfig, layer_idx: int):
        super().__init__()
        self.n_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // self.n_heads
        self.layer_idx = layer_idx
        self.wqkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=False)
        self.wo = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, x, cos, sin, allowed, cache):
        batch, n, d = x.shape
        q, k, v = self.wqkv(x).view(batch, n, 3, self.n_heads, self.head_dim).unbind(2)
        q, k = apply_rope(q, cos, sin).transpose(1, 2), apply_rope(k, cos, sin).transpose(1, 2)
        v = v.transpose(1, 2)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        if allowed is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            out = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=allowed.unsqueeze(1))
        return self.wo(out.transpose(1, 2).reshape(batch, n, d))


class Block(nn.Module):
    def __init__(self, config: LoryConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = Attention(config, layer_idx)
        self.ffn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.ffn = make_ffn(config)


class LoryForCausalLM(PreTrainedModel, GenerationMixin):
    """Embedding, decoder blocks with Lory (or baseline) FFNs, final RMSNorm, output projection."""

    config_class = LoryConfig
    base_model_prefix = "lory"
    _supports_cache_class = True

    def __init__(self, config: LoryConfig):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        # weights come from the checkpoint; this only gives fresh (unloaded) models sane values
        std = 0.02
        for param in module.parameters(recurse=False):
            if param.dim() > 1:
                nn.init.normal_(param, std=std)
        if isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)

    def get_input_embeddings(self) -> nn.Module:
        return self.embed

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.embed = value

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def generate(self, inputs: torch.Tensor | None = None, *args, **kwargs):
        """`GenerationMixin.generate`, telling every forward pass where the prompt ends, so that
        `use_cache=False` routes "prompt" and "segment" exactly as cached decoding does."""
        ids = inputs if inputs is not None else kwargs.get("input_ids")
        if ids is not None and kwargs.get("prompt_length") is None:
            kwargs["prompt_length"] = ids.shape[1]
        return super().generate(inputs, *args, **kwargs)

    def forward(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, cache: DynamicCache | None = None,
                past_key_values: DynamicCache | None = None, use_cache: bool | None = None,
                labels: torch.LongTensor | None = None, routing: str | None = None,
                prompt_length: int | None = None, **kwargs):
        """Logits of `input_ids` (B, n).

        Args:
            input_ids: token ids.
            attention_mask: (B, past + n) 1 for real tokens, 0 for padding (left or right).
            position_ids: ignored; positions follow from the cache and the attention mask.
            cache, past_key_values: a `LoryCache` (an empty `DynamicCache` is replaced by one).
            use_cache: start a `LoryCache` when none is given.
            labels: targets for the mean next-token loss (-100 is ignored).
            routing: "causal", "segment" or "prompt" (default: `config.routing`); a cache keeps
                the mode it was started with.
            prompt_length: columns of `input_ids` that hold the prompt (`generate` passes it);
                without a cache, "prompt" and "segment" routing average over those tokens only.
        """
        cache = cache if cache is not None else past_key_values
        if cache is not None and not isinstance(cache, LoryCache):
            if cache.get_seq_length() > 0:
                raise ValueError("a Lory model continues only from the LoryCache it returned")
            cache = None
            use_cache = True
        mode = routing or self.config.routing
        if cache is None and use_cache:
            cache = LoryCache(mode)
        if cache is not None:
            mode = cache.routing
        if mode not in ROUTING_MODES:
            raise ValueError(f"routing must be one of {ROUTING_MODES}, got {mode!r}")
        batch, n = input_ids.shape
        device = input_ids.device
        past = cache.get_seq_length() if cache is not None else 0
        mask = None if attention_mask is None or bool(attention_mask.all()) else attention_mask.bool()
        valid = None if mask is None else mask[:, -n:]
        if mask is not None:
            positions = (mask.long().cumsum(-1) - 1).clamp(min=0)[:, -n:]
        elif cache is not None and cache.valid_lengths is not None:
            positions = cache.valid_lengths[:, None] + torch.arange(n, device=device)
        else:
            positions = (past + torch.arange(n, device=device)).expand(batch, n)
        allowed = None
        if mask is not None or past:
            keys = torch.arange(past + n, device=device)
            queries = past + torch.arange(n, device=device)[:, None]
            allowed = (keys <= queries).expand(batch, n, past + n)
            if mask is not None:
                # a padded query still sees itself, so that its (unused) output stays finite
                allowed = (allowed & mask[:, None, : past + n]) | (keys == queries)
        prompt_lens = None
        if cache is None and prompt_length is not None:
            prompt_lens = (mask[:, :prompt_length].sum(1) if mask is not None
                           else torch.full((batch,), min(prompt_length, n), device=device))
        routed = Routed(mode, valid, prompt_lens, positions)
        cos, sin = rope_angles(positions, self.config.hidden_size // self.config.num_attention_heads,
                               self.config.rope_theta)
        h = self.embed(input_ids)
        for index, block in enumerate(self.layers):
            h = h + block.attn(block.attn_norm(h), cos, sin, allowed, cache)
            state = None if cache is None else cache.ffn_state.setdefault(index, {})
            h = h + block.ffn(block.ffn_norm(h), routed, state)
        if cache is not None:
            seen = valid.sum(1) if valid is not None else torch.full((batch,), n, device=device)
            cache.valid_lengths = seen if cache.valid_lengths is None else cache.valid_lengths + seen
            cache.started = True
        logits = self.lm_head(self.norm(h))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: cache})
