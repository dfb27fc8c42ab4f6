"""Speed and activation memory of the Lory MoE layer against the dense model of the same active size.

Measured side by side in one run: a decoder with `ffn="dense"` and the same decoder with
`ffn="lory"` at E = 8, 16, 32 experts (T = 256), forward + backward of a cross-entropy loss.
The models run round-robin and the median per model is reported, so load from other
processes hits all of them alike. Two levels:

- model: the whole decoder (what training pays);
- layer: one FFN layer alone, dense SwiGLU vs Lory (routing, merge, merged FFN), which isolates
  the merge overhead; its theoretical value is E/T of the FFN (4/3 · E/T with the recomputed
  merge in backward).

Activation memory is the bytes of tensors autograd saves for backward during one forward
pass, summed over distinct storages and excluding parameters: a `saved_tensors_hooks` pack
hook sees every tensor saved by built-in ops and by our autograd functions. It is exactly the
memory that backward keeps alive, independent of the allocator, so it works on CPU. On CUDA
the run also reports memory held after forward and the forward peak over the memory before
forward (`torch.cuda.max_memory_allocated`), which include the transient merged weights.

Goal (issue 5): model overhead ≤ E/T + 5%, activation memory ≤ 1.2× dense.

    python benchmarks/bench_moe.py                 # CPU, small sizes, single thread, a few minutes
    python benchmarks/bench_moe.py --device cuda   # bf16 autocast, 0.3B width (d 1024, f 2816, L 4096)
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from lorytrain.model import ModelConfig, build_model
from lorytrain.model.dense import DenseFFN
from lorytrain.model.lory import LoryMoE
from lorytrain.model.routing import FFNContext

SIZES = {
    # CPU: matmuls, not Python, dominate; 16 segments of 256 per batch; the bundled tokenizer's
    # vocabulary, so the output layer has the share of the work it has in a real small model
    "cpu": dict(d_model=512, n_heads=8, ffn_dim=1376, n_layers=4, vocab_size=8192, seq_len=1024, batch=4),
    # GPU: the paper's 0.3B width and sequence length, fewer layers (width sets the ratios)
    "cuda": dict(d_model=1024, n_heads=16, ffn_dim=2816, n_layers=4, vocab_size=32000, seq_len=4096, batch=4),
}


class SavedTensorMeter:
    """Bytes of distinct non-parameter storages saved for backward inside the context."""

    def __init__(self, params):
        self.params = {p.untyped_storage().data_ptr() for p in params}
        self.storages: dict[int, int] = {}

    def _pack(self, tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self.params:
            self.storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)

    @property
    def bytes(self) -> int:
        return sum(self.storages.values())


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def model_step(model, ids, autocast):
    with autocast:
        logits = model(ids)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
    loss.backward()


def layer_step(layer, x, ctx, autocast):
    with autocast:
        y = layer(x, ctx)
    y.float().square().mean().backward()


def timed(step, device):
    """Wall-clock seconds on CUDA; on CPU the process's CPU time, which other processes on a
    shared machine do not inflate (the CPU run is single-threaded by default for that reason)."""
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    sync(device)
    start = clock()
    step()
    sync(device)
    return clock() - start


def activation_bytes(module, step) -> int:
    with SavedTensorMeter(module.parameters()) as meter:
        # backward inside the hooks is harmless: pack only fires in forward
        step()
    return meter.bytes


def cuda_memory(module, forward, device) -> tuple[int, int]:
    """(held after forward, forward peak) over the memory allocated before forward."""
    module.zero_grad(set_to_none=True)
    torch.cuda.empty_cache()
    sync(device)
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = forward()
    sync(device)
    held, peak = torch.cuda.memory_allocated() - base, torch.cuda.max_memory_allocated() - base
    del out
    return held, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--segment-len", type=int, default=256)
    parser.add_argument("--iters", type=int, default=0, help="timed rounds (default 5 on CPU, 20 on CUDA)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default per device)")
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--merge-chunk", type=int, default=0, help="segments merged per step (0: all)")
    parser.add_argument("--merge-tile", type=int, default=0, help="inner units merged per step (0: auto)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (0: torch default)")
    parser.add_argument("--levels", nargs="+", default=["layer", "model"], choices=["layer", "model"])
    args = parser.parse_args()

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if args.threads and device.type == "cpu":
        torch.set_num_threads(args.threads)
    sizes = dict(SIZES[device.type])
    for key, value in (("n_layers", args.layers), ("seq_len", args.seq_len), ("batch", args.batch)):
        if value:
            sizes[key] = value
    seq_len, batch = sizes.pop("seq_len"), sizes.pop("batch")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    iters = args.iters or (20 if device.type == "cuda" else 5)
    T = args.segment_len

    torch.manual_seed(0)
    base = ModelConfig(**sizes, segment_len=T, merge_chunk=args.merge_chunk, merge_tile=args.merge_tile)
    names = ["dense"] + [f"lory{e}" for e in args.experts]
    configs = {"dense": base} | {f"lory{e}": ModelConfig(**{**base.to_dict(), "ffn": "lory", "n_experts": e})
                                 for e in args.experts}
    ids = torch.randint(0, base.vocab_size, (batch, seq_len), device=device)
    x = torch.randn(batch, seq_len, base.d_model, device=device, requires_grad=True)
    ctx = FFNContext("segment", None, torch.arange(seq_len, device=device).unsqueeze(0))
    print(f"device cpu ({torch.get_num_threads()} threads), time = process CPU time" if device.type == "cpu" else
          f"device {torch.cuda.get_device_name()}, bf16 autocast, time = wall clock")
    print(f"d {base.d_model}, f {base.ffn_dim}, {base.n_layers} layers, {base.n_heads} heads, vocab {base.vocab_size}, "
          f"batch {batch} x {seq_len} tokens, T {T}; {iters} timed rounds after {args.warmup} warm-up")

    results = {}
    for level in args.levels:
        modules = {}
        for name in names:
            cfg = configs[name]
            if level == "model":
                modules[name] = build_model(cfg).to(device)
            else:
                layer = DenseFFN(cfg.d_model, cfg.ffn_dim) if name == "dense" else LoryMoE(cfg)
                layer.init_weights(cfg.init_std, cfg.init_std)
                modules[name] = layer.to(device)

        def step_for(name, modules=modules, level=level):
            module = modules[name]
            if level == "model":
                return lambda: model_step(module, ids, autocast)
            return lambda: layer_step(module, x, ctx, autocast)

        times = {name: [] for name in names}
        for round_ in range(args.warmup + iters):
            for name in names:
                modules[name].zero_grad(set_to_none=True)
                x.grad = None
                elapsed = timed(step_for(name), device)
                if round_ >= args.warmup:
                    times[name].append(elapsed)
        for name in names:
            modules[name].zero_grad(set_to_none=True)
            entry = {"time": statistics.median(times[name]), "saved": activation_bytes(modules[name], step_for(name))}
            if device.type == "cuda":
                def forward(module=modules[name], level=level):
                    with autocast:
                        return module(ids) if level == "model" else module(x, ctx)
                entry["held"], entry["peak"] = cuda_memory(modules[name], forward, device)
            results[level, name] = entry
        del modules

    for level in args.levels:
        dense = results[level, "dense"]
        print(f"\n{level}: forward+backward and activation memory")
        header = f"  {'':8} {'ms':>9} {'overhead':>9} {'E/T':>6} {'goal':>6} {'saved MiB':>10} {'x dense':>8}"
        if device.type == "cuda":
            header += f" {'held MiB':>9} {'x':>6} {'fwd peak MiB':>13} {'x':>6}"
        print(header)
        for name in names:
            entry = results[level, name]
            experts = configs[name].n_experts if name != "dense" else 0
            overhead = entry["time"] / dense["time"] - 1
            goal = experts / T + 0.05
            row = (f"  {name:8} {1e3 * entry['time']:9.1f} {100 * overhead:8.1f}% {100 * experts / T:5.1f}% "
                   f"{100 * goal:5.1f}% {entry['saved'] / 2**20:10.1f} {entry['saved'] / dense['saved']:8.3f}")
            if device.type == "cuda":
                row += (f" {entry['held'] / 2**20:9.1f} {entry['held'] / dense['held']:6.3f}"
                        f" {entry['peak'] / 2**20:13.1f} {entry['peak'] / dense['peak']:6.3f}")
            if name != "dense" and level == "model":
                verdict = "ok" if overhead <= goal and entry["saved"] <= 1.2 * dense["saved"] else "MISSED"
                row += f"  {verdict}"
            print(row)
    print("\noverhead: time / dense time - 1 (median of rounds); goal: E/T + 5% (model level) and saved "
          "activations <= 1.2x dense")


if __name__ == "__main__":
    main()
