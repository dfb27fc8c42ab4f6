"""Beam's DaskRunner (`apache_beam.runners.dask`) with what `lory build-corpus` needs fixed.

Beam 2.77's runner translates a pipeline into `dask.bag` operations. On this pipeline it
loses data or work in six ways, each fixed here (and pinned by `tests/pipelines/test_dask_runner.py`):

- tagged outputs (`with_outputs`) are not separated: every consumer of a ParDo got all of
  its outputs. Here a ParDo's bag holds `(tag, value)` pairs and each consumer selects its tag.
- only the last transform's bag is computed, so other branches (one split's writes) never
  ran. Here every ParDo (through its metrics) and every unconsumed output is computed, in one
  graph, so shared upstream work runs once.
- elements emitted in `finish_bundle` are dropped (the outputs were collected before it ran):
  file sinks lost their results, `BatchElements` (RunInference) its last batch.
- `Read` transforms (`ReadFromParquet`) produced nothing. Here the source is split into
  bundles and each bundle is read by a task.
- side inputs re-ran their whole upstream graph inside every task. Here a side input is one
  dask dependency, computed once and handed to every task.
- `result.metrics()` raised NotImplementedError. Here each bundle runs under a
  MetricsContainer and the counters come back with the results.
- workers never saw the pipeline options, so Beam's filesystems had none (S3: "Must provide
  one of client or options"). Here every worker sets them once per run, as Beam's SDK
  harness does.

Also: one DoFn instance per worker thread is set up once per pipeline run and reused across
bundles (as Beam's runners do; RunInference loads its model once, not per partition), `Create`
makes one partition per element (up to 1024) and `Reshuffle` and `GroupByKey` spread their
elements over at least one partition per worker thread (stock: one partition for fewer than
128 elements, so one worker did everything), and the shuffle is dask's task-based one, never
the disk one (local temp files a remote worker cannot see). Only the global window is supported (batch pipelines); windows are dropped.

Memory: a dask partition is one Beam bundle, and a ParDo's outputs for it are held as a list
until its consumers ran, so a worker holds about one partition's data per running task. Keep
per-document data inside a ParDo chain that writes files, and let bags carry metadata.

`--runner dask` in `pipelines.runner.session` maps to `LoryDaskRunner` (the stock short name
`DaskRunner` is unknown to Beam's `create_runner`).
"""

from __future__ import annotations

import contextlib
import threading
import uuid
from dataclasses import dataclass, field
from typing import Any

import apache_beam as beam
import dask
import dask.bag as db
import dask.distributed as ddist
from apache_beam import pvalue
from apache_beam.internal import pickler
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics.execution import MetricsContainer
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.pipeline import AppliedPTransform, PipelineVisitor
from apache_beam.runners.common import DoFnContext, DoFnInvoker, DoFnSignature, Receiver, _OutputHandler
from apache_beam.runners.dask.dask_runner import DaskOptions, DaskRunner
from apache_beam.runners.dask.overrides import (
    _Create,
    _Flatten,
    _GroupByKeyOnly,
    _Read,
    _Reshuffle,
    dask_overrides,
)
from apache_beam.runners.direct.direct_metrics import DirectMetrics
from apache_beam.runners.runner import PipelineResult, PipelineState
from apache_beam.runners.worker import statesampler
from apache_beam.transforms.sideinputs import SideInputMap
from apache_beam.transforms.window import GlobalWindow, GlobalWindows
from apache_beam.utils import counters
from apache_beam.utils.windowed_value import WindowedValue

METRICS_TAG = "__lory_dask_metrics__"  # the tag under which a bundle's metric updates travel
READ_BUNDLE_BYTES = 64 << 20  # largest bundle a Read is split into
CREATE_PARTITIONS = 1024  # most partitions a Create is split into


def _windowed(value: Any) -> WindowedValue:
    return value if isinstance(value, WindowedValue) else WindowedValue(value, 0, (GlobalWindow(),))


class _TagReceiver(Receiver):
    """Collects one output tag's values as `(tag, value)` pairs into a shared list."""

    def __init__(self, tag, values: list):
        self.tag, self.values = tag, values

    def receive(self, windowed_value: WindowedValue):
        self.values.append((self.tag, windowed_value.value))


class _Receivers(dict):
    """Tag → receiver, created on first use (the output handler looks tags up lazily)."""

    def __init__(self):
        super().__init__()
        self.values: list = []

    def __missing__(self, tag):
        receiver = self[tag] = _TagReceiver(tag, self.values)
        return receiver


# ---- DoFn instances reused across the bundles of one run, per worker process ----------
_POOL_LOCK = threading.Lock()
_POOL: dict[str, Any] = {"run": None, "idle": {}}


def _set_options(run: str, options: dict) -> None:
    """The run's pipeline options for Beam's filesystems in this worker, once per run."""
    with _POOL_LOCK:
        if _POOL.get("options_run") == run:
            return
        _POOL["options_run"] = run
    FileSystems.set_options(PipelineOptions.from_dictionary(options))


def _take_dofn(run: str, key: str, fn_bytes: bytes):
    """A set-up DoFn for `key`: an idle one of this run, or a fresh one (set up now).

    A task of a new run tears down the previous run's idle DoFns, so a long-lived worker
    keeps at most one run's models and tokenizers in memory."""
    with _POOL_LOCK:
        if _POOL["run"] != run:
            stale = [fn for fns in _POOL["idle"].values() for fn in fns]
            _POOL.update(run=run, idle={})
        else:
            stale = []
        idle = _POOL["idle"].setdefault(key, [])
        fn = idle.pop() if idle else None
    for old in stale:
        with contextlib.suppress(Exception):  # teardown is best effort in Beam too
            old.teardown()
    if fn is None:
        fn = pickler.loads(fn_bytes)
        fn.setup()
    return fn


def _give_back_dofn(run: str, key: str, fn) -> None:
    with _POOL_LOCK:
        if _POOL["run"] == run:
            _POOL["idle"].setdefault(key, []).append(fn)


@dataclass
class _ParDoSpec:
    """What a task needs to run one bundle of a ParDo (pickled into the dask graph)."""

    run: str
    label: str
    fn_bytes: bytes
    args: tuple
    kwargs: dict
    views: list = field(default_factory=list)  # (view class, view options) per side input
    options: dict = field(default_factory=dict)  # the pipeline options (filesystems need them)


def _run_bundle(items, spec: _ParDoSpec, *side_values) -> list:
    """Run one dask partition through a DoFn as one Beam bundle.

    Returns the `(tag, value)` outputs, finish_bundle's included, then the bundle's metric
    updates under `METRICS_TAG`.
    """
    key = spec.label
    _set_options(spec.run, spec.options)
    fn = _take_dofn(spec.run, key, spec.fn_bytes)
    receivers = _Receivers()
    handler = _OutputHandler(
        window_fn=GlobalWindows(),
        main_receivers=receivers[None],
        tagged_receivers=receivers,
        per_element_output_counter=None,
        output_batch_converter=None,
        process_yields_batches=False,
        process_batch_yields_elements=False,
    )
    side_inputs = [
        SideInputMap(view, options, [_windowed(v) for v in values])
        for (view, options), values in zip(spec.views, side_values, strict=True)
    ]
    invoker = DoFnInvoker.create_invoker(
        DoFnSignature(fn),
        handler,
        context=DoFnContext(spec.label, state=None),
        side_inputs=side_inputs,
        input_args=spec.args,
        input_kwargs=spec.kwargs,
        user_state_context=None,
        bundle_finalizer_param=beam.DoFn.BundleFinalizerParam(),
    )
    container = MetricsContainer(spec.label)
    # Beam's Metrics.counter(...).inc() finds its container through the thread's state sampler.
    sampler = statesampler.StateSampler(spec.label, counters.CounterFactory())
    previous = statesampler.get_current_tracker()
    statesampler.set_current_tracker(sampler)
    try:
        with sampler.scoped_state(spec.label, "process", metrics_container=container):
            invoker.invoke_start_bundle()
            for item in items:
                invoker.invoke_process(_windowed(item))
            invoker.invoke_finish_bundle()
    finally:
        statesampler.set_current_tracker(previous)
    _give_back_dofn(spec.run, key, fn)
    receivers.values.append((METRICS_TAG, container.get_cumulative()))
    return receivers.values


def _select(partition, tag) -> list:
    return [value for t, value in partition if t == tag]


def _discard(partition) -> list:
    for _ in partition:
        pass
    return []


def _concat(parts) -> list:
    return [x for part in parts for x in part]


def _read_bundles(bundles) -> list:
    return [
        record
        for bundle in bundles
        for record in bundle.source.read(bundle.source.get_range_tracker(bundle.start_position, bundle.stop_position))
    ]


def _strip_group(group) -> tuple:
    """dask's `(key, [(key, WindowedValue)])` → Beam's `(key, [value])`."""
    key, items = group
    return key, [item[1].value if isinstance(item[1], WindowedValue) else item[1] for item in items]


def _first(item):
    return item[0]


class _BagGraph(PipelineVisitor):
    """Translates every primitive transform into a dask bag.

    Args:
        bag_kwargs: `--dask_npartitions` / `--dask_partition_size`, for `Create`.
        partitions: fewest partitions `Create`, `Reshuffle` and `GroupByKey` spread over.
        run: a fresh id per run (keys the per-worker DoFn pool).
        options: the pipeline options as a dict (handed to every worker).
    """

    def __init__(self, bag_kwargs: dict, partitions: int, run: str, options: dict | None = None):
        self.bag_kwargs = bag_kwargs
        self.partitions = max(1, partitions)
        self.run = run
        self.options = options or {}
        self.bags: dict[AppliedPTransform, Any] = {}
        self.tagged: set[AppliedPTransform] = set()  # transforms whose bag holds (tag, value)
        self.consumed: set[AppliedPTransform] = set()

    def bag_of(self, pcoll):
        """The bag of one PCollection: a ParDo's output selected by its tag."""
        producer = pcoll.producer
        self.consumed.add(producer)
        bag = self.bags[producer]
        return bag.map_partitions(_select, pcoll.tag) if producer in self.tagged else bag

    def side_value(self, side_input):
        """A side input as one dask dependency: its PCollection's elements as a list."""
        return dask.delayed(_concat)(self.bag_of(side_input.pvalue).to_delayed(optimize_graph=False))

    def visit_transform(self, node: AppliedPTransform) -> None:
        transform = node.transform
        inputs = [self.bag_of(p) for p in node.inputs if not isinstance(p, pvalue.PBegin)]
        if type(transform) is beam.ParDo:
            self.bags[node] = self.pardo(node, inputs[0])
            self.tagged.add(node)
        elif isinstance(transform, _Create):
            self.bags[node] = self.create(list(transform.values))
        elif isinstance(transform, _Read):
            self.bags[node] = self.read(transform.source)
        elif isinstance(transform, _Reshuffle):
            bag = inputs[0]
            self.bags[node] = bag.repartition(self.partitions) if bag.npartitions < self.partitions else bag
        elif isinstance(transform, _GroupByKeyOnly):
            bag = inputs[0]
            grouped = bag.groupby(_first, shuffle="tasks", npartitions=max(bag.npartitions, self.partitions))
            self.bags[node] = grouped.map(_strip_group)
        elif isinstance(transform, _Flatten):
            self.bags[node] = db.concat(inputs) if inputs else db.from_sequence([], npartitions=1)
        elif inputs:
            # _GroupAlsoByWindow, WindowInto: identities in the global window.
            self.bags[node] = inputs[0]
        else:
            raise NotImplementedError(f"LoryDaskRunner cannot run {type(transform).__name__} ({node.full_label})")

    def create(self, values: list):
        size = self.bag_kwargs.get("partition_size")
        if size:
            return db.from_sequence(values, partition_size=size)
        # One element per partition (up to CREATE_PARTITIONS): a Create usually lists files or
        # buckets, each worth a task of its own, and a partition's outputs are held as a list.
        npartitions = self.bag_kwargs.get("npartitions") or min(max(1, len(values)), CREATE_PARTITIONS)
        return db.from_sequence(values, npartitions=npartitions)

    def read(self, source):
        try:
            size = source.estimate_size() or 0
        except Exception:  # a source that cannot estimate is read as one bundle per split
            size = 0
        desired = max(1 << 20, min(READ_BUNDLE_BYTES, size // self.partitions))
        bundles = list(source.split(desired_bundle_size=desired))
        return db.from_sequence(bundles, npartitions=max(1, len(bundles))).map_partitions(_read_bundles)

    def pardo(self, node: AppliedPTransform, bag):
        transform = node.transform
        spec = _ParDoSpec(
            run=self.run,
            label=node.full_label,
            fn_bytes=pickler.dumps(transform.fn),
            # args/kwargs with side inputs replaced by placeholders the invoker fills in.
            args=tuple(transform.args),
            kwargs=dict(transform.kwargs),
            views=[(type(si), si._view_options()) for si in node.side_inputs],
            options=self.options,
        )
        side_values = [self.side_value(si) for si in node.side_inputs]
        return bag.map_partitions(_run_bundle, spec, *side_values)

    def targets(self) -> tuple[list, list]:
        """(metrics bags, one per ParDo; the other unconsumed bags, reduced to nothing)."""
        metrics = [self.bags[node].map_partitions(_select, METRICS_TAG) for node in self.bags if node in self.tagged]
        leaves = [bag.map_partitions(_discard) for node, bag in self.bags.items()
                  if node not in self.consumed and node not in self.tagged]
        return metrics, leaves


class LoryDaskResult(PipelineResult):
    """A running pipeline: waits for every branch, then holds the metrics.

    Args:
        client: the dask client the pipeline runs on (closed once the run ends).
        metric_futures: one future per ParDo, each a list of per-bundle MetricUpdates.
        leaf_futures: futures of the unconsumed outputs (empty lists).
    """

    def __init__(self, client, metric_futures: list, leaf_futures: list):
        super().__init__(PipelineState.RUNNING)
        self.client = client
        self.metric_futures = metric_futures
        self.leaf_futures = leaf_futures
        self._metrics = DirectMetrics()

    def wait_until_finish(self, duration=None) -> str:
        if self._state != PipelineState.RUNNING:
            return self._state
        try:
            timeout = duration / 1000 if duration is not None else None
            futures = [*self.metric_futures, *self.leaf_futures]
            metric_keys = {future.key for future in self.metric_futures}
            bundle = 0
            for future, result in ddist.as_completed(futures, timeout=timeout, with_results=True):
                if future.key in metric_keys:
                    for updates in result:
                        bundle += 1
                        self._metrics.commit_logical(bundle, updates)
                        self._metrics.commit_physical(bundle, updates)
            self._state = PipelineState.DONE
        except BaseException:
            self._state = PipelineState.FAILED
            raise
        finally:
            self.client.close()
        return self._state

    def cancel(self) -> str:
        self.client.cancel([*self.metric_futures, *self.leaf_futures])
        self.client.close()
        self._state = PipelineState.CANCELLED
        return self._state

    def metrics(self) -> DirectMetrics:
        return self._metrics


class LoryDaskRunner(DaskRunner):
    """Beam's DaskRunner with the fixes above; options as Beam's (`--dask_client_address` …)."""

    def run_pipeline(self, pipeline, options) -> LoryDaskResult:
        dask_options = options.view_as(DaskOptions).get_all_options(drop_default=True, current_only=True)
        bag_kwargs = DaskOptions._extract_bag_kwargs(dask_options)
        client = ddist.Client(**dask_options)
        try:
            threads = sum(client.nthreads().values())
            pipeline.replace_all(dask_overrides())
            graph = _BagGraph(bag_kwargs, partitions=threads, run=uuid.uuid4().hex,
                              options=options.get_all_options(drop_default=True))
            pipeline.visit(graph)
            metrics, leaves = graph.targets()
            futures = client.compute([*metrics, *leaves])
        except BaseException:
            client.close()
            raise
        return LoryDaskResult(client, futures[: len(metrics)], futures[len(metrics):])
