"""Keras callbacks of a training run: checkpoints, the divergence guard, the progress line
and TensorBoard (scalars, reliability diagrams, HParams)."""

import dataclasses
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
from balpoe_tf.preemption import Interrupted, signal_name
from balpoe_tf.run_folder import checkpoint_path, latest_checkpoint, prune_checkpoints, save_atomic


class Checkpoints(keras.callbacks.Callback):
    """Checkpoints of a run (model, optimizer state, schedule position; the data position is in
    the name, `run_folder.checkpoint_path`), keeping the newest `keep`:

    - at the end of every `every` epochs and of the last;
    - inside an epoch, every `minutes` of training (0: never);
    - when a stop is requested (`preemption.StopRequest`, on any worker of a multi-worker run):
      at the end of the current step, after which `preemption.Interrupted` ends the run.

    Args:
        output_dir: the run folder.
        every: epochs between epoch-end checkpoints.
        epochs: the run's epochs.
        steps: training steps per epoch.
        keep: how many checkpoints stay (the newest always does).
        minutes: minutes of training between checkpoints inside an epoch.
        request: the run's `StopRequest` (None: signals are not watched).
        first: `(epoch, step)` where training begins: a run resumed inside an epoch trains the
            rest of it first, so that its steps are counted from `step`.
        agree: for a multi-worker run, `signum -> signum` that every worker calls at every step
            and that returns a signal any worker received (so that all stop at the same step).
        clock: seconds, for `minutes`.
    """

    def __init__(self, output_dir, every, epochs, steps, keep=2, minutes=0.0, request=None, first=(0, 0),
                 agree=None, clock=time.monotonic):
        super().__init__()
        self.output_dir, self.every, self.epochs, self.steps, self.keep = output_dir, every, epochs, steps, keep
        self.minutes, self.request, self.first, self.agree, self.clock = minutes, request, first, agree, clock

    def on_train_begin(self, logs=None):
        self.last_save = self.clock()
        if self.request is not None:
            self.request.training = True

    def on_train_end(self, logs=None):
        if self.request is not None:
            self.request.training = False

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch
        self.offset = self.first[1] if epoch == self.first[0] else 0

    def _save(self, epoch, step) -> str:
        path = checkpoint_path(self.output_dir, epoch, step)
        save_atomic(self.model, path)
        prune_checkpoints(self.output_dir, self.keep)
        self.last_save = self.clock()
        return path

    def _stop(self, signum, position):
        path = self._save(*position)
        if self.request is not None:
            self.request.training = False  # a further signal now stops at once
        epoch, step = position
        where = (f"step {step}/{self.steps} of epoch {epoch + 1}/{self.epochs}" if step
                 else f"the end of epoch {epoch}/{self.epochs}")
        raise Interrupted(signum, f"stopped by {signal_name(signum)} at {where}: saved {path}, nothing is lost")

    def on_train_batch_end(self, batch, logs=None):
        step = self.offset + batch + 1
        signum = self.request.signum if self.request is not None else 0
        if self.agree is not None:
            signum = self.agree(signum)
        # The last step of an epoch ends it: its position is the epoch's end.
        position = (self.epoch + 1, 0) if step >= self.steps else (self.epoch, step)
        if signum:
            self._stop(signum, position)
        if self.minutes and self.clock() - self.last_save >= 60 * self.minutes and step < self.steps:
            self._save(*position)

    def on_test_batch_end(self, batch, logs=None):
        # Evaluated at an epoch's end: what is saved is that epoch, whose evaluation is lost.
        if self.agree is None and self.request is not None and self.request.signum:
            self._stop(self.request.signum, (self.epoch + 1, 0))

    def on_epoch_end(self, epoch, logs=None):
        done = epoch + 1
        if done % self.every == 0 or done == self.epochs:
            self._save(done, 0)


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
                 steps=1, test_images=0, test_steps=1, every=30.0, stream=None, first=(0, 0)):
        super().__init__()
        self.num_images, self.epochs, self.schedule, self.log = num_images, epochs, schedule, log
        self.steps, self.test_images, self.test_steps = steps, test_images, test_steps
        self.every, self.stream, self.first = every, stream, first
        self.durations = []

    def on_epoch_begin(self, epoch, logs=None):
        self.start = time.perf_counter()
        self.epoch = epoch
        # A run resumed inside an epoch trains the rest of it.
        self.offset = self.first[1] if epoch == self.first[0] else 0
        what = f"epoch {epoch + 1}/{self.epochs}" + (f" from step {self.offset + 1}" if self.offset else "")
        self.bar = Progress(what, self.steps - self.offset, self._images(), self.every, self.stream)

    def _images(self) -> float:
        return self.num_images * (self.steps - self.offset) / self.steps

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
        parts += [f"{self._images() / seconds:.0f} img/s", f"ETA {hms(eta)}"]
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
