"""`benchmarks/gpu_check.py` without a GPU: the one-line answer, step timeouts that still
leave parsed partial results, and the summaries it writes."""

import json
import subprocess
import sys

import pytest
import torch

from tests.lorytrain.test_training import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import gpu_check  # benchmarks/ is a folder of scripts, not a package


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer of a machine without CUDA")
def test_without_cuda_it_says_so_in_one_line_and_exits_0(tmp_path):
    result = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--out", str(tmp_path / "out")], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    assert result.stdout.splitlines() == ["gpu_check: no CUDA device visible (torch sees none): nothing to check on "
                                          "this machine"]
    assert not (tmp_path / "out").exists()


def test_a_hanging_step_is_killed_at_its_timeout_and_its_output_so_far_kept(tmp_path):
    hang = ("import subprocess, sys, time; print('CUDA, 0.3b'); print('  dense        12,345 tokens/s, MFU 41.5%', "
            "flush=True); subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)")
    step = gpu_check.Step("bench-train", [sys.executable, "-c", hang], timeout_s=3)
    gpu_check.run_step(step, tmp_path / "bench-train.log", seconds_left=100, min_seconds=1)
    assert step.status == "timeout" and step.seconds < 30
    assert step.results == {"cuda": {"dense": {"tokens_per_s": 12345, "mfu_pct": 41.5}}}
    late = gpu_check.Step("embed", [sys.executable, "-c", "print(1)"], timeout_s=40)
    gpu_check.run_step(late, tmp_path / "embed.log", seconds_left=5)  # not enough budget left
    assert late.status == "skipped"
    header = {"device": "test", "torch": torch.__version__, "cuda": None, "started": "now", "budget_s": 470}
    gpu_check.write_summaries(tmp_path, header, [step, late])
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [s["status"] for s in report["steps"]] == ["timeout", "skipped"]
    markdown = (tmp_path / "gpu_check.md").read_text()
    assert "| bench-train | timeout |" in markdown and "| dense | 12,345 | 41.5 |" in markdown


def test_step_outputs_are_parsed():
    pytest_output = ("tests/lorytrain/test_gpu_training.py::test_a PASSED [ 50%]\n"
                     "tests/lorytrain/test_gpu_training.py::test_b[segment] FAILED [100%]\n"
                     "===== 1 failed, 1 passed in 3.2s =====\n")
    parsed = gpu_check.parse_pytest(pytest_output)
    assert parsed["counts"] == {"PASSED": 1, "FAILED": 1} and parsed["summary"] == "1 failed, 1 passed in 3.2s"
    train_output = ("CPU, tiny\n  dense         1,000 tokens/s\n  lory-8E         900 tokens/s\n"
                    "  lory-8E / dense throughput: 0.900\nGPU: H200\nCUDA, 0.3b preset\n"
                    "  dense       250,000 tokens/s, MFU 45.0%\n  lory-8E     200,000 tokens/s, MFU 36.0%\n"
                    "  lory-8E / dense throughput: 0.800\n")
    assert gpu_check.parse_bench_train(train_output) == {
        "cuda": {"dense": {"tokens_per_s": 250000, "mfu_pct": 45.0}, "lory-8E": {"tokens_per_s": 200000, "mfu_pct": 36.0}},
        "lory_over_dense": 0.8}
    assert gpu_check.parse_embed('noise\nEMBED {"docs_per_s": 5000.0}\n') == {"docs_per_s": 5000.0}
    assert gpu_check.parse_bench_moe("warming\ndevice NVIDIA H200, bf16\n\nmodel: x\n")["table"] == [
        "device NVIDIA H200, bf16", "model: x"]
