"""Keras callbacks of a training run: checkpoints, the divergence guard, the progress line
and TensorBoard (scalars, reliability diagrams, HParams)."""

import dataclasses
import glob
import math
import os
import time
from typing import Callable

import numpy as np

import keras
import tensorflow as tf

from balpoe_tf import training
from balpoe_tf.progress import Progress, hms
from balpoe_tf.reporting import reliability_diagram_png, RESULT_COLUMNS
from balpoe_tf.run_config import RUN_CONTROL, RunConfig
from balpoe_tf.run_folder import CHECKPOINT_PATTERN, latest_checkpoint, save_atomic


class EpochCheckpoint(keras.callbacks.Callback):
    """Saves `checkpoints/epoch_NNNN.keras` (model, optimizer state, schedule position)
    every `every` epochs and at the last one, keeping the newest `keep`."""

    def __init__(self, output_dir, every, epochs, keep=2):
        super().__init__()
        self.output_dir, self.every, self.epochs, self.keep = output_dir, every, epochs, keep

    def on_epoch_end(self, epoch, logs=None):
        done = epoch + 1
        if done % self.every and done != self.epochs:
            return
        save_atomic(self.model, os.path.join(self.output_dir, CHECKPOINT_PATTERN.format(done)))
        for path in sorted(glob.glob(os.path.join(self.output_dir, "checkpoints", "epoch_*.keras")))[:-self.keep]:
            os.remove(path)


class DivergenceGuard(keras.callbacks.Callback):
    """Stops training at the first non-finite loss, or at an epoch end whose weights are
    not all finite (before the checkpoint of that epoch is written), by raising
    `TrainingDiverged` with the epoch, step and learning rate: a diverged model is never
    checkpointed, evaluated or exported."""

    def __init__(self, schedule, output_dir):
        super().__init__()
        self.schedule, self.output_dir = schedule, output_dir

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def _stop(self, what, where):
        _, checkpoint = latest_checkpoint(self.output_dir)
        kept = f"the last good checkpoint is {checkpoint}" if checkpoint else "no checkpoint was written"
        lr = float(self.schedule.epoch_lr(self.epoch))
        raise training.TrainingDiverged(
            f"training diverged at epoch {self.epoch + 1}, {where} (LR {lr:.4g}): {what}; {kept}; nothing "
            "was evaluated or exported. Start again with a lower --lr (or a longer --warmup_epochs) in a new "
            "--output_dir.")

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            self._stop(f"the loss is {float(loss)}", f"step {batch + 1}")

    def on_epoch_end(self, epoch, logs=None):
        if not all(np.isfinite(w).all() for w in self.model.get_weights()):
            self._stop("the weights are not all finite", "its end")


class ProgressLine(keras.callbacks.Callback):
    """Inside each epoch and evaluation, a `progress.Progress` line (steps, images/s, ETA);
    after each epoch, one summary line: losses, accuracies, LR, throughput and ETA."""

    def __init__(self, num_images, epochs, schedule, log: Callable[[str], None] = print,
                 steps=1, test_images=0, test_steps=1, every=30.0, stream=None):
        super().__init__()
        self.num_images, self.epochs, self.schedule, self.log = num_images, epochs, schedule, log
        self.steps, self.test_images, self.test_steps = steps, test_images, test_steps
        self.every, self.stream = every, stream
        self.durations = []

    def on_epoch_begin(self, epoch, logs=None):
        self.start = time.perf_counter()
        self.epoch = epoch
        self.bar = Progress(f"epoch {epoch + 1}/{self.epochs}", self.steps, self.num_images, self.every, self.stream)

    def on_train_batch_end(self, batch, logs=None):
        self.bar.update(batch + 1)

    def on_test_begin(self, logs=None):
        self.bar.close()
        self.test_bar = Progress(f"epoch {self.epoch + 1}/{self.epochs} evaluating", self.test_steps,
                                 self.test_images, self.every, self.stream)

    def on_test_batch_end(self, batch, logs=None):
        self.test_bar.update(batch + 1)

    def on_test_end(self, logs=None):
        self.test_bar.close()

    def on_epoch_end(self, epoch, logs=None):
        self.bar.close()
        seconds = time.perf_counter() - self.start
        self.durations.append(seconds)
        eta = np.median(self.durations[-5:]) * (self.epochs - epoch - 1)
        logs = logs or {}
        parts = [f"epoch {epoch + 1}/{self.epochs}", f"lr {float(self.schedule.epoch_lr(epoch)):.4g}",
                 f"loss {logs.get('loss', float('nan')):.4f}", f"acc {logs.get('accuracy', float('nan')):.4f}"]
        if "val_accuracy" in logs:
            parts += [f"test acc {logs['val_accuracy']:.4f}",
                      "many/med/few " + "/".join(f"{logs.get(f'val_{g}_accuracy', float('nan')):.3f}"
                                                 for g in ("many", "medium", "few")),
                      f"ECE {logs.get('val_ece', float('nan')):.4f}"]
        parts += [f"{self.num_images / seconds:.0f} img/s", f"ETA {hms(eta)}"]
        self.log("  ".join(parts))


# Final balanced-test metrics, written to each run's session folder for TensorBoard's HParams
# dashboard, which reads a session's metrics from that folder.
FINAL_METRICS = RESULT_COLUMNS


def hparams_config():
    """The HParams dashboard's columns: every setting that changes what a run computes,
    with its domain where the setting has a list of values, and the final metrics."""
    from tensorboard.plugins.hparams import api as hp

    hparams = []
    for field in dataclasses.fields(RunConfig):
        if field.name in RUN_CONTROL:
            continue
        check = field.metadata.get("check")
        domain = (hp.Discrete(list(check.choices)) if check is not None and check.choices
                  else hp.Discrete([False, True]) if field.type in (bool, "bool") else None)
        hparams.append(hp.HParam(field.name, domain, description=field.metadata.get("help")))
    metrics = [hp.Metric(f"final/{m}", display_name=m.replace("_accuracy", ""),
                         description=f"balanced test set, last epoch: {m}") for m in FINAL_METRICS]
    return hparams, metrics


def write_final_metrics(log_dir: str, results: dict, step: int):
    """The final balanced-test metrics as `final/<metric>` scalars of the run's session."""
    writer = tf.summary.create_file_writer(log_dir)
    with writer.as_default(step=step):
        for name in FINAL_METRICS:
            value = results.get(name)
            if value is not None and math.isfinite(value):  # an empty class group has no accuracy
                tf.summary.scalar(f"final/{name}", value)
    writer.close()


class BalPoETensorBoard(keras.callbacks.Callback):
    """LR per epoch and a reliability diagram at each evaluation (in `balpoe/`), next to the
    scalars Keras' TensorBoard callback writes, and the run's hparams with the dashboard's
    columns declared (in the log folder itself, the session that the final metrics join)."""

    def __init__(self, log_dir, schedule, hparams: dict):
        super().__init__()
        self.log_dir = log_dir
        self.writer = tf.summary.create_file_writer(os.path.join(log_dir, "balpoe"))
        self.schedule, self.hparams = schedule, hparams

    def on_train_begin(self, logs=None):
        from tensorboard.plugins.hparams import api as hp

        writer = tf.summary.create_file_writer(self.log_dir)
        with writer.as_default():
            hp.hparams_config(*hparams_config())
            # The run folder names the session (e.g. baseline_ce), not a hash of the hparams.
            hp.hparams(self.hparams, trial_id=os.path.basename(os.path.dirname(os.path.normpath(self.log_dir))))
        writer.close()

    def on_epoch_end(self, epoch, logs=None):
        with self.writer.as_default(step=epoch + 1):
            tf.summary.scalar("learning_rate", self.schedule.epoch_lr(epoch))
            if logs and "val_ece" in logs:
                cal = self.model.calibration
                png = reliability_diagram_png(cal.count.numpy(), cal.confidence.numpy(), cal.hits.numpy(),
                                              f"epoch {epoch + 1}")
                tf.summary.image("reliability_diagram", tf.image.decode_png(png)[None])
        self.writer.flush()
