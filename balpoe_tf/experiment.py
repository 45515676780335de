"""A training run from start to end: strategy, data, model, resume, callbacks, final
evaluation, calibration on the held-out split and export."""

import dataclasses
import os
import subprocess
from typing import Callable

import numpy as np

import keras
import tensorflow as tf

from balpoe_tf import __version__, export, label_shift, losses, models, training
from balpoe_tf import data as lt_data
from balpoe_tf.callbacks import BalPoETensorBoard, DivergenceGuard, EpochCheckpoint, ProgressLine, write_final_metrics
from balpoe_tf.config import RunError
from balpoe_tf.reporting import format_table, reliability_diagram_png, write_json
from balpoe_tf.run_config import baseline_config, config_to_flags, load_data, RUN_CONTROL, RunConfig, STRATEGIES
from balpoe_tf.run_folder import (check_run_folder, config_path, load_latest_checkpoint, load_model_file,
                                  resumed_run_settings)


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
    write_json(config_path(config.output_dir), record, default=str)
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


# x86 CPU features (/proc/cpuinfo flags) with which a CPU computes a mixed precision in its own
# arithmetic. Without them TensorFlow emulates it (in oneDNN on AVX-512, through Eigen otherwise),
# which trains slower than float32 (docs/results.md, "Beyond the same maths").
NATIVE_CPU_FEATURES = {"mixed_bfloat16": ("avx512_bf16", "amx_bf16", "avx_ne_convert"),
                       "mixed_float16": ("avx512_fp16", "amx_fp16", "avx_ne_convert")}


def cpu_flags(cpuinfo: str = "/proc/cpuinfo"):
    """This CPU's x86 feature flags, or None where they cannot be read (not Linux, not x86).

    Args:
        cpuinfo: the file to read them from.

    Returns:
        The set of flags of the first processor listed, or None.
    """
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def emulated_precision_warning(precision: str, has_gpu: bool, flags) -> str:
    """A warning line when `precision` would run emulated on this machine's CPU, else "".

    Args:
        precision: the Keras precision policy of the run.
        has_gpu: whether TensorFlow sees a GPU (then the CPU does not compute the model).
        flags: the CPU's feature flags from `cpu_flags` (None: unknown, no warning).
    """
    features = NATIVE_CPU_FEATURES.get(precision)
    if not features or has_gpu or flags is None or flags & set(features):
        return ""
    return (f"warning: --precision={precision} on a CPU without {', '.join(features[:-1])} or {features[-1]}: "
            "TensorFlow emulates it, which trains slower than float32, not faster (docs/results.md, \"Beyond "
            "the same maths\"); use --precision=float32")


# The CPU features with which bfloat16 trains faster than float32: measured with AVX512-BF16
# (docs/results.md); AMX-BF16 adds bfloat16 matrix units. AVX-NE-CONVERT only converts to and
# from bfloat16, so auto leaves such CPUs in float32.
AUTO_BFLOAT16_CPU_FEATURES = ("avx512_bf16", "amx_bf16")


def gpu_capabilities() -> list:
    """The CUDA compute capability `(major, minor)` of each GPU TensorFlow sees (None where
    a GPU does not report one); [] without a GPU."""
    return [tf.config.experimental.get_device_details(gpu).get("compute_capability")
            for gpu in tf.config.list_physical_devices("GPU")]


def resolve_precision(precision: str, gpus: list, flags) -> str:
    """The precision `--precision=auto` stands for on this machine; other values unchanged.

    auto is mixed_bfloat16 where the hardware computes bfloat16 natively: GPUs that all have
    compute capability 8.0 or more (Ampere and later) or, without a GPU, a CPU with one of
    `AUTO_BFLOAT16_CPU_FEATURES`. Elsewhere bfloat16 would be emulated and slower, so auto is
    float32.

    Args:
        precision: the --precision setting.
        gpus: `gpu_capabilities()`.
        flags: the CPU's feature flags from `cpu_flags` (None: unknown, so float32).

    Returns:
        A Keras precision policy name.
    """
    if precision != "auto":
        return precision
    if gpus:
        native = all(capability is not None and tuple(capability) >= (8, 0) for capability in gpus)
    else:
        native = flags is not None and bool(flags & set(AUTO_BFLOAT16_CPU_FEATURES))
    return "mixed_bfloat16" if native else "float32"


def run_precision(config: RunConfig, gpus: list, flags) -> str:
    """The precision a run computes in: `resolve_precision`, except that auto resumes a run in
    the precision it started with, so that it continues the same run on another machine too."""
    saved = None if config.precision != "auto" or config.dry_run else resumed_run_settings(config.output_dir)
    if saved is not None:
        return saved["precision"]
    return resolve_precision(config.precision, gpus, flags)


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
    gpus, flags = gpu_capabilities(), cpu_flags()
    if config.precision == "auto":
        config = dataclasses.replace(config, precision=run_precision(config, gpus, flags))
        log(f"precision {config.precision} (--precision=auto)")
    if not config.dry_run:
        check_run_folder(config)
    warning = emulated_precision_warning(config.precision, bool(gpus), flags)
    if warning:
        log(warning)
    with models.precision_policy(config.precision):
        return _train_in_precision(config, strategy, log)


def _train_in_precision(config: RunConfig, strategy: tf.distribute.Strategy, log: Callable[[str], None]) -> dict:
    """`train` once the run's precision is resolved and in force."""
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
    model_path = os.path.join(config.output_dir, "model.keras")
    model.save(model_path)
    write_json(os.path.join(config.output_dir, "results.json"), {"epochs": config.epochs, "test": results})
    log(f"done: {config.output_dir}/model.keras, results.json")
    calibration = None
    if data.holdout is not None:
        calibration = calibrate_on_holdout(model, data, config, test_batch).calibration
        log(f"calibrated on {len(data.holdout)} held-out images: temperature {calibration.temperature:.3f}, "
            f"held-out NLL {calibration.nll_before:.3f} -> {calibration.nll_after:.3f} "
            f"({label_shift.CALIBRATION_FILE})")
    if config.export:
        # A SavedModel is served on other machines, where bfloat16 may be emulated: it computes in
        # float32 unless tools/export.py --precision says otherwise.
        served = model if config.precision == "float32" else load_model_file(model_path, "float32")
        path = export.export_run(served, record, os.path.join(config.output_dir, "export"), calibration=calibration)
        log(f"SavedModel for TF Serving: {path} (computes in float32)")
    return results


def calibrate_on_holdout(model, data: lt_data.LabeledData, config: RunConfig, batch_size: int):
    """Predict the held-out split, store its balanced logits in the run folder and fit the
    calibrations test-time prior estimation uses (`label_shift.Holdout`)."""
    labels, logits, _ = models.predict_dataset(
        model, lt_data.test_pipeline(data, batch_size, split=data.holdout, bad_images=config.bad_images))
    trained_log_prior = label_shift.trained_log_prior(data.train_counts(), float(np.mean(config.lambdas)))
    return label_shift.save_holdout(config.output_dir, labels, logits.astype(np.float64) - trained_log_prior,
                                    data.train_counts())


def _eval_epochs(config: RunConfig, start_epoch: int) -> list:
    # 1-based epochs at which Keras evaluates: every eval_every epochs, and the last.
    every = max(config.eval_every, 1)
    return sorted({e for e in range(start_epoch + 1, config.epochs + 1) if e % every == 0} | {config.epochs})


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
