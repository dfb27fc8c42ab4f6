"""Running a stage's steps on Beam: the pipeline, its runner, its counters.

Every stage is a list of steps; a step spreads small elements (file names, bucket, cell,
unit or shard numbers) over the workers and runs one DoFn on each. Per-document data never
travels through Beam: DoFns read and write partition files (see `pipelines.layout`).
"""

from __future__ import annotations

import logging
import re
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from apache_beam.transforms.environments import SubprocessSDKEnvironment

from lorydata.errors import LoryDataError
from lorydata.tokenizer_fast import default_threads
from pipelines import fileio
from pipelines.commits import PartitionFn, done_partitions, load_records, totals
from pipelines.runner.session import LOCAL_RUNNER, make_runner

# Input (bytes, compressed inputs counted 4x) from which a CPU-bound pipeline on the default
# runner goes to worker processes. Two worker processes start in about 1.5 s; on the 100k
# dump (282 MB counted) the documents stage's read + dedup pipeline takes about 9.2 s on two
# of them against 11-12 s in-process (benchmarks/bench_dump.py): the break-even is near
# 140 MB, and this leaves room for slower process starts.
PROCESSES_FROM_BYTES = 256 << 20
# Beam logs every worker's start and stop at INFO, and warns when workers run in the
# default running mode: what lory's own progress lines are for.
_QUIET_LOGGERS = ("apache_beam.runners.portability.fn_api_runner.fn_runner",
                  "apache_beam.runners.portability.local_job_service")


@dataclass
class BeamRunner:
    """Where a build's steps run: a Beam runner and its pass-through flags.

    Args:
        name: Beam runner name; the default is the in-process FnApiRunner.
        flags: extra Beam pipeline flags, verbatim (`--direct_num_workers=2`, ...).
        log: where a line about partitions done by an earlier run goes.
    """

    name: str = LOCAL_RUNNER
    flags: list[str] = field(default_factory=list)
    log: Callable[[str], None] = field(default=lambda _: None, repr=False, compare=False)
    # {"<stage>/<step>": {"partitions", "done_before"}} of every step run so far, and the
    # seconds of the pipeline with the last step it ran (the build's summary)
    partitions: dict[str, dict] = field(default_factory=dict, repr=False, compare=False)

    def pipeline(self, processes: int = 1) -> beam.Pipeline:
        """A new Beam pipeline on this runner.

        Args:
            processes: worker processes for the default runner (`local_processes`); 1: in this
                process (or as the user's `--direct_*` flags say).
        """
        # S3 endpoint and credentials of the driver's AWS environment go to the workers too,
        # which may not share it (a Dask cluster started elsewhere).
        flags = fileio.s3_flags(list(self.flags))
        if self.name != LOCAL_RUNNER:
            flags.append(f"--runner={self.name}")
        runner = FnApiRunner() if self.name == LOCAL_RUNNER else make_runner(self.name)
        if processes > 1 and self.name == LOCAL_RUNNER:
            # Beam's multi_processing mode, with the workers' own log lines (their start and
            # stop at INFO) sent to /dev/null: what a worker raises still reaches the driver
            # through the Fn API (`run_pipeline`).
            worker = f"{shlex.quote(sys.executable)} -m apache_beam.runners.worker.sdk_worker_main 2>/dev/null"
            runner = FnApiRunner(default_environment=SubprocessSDKEnvironment.from_command_string(worker))
            flags.append(f"--direct_num_workers={processes}")
            for name in _QUIET_LOGGERS:
                logging.getLogger(name).setLevel(logging.ERROR)
        # Beam would pickle the main session otherwise; our DoFns are importable module code.
        options = PipelineOptions(flags, save_main_session=False)
        return beam.Pipeline(runner=runner, options=options)

    def local_processes(self, input_bytes: int) -> int:
        """Worker processes for a pipeline whose work is Python (parsing, tokenizing: calls that
        hold the GIL, so threads do not use a second core) over `input_bytes` of input: every
        core on the default runner from `PROCESSES_FROM_BYTES` on, else 1 (in this process).
        A runner the user chose, or `--direct_*` flags, are left as they are.
        """
        if self.name != LOCAL_RUNNER or any(flag.startswith("--direct_") for flag in self.flags):
            return 1
        return default_threads() if input_bytes >= PROCESSES_FROM_BYTES else 1

    def threads_per_worker(self, processes: int = 1) -> int | None:
        """Threads a library call in a worker may use: None (every core) on the in-process
        runner, one per worker where worker processes share this machine's cores.

        Args:
            processes: the worker processes the pipeline runs on (`local_processes`).
        """
        flags = dict(flag.removeprefix("--").split("=", 1) for flag in self.flags if "=" in flag)
        if self.name != LOCAL_RUNNER or flags.get("direct_running_mode") == "multi_processing" or processes > 1:
            return 1
        return None

    def run_each(self, stage: str, label: str, elements: list, fn: PartitionFn) -> dict[str, int]:
        """One step: `fn` on each of `elements`; returns the counts of its partitions."""
        return self.run_steps(stage, [(label, elements, fn)])

    def run_steps(self, stage: str, steps: list[tuple[str, list, PartitionFn]], processes: int = 1) -> dict[str, int]:
        """Steps of one stage that each need all files of the step before, in one pipeline.

        Partitions committed by an earlier run (`pipelines.commits`) are not run again.
        From the second step on, the DoFn gets the partition names the previous step
        finished as a side input (its `process(element, after)`): a runner computes a side
        input in full before the step that reads it starts, so the side input is a barrier
        (one short name per partition). Elements are spread over the workers by a
        Reshuffle, except on the single in-process worker, where it would only cost.

        Args:
            stage: the stage folder (commit records and every file the steps write).
            steps: (label, elements, PartitionFn) in order; labels unique in the stage.
            processes: worker processes on the default runner (`local_processes`).

        Returns:
            The counts of every partition of every step, added up.
        """
        stored = fileio.sizes(stage)
        pipeline, done, todo = self.pipeline(processes), None, 0
        spread_out = self.threads_per_worker(processes) == 1 or "direct_num_workers" in " ".join(self.flags)
        for label, elements, fn in steps:
            fn.bind(stage, label)
            finished = done_partitions(stage, label, stored)
            pending = [e for e in elements if fn.key(e) not in finished]
            self.partitions[f"{fileio.basename(stage)}/{label}"] = {"partitions": len(elements),
                                                                   "done_before": len(elements) - len(pending)}
            if len(pending) < len(elements):
                self.log(f"  {label}: {len(elements) - len(pending)} of {len(elements)} partitions done by an "
                         "earlier run, verified and kept")
            todo += len(pending)
            spread = pipeline | f"{label}Elements" >> beam.Create(pending)
            if spread_out:
                spread = spread | f"Spread{label}" >> beam.Reshuffle()
            after = [] if done is None else [beam.pvalue.AsList(done)]
            done = spread | label >> beam.ParDo(fn, *after)
        start = time.perf_counter()
        if todo:
            run_pipeline(pipeline)
        # one pipeline runs all the steps: its seconds are recorded with the last of them
        self.partitions[f"{fileio.basename(stage)}/{steps[-1][0]}"]["seconds"] = round(time.perf_counter() - start, 2)
        records = []
        for label, elements, fn in steps:
            found = load_records(stage, label)
            missing = [e for e in elements if fn.key(e) not in found]
            if missing:
                raise RuntimeError(f"step {label}: {len(missing)} partition(s) finished without a commit record")
            records += [found[fn.key(e)] for e in elements]
        return totals(records)


def run_pipeline(pipeline: beam.Pipeline):
    """Run a pipeline to the end. What a worker raised comes back as the user should see it:
    a `LoryDataError` with its message only, a full disk as one `LoryDataError`, Ctrl-C as
    `KeyboardInterrupt`.

    In-process, Beam re-raises the worker's exception itself (or wraps it in a RuntimeError
    "... [while running 'Step']"); from worker processes it raises a RuntimeError whose text
    is the worker's whole traceback, which the CLI would print in full.
    """
    try:
        result = pipeline.run()
        result.wait_until_finish()
    except (LoryDataError, KeyboardInterrupt):
        raise
    except Exception as exc:
        text = str(exc)
        found = re.findall(r"(?:LoryDataError|InputNotFoundError|ShardError|MismatchError): (.+)", text)
        if found:
            raise LoryDataError(re.sub(r" \[while running .*\]$", "", found[-1].strip())) from exc
        if "KeyboardInterrupt" in text:
            raise KeyboardInterrupt from None
        reason = fileio.write_failure(exc)
        if reason:
            raise LoryDataError(f"a worker could not write the build: {reason}; every partition written so far is "
                                "kept: make room and rerun the same command to resume") from None
        raise
    return result
