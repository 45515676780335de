"""A training run from start to end: data, model, resume, callbacks, final evaluation,
calibration on the held-out split and export (the strategy is `distribution`'s, the precision
`run_precision`'s)."""

import collections
import dataclasses
import os
import subprocess
from typing import Callable, Optional

import numpy as np

import keras
import tensorflow as tf

from balpoe_tf import (__version__, distribution, export, label_shift, models, names, preemption, pretrained,
                       run_precision, task)
from balpoe_tf import data as lt_data
from balpoe_tf import precision as precision_lib
from balpoe_tf.callbacks import BalPoETensorBoard, Checkpoints, DivergenceGuard, ProgressLine, write_final_metrics
from balpoe_tf.reporting import format_table, reliability_diagram_png, write_atomic, write_json
from balpoe_tf.run_config import baseline_config, config_to_flags, quick_config, RUN_CONTROL, RunConfig, test_batch_size
from balpoe_tf.run_data import load_data
from balpoe_tf.run_folder import (check_run_folder, check_same_training_data, check_writable_folder, DataRecord,
                                  describe_position, finished_results, latest_checkpoint, load_latest_checkpoint,
                                  load_model_file, missing_artefacts, read_record, remove_partial_files,
                                  resumed_run_settings, RunFolder, RunRecord, save_atomic, write_data_files)


def write_run_record(config: RunConfig, data: lt_data.LabeledData, model: task.BalPoEModel,
                     steps_per_epoch: int, choice: precision_lib.PrecisionChoice,
                     init: Optional[pretrained.InitReport] = None) -> RunRecord:
    """Write flags.txt (a re-runnable flag file) and config.json (`RunRecord`: settings, data,
    how the precision was chosen, what --init_from loaded, schedule, optimizer, model); returns
    the record."""
    folder = RunFolder(config.output_dir)
    os.makedirs(folder.path, exist_ok=True)
    schedule = task.lr_schedule(model)
    previous = read_record(folder.path)
    saved = previous if choice.how == "resumed" else None
    record = RunRecord(
        config=dataclasses.asdict(config),
        data=DataRecord(
            name=data.name, num_classes=data.num_classes, train_size=len(data.train), test_size=len(data.test),
            holdout_size=0 if data.holdout is None else len(data.holdout), train_counts=data.train_counts().tolist(),
            class_names=list(data.class_names), mean=list(data.mean), std=list(data.std), test_crop=data.test_crop,
            image_shape=list(data.image_shape), train_fingerprint=lt_data.fingerprint(data.train),
            test_fingerprint=lt_data.fingerprint(data.test),
            left_out=[{"path": path, "reason": reason} for path, reason in data.left_out]),
        # A resumed run keeps the measurement its precision came from.
        precision_choice=saved.precision_choice if saved and saved.precision_choice else choice.to_dict(),
        # A resumed run loaded nothing now: it keeps the report of its start.
        init_from=init.to_dict() if init else (previous.init_from if previous and config.init_from else {}),
        steps_per_epoch=steps_per_epoch,
        lr_by_epoch=[float(schedule.epoch_lr(e)) for e in range(config.epochs)],
        optimizer=keras.saving.serialize_keras_object(model.optimizer),
        model=model.get_config(),
        versions={"tensorflow": tf.__version__, "keras": keras.__version__, "balpoe_tf": __version__,
                  "commit": source_commit()})
    write_json(folder.config, record.to_dict(), default=str)
    write_data_files(folder.path, data)
    with open(folder.flags, "w") as f:
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
            `run_precision.choose_precision` (the baselines of a comparison take their run's).

    Returns:
        Final test metrics (empty for a dry run).

    Raises:
        preemption.Interrupted: on SIGINT or SIGTERM, once the run has saved where it is.
    """
    strategy = distribution.make_strategy(config.strategy)  # first: collectives must precede other TF work
    # After the strategy: a multi-worker one sets TensorFlow's own SIGTERM handler, which this replaces.
    with preemption.watching() as request:
        return _train(quick_config(config), strategy, log, precision, request)


def _train(config: RunConfig, strategy: tf.distribute.Strategy, log: Callable[[str], None],
           precision: Optional[precision_lib.PrecisionChoice], request: preemption.StopRequest) -> dict:
    """`train` with the run's strategy and stop request."""
    chief_dir = config.output_dir  # every worker resumes from the chief's newest checkpoint
    config = distribution.worker_config(config, strategy)
    check_writable_folder(config.output_dir, "output_dir")
    if not config.dry_run:
        check_run_folder(config)
        remove_partial_files(config.output_dir)
        finished = finished_results(config)
        if finished is not None:
            log(f"{config.output_dir} has finished all {config.epochs} epochs (balanced accuracy "
                f"{100 * finished.get('accuracy', float('nan')):.1f} %): nothing to do. tools/evaluate.py evaluates "
                f"it, tools/export.py --run_dir={config.output_dir} exports it again")
            return finished
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()
    data = load_data(config, None if config.dry_run else RunFolder(config.output_dir).image_record)
    log(f"data {data.name}: {len(data.train)} training images in {data.num_classes} classes "
        f"(max {data.train_counts().max()}, min {data.train_counts().min()}), {len(data.test)} test images")
    for line in _data_notes(data):
        log(line)
    if not config.dry_run and resumed_run_settings(config.output_dir) is not None:
        check_same_training_data(config.output_dir, read_record(config.output_dir), data)
    if data.left_out:
        log(f"left out {len(data.left_out)} image file(s) that cannot be used (--bad_images=skip; all listed in "
            f"config.json): " + "; ".join(f"{path}: {reason}" for path, reason in data.left_out[:3])
            + (" ..." if len(data.left_out) > 3 else ""))
    gpus, flags = precision_lib.gpu_capabilities(), precision_lib.cpu_flags()
    choice = precision if precision and config.precision == "auto" else run_precision.choose_precision(
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
    folder = RunFolder(config.output_dir)
    steps = lt_data.steps_per_epoch(len(data.train), config.batch_size)
    with strategy.scope():
        start, model = ((0, 0), None) if config.dry_run else load_latest_checkpoint(
            chief_dir, log, rename_unreadable=chief_dir == config.output_dir)
        init = []  # the report of --init_from, for a new run that has one
        if model is None:
            model = task.build_model(config, data, steps, _initialise(config, init.append))
    schedule = task.lr_schedule(model)
    log(f"model {config.backbone} x {config.num_experts} experts, lambdas {config.lambdas}, "
        f"{models.count_params(model):,} parameters; {steps} steps/epoch")
    if init:
        log(init[0].summary())

    test_batch = test_batch_size(config)
    test_ds = lt_data.test_pipeline(data, test_batch)
    if config.dry_run:
        images, labels = next(iter(lt_data.train_pipeline(data, config.batch_size, 1, config.seed, config.augment)))
        logs = model.train_on_batch(images, labels, return_dict=True)
        test_logs = model.test_on_batch(*next(iter(test_ds)), return_dict=True)
        log(f"dry run: batch {tuple(images.shape)}, train loss {logs['loss']:.4f}, "
            f"test-batch accuracy {test_logs['accuracy']:.4f}")
        return {}

    record = write_run_record(config, data, model, steps, choice, init[0] if init else None)
    results = {}
    if start < (config.epochs, 0):
        log_dir = folder.tensorboard
        callbacks = [
            keras.callbacks.TensorBoard(log_dir, write_graph=False),
            BalPoETensorBoard(log_dir, schedule, _hparams(config)),
            DivergenceGuard(schedule, config.output_dir),  # before the checkpoint of the epoch
            Checkpoints(config.output_dir, config.checkpoint_every, config.epochs, steps, config.keep_checkpoints,
                        config.checkpoint_every_minutes, request, start, distribution.stop_agreement(strategy)),
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
    return _finish(model, config, data, record, results, test_ds, request, log)


def _finish(model, config: RunConfig, data: lt_data.LabeledData, record: RunRecord, results: dict, test_ds,
            request: preemption.StopRequest, log: Callable[[str], None]) -> dict:
    """Write what a finished run promises and its folder lacks (`run_folder.missing_artefacts`),
    results.json last: a run stopped at any point after its last step writes the rest when
    started again."""
    folder = RunFolder(config.output_dir)
    missing = set(missing_artefacts(config))

    def stage(what):
        request.stage = f"after epoch {config.epochs} of {config.epochs}, while {what}"

    if not results:
        stage("evaluating on the test set")
        results = model.evaluate(test_ds, return_dict=True, verbose=0)
    results = {k: float(v) for k, v in results.items()}
    stage("saving the model")
    write_final_metrics(folder.tensorboard, results, config.epochs)
    if folder.model in missing:
        save_atomic(model, folder.model)
    cal = model.calibration
    write_atomic(folder.reliability, reliability_diagram_png(cal.count.numpy(), cal.confidence.numpy(),
                                                             cal.hits.numpy(), data.name))
    calibration = None
    if data.holdout is not None and os.path.join(folder.path, label_shift.CALIBRATION_FILE) in missing:
        stage("calibrating on the held-out split")
        calibration = calibrate_on_holdout(model, data, config, test_batch_size(config)).calibration
        log(f"calibrated on {len(data.holdout)} held-out images: temperature {calibration.temperature:.3f}, "
            f"held-out NLL {calibration.nll_before:.3f} -> {calibration.nll_after:.3f} "
            f"({label_shift.CALIBRATION_FILE})")
    elif data.holdout is not None:
        calibration = label_shift.load_holdout(folder.path, data.train_counts()).calibration
    if config.export and folder.export in missing:
        stage("exporting the SavedModel")
        # A SavedModel is served on other machines, where bfloat16 may be emulated: it computes in
        # float32 unless tools/export.py --precision says otherwise.
        served = model if config.precision == "float32" else load_model_file(folder.model, "float32")
        path = export.export_run(served, record, folder.export, calibration=calibration)
        log(f"SavedModel for TF Serving: {path} (computes in float32)")
    stage("writing results.json")
    write_json(folder.results, {"epochs": config.epochs, "test": results})
    log(f"done: {folder.model}, {folder.results}")
    return results


def _data_notes(data: lt_data.LabeledData) -> list:
    """Log lines on what a run does not read of its data, so that nothing goes unmentioned: the
    hidden and AppleDouble files of an image folder, the files whose name is not an image's (by
    extension), and the classes without test images."""
    notes = []
    if data.ignored_files:
        notes.append(f"ignored {len(data.ignored_files)} hidden or AppleDouble (._*) file(s) or folder(s): "
                     + ", ".join(data.ignored_files[:3]) + (" ..." if len(data.ignored_files) > 3 else ""))
    if data.skipped_files:
        kinds = collections.Counter(os.path.splitext(p)[1].lower() or "no extension" for p in data.skipped_files)
        notes.append(f"skipped {len(data.skipped_files)} file(s) whose name is not an image's ("
                     + ", ".join(f"{kind} {n}" for kind, n in kinds.most_common()) + "; read: "
                     + " ".join(lt_data.IMAGE_EXTENSIONS) + "): " + ", ".join(data.skipped_files[:3])
                     + (" ..." if len(data.skipped_files) > 3 else ""))
    untested = [name for name, n in zip(data.class_names, lt_data.class_counts(data.test.labels, data.num_classes))
                if n == 0]
    if untested:
        notes.append(f"warning: {len(untested)} class(es) have no test images, so their accuracy is not measured: "
                     f"{', '.join(map(str, untested[:10]))}"
                     + (" ..." if len(untested) > 10 else ""))
    return notes


def _initialise(config: RunConfig, report: Callable[[pretrained.InitReport], None]):
    """`build_model`'s `initialise` for `--init_from` or a keras-hub backbone's preset (None with
    neither), telling `report` what was loaded."""
    if not config.init_from and not config.backbone.startswith(names.HUB_PREFIX):
        return None

    def initialise(model):
        loaded = (pretrained.initialise(model, config.init_from) if config.init_from
                  else pretrained.preset_report(model))
        report(loaded)
        return loaded.pretrained

    return initialise


def _fit_ranges(start, epochs: int) -> list:
    """`(first epoch, last epoch, steps to skip)` of each `fit` a run started at `start`
    needs: Keras counts the same steps in every epoch, so a run resumed inside an epoch
    trains the rest of it alone first."""
    epoch, step = start
    ranges = [(epoch, epoch + 1, step)] if step else []
    epoch += 1 if step else 0
    return ranges + ([(epoch, epochs, 0)] if epoch < epochs else [])


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
            read_record(config.output_dir).settings.precision, "compared")
        rows[name] = train(baseline, log, same)
    table = format_table(rows)
    # Written from the finished runs each time the command ends: a stop before it loses nothing,
    # since the command started again finds every run finished and writes it.
    write_atomic(RunFolder(config.output_dir).results_table, f"Balanced test set of {config.dataset}, IR "
                 f"{config.imbalance_ratio:g}, {config.epochs} epochs (% except NLL)\n\n{table}\n")
    log(table)
    return rows
