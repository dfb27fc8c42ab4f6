"""`lory export-hf`: a self-contained Hugging Face folder for any lory checkpoint.

The folder holds `config.json` (with `auto_map`), the modeling and configuration files (copied
from `hf_template/`, which import nothing from lory), `model.safetensors`, the tokenizer and a
model card (`README.md`), so that `AutoModelForCausalLM.from_pretrained(OUT,
trust_remote_code=True)` loads it for every `--ffn` kind. Parameter names and layouts stay those
of lory's checkpoints; SaMoE layers are written with their experts resolved from the pool
(θ_e = Σ_g α_e,g P_g), and tied embeddings as two copies, so the remote code needs neither.

`config.json` carries the routing mode (`routing`, default "causal"): the same strictly causal
rule that lory's own lm-eval backend scores with by default, so `lm_eval --model hf` on the
folder and `--model lory` on the run give the same log-likelihoods.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from lorytrain.errors import LoryTrainError
from lorytrain.model import LoryLM

TEMPLATE = Path(__file__).with_name("hf_template")
MODEL_FILES = ("configuration_lory.py", "modeling_lory.py")
ROUTING_MODES = ("causal", "segment", "prompt")


def hf_state_dict(model: LoryLM) -> dict[str, torch.Tensor]:
    """The weights under the exported model's names: lory's, with pooled experts resolved."""
    tensors = {}
    for name, value in model.state_dict().items():
        if name.startswith("expert_pool.") or name.endswith("experts.mix_logits"):
            continue
        tensors[name] = value
    for index, block in enumerate(model.layers):
        experts = getattr(block.ffn, "experts", None)
        if experts is not None and experts.pool is not None:
            with torch.no_grad():
                tensors[f"layers.{index}.ffn.experts.w"] = experts.weights()
    # safetensors refuses shared storage (tied embeddings): every tensor gets its own copy
    return {name: value.detach().to("cpu").contiguous().clone() for name, value in tensors.items()}


def hf_config(model: LoryLM, eos_id: int | None, pad_id: int | None, routing: str = "causal",
              max_length: int = 4096) -> dict:
    """`config.json` of the exported folder."""
    c = model.config
    return {
        "architectures": ["LoryForCausalLM"],
        "model_type": "lory",
        "auto_map": {"AutoConfig": "configuration_lory.LoryConfig",
                     "AutoModelForCausalLM": "modeling_lory.LoryForCausalLM"},
        "vocab_size": c.vocab_size, "hidden_size": c.d_model, "num_hidden_layers": c.n_layers,
        "num_attention_heads": c.n_heads, "intermediate_size": c.ffn_dim, "rope_theta": c.rope_theta,
        "rms_norm_eps": c.norm_eps, "ffn": c.ffn, "n_experts": c.n_experts, "segment_len": c.segment_len,
        "first_segment": c.first_segment, "moe_top_k": c.top_k, "ec_level": c.ec_level,
        "routing": routing, "max_position_embeddings": max_length, "tie_word_embeddings": False,
        "bos_token_id": eos_id, "eos_token_id": eos_id, "pad_token_id": pad_id, "torch_dtype": "float32",
    }


def write_tokenizer(tokenizer_path: str | Path, out: Path) -> tuple[int, int]:
    """Copy tokenizer.json and describe it for `AutoTokenizer` (a fast tokenizer; EOS doubles as
    BOS, as it precedes every document in training). Returns (eos_id, pad_id)."""
    from lorydata.tokenizer import Tokenizer

    tok = Tokenizer(tokenizer_path)
    shutil.copyfile(tok.path, out / "tokenizer.json")
    eos = tok.decode([tok.eos_id])
    pad = tok.decode([tok.pad_id])
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "bos_token": eos, "pad_token": pad,
              "unk_token": None, "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
              "model_max_length": 1_000_000}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(
        json.dumps({"eos_token": eos, "bos_token": eos, "pad_token": pad}, indent=2) + "\n")
    return tok.eos_id, tok.pad_id


def export_hf(model: LoryLM, out: str | Path, tokenizer_path: str | Path | None = None, routing: str = "causal",
              max_length: int | None = None, source: str | None = None, overwrite: bool = False) -> Path:
    """Write `model` as a trust_remote_code Hugging Face folder with a model card.

    Args:
        model: any `LoryLM` (weights are written in float32).
        out: the folder to create.
        tokenizer_path: tokenizer.json to ship (None: no tokenizer; token ids only).
        routing: "causal" (default), "segment" or "prompt": the folder's routing mode for forward
            passes and `generate()` (see `hf_template/modeling_lory.py`).
        max_length: the training sequence length (config `max_position_embeddings`; default 4096).
        source: what the weights are (e.g. "runs/x, step 60"), for the model card.
        overwrite: replace an existing non-empty folder.

    Returns:
        The folder.

    Raises:
        LoryTrainError: `out` exists and is not empty (without overwrite), or bad routing.
    """
    if routing not in ROUTING_MODES:
        raise LoryTrainError(f"routing must be one of {', '.join(ROUTING_MODES)}, got {routing!r}")
    out = _fresh_folder(out, overwrite)
    eos_id = pad_id = None
    if tokenizer_path is not None:
        eos_id, pad_id = write_tokenizer(tokenizer_path, out)
    for name in MODEL_FILES:
        shutil.copyfile(TEMPLATE / name, out / name)
    tensors = {name: value.float() for name, value in hf_state_dict(model).items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = hf_config(model, eos_id, pad_id, routing, max_length or 4096)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {"eos_token_id": eos_id, "pad_token_id": pad_id, "bos_token_id": eos_id}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    (out / "README.md").write_text(model_card(model, config, source))
    return out


def model_card(model: LoryLM, config: dict, source: str | None = None) -> str:
    """The folder's README.md: what the model is, how to load and score it, and its routing modes."""
    c = model.config
    kind = {"dense": "dense SwiGLU FFNs", "lory": f"Lory MoE layers ({c.n_experts} experts merged per segment)",
            "prefix": f"prefix-routed soft MoE layers ({c.n_experts} experts)",
            "topk": f"token-choice top-{c.top_k} MoE layers ({c.n_experts} experts)",
            "expert-choice": f"{c.ec_level}-level expert-choice MoE layers ({c.n_experts} experts)"}[c.ffn]
    segment_routed = c.ffn in ("lory", "prefix") or (c.ffn == "expert-choice" and c.ec_level == "segment")
    lines = [
        "---", "library_name: transformers", "tags: [lory, mixture-of-experts]", "---", "",
        "# Lory decoder (exported by `lory export-hf`)", "",
        f"A LLaMA-style decoder ({c.n_layers} layers, d={c.d_model}, {c.n_heads} heads, "
        f"vocabulary {c.vocab_size}) with {kind}." + (f" Weights: {source}." if source else ""), "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        'model = AutoModelForCausalLM.from_pretrained("THIS_FOLDER", trust_remote_code=True)',
        'tokenizer = AutoTokenizer.from_pretrained("THIS_FOLDER", trust_remote_code=True)',
        "```", "",
        "Score it with lm-evaluation-harness (needs `accelerate`):",
        "`lm_eval --model hf --model_args pretrained=THIS_FOLDER,trust_remote_code=True --tasks ...`.", "",
        "## Routing", "",
    ]
    if segment_routed:
        lines += [
            f"Each MoE layer routes whole segments of {c.segment_len} tokens: segment k > 0 by the mean FFN "
            "input of segment k-1" + (" (prefix rule: by segment 0)" if c.ffn == "prefix" else "") + ". "
            f"`config.json` sets the mode (`routing`, here `{config['routing']}`); pass "
            "`routing=...` to `from_pretrained` (or to a forward call) to change it:", "",
            "- `causal` (default): token t of the first segment is routed by the running mean of tokens "
            "0..t, so no token's logit depends on a later token. An uncached forward pass, cached "
            "`generate()` and `generate(use_cache=False)` give the same logits, and `lm_eval --model hf` "
            "scores what lory's own backend (`--model lory`, default routing) scores.",
            "- `segment`: the paper's training rule; the first segment is routed by its own mean "
            f"(trained with `first_segment={c.first_segment}`), so in a plain forward pass the first "
            f"{c.segment_len} tokens see a summary of each other, later tokens included. `generate()` "
            "bounds that mean to the prompt.",
            "- `prompt`: the paper's generation rule; every MoE layer routes once on the mean of the "
            "prompt and keeps that merged FFN. `generate()` knows the prompt; a plain forward pass takes "
            "its whole input as the prompt (not causal: use it for generation, not for scoring).", "",
        ]
        if c.first_segment == "uniform":
            lines += ["This model was trained with a uniformly weighted first segment, which is already "
                      "causal: `causal` and `segment` are the same rule.", ""]
    else:
        lines += ["The FFNs of this model route each token on its own (or are dense): every routing mode "
                  "computes the same, causal logits.", ""]
    lines += ["Padded batches (left or right) work in every mode; beam search is not supported."]
    return "\n".join(lines) + "\n"


def _fresh_folder(out: str | Path, overwrite: bool) -> Path:
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise LoryTrainError(f"{out} exists and is not empty; pass --overwrite to replace it")
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return out
