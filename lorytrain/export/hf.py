"""`lory export-hf`: a self-contained Hugging Face folder for any lory checkpoint.

The folder holds `config.json` (with `auto_map`), the modeling and configuration files (copied
from `hf_template/`, which import nothing from lory), `model.safetensors` and the tokenizer, so
that `AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True)` loads it for every
`--ffn` kind. Parameter names and layouts stay those of lory's checkpoints; SaMoE layers are
written with their experts resolved from the pool (θ_e = Σ_g α_e,g P_g), and tied embeddings
as two copies, so the remote code needs neither.
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


def hf_config(model: LoryLM, eos_id: int | None, pad_id: int | None, generation_routing: str = "prompt") -> dict:
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
        "generation_routing": generation_routing, "tie_word_embeddings": False,
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


def export_hf(model: LoryLM, out: str | Path, tokenizer_path: str | Path | None = None,
              generation_routing: str = "prompt", overwrite: bool = False) -> Path:
    """Write `model` as a trust_remote_code Hugging Face folder.

    Args:
        model: any `LoryLM` (weights are written in float32).
        out: the folder to create.
        tokenizer_path: tokenizer.json to ship (None: no tokenizer; token ids only).
        generation_routing: "prompt" or "segment" routing of cached generation.
        overwrite: replace an existing non-empty folder.

    Returns:
        The folder.

    Raises:
        LoryTrainError: `out` exists and is not empty (without overwrite), or bad routing.
    """
    if generation_routing not in ("prompt", "segment"):
        raise LoryTrainError(f"generation routing must be 'prompt' or 'segment', got {generation_routing!r}")
    out = _fresh_folder(out, overwrite)
    eos_id = pad_id = None
    if tokenizer_path is not None:
        eos_id, pad_id = write_tokenizer(tokenizer_path, out)
    for name in MODEL_FILES:
        shutil.copyfile(TEMPLATE / name, out / name)
    tensors = {name: value.float() for name, value in hf_state_dict(model).items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_config(model, eos_id, pad_id, generation_routing), indent=2) + "\n")
    generation = {"eos_token_id": eos_id, "pad_token_id": pad_id, "bos_token_id": eos_id}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    return out


def _fresh_folder(out: str | Path, overwrite: bool) -> Path:
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise LoryTrainError(f"{out} exists and is not empty; pass --overwrite to replace it")
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return out
