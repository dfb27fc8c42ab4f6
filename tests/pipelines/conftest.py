"""Fixtures of the pipeline tests."""

import pytest


@pytest.fixture(scope="module")
def dask_cluster():
    """A 2-process `dask.distributed.LocalCluster` (one thread each), once per test module."""
    import distributed

    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as c:
        yield c
