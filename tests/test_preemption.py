"""preemption: what a signal does before and during training, and the exit codes."""

import signal

import pytest

from balpoe_tf import preemption


def test_a_signal_before_training_stops_at_once_and_during_it_waits_for_the_step():
    request = preemption.StopRequest()
    with pytest.raises(preemption.Interrupted, match="stopped by SIGINT before training began: nothing was lost"):
        request.handle(signal.SIGINT)
    request.training = True
    request.handle(signal.SIGTERM)  # noted: the step finishes and is saved
    assert request.signum == signal.SIGTERM
    with pytest.raises(preemption.Interrupted, match="stopped by a second SIGINT before the checkpoint was written"):
        request.handle(signal.SIGINT)


def test_signals_are_watched_inside_the_block_only():
    before = signal.getsignal(signal.SIGTERM)
    with preemption.watching() as request:
        assert signal.getsignal(signal.SIGTERM) == request.handle == signal.getsignal(signal.SIGINT)
        request.training = True
        signal.raise_signal(signal.SIGTERM)
        assert request.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) == before


def test_exit_codes_and_lost_workers_by_hand():
    assert (preemption.exit_code(signal.SIGINT), preemption.exit_code(signal.SIGTERM)) == (130, 143)
    error = RuntimeError("Collective ops is aborted by: Error reported from /job:worker/task:1: The following tasks "
                         "are unhealthy (stopped sending heartbeats):\n/job:worker/replica:0/task:1")
    assert preemption.lost_worker(error) == "worker 1"
    assert preemption.lost_worker(RuntimeError("connection reset")) == "a worker"
