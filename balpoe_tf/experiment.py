"""A training run: configuration, run folder, checkpoints and resume, logging, results.

`RunConfig` is the single list of run settings; `tools/train.py` turns each field into
an absl flag, so flag files in `configs/` set exactly these names.
"""

import dataclasses
import glob
import io
import json
import math
import os
import re
import subprocess
import time
from typing import Callable, List

import numpy as np

import keras
import tensorflow as tf

from balpoe_tf import __version__, export, label_shift, losses, models, training
from balpoe_tf.progress import Progress, hms
from balpoe_tf import data as lt_data
from balpoe_tf.config import (FINITE, NON_EMPTY, Check, at_least, between, config_field, each, either,
                              greater_than, one_of, refuse, validate)


# Baselines in the same code: name -> overrides.
BASELINES = {
    "ce": dict(num_experts=1, lambdas=[1.0], target_mean_lambda=1.0, mixup_alpha=0.0),
    "bs": dict(num_experts=1, lambdas=[0.0], target_mean_lambda=0.0, mixup_alpha=0.0),
    "erm": dict(mixup_alpha=0.0),
    "uniform": dict(lambdas=None),  # M experts, all lambda = 0
}

PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")
STRATEGIES = ("auto", "mirrored", "multi_worker", "none")
SCHEDULES = ("step", "cosine")


@dataclasses.dataclass
class RunConfig:
    """Everything that defines a training run (each field is a flag of tools/train.py).

    Making one checks every value against its rule and the settings against each other
    (`ConfigError` names the flag, its value and what it may be)."""

    output_dir: str = config_field("runs/demo", "Run folder: flags, checkpoints, TensorBoard logs, results.",
                                   NON_EMPTY)
    # Data.
    dataset: str = config_field("digits", "Data source: a name, or tfds:NAME for any TFDS image-classification "
                                          "dataset (e.g. tfds:imagenet_lt).",
                                Check(lambda v: v in lt_data.DATASETS or (v.startswith(lt_data.TFDS_PREFIX)
                                                                          and len(v) > len(lt_data.TFDS_PREFIX)),
                                      "one of " + ", ".join(sorted(lt_data.DATASETS)) + " or tfds:NAME"))
    data_dir: str = config_field("", "TFDS data_dir holding prepared datasets (default ~/tensorflow_datasets).")
    tfds_split_train: str = config_field("train", "--dataset=tfds:NAME: the training split (slices work: "
                                                  "train[:90%]).", NON_EMPTY)
    tfds_split_test: str = config_field("test", "--dataset=tfds:NAME: the (balanced) test split.", NON_EMPTY)
    tfds_image_key: str = config_field("", "--dataset=tfds:NAME: the image feature (default: the Image one).")
    tfds_label_key: str = config_field("", "--dataset=tfds:NAME: the label feature (default: 'label', or the "
                                           "ClassLabel one).")
    tfds_in_memory: str = config_field("auto", "--dataset=tfds:NAME: load the images into memory (auto: when "
                                               "they have one fixed shape, e.g. CIFAR) or stream them from "
                                               "TFDS's files.", one_of(("auto", "yes", "no")))
    download: bool = config_field(False, "Let TFDS download the dataset (needs internet).")
    data_path: str = config_field("", "The .npz file (--dataset=npz) or image folder (--dataset=folder).")
    train_list: str = config_field("", "'path label' list of training images (--dataset=list).")
    test_list: str = config_field("", "'path label' list of test images (--dataset=list).")
    data_root: str = config_field("", "Folder the list-file paths are relative to.")
    num_classes: int = config_field(0, "Number of classes for --dataset=list (0: largest label + 1).",
                                    at_least(0))
    image_size: int = config_field(32, "Side of the model input for image files.", at_least(8))
    tfds_images: str = config_field("", "With --dataset=list: take the listed images missing under "
                                        "--data_root from this prepared TFDS dataset (imagenet2012, in "
                                        "--data_dir) and write them there first.")
    imbalance_ratio: float = config_field(100.0, "Head/tail ratio of the long-tailed training split; "
                                           "0 keeps the source's own class counts.",
                                          either(0, at_least(1), "the source's own counts"))
    augment: str = config_field("cifar", "Training augmentation.", one_of(lt_data.AUGMENTATIONS))
    mean: List[float] = config_field([], "Per-channel normalisation mean in [0, 1] (default: the source's).",
                                     each(between(0, 1)))
    std: List[float] = config_field([], "Per-channel normalisation std in [0, 1] (default: the source's).",
                                    each(Check(lambda v: 0 < v <= 1, "in (0, 1]")))
    test_crop: float = config_field(0.0, "Image files: test resize to size/test_crop, centre crop (0.875); "
                                         "0 resizes the whole image.",
                                    either(0, Check(lambda v: 0 < v <= 1, "in (0, 1]"), "off"))
    holdout_fraction: float = config_field(0.0, "Share of each class's training images set aside (never trained "
                                                "on) to calibrate the ensemble for test-time prior estimation "
                                                "(0: none, as in the paper).", between(0, 0.5, open_high=True))
    bad_images: str = config_field("fail", "Image files that are not images: 'fail' naming the file, "
                                           "or 'skip' them with a message.", one_of(("fail", "skip")))
    # Model.
    backbone: str = config_field("resnet32", "Backbone.", one_of(sorted(models.BACKBONES)))
    num_experts: int = config_field(3, "Number of experts M.", at_least(1))
    lambdas: List[float] = config_field([1.0, 0.0, -1.0], "One lambda per expert (tau = 1 - lambda).",
                                        each(FINITE))
    target_mean_lambda: float = config_field(0.0, "Mean lambda the ensemble should have (0: balanced); "
                                            "a different mean of --lambdas warns.", FINITE)
    scale: float = config_field(30.0, "Cosine-classifier scale (30 in the official code, 32 in the paper).",
                                greater_than(0))
    precision: str = config_field("float32", "Compute precision (the loss stays float32).", one_of(PRECISIONS))
    strategy: str = config_field("auto", "tf.distribute strategy: auto (MirroredStrategy over all GPUs "
                                         "when there are several), mirrored, multi_worker (from TF_CONFIG) "
                                         "or none.", one_of(STRATEGIES))
    sync_bn: bool = config_field(False, "Synchronise batch-norm statistics across replicas.")
    # Optimisation.
    epochs: int = config_field(200, "Training epochs.", at_least(1))
    batch_size: int = config_field(128, "Global batch size.", at_least(1))
    lr: float = config_field(0.1, "Base learning rate.", greater_than(0))
    schedule: str = config_field("step", "LR schedule, stepped per epoch: 'step' (warm-up, x gamma at "
                                    "--milestones) or 'cosine' (to 0 at --epochs).", one_of(SCHEDULES))
    warmup_epochs: int = config_field(5, "Linear warm-up epochs (at most --epochs).", at_least(0))
    milestones: List[int] = config_field([160, 180], "Epochs (0-based, increasing, below --epochs) at which "
                                                     "'step' multiplies the LR by --gamma.", each(at_least(0)))
    gamma: float = config_field(0.1, "LR decay factor of 'step'.", greater_than(0))
    weight_decay: float = config_field(5e-4, "L2 weight decay (added to the gradient before momentum).",
                                       at_least(0))
    momentum: float = config_field(0.9, "SGD momentum.", between(0, 1, open_high=True))
    nesterov: bool = config_field(True, "Nesterov momentum (needs --momentum > 0).")
    mixup_alpha: float = config_field(0.4, "Mixup Beta(alpha, alpha); 0 trains without mixup.",
                                      either(0, greater_than(0), "no mixup"))
    seed: int = config_field(1, "Seed of initialisation, shuffling, augmentation and mixup.", at_least(0))
    deterministic: bool = config_field(False, "Enable TensorFlow op determinism (same seed, same weights).")
    jit_compile: bool = config_field(False, "Compile the train step with XLA (slower on CPU; measured).")
    # Run control.
    eval_every: int = config_field(10, "Evaluate on the test set every N epochs (and at the end).", at_least(1))
    checkpoint_every: int = config_field(10, "Save a checkpoint every N epochs (and at the end).", at_least(1))
    compare: List[str] = config_field([], "Baselines to train after this run with the same data and "
                                      "schedule, and to put in the result table.", each(one_of(BASELINES)))
    dry_run: bool = config_field(False, "Build data and model, run one training step and one test batch, exit.")
    export: bool = config_field(True, "At the end, export a TF Serving SavedModel to RUN/export/<version>.")
    progress_every: float = config_field(30.0, "Inside an epoch or evaluation, seconds between progress lines "
                                               "when output is not a terminal (0: none); a terminal gets one "
                                               "updating line.", at_least(0))

    def __post_init__(self):
        validate(self)
        if len(self.lambdas) != self.num_experts:
            refuse("lambdas", self.lambdas, f"one value per expert: {self.num_experts} for "
                   f"--num_experts={self.num_experts}")
        if self.warmup_epochs > self.epochs:
            refuse("warmup_epochs", self.warmup_epochs, f"at most --epochs={self.epochs}")
        if self.schedule == "step" and (sorted(set(self.milestones)) != self.milestones
                                        or any(m >= self.epochs for m in self.milestones)):
            refuse("milestones", self.milestones, f"strictly increasing epochs below --epochs={self.epochs}")
        if self.nesterov and self.momentum == 0:
            refuse("momentum", self.momentum, "> 0 with --nesterov (or pass --nonesterov)")


# Settings that do not change what a run computes, so a resumed run may differ in them.
RUN_CONTROL = ("output_dir", "eval_every", "checkpoint_every", "compare", "dry_run", "export", "progress_every",
               "data_dir", "tfds_images", "download", "data_path", "train_list", "test_list", "data_root",
               "jit_compile")

RESULT_COLUMNS = ("accuracy", "many_accuracy", "medium_accuracy", "few_accuracy", "ece", "mce", "nll")


class RunError(RuntimeError):
    """A run cannot start as configured; the message says why and what to do."""


def baseline_config(config: RunConfig, name: str) -> RunConfig:
    """The config of baseline `name` trained like `config`, in a sub-folder of its run."""
    if name not in BASELINES:
        raise RunError(f"unknown baseline {name!r}; choose from {sorted(BASELINES)}")
    overrides = dict(BASELINES[name])
    if overrides.get("lambdas", 1) is None:
        overrides["lambdas"] = [0.0] * config.num_experts
    return dataclasses.replace(config, output_dir=os.path.join(config.output_dir, f"baseline_{name}"),
                               compare=[], **overrides)


def load_data(config: RunConfig) -> lt_data.LabeledData:
    if config.tfds_images:
        if config.dataset != "list":
            raise RunError("--tfds_images goes with --dataset=list (the lists name the images to take)")
        lt_data.extract_from_tfds([config.train_list, config.test_list], config.data_root,
                                  config.tfds_images, config.data_dir or None)
    data = lt_data.load_dataset(
        config.dataset, imbalance_ratio=config.imbalance_ratio or None, data_dir=config.data_dir or None,
        download=config.download, data_path=config.data_path, train_list=config.train_list,
        test_list=config.test_list, data_root=config.data_root,
        num_classes=config.num_classes or None, image_size=config.image_size,
        mean=config.mean or None, std=config.std or None, test_crop=config.test_crop,
        split_train=config.tfds_split_train, split_test=config.tfds_split_test, image_key=config.tfds_image_key,
        label_key=config.tfds_label_key, in_memory=config.tfds_in_memory)
    return lt_data.hold_out(data, config.holdout_fraction) if config.holdout_fraction else data


def make_schedule(config: RunConfig, steps_per_epoch: int):
    if config.schedule == "step":
        return training.WarmupStepSchedule(config.lr, steps_per_epoch, config.warmup_epochs,
                                           config.milestones, config.gamma)
    return training.EpochCosineSchedule(config.lr, steps_per_epoch, config.epochs, config.warmup_epochs)


def build_model(config: RunConfig, data: lt_data.LabeledData, steps_per_epoch: int) -> models.BalPoEModel:
    """A compiled BalPoE model for `config` (call inside the strategy scope)."""
    model = models.BalPoEModel(data.num_classes, config.num_experts, config.backbone, config.scale,
                               input_shape=data.image_shape, sync_bn=config.sync_bn)
    optimizer = training.SGDWithL2(make_schedule(config, steps_per_epoch), config.momentum,
                                   config.nesterov, config.weight_decay)
    if config.precision == "mixed_float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    loss = losses.LogitAdjustedLoss(data.train_counts(), config.lambdas, config.target_mean_lambda)
    model.compile(optimizer, loss, mixup_alpha=config.mixup_alpha, seed=config.seed,
                  jit_compile=config.jit_compile)
    return model


def lr_schedule(model):
    """The per-epoch schedule object behind the model's optimizer."""
    optimizer = model.optimizer
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        optimizer = optimizer.inner_optimizer
    # Keras exposes only the current LR value publicly; the schedule is `_learning_rate`.
    return optimizer._learning_rate


# ---------------------------------------------------------------------------------------
# Run folder.

CHECKPOINT_PATTERN = "checkpoints/epoch_{:04d}.keras"


def _config_path(output_dir):
    return os.path.join(output_dir, "config.json")


def checkpoints(output_dir: str) -> list:
    """(epoch, path) of every checkpoint in a run folder, newest first."""
    found = []
    for path in glob.glob(os.path.join(output_dir, "checkpoints", "epoch_*.keras")):
        match = re.search(r"epoch_(\d+)\.keras$", path)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found, reverse=True)


def latest_checkpoint(output_dir: str):
    """(epoch, path) of the newest checkpoint in a run folder, or (0, None)."""
    return (checkpoints(output_dir) or [(0, None)])[0]


UNREADABLE_SUFFIX = ".unreadable"


def load_model_file(path: str):
    """A saved Keras model; a file that cannot be read raises `RunError` naming it."""
    try:
        return keras.saving.load_model(path)
    except Exception as e:  # Keras reports a damaged zip as many error types, some misleading
        raise RunError(f"{path} is not a readable Keras model ({type(e).__name__}: "
                       f"{str(e).splitlines()[0] if str(e) else 'no details'})") from e


def load_latest_checkpoint(output_dir: str, log: Callable[[str], None] = print):
    """(epoch, model) of the newest checkpoint that loads, or (0, None) if there is none.

    A newer checkpoint that cannot be read (e.g. truncated when the machine stopped) is
    named in a warning and renamed `*.keras.unreadable` (kept, never tried again) once an
    older one loads; if none loads, `RunError` lists them and nothing is renamed."""
    found, unreadable = checkpoints(output_dir), []
    for epoch, path in found:
        try:
            model = load_model_file(path)
        except RunError as e:
            log(f"warning: {e}; trying the previous checkpoint")
            unreadable.append(path)
            continue
        for bad in unreadable:
            os.replace(bad, bad + UNREADABLE_SUFFIX)
            log(f"warning: kept the unreadable {bad} as {bad + UNREADABLE_SUFFIX}")
        log(f"resuming from {path} (epoch {epoch})")
        return epoch, model
    if found:
        raise RunError(f"no checkpoint in {output_dir}/checkpoints can be read ({', '.join(unreadable)}): "
                       "check the Keras version (config.json records the one that wrote them), or start "
                       "the run in a new --output_dir")
    return 0, None


def check_run_folder(config: RunConfig):
    """Fail if the run folder holds another run's checkpoint that this config cannot resume."""
    _, checkpoint = latest_checkpoint(config.output_dir)
    if checkpoint is None:
        return
    path = _config_path(config.output_dir)
    if not os.path.isfile(path):
        raise RunError(f"{config.output_dir} holds checkpoint {checkpoint} but no config.json, so it "
                       "cannot be resumed safely: use a new --output_dir or delete the folder")
    with open(path) as f:
        saved = json.load(f)["config"]
    current = dataclasses.asdict(config)
    # A setting added after the run was saved had its default then.
    saved = {**dataclasses.asdict(RunConfig()), **saved}
    diffs = [f"--{k}: saved {saved[k]!r}, now {current[k]!r}" for k in current
             if k not in RUN_CONTROL and saved[k] != current[k]]
    if diffs:
        raise RunError(f"{config.output_dir} holds a checkpoint of a different run ("
                       + "; ".join(diffs) + "): use a new --output_dir, or the saved settings "
                       f"(--flagfile={os.path.join(config.output_dir, 'flags.txt')}) to resume it")


def strict_json(value):
    """`value` with every NaN (e.g. the accuracy of an empty class group) as None, so that the
    JSON written is standard JSON (null) that any reader accepts, not Python's NaN extension."""
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def write_json(path: str, value, **kwargs):
    """Write `value` to `path` as standard JSON (NaN as null); kwargs go to json.dump."""
    with open(path, "w") as f:
        json.dump(strict_json(value), f, indent=1, allow_nan=False, **kwargs)


def load_run(run_dir: str):
    """(model, saved run record) of a run folder made by tools/train.py."""
    record_path = os.path.join(run_dir, "config.json")
    model_path = os.path.join(run_dir, "model.keras")
    if not os.path.isfile(model_path):
        _, model_path = latest_checkpoint(run_dir)
    if not os.path.isfile(record_path) or not model_path:
        raise RunError(f"{run_dir} holds no trained model (model.keras or checkpoints/) with its "
                       "config.json: pass the --output_dir of a tools/train.py run")
    with open(record_path) as f:
        record = json.load(f)
    return load_model_file(model_path), record


def write_run_record(config: RunConfig, data: lt_data.LabeledData, model: models.BalPoEModel,
                     steps_per_epoch: int) -> dict:
    """Write flags.txt (a re-runnable flag file) and config.json (settings, schedule,
    optimizer, data); returns the config.json record."""
    os.makedirs(config.output_dir, exist_ok=True)
    schedule = lr_schedule(model)
    record = {
        "config": dataclasses.asdict(config),
        "data": {"name": data.name, "num_classes": data.num_classes, "train_size": len(data.train),
                 "holdout_size": 0 if data.holdout is None else len(data.holdout),
                 "test_size": len(data.test), "train_counts": data.train_counts().tolist(),
                 "class_names": list(data.class_names), "mean": list(data.mean), "std": list(data.std),
                 "test_crop": data.test_crop,
                 "image_shape": list(data.image_shape)},
        "steps_per_epoch": steps_per_epoch,
        "lr_by_epoch": [float(schedule.epoch_lr(e)) for e in range(config.epochs)],
        "optimizer": keras.saving.serialize_keras_object(model.optimizer),
        "model": model.get_config(),
        "versions": {"tensorflow": tf.__version__, "keras": keras.__version__,
                     "balpoe_tf": __version__, "commit": source_commit()},
    }
    write_json(_config_path(config.output_dir), record, default=str)
    with open(os.path.join(config.output_dir, "flags.txt"), "w") as f:
        f.write(config_to_flags(config))
    return record


def source_commit():
    """The git commit of the checkout this package runs from ("-dirty" when it has
    uncommitted changes), or None outside a git checkout."""
    try:
        result = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=40"], capture_output=True,
                                text=True, timeout=30, cwd=os.path.dirname(os.path.abspath(__file__)))
    except (OSError, subprocess.SubprocessError):
        return None
    commit = result.stdout.strip()
    return commit if result.returncode == 0 and commit else None


def config_to_flags(config: RunConfig) -> str:
    lines = []
    for key, value in dataclasses.asdict(config).items():
        if isinstance(value, list):
            value = ",".join(str(v) for v in value)
        elif isinstance(value, bool):
            value = str(value).lower()
        lines.append(f"--{key}={value}")
    return "\n".join(lines) + "\n"


def _save_atomic(model, path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path[:-len(".keras")] + ".tmp.keras"
    model.save(tmp)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------
# Callbacks.


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
        _save_atomic(self.model, os.path.join(self.output_dir, CHECKPOINT_PATTERN.format(done)))
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


def reliability_diagram_png(count, confidence, hits, title="") -> bytes:
    """A reliability diagram (accuracy and mean confidence per bin) as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    count, confidence, hits = (np.asarray(v, np.float64) for v in (count, confidence, hits))
    bins = len(count)
    edges = np.linspace(0, 1, bins + 1)
    nonempty = count > 0
    acc = np.where(nonempty, hits / np.maximum(count, 1), 0)
    conf = np.where(nonempty, confidence / np.maximum(count, 1), 0)
    ece = np.abs(hits - confidence).sum() / max(count.sum(), 1)
    mce = np.max(np.where(nonempty, np.abs(acc - conf), 0))
    fig, ax = plt.subplots(figsize=(4, 4), dpi=80)
    ax.bar(edges[:-1], acc, width=1 / bins, align="edge", edgecolor="black", label="accuracy")
    ax.bar(edges[:-1], conf - acc, bottom=acc, width=1 / bins, align="edge", color="red",
           alpha=0.3, label="gap")
    ax.plot([0, 1], [0, 1], "k--", linewidth=1)
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy",
           title=f"{title} ECE {100 * ece:.1f}  MCE {100 * mce:.1f}".strip())
    ax.legend(loc="upper left")
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


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


# ---------------------------------------------------------------------------------------
# Training.


def make_strategy(name: str) -> tf.distribute.Strategy:
    """The tf.distribute strategy named by --strategy."""
    if name == "auto":
        name = "mirrored" if len(tf.config.list_logical_devices("GPU")) > 1 else "none"
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi_worker":
        if "TF_CONFIG" not in os.environ:
            raise RunError("--strategy=multi_worker reads the cluster from the TF_CONFIG environment "
                           "variable, which is not set")
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "none":
        return tf.distribute.get_strategy()
    raise RunError(f"unknown --strategy {name!r}; choose from {STRATEGIES}")


def _worker_config(config: RunConfig, strategy) -> RunConfig:
    """Under MultiWorkerMirroredStrategy every worker trains and saves (saving reads
    variables collectively), but only the chief writes to --output_dir; worker i uses
    --output_dir/worker<i>."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) or resolver is None:
        return config
    chief = resolver.task_type == "chief" or (
        resolver.task_type == "worker" and resolver.task_id == 0 and "chief" not in resolver.cluster_spec().as_dict())
    if chief:
        return config
    return dataclasses.replace(config, output_dir=os.path.join(config.output_dir, f"worker{resolver.task_id}"),
                               compare=[])


def _hparams(config: RunConfig) -> dict:
    out = {}
    for key, value in dataclasses.asdict(config).items():
        if key in RUN_CONTROL:
            continue
        out[key] = ",".join(map(str, value)) if isinstance(value, list) else value
    return out


def train(config: RunConfig, log: Callable[[str], None] = print) -> dict:
    """Train (or resume) one run and evaluate it on the balanced test set.

    Args:
        config: the run settings.
        log: where progress lines go.

    Returns:
        Final test metrics (empty for a dry run).
    """
    strategy = make_strategy(config.strategy)  # first: collectives must precede other TF work
    config = _worker_config(config, strategy)
    if not config.dry_run:
        check_run_folder(config)
    keras.mixed_precision.set_global_policy(config.precision)
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()
    keras.utils.set_random_seed(config.seed)
    data = load_data(config)
    steps = lt_data.steps_per_epoch(len(data.train), config.batch_size)
    log(f"data {data.name}: {len(data.train)} training images in {data.num_classes} classes "
        f"(max {data.train_counts().max()}, min {data.train_counts().min()}), {len(data.test)} test images")

    with strategy.scope():
        start_epoch, model = (0, None) if config.dry_run else load_latest_checkpoint(config.output_dir, log)
        if model is None:
            model = build_model(config, data, steps)
    schedule = lr_schedule(model)
    log(f"model {config.backbone} x {config.num_experts} experts, lambdas {config.lambdas}, "
        f"{models.count_params(model):,} parameters; {steps} steps/epoch")

    train_ds = lt_data.train_pipeline(data, config.batch_size, config.epochs, config.seed,
                                      config.augment, start_epoch, config.bad_images)
    test_batch = max(config.batch_size, 256)
    test_ds = lt_data.test_pipeline(data, test_batch, bad_images=config.bad_images)
    if config.dry_run:
        images, labels = next(iter(train_ds))
        logs = model.train_on_batch(images, labels, return_dict=True)
        test_logs = model.test_on_batch(*next(iter(test_ds)), return_dict=True)
        log(f"dry run: batch {tuple(images.shape)}, train loss {logs['loss']:.4f}, "
            f"test-batch accuracy {test_logs['accuracy']:.4f}")
        return {}

    record = write_run_record(config, data, model, steps)
    results = {}
    if start_epoch < config.epochs:
        log_dir = os.path.join(config.output_dir, "tensorboard")
        callbacks = [
            keras.callbacks.TensorBoard(log_dir, write_graph=False),
            BalPoETensorBoard(log_dir, schedule, _hparams(config)),
            DivergenceGuard(schedule, config.output_dir),  # before the checkpoint of the epoch
            EpochCheckpoint(config.output_dir, config.checkpoint_every, config.epochs),
            ProgressLine(len(data.train), config.epochs, schedule, log, steps, len(data.test),
                         lt_data.steps_per_epoch(len(data.test), test_batch), config.progress_every),
        ]
        history = model.fit(train_ds, epochs=config.epochs, initial_epoch=start_epoch,
                            steps_per_epoch=steps, validation_data=test_ds,
                            validation_freq=_eval_epochs(config, start_epoch),
                            callbacks=callbacks, shuffle=False, verbose=0)
        # The last epoch is always evaluated; its metrics are the final results.
        results = {k[len("val_"):]: v[-1] for k, v in history.history.items() if k.startswith("val_")}
    if not results:
        results = model.evaluate(test_ds, return_dict=True, verbose=0)
    results = {k: float(v) for k, v in results.items()}
    write_final_metrics(os.path.join(config.output_dir, "tensorboard"), results, config.epochs)
    cal = model.calibration
    with open(os.path.join(config.output_dir, "reliability_diagram.png"), "wb") as f:
        f.write(reliability_diagram_png(cal.count.numpy(), cal.confidence.numpy(), cal.hits.numpy(),
                                        data.name))
    model.save(os.path.join(config.output_dir, "model.keras"))
    write_json(os.path.join(config.output_dir, "results.json"), {"epochs": config.epochs, "test": results})
    log(f"done: {config.output_dir}/model.keras, results.json")
    calibration = None
    if data.holdout is not None:
        calibration = calibrate_on_holdout(model, data, config, test_batch).calibration
        log(f"calibrated on {len(data.holdout)} held-out images: temperature {calibration.temperature:.3f}, "
            f"balanced NLL {calibration.nll_before:.3f} -> {calibration.nll_after:.3f} "
            f"({label_shift.CALIBRATION_FILE})")
    if config.export:
        path = export.export_run(model, record, os.path.join(config.output_dir, "export"), calibration=calibration)
        log(f"SavedModel for TF Serving: {path}")
    return results


def calibrate_on_holdout(model, data: lt_data.LabeledData, config: RunConfig, batch_size: int):
    """Predict the held-out split, store its balanced logits in the run folder and fit the
    calibrations test-time prior estimation uses (`label_shift.Holdout`)."""
    forward = tf.function(lambda x: model(x, training=False)["logits"], autograph=False)
    labels, logits = [], []
    for images, y in lt_data.test_pipeline(data, batch_size, split=data.holdout, bad_images=config.bad_images):
        labels.append(y.numpy())
        logits.append(forward(images).numpy())
    trained_log_prior = float(np.mean(config.lambdas)) * np.log(lt_data.class_prior(data.train_counts()))
    return label_shift.save_holdout(config.output_dir, np.concatenate(labels),
                                    np.concatenate(logits).astype(np.float64) - trained_log_prior)


def _eval_epochs(config: RunConfig, start_epoch: int) -> list:
    # 1-based epochs at which Keras evaluates: every eval_every epochs, and the last.
    every = max(config.eval_every, 1)
    return sorted({e for e in range(start_epoch + 1, config.epochs + 1) if e % every == 0} | {config.epochs})


def percent(value) -> str:
    """A fraction as a percentage with one decimal, or "n/a" for a missing (None / NaN) value."""
    return "n/a" if value is None or math.isnan(value) else f"{100 * value:.1f}"


def format_table(rows: dict, columns=RESULT_COLUMNS) -> str:
    """A Markdown table of runs (rows) by metrics (columns, in %; NLL as is)."""
    head = "| run | " + " | ".join(c.replace("_accuracy", "") for c in columns) + " |"
    lines = [head, "|" + "---|" * (len(columns) + 1)]
    for name, metrics in rows.items():
        cells = []
        for c in columns:
            value = metrics.get(c, float("nan"))
            cells.append(f"{value:.3f}" if c == "nll" and value is not None and not math.isnan(value)
                         else percent(value))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def train_with_baselines(config: RunConfig, log: Callable[[str], None] = print) -> dict:
    """Train `config`, then each baseline of `config.compare`; print and save the table."""
    for name in config.compare:
        baseline_config(config, name)  # unknown names fail before any training
    label = "BalPoE" if config.num_experts > 1 else "run"
    rows = {f"{label} (lambdas {','.join(f'{v:g}' for v in config.lambdas)})": train(config, log)}
    if config.dry_run:
        return rows
    for name in config.compare:
        log(f"--- baseline {name} ---")
        rows[name] = train(baseline_config(config, name), log)
    table = format_table(rows)
    with open(os.path.join(config.output_dir, "results.md"), "w") as f:
        f.write(f"Balanced test set of {config.dataset}, IR {config.imbalance_ratio:g}, "
                f"{config.epochs} epochs (% except NLL)\n\n{table}\n")
    log(table)
    return rows
