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


# --- A run stopped between its last step and its end, then started again -------------------------

FINISHING = ["--flagfile=configs/demo.flags", "--compare=", "--epochs=1", "--warmup_epochs=0", "--milestones=",
             "--holdout_fraction=0.2", "--deterministic"]

# Where a run is stopped after its last step: what it was doing -> the function it is stopped in
# (module, name), when its first argument holds this text.
STOPS = {
    "saving the model": ("balpoe_tf.experiment", "save_atomic", "model.keras"),
    "calibrating on the held-out split": ("balpoe_tf.experiment", "calibrate_on_holdout", ""),
    "exporting the SavedModel": ("os", "rename", ".partial-"),  # written whole, not yet in place
    "writing results.json": ("balpoe_tf.experiment", "write_json", "results.json"),
}

# tools/train.py, with `signum` sent to itself at one of the STOPS.
STOPPED_TRAIN = """
import importlib, os, sys
sys.path.insert(0, os.getcwd())
import balpoe_tf
balpoe_tf.import_tensorflow_quietly()
from balpoe_tf import cli, experiment, run_config
module, name, text, signum = sys.argv.pop(1), sys.argv.pop(1), sys.argv.pop(1), int(sys.argv.pop(1))
owner = importlib.import_module(module)
original = getattr(owner, name)

def stopping(*args, **kwargs):
    if text in str(args):
        os.kill(os.getpid(), signum)
    return original(*args, **kwargs)

setattr(owner, name, stopping)
cli.run_tool(run_config.RunConfig, experiment.train_with_baselines)
"""


def _train(args, stop=None, signum=signal.SIGTERM):
    import subprocess
    import sys

    from conftest import REPO

    command = [sys.executable, "tools/train.py"] if stop is None else [
        sys.executable, "-c", STOPPED_TRAIN, *(str(v) for v in STOPS[stop]), str(int(signum))]
    return subprocess.run(command + list(args), cwd=REPO, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    import json

    folder = tmp_path_factory.mktemp("uninterrupted")
    done = _train([*FINISHING, f"--output_dir={folder}"])
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((folder / "results.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "kill-9"])
@pytest.mark.parametrize("stop", sorted(STOPS))
def test_a_run_stopped_after_its_last_step_writes_everything_when_started_again(tmp_path, stop, signum,
                                                                                  uninterrupted):
    import json

    from balpoe_tf import run_folder
    from conftest import parse_config
    from balpoe_tf.run_config import RunConfig

    args = [*FINISHING, f"--output_dir={tmp_path}"]
    stopped = _train(args, stop, signum)
    assert stopped.returncode == preemption.exit_code(signum) if signum == signal.SIGTERM else -signal.SIGKILL
    if signum == signal.SIGTERM:
        assert f"stopped by SIGTERM after epoch 1 of 1, while {stop}: the training is in its last checkpoint" \
            in stderr_lines(stopped)[-1], stopped.stderr[-3000:]
    config = parse_config(RunConfig, *args)
    assert run_folder.missing_artefacts(config)  # the stop came before the end
    again = _train(args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "has finished all" not in again.stdout and f"done: {tmp_path}/model.keras" in again.stdout
    assert run_folder.missing_artefacts(config) == []
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["1"]  # no part of a stopped export left
    assert not list(tmp_path.rglob("*.tmp*"))
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["epochs"] == 1 and results["test"] == pytest.approx(uninterrupted["test"], abs=1e-6)
    assert "has finished all 1 epochs" in _train(args).stdout  # and then it is done


def stderr_lines(done):
    return [line for line in done.stderr.splitlines() if line.strip()]
