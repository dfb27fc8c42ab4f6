"""A Lory decoder for transformers (`AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)`).

Written by `lory export-hf`; self-contained (it imports nothing from lory). The parameter names
and layouts are those of lory's own checkpoints: every FFN is one tensor `w` (f, 3, d) with
gate, up and down rows per inner unit, a bank of E experts is (E, f, 3, d).

Routing (Zhong et al. 2024, "Lory"): each MoE layer of the lory family merges its experts in
parameter space, θ̄ = Σ_i e_i θ_i, with weights e = softmax(R(mean FFN input)). An uncached
forward pass routes segment k of `segment_len` tokens by segment k-1 (segment 0 by itself, or
uniformly), as in training. `generate()` keeps the routing state in a `LoryCache` (a
`DynamicCache` subclass) and routes by `config.generation_routing`: "prompt" routes once on the
mean of the prompt and keeps that merged FFN for every generated token (the paper's default);
"segment" re-routes every `segment_len` tokens from the previous segment.

Padding (an `attention_mask` with zeros, e.g. left-padded batches) is supported by prompt
routing and by token-level layers; segment routing needs unpadded rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_lory import LoryConfig

GATE, UP, DOWN = 0, 1, 2
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


class LoryCache(DynamicCache):
    """Keys and values (a `DynamicCache`) plus the routing state of every MoE layer.

    Args:
        routing: "prompt" or "segment" (see the module docstring).
    """

    def __init__(self, routing: str = "prompt"):
        super().__init__()
        self.routing = routing
        self.ffn_state: dict[int, dict] = {}
        self.started = False


class SegmentRouter(nn.Module):
    """Router R: d → E on segment means, with Lory's causal shift or the prefix rule."""

    def __init__(self, config: LoryConfig, rule: str, first_segment: str):
        super().__init__()
        self.router = nn.Linear(config.hidden_size, config.n_experts, bias=False)
        self.n_experts, self.segment_len = config.n_experts, config.segment_len
        self.rule, self.first_segment = rule, first_segment

    def probs(self, means: torch.Tensor) -> torch.Tensor:
        return F.linear(_wide(means), _wide(self.router.weight)).softmax(-1)

    def forward(self, x: torch.Tensor, routing: str, valid: torch.Tensor | None) -> tuple[torch.Tensor, int]:
        """Weights (B, N, E) per segment and the segment length; `valid` (B, L) masks padding."""
        batch, length, _ = x.shape
        if routing == "prompt":
            mask = torch.ones(batch, length, device=x.device) if valid is None else valid.float()
            mean = torch.einsum("bl,bld->bd", mask, _wide(x)) / mask.sum(1, keepdim=True).clamp(min=1)
            return self.probs(mean).unsqueeze(1), length
        if valid is not None and not bool(valid.all()):
            raise ValueError("segment routing needs unpadded sequences; use prompt routing or batch size 1")
        T = self.segment_len
        n_seg = -(-length // T)
        padded = F.pad(_wide(x), (0, 0, 0, n_seg * T - length))
        counts = torch.full((n_seg,), float(T), device=x.device)
        counts[-1] = length - (n_seg - 1) * T
        probs = self.probs(padded.view(batch, n_seg, T, -1).sum(2) / counts[:, None])
        first = torch.full_like(probs[:, :1], 1 / self.n_experts) if self.first_segment == "uniform" else probs[:, :1]
        rest = probs[:, :-1] if self.rule == "shift" else probs[:, :1].expand(-1, n_seg - 1, -1)
        return torch.cat([first, rest], dim=1), T

    def start(self, x: torch.Tensor, weights: torch.Tensor, routing: str) -> dict:
        """Decoding state after the prefill: the current weights and the running sum of FFN inputs."""
        if routing == "prompt":
            return {"current": weights[:, 0].clone(), "sum": None}
        length, T = x.shape[1], self.segment_len
        last = (length - 1) // T
        lo, hi = (last * T, length) if self.rule == "shift" else (0, min(length, T))
        return {"current": weights[:, last].clone(), "sum": _wide(x[:, lo:hi]).sum(1)}

    def step(self, state: dict, x: torch.Tensor, position: int, routing: str) -> bool:
        """Advance by one token (B, d) at `position`; True when the weights changed."""
        if routing == "prompt":
            return False
        T = self.segment_len
        switch = position % T == 0 if self.rule == "shift" else position == T
        if switch:
            state["current"] = self.probs(state["sum"] / T)
            state["sum"] = torch.zeros_like(state["sum"])
        if self.rule == "shift" or position < T:
            state["sum"] = state["sum"] + _wide(x)
        return switch


class ExpertBank(nn.Module):
    def __init__(self, config: LoryConfig):
        super().__init__()
        self.w = nn.Parameter(torch.empty(config.n_experts, config.intermediate_size, 3, config.hidden_size))

    def merged(self, coef: torch.Tensor) -> torch.Tensor:
        """One merged FFN (B, f, 3, d) per row of coef (B, E)."""
        return (coef.to(self.w.dtype) @ self.w.flatten(1)).view(-1, *self.w.shape[1:])

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

    def forward(self, x, routing, valid, state, positions):
        return swiglu(x, self.w)


class LoryMoE(nn.Module):
    """Soft merging of E experts per segment (lory) or by the first segment (prefix)."""

    def __init__(self, config: LoryConfig):
        super().__init__()
        rule = "prefix" if config.ffn == "prefix" else "shift"
        self.routing = SegmentRouter(config, rule, config.first_segment)
        self.experts = ExpertBank(config)

    def forward(self, x, routing, valid, state, positions):
        if state:
            return self._decode(x, routing, state, positions)
        weights, seg_len = self.routing(x, routing, valid)
        length = x.shape[1]
        y = torch.empty_like(x)
        for k in range(weights.shape[1]):
            span = slice(k * seg_len, min((k + 1) * seg_len, length))
            y[:, span] = swiglu(x[:, span], self.experts.merged(weights[:, k]))
        if state is not None:
            state.update(self.routing.start(x, weights, routing))
            state["w"] = self.experts.merged(state["current"])
        return y

    def _decode(self, x, routing, state, positions):
        outputs = []
        for i in range(x.shape[1]):
            if self.routing.step(state, x[:, i], positions + i, routing):
                state["w"] = self.experts.merged(state["current"])
            outputs.append(swiglu(x[:, i : i + 1], state["w"]))
        return torch.cat(outputs, dim=1)


class TopKMoE(nn.Module):
    """Token-choice top-k: softmax router, top-k experts (k > 1: renormalised gates)."""

    def __init__(self, config: LoryConfig):
        super().__init__()
        self.router = nn.Linear(config.hidden_size, config.n_experts, bias=False)
        self.experts = ExpertBank(config)
        self.top_k = config.moe_top_k

    def forward(self, x, routing, valid, state, positions):
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

    def forward(self, x, routing, valid, state, positions):
        if self.level == "token":
            scores = F.linear(_wide(x), _wide(self.router.weight)).softmax(-1)
            gates = scores * (scores >= self.threshold)
        elif state:
            rows = []
            for i in range(x.shape[1]):
                self.routing.step(state, x[:, i], positions + i, routing)
                rows.append(state["current"] * (state["current"] >= self.threshold))
            gates = torch.stack(rows, dim=1)
        else:
            weights, seg_len = self.routing(x, routing, valid)
            gates = (weights * (weights >= self.threshold)).repeat_interleave(seg_len, dim=1)[:, : x.shape[1]]
            if state is not None:
                state.update(self.routing.start(x, weights, routing))
        return self.experts.mixture(x.reshape(-1, x.shape[-1]), gates.reshape(-1, gates.shape[-1])).view_as(x)


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

    def forward(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, cache: DynamicCache | None = None,
                past_key_values: DynamicCache | None = None, use_cache: bool | None = None,
                labels: torch.LongTensor | None = None, routing: str | None = None, **kwargs):
        """Logits of `input_ids` (B, n).

        Args:
            input_ids: token ids.
            attention_mask: (B, past + n) 1 for real tokens, 0 for padding.
            position_ids: ignored; positions follow from the cache and the attention mask.
            cache, past_key_values: a `LoryCache` (an empty `DynamicCache` is replaced by one).
            use_cache: start a `LoryCache` when none is given.
            labels: targets for the mean next-token loss (-100 is ignored).
            routing: "segment" or "prompt" for an uncached pass (default "segment").
        """
        cache = cache if cache is not None else past_key_values
        if cache is not None and not isinstance(cache, LoryCache):
            if cache.get_seq_length() > 0:
                raise ValueError("a Lory model continues only from the LoryCache it returned")
            cache = None
            use_cache = True
        if cache is None and use_cache:
            cache = LoryCache(routing or self.config.generation_routing)
        batch, n = input_ids.shape
        past = cache.get_seq_length() if cache is not None else 0
        if cache is not None:
            routing = cache.routing
        routing = routing or "segment"
        if routing not in ("segment", "prompt"):
            raise ValueError(f"routing must be 'segment' or 'prompt', got {routing!r}")
        valid = allowed = None
        if attention_mask is not None and not bool(attention_mask.all()):
            mask = attention_mask.bool()
            positions = (mask.long().cumsum(-1) - 1).clamp(min=0)[:, -n:]
            valid = mask[:, -n:]
            keys = torch.arange(past + n, device=input_ids.device)
            queries = past + torch.arange(n, device=input_ids.device)[:, None]
            # a padded query still sees itself, so that its (unused) output stays finite
            allowed = ((keys <= queries) & mask[:, None, : past + n]) | (keys == queries)
        else:
            positions = (past + torch.arange(n, device=input_ids.device)).expand(batch, n)
            if past:
                allowed = torch.ones(batch, n, past + n, dtype=torch.bool, device=input_ids.device).tril(past)
        cos, sin = rope_angles(positions, self.config.hidden_size // self.config.num_attention_heads,
                               self.config.rope_theta)
        h = self.embed(input_ids)
        for index, block in enumerate(self.layers):
            h = h + block.attn(block.attn_norm(h), cos, sin, allowed, cache)
            state = None
            if cache is not None:
                state = cache.ffn_state.setdefault(index, {})
                if valid is not None and state and routing == "segment":
                    raise ValueError("segment routing needs unpadded sequences")
            h = h + block.ffn(block.ffn_norm(h), routing, valid, state, past)
        if cache is not None:
            cache.started = True
        logits = self.lm_head(self.norm(h))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: cache})
