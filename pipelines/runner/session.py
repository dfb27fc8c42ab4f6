"""The Beam runner `lory build-corpus` runs on: a runner name, or Dask with the cluster it
connects to (`--dask-address`) or starts for the build (`--workers`)."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

from lorydata.errors import LoryDataError

# The in-process runner. Beam's "DirectRunner" first tries the Prism runner, which
# downloads a binary; FnApiRunner runs in this process (or local subprocesses with
# --direct_running_mode multi_processing) and never touches the network.
LOCAL_RUNNER = "FnApiRunner"
DASK = "dask"
DASK_NAMES = ("dask", "daskrunner")  # `--runner dask` and Beam's short name `DaskRunner`
CONNECT_TIMEOUT_S = 10


def is_dask(runner: str | None) -> bool:
    return runner is not None and runner.lower() in DASK_NAMES


def require_dask():
    """The optional `dask[distributed]` dependency and lory's runner on it, checked here
    only (the `dask` extra): returns `(dask.distributed, pipelines.runner.dask_runner)`."""
    try:
        import dask.distributed as ddist  # noqa: PLC0415 (optional dependency: the `dask` extra)

        from pipelines.runner import dask_runner  # noqa: PLC0415 (imports dask at its top)
    except ImportError:
        raise LoryDataError("--runner dask needs dask[distributed]: pip install 'lory[dask]'") from None
    return ddist, dask_runner


def make_runner(name: str):
    """The runner to hand to `beam.Pipeline`: `LoryDaskRunner` for `dask` / `DaskRunner`
    (Beam's `create_runner` knows neither), else the name, which Beam resolves."""
    if is_dask(name):
        return require_dask()[1].LoryDaskRunner()
    return name


def _check_scheduler(ddist, address: str) -> None:
    """Connect once, so a wrong address fails now with one line, not inside a stage."""
    try:
        client = ddist.Client(address, timeout=f"{CONNECT_TIMEOUT_S}s")
    except Exception as exc:  # OSError, TimeoutError, ValueError for a malformed address
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LoryDataError(f"cannot reach a Dask scheduler at {address!r}: {reason}") from None
    client.close()


@contextmanager
def runner_session(runner: str | None, dask_address: str | None = None,
                   workers: int | None = None) -> Iterator[tuple[str | None, list[str]]]:
    """Check the runner options, start a local Dask cluster if asked, and yield
    `(runner, extra Beam flags)` for the build's `BeamRunner`; the cluster is closed on exit.

    Args:
        runner: the `--runner` value (None: Beam's in-process runner).
        dask_address: `tcp://host:port` of a running Dask scheduler (`--runner dask` only).
        workers: worker processes of a local cluster started for this build (`--runner dask`
            only; default with neither: one per CPU core).

    Raises:
        LoryDataError: dask options without `--runner dask`, both of them, a bad worker
            count, dask not installed, or a scheduler that cannot be reached.
    """
    if not is_dask(runner):
        if workers is not None:
            raise LoryDataError("--workers needs --runner dask")
        if dask_address is not None:
            raise LoryDataError("--dask-address needs --runner dask")
        yield runner, []
        return
    if workers is not None and dask_address is not None:
        raise LoryDataError("give --dask-address (a running cluster) or --workers (a local one), not both")
    if workers is not None and workers < 1:
        raise LoryDataError(f"--workers must be positive, got {workers}")
    ddist, _ = require_dask()
    # The scheduler of a local cluster runs in this process: its INFO lines are not for users.
    logging.getLogger("distributed").setLevel(logging.WARNING)
    if dask_address is not None:
        _check_scheduler(ddist, dask_address)
        yield DASK, [f"--dask_client_address={dask_address}"]
        return
    cluster = ddist.LocalCluster(n_workers=workers or os.cpu_count() or 1, threads_per_worker=1, processes=True,
                                 dashboard_address=":0")
    try:
        yield DASK, [f"--dask_client_address={cluster.scheduler_address}"]
    finally:
        cluster.close()
