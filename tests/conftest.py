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


class S3Server:
    """A real S3 API on 127.0.0.1 (moto's server mode) with one bucket, reached through the
    standard AWS environment variables, as the code under test would reach AWS or MinIO."""

    def __init__(self, endpoint: str, bucket: str):
        import boto3

        self.endpoint, self.bucket = endpoint, bucket
        self.client = boto3.client("s3", endpoint_url=endpoint)

    def url(self, key: str = "") -> str:
        return f"s3://{self.bucket}/{key}".rstrip("/")

    def keys(self, prefix: str = "") -> list[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return sorted(item["Key"] for page in pages for item in page.get("Contents", []))

    def upload(self, path: Path, key: str) -> str:
        self.client.upload_file(str(path), self.bucket, key)
        return self.url(key)


@pytest.fixture(scope="module")
def s3():
    """`S3Server` on a free port for the module; the AWS variables point at it meanwhile."""
    import logging
    import uuid

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                            "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ENDPOINT_URL=f"http://{host}:{port}", AWS_ACCESS_KEY_ID="testing",
                      AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    try:
        found = S3Server(f"http://{host}:{port}", f"lory-{uuid.uuid4().hex[:8]}")
        found.client.create_bucket(Bucket=found.bucket)
        yield found
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
