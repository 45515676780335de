"""callbacks.Checkpoints: where checkpoints are saved, by epochs, by minutes and on a signal."""

import pytest

from balpoe_tf import callbacks, preemption, run_folder


class _Model:
    def save(self, path):
        with open(path, "w") as f:
            f.write("checkpoint")


def _names(folder):
    return sorted(p.name for p in (folder / "checkpoints").iterdir())


def _epoch(checkpoints, epoch, steps, first_step=0):
    checkpoints.on_epoch_begin(epoch)
    for batch in range(steps - first_step):
        checkpoints.on_train_batch_end(batch)
    checkpoints.on_epoch_end(epoch)


@pytest.fixture
def clock():
    class Clock:
        now = 0.0

        def __call__(self):
            return self.now
    return Clock()


def test_epoch_ends_minutes_and_the_newest_kept(tmp_path, clock):
    saved = callbacks.Checkpoints(str(tmp_path), every=2, epochs=3, steps=4, keep=3, minutes=1.0, clock=clock)
    saved.set_model(_Model())
    saved.on_train_begin()
    clock.now = 30.0
    saved.on_epoch_begin(0)
    saved.on_train_batch_end(0)
    assert not (tmp_path / "checkpoints").exists()  # half a minute: nothing yet
    clock.now = 61.0
    saved.on_train_batch_end(1)  # a minute since the start: step 2 of epoch 1
    assert _names(tmp_path) == ["epoch_0000_step_000002.keras"]
    saved.on_train_batch_end(2)
    saved.on_train_batch_end(3)
    saved.on_epoch_end(0)  # not every 2nd epoch: no epoch checkpoint
    clock.now = 200.0
    _epoch(saved, 1, 4)  # a minute passed: step 1, then the epoch's end (every 2)
    assert _names(tmp_path) == ["epoch_0000_step_000002.keras", "epoch_0001_step_000001.keras", "epoch_0002.keras"]
    _epoch(saved, 2, 4)  # the last epoch; keep 3
    assert _names(tmp_path) == ["epoch_0001_step_000001.keras", "epoch_0002.keras", "epoch_0003.keras"]
    assert run_folder.latest_checkpoint(str(tmp_path))[0] == (3, 0)
    run_folder.prune_checkpoints(str(tmp_path), 0)  # the newest always stays
    assert _names(tmp_path) == ["epoch_0003.keras"]


def test_a_signal_saves_the_step_and_stops(tmp_path):
    request = preemption.StopRequest()
    saved = callbacks.Checkpoints(str(tmp_path), every=10, epochs=5, steps=6, request=request, first=(2, 3))
    saved.set_model(_Model())
    saved.on_train_begin()
    assert request.training
    saved.on_epoch_begin(2)  # resumed at step 3 of epoch 3
    saved.on_train_batch_end(0)
    request.handle(15)
    with pytest.raises(preemption.Interrupted, match="stopped by SIGTERM at step 5/6 of epoch 3/5: saved .*"
                                                     "epoch_0002_step_000005.keras, nothing is lost"):
        saved.on_train_batch_end(1)
    assert not request.training and _names(tmp_path) == ["epoch_0002_step_000005.keras"]
    # On the last step of an epoch, where the run stands is the epoch's end.
    request = preemption.StopRequest()
    saved = callbacks.Checkpoints(str(tmp_path), every=10, epochs=5, steps=6, request=request)
    saved.set_model(_Model())
    saved.on_train_begin()
    saved.on_epoch_begin(3)
    request.handle(2)
    with pytest.raises(preemption.Interrupted, match="stopped by SIGINT at the end of epoch 4/5"):
        saved.on_train_batch_end(5)
    # Every worker of a multi-worker run stops where any one received the signal.
    saved = callbacks.Checkpoints(str(tmp_path), every=10, epochs=5, steps=6, request=preemption.StopRequest(),
                                  agree=lambda signum: 15)
    saved.set_model(_Model())
    saved.on_epoch_begin(0)
    with pytest.raises(preemption.Interrupted, match="stopped by SIGTERM at step 1/6 of epoch 1/5"):
        saved.on_train_batch_end(0)


def test_checkpoint_paths_and_positions(tmp_path):
    assert run_folder.checkpoint_path("run", 3).endswith("checkpoints/epoch_0003.keras")
    assert run_folder.checkpoint_path("run", 3, 12).endswith("checkpoints/epoch_0003_step_000012.keras")
    assert run_folder.describe_position((3, 0)) == "epoch 3"
    assert run_folder.describe_position((3, 12)) == "epoch 4, step 12"
    assert run_folder.latest_checkpoint(str(tmp_path)) == ((0, 0), None)
