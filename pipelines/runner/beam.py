"""Running a stage's steps on Beam: the pipeline, its runner, its counters.

Every stage is a list of steps; a step spreads small elements (file names, bucket, cell,
unit or shard numbers) over the workers and runs one DoFn on each. Per-document data never
travels through Beam: DoFns read and write partition files (see `pipelines.layout`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.portability.fn_api_runner import FnApiRunner

from lorydata.errors import LoryDataError
from pipelines.runner.session import LOCAL_RUNNER, make_runner

NAMESPACE = "lory"


def count(name: str, n: int = 1) -> None:
    """Add `n` to the `lory` counter `name` (summed over workers, read back by the driver)."""
    Metrics.counter(NAMESPACE, name).inc(n)


@dataclass(frozen=True)
class BeamRunner:
    """Where a build's steps run: a Beam runner and its pass-through flags.

    Args:
        name: Beam runner name; the default is the in-process FnApiRunner.
        flags: extra Beam pipeline flags, verbatim (`--direct_num_workers=2`, ...).
    """

    name: str = LOCAL_RUNNER
    flags: list[str] = field(default_factory=list)

    def pipeline(self) -> beam.Pipeline:
        """A new Beam pipeline on this runner."""
        flags = list(self.flags)
        if self.name != LOCAL_RUNNER:
            flags.append(f"--runner={self.name}")
        # Beam would pickle the main session otherwise; our DoFns are importable module code.
        options = PipelineOptions(flags, save_main_session=False)
        runner = FnApiRunner() if self.name == LOCAL_RUNNER else make_runner(self.name)
        return beam.Pipeline(runner=runner, options=options)

    def run_each(self, label: str, elements: list, fn: beam.DoFn) -> dict[str, int]:
        """One step: `fn` on each of `elements`; returns the `lory` counters."""
        return self.run_steps([(label, elements, fn)])

    def run_steps(self, steps: list[tuple[str, list, beam.DoFn]]) -> dict[str, int]:
        """Steps that each need all files of the step before, in one Beam pipeline.

        From the second step on, the DoFn gets the number of outputs of the previous step as
        a side input (its `process(element, after)`): a runner computes a side input in full
        before the step that reads it starts, so the side input is a barrier that carries one
        number.

        Args:
            steps: (label, elements, DoFn) in order.

        Returns:
            The `lory` counters of the whole pipeline.
        """
        pipeline = self.pipeline()
        done = None
        for label, elements, fn in steps:
            spread = pipeline | f"{label}Elements" >> beam.Create(elements) | f"Spread{label}" >> beam.Reshuffle()
            after = [] if done is None else [beam.pvalue.AsSingleton(done)]
            done = spread | label >> beam.ParDo(fn, *after) | f"{label}Done" >> beam.combiners.Count.Globally()
        return counters(run_pipeline(pipeline))


def run_pipeline(pipeline: beam.Pipeline):
    """Run a pipeline to the end; a `LoryDataError` raised inside a worker process comes back
    as one, with its message only.

    In-process, Beam re-raises the worker's exception itself; from worker processes it
    raises a RuntimeError whose text is the worker's whole traceback, which the CLI would
    print in full for a plain user mistake.
    """
    try:
        result = pipeline.run()
        result.wait_until_finish()
    except LoryDataError:
        raise
    except Exception as exc:
        found = re.findall(r"(?:LoryDataError|InputNotFoundError|ShardError|MismatchError): (.+)", str(exc))
        if found:
            raise LoryDataError(re.sub(r" \[while running .*\]$", "", found[-1].strip())) from exc
        raise
    return result


def counters(result) -> dict[str, int]:
    """The committed values of the `lory` Beam counters of a finished pipeline."""
    found = result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))["counters"]
    totals: dict[str, int] = {}
    for counter in found:
        value = counter.committed if counter.committed is not None else counter.attempted
        totals[counter.key.metric.name] = totals.get(counter.key.metric.name, 0) + int(value or 0)
    return totals
