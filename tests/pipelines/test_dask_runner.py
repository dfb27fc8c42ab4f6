"""`pipelines.runner.dask_runner.LoryDaskRunner`: one tiny pipeline per fix over Beam's DaskRunner,
each on the same 2-process `dask.distributed.LocalCluster`, plus the `--runner dask` options."""

import json
import os
import re
import uuid

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.metrics import Metrics
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.windowed_value import WindowedValue

from lorydata.errors import LoryDataError
from pipelines.runner import session
from pipelines.runner.beam import BeamRunner
from pipelines.runner.dask_runner import LoryDaskRunner
from pipelines.runner.session import make_runner, runner_session


@pytest.fixture(scope="module")
def cluster(dask_cluster):
    return dask_cluster


def run(cluster, build, *flags):
    """Build a pipeline with `build(pipeline)` on the cluster, run it to the end."""
    pipeline = beam.Pipeline(runner=LoryDaskRunner(),
                             options=PipelineOptions([f"--dask_client_address={cluster.scheduler_address}", *flags]))
    build(pipeline)
    result = pipeline.run()
    result.wait_until_finish()
    return result


class Record(beam.DoFn):
    """Writes each element to its own JSON file in `folder`: how a test sees a branch's output
    without relying on a sink (whose own correctness is under test)."""

    def __init__(self, folder):
        self.folder = str(folder)

    def process(self, element):
        with open(os.path.join(self.folder, uuid.uuid4().hex + ".json"), "w") as f:
            json.dump(element, f)


def recorded(folder):
    return sorted((json.loads(p.read_text()) for p in folder.iterdir()), key=json.dumps)


def record(pcoll, folder, label):
    folder.mkdir(exist_ok=True)
    return pcoll | label >> beam.ParDo(Record(folder))


class SplitParity(beam.DoFn):
    def process(self, x):
        Metrics.counter("test", "seen").inc()
        yield beam.pvalue.TaggedOutput("odd", x) if x % 2 else x


def test_short_name_dask_gives_the_fixed_runner():
    # Beam's create_runner("DaskRunner") raises: only the dotted path is known to it.
    for name in ("dask", "DaskRunner"):
        assert isinstance(make_runner(name), LoryDaskRunner)
    pipeline = BeamRunner("dask").pipeline()
    assert isinstance(pipeline.runner, LoryDaskRunner)


def test_tagged_outputs_reach_only_their_consumers_and_every_branch_runs(cluster, tmp_path):
    def build(p):
        parts = p | beam.Create(range(10)) | beam.ParDo(SplitParity()).with_outputs("odd", main="even")
        record(parts.even, tmp_path / "even", "RecordEven")
        record(parts.odd, tmp_path / "odd", "RecordOdd")
        record(p | "Other" >> beam.Create(["x"]), tmp_path / "other", "RecordOther")

    run(cluster, build)
    assert recorded(tmp_path / "even") == [0, 2, 4, 6, 8]
    assert recorded(tmp_path / "odd") == [1, 3, 5, 7, 9]
    assert recorded(tmp_path / "other") == ["x"]


class CountInBundle(beam.DoFn):
    """Emits nothing per element, one (count) element per bundle from finish_bundle."""

    def start_bundle(self):
        self.n = 0

    def process(self, x):
        self.n += 1

    def finish_bundle(self):
        yield WindowedValue(self.n, 0, [GlobalWindow()])


def test_finish_bundle_outputs_are_kept(cluster, tmp_path):
    def build(p):
        numbers = p | beam.Create(range(10))
        record(numbers | beam.ParDo(CountInBundle()) | "Total" >> beam.CombineGlobally(sum), tmp_path / "total", "R1")
        batches = numbers | beam.BatchElements(min_batch_size=4, max_batch_size=4)
        record(batches | beam.Map(sorted), tmp_path / "batches", "R2")
        numbers | beam.Map(str) | beam.io.WriteToText(str(tmp_path / "text" / "part"), file_name_suffix=".txt")

    run(cluster, build, "--dask_npartitions=3")
    assert recorded(tmp_path / "total") == [10]
    assert sorted(x for batch in recorded(tmp_path / "batches") for x in batch) == list(range(10))
    lines = [line for f in (tmp_path / "text").glob("part*.txt") for line in f.read_text().split()]
    assert sorted(map(int, lines)) == list(range(10))


def test_read_from_parquet_passes_rows_on(cluster, tmp_path):
    for i in range(2):
        pq.write_table(pa.table({"a": [3 * i, 3 * i + 1, 3 * i + 2]}), tmp_path / f"in-{i}.parquet")

    run(cluster, lambda p: record(p | beam.io.ReadFromParquet(str(tmp_path / "in-*.parquet")) | beam.Map(lambda r: r["a"]),
                                  tmp_path / "rows", "R"))
    assert recorded(tmp_path / "rows") == list(range(6))


class Mark(beam.DoFn):
    """Passes elements on and leaves one file per element: how often an upstream ran."""

    def __init__(self, folder):
        self.folder = str(folder)

    def process(self, x):
        open(os.path.join(self.folder, uuid.uuid4().hex), "w").close()
        yield x


def test_side_inputs_are_computed_once_and_give_list_dict_and_singleton(cluster, tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()

    def build(p):
        pairs = p | "Pairs" >> beam.Create([("a", 1), ("b", 2)], reshuffle=False) | "Mark" >> beam.ParDo(Mark(runs))
        total = pairs | beam.Map(lambda kv: kv[1]) | beam.CombineGlobally(sum)
        main = p | "Main" >> beam.Create(range(6))
        joined = main | beam.Map(lambda x, pl, pd, t: (x, sorted(pl), pd["b"], t),
                                 pl=beam.pvalue.AsList(pairs), pd=beam.pvalue.AsDict(pairs),
                                 t=beam.pvalue.AsSingleton(total))
        record(joined, tmp_path / "out", "R")

    run(cluster, build, "--dask_npartitions=3")  # main input in 3 bundles, each reading the side inputs
    assert recorded(tmp_path / "out") == [[x, [["a", 1], ["b", 2]], 2, 3] for x in range(6)]
    assert len(list(runs.iterdir())) == 2, "the side input's upstream ran more than once"


def test_group_by_key_groups_each_key_once_across_workers(cluster, tmp_path):
    def build(p):
        pairs = p | beam.Create([(f"k{i % 7}", i) for i in range(70)]) | beam.Reshuffle()
        record(pairs | beam.GroupByKey() | beam.MapTuple(lambda k, vs: [k, sorted(vs)]), tmp_path / "groups", "R")

    run(cluster, build, "--dask_npartitions=4")
    assert recorded(tmp_path / "groups") == [[f"k{k}", list(range(k, 70, 7))] for k in range(7)]


def test_metrics_are_collected_from_every_bundle(cluster, tmp_path):
    def build(p):
        parts = p | beam.Create(range(10)) | beam.ParDo(SplitParity()).with_outputs("odd", main="even")
        parts.odd | beam.Map(lambda x: x)

    result = run(cluster, build, "--dask_npartitions=3")
    found = result.metrics().query(MetricsFilter().with_namespace("test"))["counters"]
    assert [(c.key.metric.name, c.committed, c.attempted) for c in found] == [("seen", 10, 10)]


class CountSetups(beam.DoFn):
    def __init__(self, folder):
        self.folder = str(folder)

    def setup(self):
        open(os.path.join(self.folder, uuid.uuid4().hex), "w").close()

    def process(self, x):
        yield x


def test_a_dofn_is_set_up_once_per_worker_not_per_bundle(cluster, tmp_path):
    setups = tmp_path / "setups"
    setups.mkdir()
    run(cluster, lambda p: p | beam.Create(range(40)) | beam.ParDo(CountSetups(setups)), "--dask_npartitions=8")
    assert 1 <= len(list(setups.iterdir())) <= 2  # 8 bundles on 2 single-thread workers


def test_a_worker_error_reaches_the_caller(cluster):
    def fail(x):
        raise LoryDataError(f"bad element {x}")

    with pytest.raises(LoryDataError, match="bad element 3"):
        run(cluster, lambda p: p | beam.Create([3]) | beam.Map(fail))


def test_runner_session_errors_are_one_line(cluster, monkeypatch):
    monkeypatch.setattr(session, "CONNECT_TIMEOUT_S", 1)
    with pytest.raises(LoryDataError, match=r"^--workers needs --runner dask$"), runner_session(None, workers=2):
        pass
    with pytest.raises(LoryDataError, match=r"^--dask-address needs --runner dask$"), \
            runner_session("FnApiRunner", dask_address="tcp://127.0.0.1:1"):
        pass
    with pytest.raises(LoryDataError, match="not both"), runner_session("dask", "tcp://x:1", 2):
        pass
    with pytest.raises(LoryDataError, match=re.escape("cannot reach a Dask scheduler at 'tcp://127.0.0.1:9': ")), \
            runner_session("dask", dask_address="tcp://127.0.0.1:9"):
        pass
    with runner_session("dask", dask_address=cluster.scheduler_address) as (runner, flags):
        assert runner == "dask" and flags == [f"--dask_client_address={cluster.scheduler_address}"]


def test_missing_dask_is_one_line(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "dask.distributed", None)  # import now raises ImportError
    with pytest.raises(LoryDataError, match=r"needs dask\[distributed\]: pip install 'lory\[dask\]'"), \
            runner_session("dask", workers=1):
        pass
