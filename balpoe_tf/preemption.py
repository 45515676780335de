"""Stopping a run on SIGINT (Ctrl-C) or SIGTERM (how clouds and schedulers preempt) without
losing work: the signal is noted, the current training step finishes, a checkpoint of where
the run is inside its epoch is written (`callbacks.Checkpoints`) and `Interrupted` ends the
run; the same command resumes it at that step.

Before training starts (loading and checking data) there is nothing to save, so a signal
stops the run at once; a second signal does too, without waiting for the checkpoint. After the
last step (the final evaluation, the model, calibration and export) a signal stops the run at
once as well: the training is in its last checkpoint, and the run started again writes what it
had not yet written.
"""

import contextlib
import re
import signal
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)


def exit_code(signum: int) -> int:
    """The exit code of a run stopped by signal `signum`: 128 + its number, as a shell reports
    a command the signal ended (130 for SIGINT, 143 for SIGTERM)."""
    return 128 + signum


class Interrupted(Exception):
    """A run stopped on a signal; the message says where, and what was saved."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


# Exit code of a worker of a multi-worker run whose peer was lost (`WorkerLost`).
EXIT_WORKER_LOST = 3


class WorkerLost(RuntimeError):
    """A multi-worker run lost a worker (it died, or stopped answering the cluster's
    heartbeats); the message names it and says how to resume."""


def lost_worker(error: Exception) -> str:
    """The worker a TensorFlow cluster error names ("worker 1"), or "a worker"."""
    found = re.search(r"/job:(\w+)/(?:replica:\d+/)?task:(\d+)", str(error))
    return f"{found.group(1)} {found.group(2)}" if found else "a worker"


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


class StopRequest:
    """The SIGINT or SIGTERM a run received (`signum`, 0 while none), whether its training
    steps are running (`training`: then a signal waits for the end of the step), and once they
    are done, what the run is finishing (`stage`: "after epoch 40 of 40, while exporting ...")."""

    def __init__(self):
        self.signum = 0
        self.training = False
        self.stage = ""

    def handle(self, signum, frame=None):
        if self.signum:
            raise Interrupted(signum, f"stopped by a second {signal_name(signum)} before the checkpoint was "
                                      "written: the run resumes from its last checkpoint")
        if self.stage:
            raise Interrupted(signum, f"stopped by {signal_name(signum)} {self.stage}: the training is in its "
                                      "last checkpoint; started again, the run writes what it had not yet")
        if not self.training:
            raise Interrupted(signum, f"stopped by {signal_name(signum)} before training began: nothing was "
                                      "lost")
        self.signum = signum


@contextlib.contextmanager
def watching():
    """Inside the block, SIGINT and SIGTERM go to the `StopRequest` it yields (in the main
    thread only, where Python runs signal handlers; elsewhere the request stays unused)."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    previous = {s: signal.signal(s, request.handle) for s in SIGNALS}
    try:
        yield request
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
