"""A training run from start to end: strategy, data, model, resume, callbacks, final
evaluation, calibration on the held-out split and export."""

import dataclasses
import os
import subprocess
from typing import Callable, Optional

import numpy as np

import keras
import tensorflow as tf

from balpoe_tf import __version__, export, label_shift, losses, models, task, training
from balpoe_tf import precision as precision_lib
from balpoe_tf import data as lt_data
from balpoe_tf import preemption
from balpoe_tf.callbacks import BalPoETensorBoard, Checkpoints, DivergenceGuard, ProgressLine, write_final_metrics
from balpoe_tf.config import RunError
from balpoe_tf.reporting import format_table, reliability_diagram_png, write_json
from balpoe_tf.run_data import load_data
from balpoe_tf.run_config import (baseline_config, config_to_flags, quick_config, RUN_CONTROL, RunConfig,
                                  STRATEGIES, test_batch_size)
from balpoe_tf.run_folder import (check_run_folder, check_writable_folder, config_path, describe_position,
                                  finished_results, IMAGE_RECORD, latest_checkpoint, load_latest_checkpoint,
                                  load_model_file, read_run_record, resumed_run_settings)


def make_schedule(config: RunConfig, steps_per_epoch: int):
    if config.schedule == "step":
        return training.WarmupStepSchedule(config.lr, steps_per_epoch, config.warmup_epochs,
                                           config.milestones, config.gamma)
    return training.EpochCosineSchedule(config.lr, steps_per_epoch, config.epochs, config.warmup_epochs)


def build_model(config: RunConfig, data: lt_data.LabeledData, steps_per_epoch: int) -> task.BalPoEModel:
    """A compiled BalPoE model for `config` (call inside the strategy scope)."""
    model = task.BalPoEModel(data.num_classes, config.num_experts, config.backbone, config.scale,
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


def write_run_record(config: RunConfig, data: lt_data.LabeledData, model: task.BalPoEModel,
                     steps_per_epoch: int, choice: precision_lib.PrecisionChoice) -> dict:
    """Write flags.txt (a re-runnable flag file) and config.json (settings, schedule,
    optimizer, data, how the precision was chosen); returns the config.json record."""
    os.makedirs(config.output_dir, exist_ok=True)
    schedule = lr_schedule(model)
    if choice.how == "resumed":  # keep the measurement the run's precision came from
        choice = read_run_record(config.output_dir).get("precision_choice", choice.to_dict())
    else:
        choice = choice.to_dict()
    record = {
        "config": dataclasses.asdict(config),
        "data": {"name": data.name, "num_classes": data.num_classes, "train_size": len(data.train),
                 "holdout_size": 0 if data.holdout is None else len(data.holdout),
                 "test_size": len(data.test), "train_counts": data.train_counts().tolist(),
                 "class_names": list(data.class_names), "mean": list(data.mean), "std": list(data.std),
                 "test_crop": data.test_crop,
                 "image_shape": list(data.image_shape),
                 "train_fingerprint": lt_data.fingerprint(data.train),
                 "test_fingerprint": lt_data.fingerprint(data.test),
                 "left_out": [{"path": path, "reason": reason} for path, reason in data.left_out]},
        "precision_choice": choice,
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


def _measured_step(config: RunConfig, data: lt_data.LabeledData, batch: int):
    """`precision -> step` for `precision.measure_speeds`: the run's model compiled as the
    run compiles it, its `train_step` (mixup, losses, update, metrics) on one fixed random
    batch of the run's shape. Traced without AutoGraph, which the step does not need: tracing,
    most of what measuring costs on a small model, then takes 0.75 s instead of 1.9 s (ResNet-8)."""
    rng = np.random.default_rng(0)
    images = tf.constant(rng.standard_normal((batch, *data.image_shape), dtype=np.float32))
    labels = tf.constant(rng.integers(0, data.num_classes, batch), tf.int32)

    def make_step(name):
        with models.precision_policy(name):
            model = build_model(dataclasses.replace(config, precision=name), data, steps_per_epoch=1)
        model.optimizer.build(model.trainable_variables)
        step = tf.function(lambda: model.train_step((images, labels))["loss"], autograph=False,
                           jit_compile=config.jit_compile)
        return lambda: float(step())

    return make_step


def _agree_across_workers(strategy, choice: precision_lib.PrecisionChoice) -> precision_lib.PrecisionChoice:
    """Every worker of a multi-worker run must compute in the same precision: the workers'
    measurements are gathered and each takes `precision.slowest_worker` of them."""
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return choice
    local = tf.constant([precision_lib.worker_row(choice)], tf.float64)
    rows = strategy.gather(strategy.experimental_distribute_values_from_function(lambda _: local), axis=0)
    return precision_lib.slowest_worker(choice, rows.numpy())


def precision_model_key(config: RunConfig, data: lt_data.LabeledData, replicas: int) -> dict:
    """What `--precision=auto`'s measurement depends on besides the machine."""
    return {"backbone": config.backbone, "experts": config.num_experts, "classes": data.num_classes,
            "image_shape": list(data.image_shape), "batch": max(1, config.batch_size // replicas),
            "jit_compile": config.jit_compile, "replicas": replicas}


def choose_precision(config: RunConfig, data: lt_data.LabeledData, strategy: tf.distribute.Strategy,
                     gpus: list, flags) -> precision_lib.PrecisionChoice:
    """The precision a run computes in: the one --precision names; for auto, the one it
    started with when the run resumes (so that it continues the same run on another machine
    too), else the one measured faster for this model on this machine (`precision.choose_auto`)."""
    if config.precision != "auto":
        return precision_lib.PrecisionChoice(config.precision, "given")
    saved = None if config.dry_run else resumed_run_settings(config.output_dir)
    if saved is not None:
        return precision_lib.PrecisionChoice(saved["precision"], "resumed")
    model_key = precision_model_key(config, data, strategy.num_replicas_in_sync)
    batch = model_key["batch"]
    total_steps = config.epochs * lt_data.steps_per_epoch(len(data.train), config.batch_size)
    choice = precision_lib.choose_auto(model_key, precision_lib.auto_candidates(gpus, flags),
                                       _measured_step(config, data, batch), batch, total_steps, gpus, flags)
    return _agree_across_workers(strategy, choice)


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


def train(config: RunConfig, log: Callable[[str], None] = print,
          precision: Optional[precision_lib.PrecisionChoice] = None) -> dict:
    """Train (or resume) one run and evaluate it on the balanced test set.

    Args:
        config: the run settings.
        log: where progress lines go.
        precision: the precision to compute in when --precision is auto, instead of
            `choose_precision` (the baselines of a comparison take their run's).

    Returns:
        Final test metrics (empty for a dry run).

    Raises:
        preemption.Interrupted: on SIGINT or SIGTERM, once the run has saved where it is.
    """
    strategy = make_strategy(config.strategy)  # first: collectives must precede other TF work
    # After the strategy: a multi-worker one sets TensorFlow's own SIGTERM handler, which this replaces.
    with preemption.watching() as request:
        return _train(quick_config(config), strategy, log, precision, request)


def _train(config: RunConfig, strategy: tf.distribute.Strategy, log: Callable[[str], None],
           precision: Optional[precision_lib.PrecisionChoice], request: preemption.StopRequest) -> dict:
    """`train` with the run's strategy and stop request."""
    chief_dir = config.output_dir  # every worker resumes from the chief's newest checkpoint
    config = _worker_config(config, strategy)
    check_writable_folder(config.output_dir, "output_dir")
    if not config.dry_run:
        check_run_folder(config)
        finished = finished_results(config.output_dir, config.epochs)
        if finished is not None:
            log(f"{config.output_dir} has finished all {config.epochs} epochs (balanced accuracy "
                f"{100 * finished.get('accuracy', float('nan')):.1f} %): nothing to do. tools/evaluate.py evaluates "
                f"it, tools/export.py --run_dir={config.output_dir} exports it again")
            return finished
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()
    data = load_data(config, None if config.dry_run else os.path.join(config.output_dir, IMAGE_RECORD))
    log(f"data {data.name}: {len(data.train)} training images in {data.num_classes} classes "
        f"(max {data.train_counts().max()}, min {data.train_counts().min()}), {len(data.test)} test images")
    if data.left_out:
        log(f"left out {len(data.left_out)} image file(s) that cannot be used (--bad_images=skip; all listed in "
            f"config.json): " + "; ".join(f"{path}: {reason}" for path, reason in data.left_out[:3])
            + (" ..." if len(data.left_out) > 3 else ""))
    gpus, flags = precision_lib.gpu_capabilities(), precision_lib.cpu_flags()
    choice = precision if precision and config.precision == "auto" else choose_precision(
        config, data, strategy, gpus, flags)
    config = dataclasses.replace(config, precision=choice.precision)
    log(choice.summary())
    warning = precision_lib.emulated_precision_warning(config.precision, bool(gpus), flags)
    if warning:
        log(warning)
    try:
        with models.precision_policy(config.precision):
            return _train_in_precision(config, data, choice, strategy, request, chief_dir, log)
    except (tf.errors.UnavailableError, tf.errors.AbortedError, tf.errors.CancelledError,
            tf.errors.DeadlineExceededError) as e:
        if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
            raise
        position, _ = latest_checkpoint(chief_dir)
        raise preemption.WorkerLost(
            f"lost {preemption.lost_worker(e)} of the multi-worker run (TensorFlow: {type(e).__name__}): every "
            "worker stops. Start all of them again with the same command: they resume from the chief's newest "
            f"checkpoint ({describe_position(position)})") from None


def _train_in_precision(config: RunConfig, data: lt_data.LabeledData, choice: precision_lib.PrecisionChoice,
                        strategy: tf.distribute.Strategy, request: preemption.StopRequest, chief_dir: str,
                        log: Callable[[str], None]) -> dict:
    """`train` once the data is loaded and the run's precision is chosen and in force."""
    keras.utils.set_random_seed(config.seed)  # after the precision measurement, which draws numbers too
    steps = lt_data.steps_per_epoch(len(data.train), config.batch_size)
    with strategy.scope():
        start, model = ((0, 0), None) if config.dry_run else load_latest_checkpoint(
            chief_dir, log, rename_unreadable=chief_dir == config.output_dir)
        if model is None:
            model = build_model(config, data, steps)
    schedule = lr_schedule(model)
    log(f"model {config.backbone} x {config.num_experts} experts, lambdas {config.lambdas}, "
        f"{models.count_params(model):,} parameters; {steps} steps/epoch")

    test_batch = test_batch_size(config)
    test_ds = lt_data.test_pipeline(data, test_batch)
    if config.dry_run:
        images, labels = next(iter(lt_data.train_pipeline(data, config.batch_size, 1, config.seed, config.augment)))
        logs = model.train_on_batch(images, labels, return_dict=True)
        test_logs = model.test_on_batch(*next(iter(test_ds)), return_dict=True)
        log(f"dry run: batch {tuple(images.shape)}, train loss {logs['loss']:.4f}, "
            f"test-batch accuracy {test_logs['accuracy']:.4f}")
        return {}

    record = write_run_record(config, data, model, steps, choice)
    results = {}
    if start < (config.epochs, 0):
        log_dir = os.path.join(config.output_dir, "tensorboard")
        callbacks = [
            keras.callbacks.TensorBoard(log_dir, write_graph=False),
            BalPoETensorBoard(log_dir, schedule, _hparams(config)),
            DivergenceGuard(schedule, config.output_dir),  # before the checkpoint of the epoch
            Checkpoints(config.output_dir, config.checkpoint_every, config.epochs, steps, config.keep_checkpoints,
                        config.checkpoint_every_minutes, request, start, _stop_agreement(strategy)),
            ProgressLine(len(data.train), config.epochs, schedule, log, steps, len(data.test),
                         lt_data.steps_per_epoch(len(data.test), test_batch), config.progress_every, first=start),
        ]
        for first, last, skip in _fit_ranges(start, config.epochs):
            train_ds = lt_data.train_pipeline(data, config.batch_size, last, config.seed, config.augment, first, skip)
            history = model.fit(train_ds, epochs=last, initial_epoch=first, steps_per_epoch=steps - skip,
                                validation_data=test_ds, validation_freq=_eval_epochs(config, first),
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


def _fit_ranges(start, epochs: int) -> list:
    """`(first epoch, last epoch, steps to skip)` of each `fit` a run started at `start`
    needs: Keras counts the same steps in every epoch, so a run resumed inside an epoch
    trains the rest of it alone first."""
    epoch, step = start
    ranges = [(epoch, epoch + 1, step)] if step else []
    epoch += 1 if step else 0
    return ranges + ([(epoch, epochs, 0)] if epoch < epochs else [])


def _stop_agreement(strategy):
    """For a multi-worker run, `signum -> signum` that every worker calls at every step: the
    signal any worker received (0: none), so that all stop and checkpoint at the same step.
    One small all-reduce per step, traced once."""
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return None

    @tf.function
    def received(signum):
        mark = tf.one_hot(signum, 65)  # a 1 at the signal's number (0: none)
        marks = strategy.experimental_distribute_values_from_function(lambda _: mark)
        return strategy.reduce(tf.distribute.ReduceOp.SUM, marks, axis=None)

    def agree(signum):
        marks = received(tf.constant(signum, tf.int32)).numpy()[1:]
        return int(np.argmax(marks)) + 1 if marks.any() else 0

    return agree


def calibrate_on_holdout(model, data: lt_data.LabeledData, config: RunConfig, batch_size: int):
    """Predict the held-out split, store its balanced logits in the run folder and fit the
    calibrations test-time prior estimation uses (`label_shift.Holdout`)."""
    labels, logits, _ = models.predict_dataset(
        model, lt_data.test_pipeline(data, batch_size, split=data.holdout))
    trained_log_prior = label_shift.trained_log_prior(data.train_counts(), float(np.mean(config.lambdas)))
    return label_shift.save_holdout(config.output_dir, labels, logits.astype(np.float64) - trained_log_prior,
                                    data.train_counts())


def _eval_epochs(config: RunConfig, start_epoch: int) -> list:
    # 1-based epochs at which Keras evaluates: every eval_every epochs, and the last.
    every = max(config.eval_every, 1)
    return sorted({e for e in range(start_epoch + 1, config.epochs + 1) if e % every == 0} | {config.epochs})


def train_with_baselines(config: RunConfig, log: Callable[[str], None] = print) -> dict:
    """Train `config`, then each baseline of `config.compare`; print and save the table. A
    quick run (--quick) trains in OUTPUT_DIR/quick, without baselines."""
    if config.quick:
        config = dataclasses.replace(quick_config(config), output_dir=os.path.join(config.output_dir, "quick"))
    for name in config.compare:
        baseline_config(config, name)  # unknown names fail before any training
    label = "BalPoE" if config.num_experts > 1 else "run"
    rows = {f"{label} (lambdas {','.join(f'{v:g}' for v in config.lambdas)})": train(config, log)}
    if config.dry_run:
        return rows
    for name in config.compare:
        log(f"--- baseline {name} ---")
        baseline = baseline_config(config, name)
        # The methods of one comparison compute alike: a new baseline takes the precision auto
        # chose for the run it is compared with (a resumed one keeps its own).
        same = None if resumed_run_settings(baseline.output_dir) else precision_lib.PrecisionChoice(
            read_run_record(config.output_dir)["config"]["precision"], "compared")
        rows[name] = train(baseline, log, same)
    table = format_table(rows)
    with open(os.path.join(config.output_dir, "results.md"), "w") as f:
        f.write(f"Balanced test set of {config.dataset}, IR {config.imbalance_ratio:g}, "
                f"{config.epochs} epochs (% except NLL)\n\n{table}\n")
    log(table)
    return rows
