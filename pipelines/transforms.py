"""Beam helpers shared by the stages: counters, the held-out split rule, running a pipeline."""

from __future__ import annotations

import hashlib

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.metrics.metric import MetricsFilter

NAMESPACE = "lory"


def count(name: str, n: int = 1) -> None:
    Metrics.counter(NAMESPACE, name).inc(n)


def heldout_split(doc_id: str, fraction: float) -> str:
    """'heldout' for a stable `fraction` of document ids (by hash), else 'train'."""
    if fraction <= 0:
        return "train"
    value = int.from_bytes(hashlib.blake2b(doc_id.encode(), digest_size=8).digest(), "big")
    return "heldout" if value < fraction * 2**64 else "train"


def run_pipeline(pipeline):
    """Run a pipeline to the end; a `LoryDataError` raised inside a worker process comes back
    as one, with its message only.

    In-process, Beam re-raises the worker's exception itself; from worker processes it
    raises a RuntimeError whose text is the worker's whole traceback, which the CLI would
    print in full for a plain user mistake.
    """
    import re

    from lorydata.errors import LoryDataError

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


def run_each(options, label: str, elements: list, fn) -> dict[str, int]:
    """One Beam pipeline that spreads `elements` (small: file names, bucket or cell numbers)
    over the workers and runs the DoFn `fn` on each; returns the `lory` counters."""
    return run_steps(options, [(label, elements, fn)])


def run_steps(options, steps: list[tuple[str, list, beam.DoFn]]) -> dict[str, int]:
    """Steps that each need all files of the step before, in one Beam pipeline.

    Every step spreads its elements over the workers and runs its DoFn on each. From the
    second step on, the DoFn gets the number of outputs of the previous step as a side
    input (its `process(element, after)`): a runner computes a side input in full before
    the step that reads it starts, so the side input is a barrier that carries one number.

    Args:
        options: build options (runner and Beam flags).
        steps: (label, elements, DoFn) in order.

    Returns:
        The `lory` counters of the whole pipeline.
    """
    from pipelines.options import make_pipeline

    pipeline = make_pipeline(options)
    done = None
    for label, elements, fn in steps:
        spread = pipeline | f"{label}Elements" >> beam.Create(elements) | f"Spread{label}" >> beam.Reshuffle()
        after = [] if done is None else [beam.pvalue.AsSingleton(done)]
        done = spread | label >> beam.ParDo(fn, *after) | f"{label}Done" >> beam.combiners.Count.Globally()
    return counters(run_pipeline(pipeline))


def counters(result) -> dict[str, int]:
    """The committed values of the `lory` Beam counters of a finished pipeline."""
    found = result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))["counters"]
    totals: dict[str, int] = {}
    for counter in found:
        value = counter.committed if counter.committed is not None else counter.attempted
        totals[counter.key.metric.name] = totals.get(counter.key.metric.name, 0) + int(value or 0)
    return totals
