"""Preemption: SIGTERM / SIGUSR1 end a run cleanly at the next step boundary.

Schedulers announce the end of a job with a signal and a grace period (SLURM: SIGTERM, or
SIGUSR1 with `--signal=USR1@120`; preemptible cloud VMs: SIGTERM). The handler only sets a
flag; the trainer asks `requested()` once per optimizer step, all ranks agree on it (any rank
signalled → every rank stops after the same step), the run writes a checkpoint and the process
exits with `PREEMPTED_EXIT_CODE`. Further signals while that checkpoint is written change
nothing, so they cannot leave it half written. Requeue the job with `lory train ... --resume auto`.
"""

from __future__ import annotations

import os
import signal
import threading

from lorytrain.agreement import any_rank

# EX_TEMPFAIL of sysexits.h: "temporary failure, the user is invited to retry".
PREEMPTED_EXIT_CODE = 75
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Exception):
    """The run stopped on a signal after writing a checkpoint at a step boundary.

    Args:
        signal_name: the signal that asked for it (on this rank; "" when another rank got it).
        step: the step the checkpoint holds.
    """

    def __init__(self, signal_name: str, step: int):
        self.signal_name = signal_name
        self.step = step
        super().__init__(f"preempted by {signal_name or 'a signal to another rank'} at step {step}")


class PreemptionGuard:
    """Catches `SIGNALS` between `install()` and `uninstall()` and remembers the first one."""

    def __init__(self):
        self.signal_name = ""
        self._previous: dict[int, object] = {}

    def install(self) -> PreemptionGuard:
        # Python delivers signals to the main thread only; elsewhere (a Trainer driven from
        # a worker thread) the default handlers stay.
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.signal_name:
            _say(f"{name} received again: still finishing the step and its checkpoint")
            return
        self.signal_name = name
        _say(f"{name} received: finishing the current step, then writing a checkpoint")

    def requested(self) -> bool:
        """Whether any rank got a signal (collective under torchrun: call it on every rank
        at the same point of every step)."""
        return any_rank(bool(self.signal_name))


def ignore_signals() -> None:
    """Ignore `SIGNALS` from now on: for a preempted process that has written its checkpoint
    and is leaving. Under torchrun the first rank to exit makes torchrun SIGTERM the others,
    which would otherwise die mid-exit instead of exiting with `PREEMPTED_EXIT_CODE`."""
    for signum in SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def _say(line: str) -> None:
    # os.write, not print: a handler can interrupt a print to the same stream (reentrant call)
    os.write(2, (line + "\n").encode())
