"""Every CUDA check of the project in one command, for the few minutes a GPU is lent.

    python benchmarks/gpu_check.py --out DIR

Runs, each step in its own process with its own timeout (so one hang cannot eat the budget),
within 8 minutes on one H100/H200 and without network:

1. `pytest -m gpu` (170 s): every test marked `@pytest.mark.gpu` (bf16 autocast of the Lory
   layer vs fp32, merged SwiGLU on CUDA, faiss-gpu recall, fp16 embeddings, cached generation,
   FSDP2 on NCCL with sharded checkpoints, `--compile` vs eager, ...);
2. `bench_moe.py --device cuda` (100 s): the Lory layer and model at the 0.3B width, E = 8/16/32,
   T = 256, time and activation memory against dense;
3. `bench_train.py` (160 s): the real trainer on the 0.3b preset in bf16, tokens/s and MFU of
   dense and lory-8E;
4. embedding throughput (40 s): docs/s of the default embedder in fp16 on the GPU.

After every step DIR/gpu_check.json and DIR/gpu_check.md are rewritten, so a step that times
out (or the whole script being killed) still leaves the results so far; each step's full
output is in DIR/<step>.log. Without CUDA the script says so in one line and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUDGET_S = 470  # under 8 minutes with the script's own start-up
EMBED_DOCS = 2000


@dataclass
class Step:
    """One check: a command, its timeout, what came of it."""

    name: str
    command: list[str]
    timeout_s: int
    status: str = "not run"  # ok | failed | timeout | skipped (no time left)
    seconds: float = 0.0
    returncode: int | None = None
    results: dict = field(default_factory=dict)


def steps() -> list[Step]:
    python = sys.executable
    return [
        Step("pytest-gpu", [python, "-m", "pytest", "-m", "gpu", "-v", "-rs", "-p", "no:cacheprovider", "tests"], 170),
        Step("bench-moe", [python, "benchmarks/bench_moe.py", "--device", "cuda", "--experts", "8", "16", "32",
                           "--segment-len", "256"], 100),
        Step("bench-train", [python, "benchmarks/bench_train.py", "--steps", "10", "--cuda-steps", "20"], 160),
        Step("embed", [python, str(Path(__file__).resolve()), "--embed-throughput"], 40),
    ]


def run_step(step: Step, log: Path, seconds_left: float, min_seconds: float = 15) -> None:
    """Run `step` with its timeout (cut to what is left of the budget; skipped under
    `min_seconds`); the whole process group is killed on timeout, so children (torchrun,
    dataloader workers) go too, and what the step printed until then is still parsed."""
    timeout = min(step.timeout_s, seconds_left)
    if timeout < min_seconds:
        step.status = "skipped"
        return
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "LORY_PROGRESS": "0"}
    started = time.monotonic()
    with open(log, "w", encoding="utf-8") as out:
        process = subprocess.Popen(step.command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env,
                                   start_new_session=True)
        try:
            step.returncode = process.wait(timeout=timeout)
            step.status = "ok" if step.returncode == 0 else "failed"
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            step.status = "timeout"
    step.seconds = round(time.monotonic() - started, 1)
    step.results = PARSERS[step.name](log.read_text(encoding="utf-8", errors="replace"))


# ---- reading each step's output ----------------------------------------------------------
def parse_pytest(text: str) -> dict:
    tests = dict(re.findall(r"^(tests/\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)", text, re.M))
    counts: dict[str, int] = {}
    for outcome in tests.values():
        counts[outcome] = counts.get(outcome, 0) + 1
    summary = re.findall(r"^=+ (.*(?:passed|failed|skipped|error).*) =+$", text, re.M)
    return {"tests": tests, "counts": counts, "summary": summary[-1] if summary else ""}


def parse_bench_moe(text: str) -> dict:
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("device")), 0)
    return {"table": [line for line in lines[start:] if line.strip() and "Warning" not in line]}


def parse_bench_train(text: str) -> dict:
    cuda = text[text.find("CUDA"):] if "CUDA" in text else ""
    runs = {}
    for name, tokens, mfu in re.findall(r"^\s+(dense|lory-8E)\s+([\d,]+) tokens/s(?:, MFU ([\d.]+)%)?", cuda, re.M):
        runs[name] = {"tokens_per_s": int(tokens.replace(",", "")), **({"mfu_pct": float(mfu)} if mfu else {})}
    ratio = re.search(r"lory-8E / dense throughput: ([\d.]+)", cuda)
    return {"cuda": runs, **({"lory_over_dense": float(ratio.group(1))} if ratio else {})}


def parse_embed(text: str) -> dict:
    found = re.findall(r"^EMBED (\{.*\})$", text, re.M)
    return json.loads(found[-1]) if found else {}


PARSERS = {"pytest-gpu": parse_pytest, "bench-moe": parse_bench_moe, "bench-train": parse_bench_train,
           "embed": parse_embed}


def embed_throughput() -> None:
    """docs/s of the default embedder (fp16 on CUDA) on the bundled sample corpus, after a
    warm-up batch; prints one `EMBED {json}` line."""
    import torch

    from lorydata.documents import Document
    from lorydata.embed import Embedder, EmbedderConfig
    from lorydata.readers import ReaderConfig, read_file

    sample = REPO / "lorydata" / "assets" / "sample" / "sample.jsonl.zst"
    texts = [d.text for d in read_file(str(sample), ReaderConfig()) if isinstance(d, Document)]
    texts = (texts * (EMBED_DOCS // len(texts) + 1))[:EMBED_DOCS]
    embedder = Embedder(EmbedderConfig(device="cuda", batch_size=128))
    embedder.encode(texts[:256])
    torch.cuda.synchronize()
    started = time.perf_counter()
    embedder.encode(texts)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    print("EMBED " + json.dumps({"model": embedder.name, "precision": embedder.precision, "docs": len(texts),
                                 "window_tokens": embedder.window, "docs_per_s": round(len(texts) / seconds, 1)}))


# ---- summaries ---------------------------------------------------------------------------
def write_summaries(out: Path, header: dict, done: list[Step]) -> None:
    report = {**header, "steps": [asdict(s) for s in done]}
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    lines = [f"# GPU check: {header['device']}", "",
             f"torch {header['torch']}, CUDA {header['cuda']}, started {header['started']}, budget {BUDGET_S} s", "",
             "| step | status | seconds | timeout s |", "|---|---|---|---|"]
    lines += [f"| {s.name} | {s.status} | {s.seconds} | {s.timeout_s} |" for s in done]
    for step in done:
        lines += ["", f"## {step.name}", "", f"`{' '.join(['python', *step.command[1:]])}`", ""]
        lines += _markdown_results(step)
    (out / "gpu_check.md").write_text("\n".join(lines) + "\n")


def _markdown_results(step: Step) -> list[str]:
    results = step.results
    if step.name == "pytest-gpu":
        rows = ["| test | outcome |", "|---|---|"] + [f"| {t} | {o} |" for t, o in results.get("tests", {}).items()]
        return [results.get("summary", ""), "", *rows]
    if step.name == "bench-moe":
        return ["```", *results.get("table", []), "```"]
    if step.name == "bench-train":
        rows = ["| model | tokens/s | MFU % |", "|---|---|---|"]
        rows += [f"| {n} | {r['tokens_per_s']:,} | {r.get('mfu_pct', '')} |" for n, r in results.get("cuda", {}).items()]
        return [*rows, "", f"lory-8E / dense throughput: {results.get('lory_over_dense', 'n/a')}"]
    if step.name == "embed" and results:
        return [f"{results['docs_per_s']} docs/s ({results['model']}, {results['precision']}, {results['docs']} docs, "
                f"window {results['window_tokens']} tokens)"]
    return []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="folder for gpu_check.json, gpu_check.md and the step logs")
    parser.add_argument("--embed-throughput", action="store_true", help=argparse.SUPPRESS)  # step 4, in its process
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible (torch sees none): nothing to check on this machine")
        return
    if args.embed_throughput:
        embed_throughput()
        return
    if not args.out:
        parser.error("--out DIR is required")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    header = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
              "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "budget_s": BUDGET_S}
    deadline = time.monotonic() + BUDGET_S
    done: list[Step] = []
    for step in steps():
        print(f"gpu_check: {step.name} (timeout {step.timeout_s} s) ...", flush=True)
        run_step(step, out / f"{step.name}.log", deadline - time.monotonic())
        done.append(step)
        write_summaries(out, header, done)
        print(f"gpu_check: {step.name} {step.status} in {step.seconds} s", flush=True)
    print(f"gpu_check: wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'}")
    if any(s.status != "ok" for s in done):
        sys.exit(1)


if __name__ == "__main__":
    main()
