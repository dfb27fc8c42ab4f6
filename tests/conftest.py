"""Shared test setup: no network, small thread pools, paths of the bundled assets."""

import os

# Set before anything imports huggingface_hub or tokenizers.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Test tensors are tiny: one thread each avoids oversubscribing small machines (and the
# torchrun tests start several processes).
os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path

import pytest

ASSETS = Path(__file__).resolve().parents[1] / "lorydata" / "assets"


@pytest.fixture(scope="session")
def sample_corpus() -> Path:
    """The bundled 500-document, 5-domain sample corpus (jsonl.zst)."""
    return ASSETS / "sample" / "sample.jsonl.zst"


@pytest.fixture(scope="session")
def default_tokenizer_path() -> Path:
    return ASSETS / "tokenizer" / "tokenizer.json"


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need CUDA: skipped (with the reason) where torch sees none.

    `benchmarks/gpu_check.py` runs them on a GPU machine with `-m gpu`.
    """
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs CUDA (run benchmarks/gpu_check.py on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
