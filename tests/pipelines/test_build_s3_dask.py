"""Workers that share no disk: `lory build-corpus --runner dask` with inputs and `--out` on S3
(moto's server), on a cluster whose workers each run in a private working and temp folder and
know nothing of S3 but what the build hands them. The shards equal a local default-runner
build byte for byte, and nothing of the build is on any local disk afterwards."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines.build_corpus import build_corpus
from pipelines.options import BuildOptions
from tests.pipelines.test_build_s3 import COMMON, cut, local_hashes, quiet, s3_hashes  # noqa: F401 (fixture)

LORY_FILES = (".parquet", ".arrow", ".npy", ".npz", "_DONE.json", "_STARTED.json", ".manifest.json", ".jsonl")


@pytest.fixture(scope="module")
def private_cluster(tmp_path_factory):
    """A scheduler and two single-thread workers started the way a cluster starts them
    (`dask scheduler`, `dask worker`), each worker in its own folder with its own TMPDIR and
    without any AWS variable. Yields (address, [worker folders])."""
    root = tmp_path_factory.mktemp("cluster")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    scheduler_file = root / "scheduler.json"
    procs = [subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--port", "0",
                               "--dashboard-address", ":0", "--scheduler-file", str(scheduler_file)],
                              cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    folders = []
    try:
        deadline = time.monotonic() + 60
        while not scheduler_file.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        for i in range(2):
            folder = root / f"worker{i}"
            (folder / "tmp").mkdir(parents=True)
            folders.append(folder)
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "distributed.cli.dask_worker", "--scheduler-file", str(scheduler_file),
                 "--nthreads", "1", "--local-directory", str(folder / "dask"), "--no-dashboard"],
                cwd=folder, env={**env, "TMPDIR": str(folder / "tmp"), "PYTHONPATH": str(Path.cwd())},
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        address = json.loads(scheduler_file.read_text())["address"]
        import distributed

        with distributed.Client(address, timeout="30s") as client:
            client.wait_for_workers(2, timeout=120)
        yield address, folders
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=30)


def lory_files(folder: Path) -> list[str]:
    return sorted(str(p) for p in folder.rglob("*") if p.is_file() and p.name.endswith(LORY_FILES))


@pytest.mark.slow
@pytest.mark.parametrize("order", ["random", "similarity"])
def test_s3_build_on_workers_that_share_no_disk(order, s3, cut, private_cluster, tmp_path, monkeypatch):  # noqa: F811
    address, folders = private_cluster
    build_corpus(BuildOptions(inputs=[str(cut)], out=str(tmp_path / "local"), order=order, **COMMON), log=quiet)
    source = s3.upload(cut, f"{order}-inputs/cut.jsonl")
    prefix = f"{order}-dask/corpus"
    workdir = tmp_path / "driver"
    workdir.mkdir()
    monkeypatch.chdir(workdir)  # a relative local write of the driver would land here
    summary = build_corpus(BuildOptions(inputs=[source.rsplit("/", 1)[0]], out=s3.url(prefix), order=order,
                                        runner="dask", beam_args=[f"--dask_client_address={address}"], **COMMON),
                           log=quiet)
    assert summary.documents["input_files"] == 1
    assert s3_hashes(s3, prefix) == local_hashes(tmp_path / "local")
    for folder in [*folders, workdir]:
        assert lory_files(folder) == [], f"build files on a local disk: {lory_files(folder)[:3]}"
