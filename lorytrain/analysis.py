"""Routing analysis: expert use and domain specialisation of every MoE layer (`lory analyze`).

The model runs over shard data exactly as in training (causal segment routing). Every routing
segment of `segment_len` tokens gives one routing weight vector per MoE layer (the merge
weights of lory/prefix, the gates of segment-level expert choice, the segment mean of the
per-token gates of token-level layers) and one domain label: the domain holding most of the
segment's tokens (the tokens those weights are applied to), from the shard's
`doc_starts`/`domains`. Segments that are mostly padding are skipped.

From these, per layer: expert use (the paper counts an expert as used when its weight exceeds
2/E), the mean routing weights of every domain (the heatmaps), and the mutual information
between domain and top-1 expert against a baseline with shuffled domain labels, and the
routing divergence between domains (Jensen–Shannon between their mean routing weights). When
the run's metrics.jsonl holds the training-time diagnostics (`lorytrain.training.diagnostics`),
their curves over training go to `training_diagnostics.png`.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.special import rel_entr
from torch.utils.data import DataLoader

from lorydata.dataset import ShardDataset
from lorydata.manifest import Manifest
from lorytrain.errors import LoryTrainError
from lorytrain.evaluation import token_domains
from lorytrain.model.config import ModelConfig
from lorytrain.runs import find_checkpoint, load_run
from lorytrain.training.metrics_log import read_metrics

ANALYSIS_FILE = "analysis.json"
GROUPS = ("lower", "middle", "upper")


@dataclass
class RoutingCollection:
    """Routing weights of every segment seen, per MoE layer, with the segments' domains.

    Args:
        layers: decoder indices of the MoE layers.
        weights: per MoE layer, float32 routing weights (S, E), one row per segment.
        domains: (S,) domain label of every segment (object array of str).
        n_layers: decoder layers of the model (to place MoE layers in lower/middle/upper).
        ffn: the model's FFN kind.
        segment_len: tokens per routing segment.
    """

    layers: list[int]
    weights: list[np.ndarray]
    domains: np.ndarray
    n_layers: int
    ffn: str
    segment_len: int

    @property
    def n_experts(self) -> int:
        return self.weights[0].shape[1]


def _require_moe(config) -> None:
    if not config.is_moe:
        raise LoryTrainError("the model is dense (ffn=dense): it has no experts or routing to analyse; "
                             "give an MoE run (lory, topk, expert-choice, prefix)")


def segment_labels(doc_starts: list[int], domains: list[str], ids: np.ndarray, pad_id: int | None,
                   segment_len: int) -> list[str | None]:
    """The majority domain of every segment of one sequence (None: mostly padding).

    Padding is the trailing run of `pad_id` tokens (the packer pads only the tail).
    """
    names = token_domains(doc_starts, domains, len(ids))
    real = len(ids)
    if pad_id is not None:
        while real and ids[real - 1] == pad_id:
            real -= 1
    labels = []
    for lo in range(0, len(ids), segment_len):
        hi = min(lo + segment_len, len(ids))
        text = names[lo : min(hi, real)]  # the segment's non-padding tokens
        # a segment counts when at least half of it is text; ties go to the document that comes first in the segment (Counter keeps order)
        labels.append(Counter(text).most_common(1)[0][0] if 2 * len(text) >= hi - lo and len(text) else None)
    return labels


@torch.no_grad()
def collect_routing(model, folder: str | Path, batch_size: int = 8, max_batches: int = 0,
                    device: str | torch.device = "cpu", expected_tokenizer=None) -> RoutingCollection:
    """Run `model` over a shard folder and keep every segment's routing weights and domain.

    Args:
        model: a `LoryLM` with MoE layers, already on `device`; runs in eval mode.
        folder: shard folder (with doc_starts/domains, as `lory build` writes them).
        batch_size: sequences per forward pass.
        max_batches: stop after this many batches (0: the whole folder).
        device: where the inputs go.
        expected_tokenizer: refuse shards of another tokenizer (sha256 or object with one).

    Raises:
        LoryTrainError: the model is dense.
    """
    _require_moe(model.config)
    dataset = ShardDataset(folder, shuffle=False, epochs=1, even=False, with_metadata=True, batch_size=batch_size,
                           expected_tokenizer=expected_tokenizer)
    tok = dataset.manifest.tokenizer
    pad_id = tok.get("pad_id")
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=ShardDataset.collate, generator=torch.Generator())
    segment_len = model.config.segment_len
    was_training = model.training
    model.eval()
    layers: list[int] = []
    weights: list[list[np.ndarray]] = []
    labels: list[str] = []
    try:
        for index, batch in enumerate(loader):
            if max_batches and index >= max_batches:
                break
            ids = batch["input_ids"]
            model(ids.to(device))
            stats = model.routing_stats()
            if not layers:
                layers = [i for i, s in enumerate(stats) if s is not None]
                weights = [[] for _ in layers]
            rows, segs = [], []  # the segments that have a domain
            for row in range(ids.shape[0]):
                row_labels = segment_labels(batch["doc_starts"][row], batch["domains"][row], ids[row].numpy(),
                                            pad_id, segment_len)
                for seg, label in enumerate(row_labels):
                    if label is not None:
                        rows.append(row)
                        segs.append(seg)
                        labels.append(label)
            for slot, layer in enumerate(layers):
                seg_weights = stats[layer].segment_weights.float().cpu()  # (B, N, E)
                if seg_weights.shape[:2] != (ids.shape[0], len(row_labels)):  # a model bug, not bad input
                    raise RuntimeError(f"layer {layer} reported routing weights of shape {tuple(seg_weights.shape)} "
                                         f"for {ids.shape[0]} sequences of {len(row_labels)} segments")
                weights[slot].append(seg_weights[rows, segs].numpy())
    finally:
        model.train(was_training)
    if not labels:
        raise LoryTrainError(f"{folder} gave no routing segments to analyse")
    return RoutingCollection(layers, [np.concatenate(w) for w in weights], np.array(labels, dtype=object),
                             model.config.n_layers, model.config.ffn, segment_len)


def mutual_information(a: np.ndarray, b: np.ndarray) -> float:
    """Plug-in mutual information I(a; b) in nats of two integer label arrays."""
    table = np.zeros((int(a.max()) + 1, int(b.max()) + 1))
    np.add.at(table, (a, b), 1)
    joint = table / table.sum()
    outer = joint.sum(1, keepdims=True) * joint.sum(0, keepdims=True)
    nz = joint > 0
    return float((joint[nz] * np.log(joint[nz] / outer[nz])).sum())


def entropy(a: np.ndarray) -> float:
    """Entropy in nats of an integer label array."""
    p = np.bincount(a) / len(a)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def routing_divergence(weights: np.ndarray, codes: np.ndarray) -> float:
    """Mean Jensen–Shannon divergence (nats, at most log 2) between the mean routing weights of
    every pair of domains: 0 when all domains route alike, log 2 when no two share an expert.

    Args:
        weights: (S, E) routing weights of S segments.
        codes: (S,) integer domain of every segment; domains without segments are skipped.
    """
    means = [weights[codes == c].astype(np.float64).mean(0) for c in np.unique(codes)]
    means = [m / m.sum() for m in means]
    pairs = [js_divergence(a, b) for i, a in enumerate(means) for b in means[i + 1 :]]
    return float(np.mean(pairs)) if pairs else 0.0


def js_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen–Shannon divergence (nats) of two distributions; rounding below 0 counts as 0
    (scipy's `jensenshannon` takes the square root and turns it into NaN)."""
    m = (p + q) / 2
    return max(0.0, float(rel_entr(p, m).sum() + rel_entr(q, m).sum()) / 2)


def layer_group(layer: int, n_layers: int) -> str:
    """"lower", "middle" or "upper" third of the decoder."""
    return GROUPS[min(2, 3 * layer // n_layers)]


def analyze_routing(collected: RoutingCollection, n_shuffles: int = 20, seed: int = 0,
                    min_share: float = 0.01) -> dict:
    """Expert use and domain specialisation of every MoE layer.

    Definitions (E experts, S segments, w (S, E) routing weights):

    - an expert is *active* in a segment when its weight exceeds 2/E (the paper's "used");
      `active_share[e]`: share of segments in which expert e is active;
    - `expert_use`: share of experts active in at least `min_share` of the segments
      (default 1%: an expert that only ever wins a stray segment does not count);
    - `mean_active_experts`: experts active per segment, averaged over segments;
    - `domain_weights[d]`: mean routing weight vector of the segments of domain d;
    - `specialisation`: mutual information (nats) between domain and top-1 expert
      (argmax of w), the same with domain labels shuffled (mean and std over `n_shuffles`
      permutations: the plug-in estimate's bias from finite counts), `mi_excess` = mi - the
      shuffled mean, and `nmi` = 2·mi / (H(domain) + H(top-1)) in [0, 1];
    - `divergence`: `routing_divergence` of the whole weight vectors (not only the top-1,
      so it sees domains that shift weight without changing the winner), `js_shuffled` the
      same with shuffled labels (mean over the permutations), `js_excess` the difference.

    Args:
        collected: from `collect_routing`.
        n_shuffles: label permutations of the baseline.
        seed: seed of the permutations.
        min_share: see `expert_use`.

    Returns:
        {"unit": "nats", "threshold", "min_share", "n_segments", "domains": {name: segments},
        "layers": [per layer dict], "summary": per lower/middle/upper third means and the
        middle-minus-others difference of `mi_excess`}.
    """
    if n_shuffles < 0 or not 0 <= min_share <= 1:
        raise LoryTrainError(f"n_shuffles must be >= 0 and min_share in [0, 1], got {n_shuffles} and {min_share}")
    names, codes = np.unique(collected.domains.astype(str), return_inverse=True)
    n_experts = collected.n_experts
    threshold = 2 / n_experts
    rng = np.random.default_rng(seed)
    shuffles = [rng.permutation(codes) for _ in range(n_shuffles)]
    layers = []
    for layer, w in zip(collected.layers, collected.weights, strict=True):
        active = w > threshold
        share = active.mean(0)
        top1 = w.argmax(1)
        mi = mutual_information(codes, top1)
        base = np.array([mutual_information(s, top1) for s in shuffles]) if shuffles else np.zeros(1)
        h_dom, h_top = entropy(codes), entropy(top1)
        js = routing_divergence(w, codes)
        js_base = float(np.mean([routing_divergence(w, s) for s in shuffles])) if shuffles else 0.0
        layers.append({
            "layer": layer,
            "group": layer_group(layer, collected.n_layers),
            "expert_use": float((share >= min_share).mean()),
            "active_share": share.tolist(),
            "mean_active_experts": float(active.sum(1).mean()),
            "top1_share": (np.bincount(top1, minlength=n_experts) / len(top1)).tolist(),
            "domain_weights": {str(n): w[codes == i].mean(0).tolist() for i, n in enumerate(names)},
            "specialisation": {
                "mi": mi,
                "mi_shuffled": float(base.mean()),
                "mi_shuffled_std": float(base.std()),
                "mi_excess": mi - float(base.mean()),
                "nmi": 2 * mi / (h_dom + h_top) if h_dom + h_top > 0 else 0.0,
                "entropy_domain": h_dom,
                "entropy_top1": h_top,
            },
            "divergence": {"js": js, "js_shuffled": js_base, "js_excess": js - js_base},
        })
    return {
        "unit": "nats",
        "ffn": collected.ffn,
        "n_experts": n_experts,
        "segment_len": collected.segment_len,
        "threshold": threshold,
        "min_share": min_share,
        "n_shuffles": n_shuffles,
        "n_segments": len(codes),
        "domains": {str(n): int(c) for n, c in zip(names, np.bincount(codes), strict=True)},
        "layers": layers,
        "summary": _summary(layers),
    }


def _summary(layers: list[dict]) -> dict:
    groups = {}
    for group in GROUPS:
        members = [entry for entry in layers if entry["group"] == group]
        if members:
            groups[group] = {
                "layers": [entry["layer"] for entry in members],
                **{key: float(np.mean([entry["specialisation"][key] for entry in members]))
                   for key in ("mi", "mi_excess", "nmi")},
                "expert_use": float(np.mean([entry["expert_use"] for entry in members])),
                "js_excess": float(np.mean([entry["divergence"]["js_excess"] for entry in members])),
            }
    others = [entry["specialisation"]["mi_excess"] for entry in layers if entry["group"] != "middle"]
    best = max(layers, key=lambda entry: entry["specialisation"]["mi_excess"])
    return {
        "groups": groups,
        "middle_minus_others_mi_excess": (groups["middle"]["mi_excess"] - float(np.mean(others))
                                          if "middle" in groups and others else None),
        "most_specialised_layer": best["layer"],
        "mean_expert_use": float(np.mean([entry["expert_use"] for entry in layers])),
        "mean_js_excess": float(np.mean([entry["divergence"]["js_excess"] for entry in layers])),
    }


def plot_heatmaps(result: dict, out_dir: str | Path, layers_per_figure: int = 4) -> list[Path]:
    """Domains × experts heatmaps of the mean routing weights, up to `layers_per_figure` per PNG.

    Returns:
        The PNG files written (`routing_layers_<first>-<last>.png`).
    """
    # the object-oriented API with the Agg canvas: no pyplot global state, no display needed
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    entries, unit, paths = result["layers"], result.get("unit", "nats"), []
    for start in range(0, len(entries), layers_per_figure):
        chunk = entries[start : start + layers_per_figure]
        names = list(chunk[0]["domain_weights"])
        n_experts = len(chunk[0]["active_share"])
        fig = Figure(figsize=(1.2 + len(chunk) * (1.5 + 0.35 * n_experts), 1.6 + 0.35 * len(names)),
                     layout="constrained")
        FigureCanvasAgg(fig)
        axes = fig.subplots(1, len(chunk), squeeze=False)[0]
        for ax, entry in zip(axes, chunk, strict=True):
            matrix = np.array([entry["domain_weights"][n] for n in names])
            image = ax.imshow(matrix, aspect="auto", cmap="viridis", vmin=0, vmax=max(float(matrix.max()), 1e-9))
            spec = entry["specialisation"]
            ax.set_title(f"layer {entry['layer']}\nMI {spec['mi']:.3f} vs {spec['mi_shuffled']:.3f} {unit}",
                         fontsize=9)
            ax.set_xticks(range(n_experts))
            ax.set_xlabel("expert")
            ax.set_yticks(range(len(names)), names if ax is axes[0] else [""] * len(names))
            fig.colorbar(image, ax=ax, shrink=0.8)
        fig.suptitle("mean routing weight per domain", fontsize=10)
        path = out_dir / f"routing_layers_{chunk[0]['layer']:02d}-{chunk[-1]['layer']:02d}.png"
        fig.savefig(path, dpi=100)
        paths.append(path)
    return paths


# (metrics.jsonl key, panel title, reference line) of `plot_training_diagnostics`
DIAGNOSTIC_PANELS = (
    ("expert_spread", "expert spread: RMS distance from the mean expert / its norm", None),
    ("expert_cosine", "mean pairwise cosine of the experts' weights", 1.0),
    ("routing_entropy", "routing entropy per segment (nats; dashed: log E)", "log_experts"),
    ("top1_off_mode", "share of segments off the batch's top expert", None),
    ("router_grad_norm", "router gradient norm", None),
)
# Per-batch numbers (one micro-batch each) are drawn as trailing moving averages.
SMOOTHED = ("routing_entropy", "routing_entropy_std", "top1_off_mode", "router_grad_norm", "loss")


def smooth(values: np.ndarray, parts: int = 40) -> np.ndarray:
    """Trailing moving average along axis 0 over len/parts points (at least 1)."""
    window = max(1, len(values) // parts)
    cumulative = np.cumsum(np.concatenate([np.zeros((1, *values.shape[1:])), values]), axis=0)
    lo = np.maximum(np.arange(1, len(values) + 1) - window, 0)
    counts = (np.arange(1, len(values) + 1) - lo).reshape(-1, *[1] * (values.ndim - 1))
    return (cumulative[1:] - cumulative[lo]) / counts


def plot_training_diagnostics(records: list[dict], path: str | Path, title: str = "") -> Path | None:
    """Curves of the training-time MoE diagnostics over training tokens, one line per layer,
    plus the training loss; routing entropy with its ±1 std band across segments. Numbers of
    one micro-batch each (entropy, off-top share, router gradient, loss) are `smooth`ed.

    Args:
        records: metrics.jsonl records (`read_metrics`); those without "diagnostics" are skipped.
        path: the PNG to write.
        title: figure title.

    Returns:
        `path`, or None when no record holds diagnostics (a dense run or an older log).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    found = [r for r in records if r.get("diagnostics")]
    if not found:
        return None
    losses = [r for r in records if "loss" in r]
    tokens = np.array([r["tokens"] for r in found], dtype=float)
    fig = Figure(figsize=(13, 7), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 3).flatten()
    n_layers = len(found[-1]["diagnostics"]["expert_cosine"])
    for ax, (key, label, reference) in zip(axes, DIAGNOSTIC_PANELS, strict=False):
        rows = [r["diagnostics"].get(key) for r in found]
        keep = [i for i, row in enumerate(rows) if row is not None and len(row) == n_layers]
        values = np.array([rows[i] for i in keep], dtype=float).reshape(len(keep), n_layers)
        if key in SMOOTHED:
            values = smooth(values)
            label += ", smoothed"
        for layer in range(n_layers):
            line, = ax.plot(tokens[keep], values[:, layer], label=f"MoE layer {layer}", lw=1.2)
            if key == "routing_entropy":
                std = smooth(np.array([found[i]["diagnostics"]["routing_entropy_std"][layer] for i in keep]))
                ax.fill_between(tokens[keep], values[:, layer] - std, values[:, layer] + std,
                                color=line.get_color(), alpha=0.15)
        if reference == "log_experts":
            ax.axhline(found[-1]["diagnostics"]["log_experts"], color="black", ls="--", lw=0.8)
        elif reference is not None:
            ax.axhline(reference, color="black", ls="--", lw=0.8)
        if key == "router_grad_norm" and (values > 0).any():
            ax.set_yscale("log")
        else:
            ax.ticklabel_format(axis="y", useOffset=False)  # cosines like 0.9999 stay readable
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("training tokens")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    ax = axes[len(DIAGNOSTIC_PANELS)]
    ax.plot([r["tokens"] for r in losses], smooth(np.array([r["loss"] for r in losses], dtype=float)),
            color="gray", lw=0.8)
    ax.set_title("training loss, smoothed", fontsize=9)
    ax.set_xlabel("training tokens")
    ax.grid(alpha=0.3)
    fig.suptitle(title or "MoE training diagnostics", fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def _json_safe(value):
    """Plain JSON types; NaN and infinities become null."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple | np.ndarray):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def write_analysis(result: dict, out_dir: str | Path) -> Path:
    """Write `analysis.json` (every number of `result`) into out_dir; returns its path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / ANALYSIS_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(_json_safe(result), indent=2, allow_nan=False))
    tmp.replace(path)
    return path


def run_analysis(run_dir: str | Path, data: str | Path, out_dir: str | Path, *, checkpoint: str | Path | None = None,
                 batch_size: int = 8, max_batches: int = 0, device: str | torch.device = "cpu",
                 dtype: torch.dtype | None = None, n_shuffles: int = 20, seed: int = 0,
                 min_share: float = 0.01) -> dict:
    """Load a run, collect its routing on `data`, analyse it, plot and write the results.

    The checks (dense model, tokenizer) read only the checkpoint's state.json and the
    manifest, so a mismatch is refused before any weights are loaded.

    Args:
        run_dir: a `lory train --out` folder.
        data: shard folder (typically held-out data with domains).
        out_dir: where analysis.json, the heatmap PNGs and (when the run logged diagnostics)
            training_diagnostics.png go.
        checkpoint: a specific checkpoint (default: the latest).
        batch_size, max_batches, device: see `collect_routing`.
        dtype: cast the weights (e.g. torch.bfloat16 on GPU).
        n_shuffles, seed, min_share: see `analyze_routing`.

    Returns:
        The `analyze_routing` dict plus "run", "checkpoint", "step", "data" and "files".

    Raises:
        LoryTrainError: a dense model, or shards made with another tokenizer than the run's.
    """
    path = find_checkpoint(run_dir, checkpoint)
    state = json.loads((path / "state.json").read_text())
    _require_moe(ModelConfig.from_dict(state["model_config"]))
    manifest = Manifest.read(data)
    have, want = manifest.tokenizer.get("sha256"), state.get("tokenizer", {}).get("sha256")
    if want and have != want:
        raise LoryTrainError(f"{data} was tokenized with another tokenizer (sha256 {str(have)[:12]}…) than the "
                             f"run {run_dir} (sha256 {want[:12]}…)")
    run = load_run(run_dir, path, device=device, dtype=dtype)
    if manifest.tokenizer.get("vocab_size", 0) > run.model.config.vocab_size:
        raise LoryTrainError(f"{data} has a vocabulary of {manifest.tokenizer['vocab_size']} tokens, larger than "
                             f"the model's {run.model.config.vocab_size}")
    collected = collect_routing(run.model, data, batch_size, max_batches, device)
    result = analyze_routing(collected, n_shuffles, seed, min_share)
    result.update(run=str(run_dir), checkpoint=str(path), step=state.get("step"), data=str(data))
    files = plot_heatmaps(result, out_dir)
    curves = plot_training_diagnostics(read_metrics(run_dir), Path(out_dir) / "training_diagnostics.png",
                                       title=f"{Path(run_dir).name}: MoE diagnostics during training")
    if curves is not None:
        files.append(curves)
    result["files"] = [str(p) for p in [*files, Path(out_dir) / ANALYSIS_FILE]]
    write_analysis(result, out_dir)
    return result
