"""A run's folder: its record, checkpoints (atomic, with fallback past an unreadable one)
and the checks that a resumed run is the same run."""

import dataclasses
import glob
import json
import os
import re
from typing import Callable

import keras

# Imported for their Keras registrations: a saved model names its loss, optimizer and schedules.
from balpoe_tf import losses, task, training  # noqa: F401
from balpoe_tf.config import RunError
from balpoe_tf.models import precision_policy
from balpoe_tf.run_config import RUN_CONTROL, RunConfig


CHECKPOINT_FOLDER = "checkpoints"

# The run folder's record of checked image files (`data.check_image_files`).
IMAGE_RECORD = "image_check"


def check_writable_folder(path: str, flag: str):
    """Refuse, before any work, a folder a tool cannot write in: `RunError` naming the flag,
    the path and the problem. A folder that does not exist yet is fine where it can be made.

    Args:
        path: the folder the tool will write in.
        flag: the flag that named it, for the message.
    """
    import tempfile

    if os.path.exists(path) and not os.path.isdir(path):
        raise RunError(f"--{flag}={path}: is a file, not a folder: give a folder (new or existing)")
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise RunError(f"--{flag}={path}: cannot be made, {existing} is a file")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        where = "" if existing == os.path.abspath(path) else f" (in {existing}, where it would be made)"
        raise RunError(f"--{flag}={path}: cannot write there{where}: {e.strerror}; choose a folder you can "
                       "write to") from None


def check_writable_file(path: str, flag: str):
    """`check_writable_folder` for the folder of an output file, and the file not a folder."""
    if os.path.isdir(path):
        raise RunError(f"--{flag}={path}: is a folder, not a file: give a file name")
    check_writable_folder(os.path.dirname(os.path.abspath(path)), flag)


def config_path(output_dir):
    return os.path.join(output_dir, "config.json")


def read_run_record(output_dir: str) -> dict:
    """The run's config.json record, or {} when the folder holds none yet."""
    try:
        with open(config_path(output_dir)) as f:
            return json.load(f)
    except FileNotFoundError:
        return {}


def checkpoint_path(output_dir: str, epoch: int, step: int = 0) -> str:
    """Where the checkpoint of `epoch` finished epochs and `step` steps of the next one goes:
    `checkpoints/epoch_NNNN.keras` at an epoch's end, `epoch_NNNN_step_SSSSSS.keras` inside one."""
    name = f"epoch_{epoch:04d}" + (f"_step_{step:06d}" if step else "") + ".keras"
    return os.path.join(output_dir, CHECKPOINT_FOLDER, name)


def checkpoints(output_dir: str) -> list:
    """((epoch, step), path) of every checkpoint in a run folder, newest first: `epoch`
    finished epochs and `step` steps of the next (0 at an epoch's end)."""
    found = []
    for path in glob.glob(os.path.join(output_dir, CHECKPOINT_FOLDER, "epoch_*.keras")):
        match = re.search(r"epoch_(\d+)(?:_step_(\d+))?\.keras$", path)
        if match:
            found.append(((int(match.group(1)), int(match.group(2) or 0)), path))
    return sorted(found, reverse=True)


def latest_checkpoint(output_dir: str):
    """((epoch, step), path) of the newest checkpoint in a run folder, or ((0, 0), None)."""
    return (checkpoints(output_dir) or [((0, 0), None)])[0]


def prune_checkpoints(output_dir: str, keep: int):
    """Delete all but the newest `keep` checkpoints (the newest is never deleted)."""
    for _, path in checkpoints(output_dir)[max(keep, 1):]:
        os.remove(path)


UNREADABLE_SUFFIX = ".unreadable"


def load_model_file(path: str, precision: str = ""):
    """A saved Keras model; a file that cannot be read raises `RunError` naming it.

    Args:
        path: the .keras file.
        precision: the Keras precision policy the model computes in (default: the global
            one). A saved `task.BalPoEModel` does not record it: its layers take the policy in
            force when they are made.
    """
    with precision_policy(precision):
        try:
            return keras.saving.load_model(path)
        except Exception as e:  # Keras reports a damaged zip as many error types, some misleading
            raise RunError(f"{path} is not a readable Keras model ({type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else 'no details'})") from e


def load_latest_checkpoint(output_dir: str, log: Callable[[str], None] = print, rename_unreadable: bool = True):
    """((epoch, step), model) of the newest checkpoint that loads, or ((0, 0), None) if there is none.

    A newer checkpoint that cannot be read (e.g. truncated when the machine stopped) is
    named in a warning and renamed `*.keras.unreadable` (kept, never tried again) once an
    older one loads (unless `rename_unreadable` is False: the other workers of a
    multi-worker run read the chief's folder, which the chief alone changes); if none loads,
    `RunError` lists them and nothing is renamed."""
    found, unreadable = checkpoints(output_dir), []
    for position, path in found:
        try:
            model = load_model_file(path)
        except RunError as e:
            log(f"warning: {e}; trying the previous checkpoint")
            unreadable.append(path)
            continue
        for bad in unreadable if rename_unreadable else ():
            os.replace(bad, bad + UNREADABLE_SUFFIX)
            log(f"warning: kept the unreadable {bad} as {bad + UNREADABLE_SUFFIX}")
        log(f"resuming from {path} ({describe_position(position)})")
        return position, model
    if found:
        raise RunError(f"no checkpoint in {output_dir}/checkpoints can be read ({', '.join(unreadable)}): "
                       "check the Keras version (config.json records the one that wrote them), or start "
                       "the run in a new --output_dir")
    return (0, 0), None


def describe_position(position) -> str:
    """`(epoch, step)` in words: "epoch 3" at an epoch's end, "epoch 4, step 12" inside one."""
    epoch, step = position
    if not epoch and not step:
        return "none yet: from the start"
    return f"epoch {epoch}" if not step else f"epoch {epoch + 1}, step {step}"


def resumed_run_settings(output_dir: str):
    """The settings (config.json's "config") of the run whose checkpoint `output_dir` holds,
    every setting present, or None when it holds no checkpoint: a run started there is a new one."""
    _, checkpoint = latest_checkpoint(output_dir)
    if checkpoint is None:
        return None
    path = config_path(output_dir)
    if not os.path.isfile(path):
        raise RunError(f"{output_dir} holds checkpoint {checkpoint} but no config.json, so it "
                       "cannot be resumed safely: use a new --output_dir or delete the folder")
    with open(path) as f:
        saved = json.load(f)["config"]
    # A setting added after the run was saved had its default then (float32 for the precision).
    return {**dataclasses.asdict(RunConfig()), "precision": "float32", **saved}


def check_run_folder(config: RunConfig):
    """Fail if the run folder holds another run's checkpoint that this config cannot resume."""
    saved = resumed_run_settings(config.output_dir)
    if saved is None:
        return
    current = dataclasses.asdict(config)
    if current["precision"] == "auto":  # auto resumes a run in the precision it started with
        current["precision"] = saved["precision"]
    diffs = [f"--{k}: saved {saved[k]!r}, now {current[k]!r}" for k in current
             if k not in RUN_CONTROL and saved[k] != current[k]]
    if diffs:
        raise RunError(f"{config.output_dir} holds a checkpoint of a different run ("
                       + "; ".join(diffs) + "): use a new --output_dir, or the saved settings "
                       f"(--flagfile={os.path.join(config.output_dir, 'flags.txt')}) to resume it")


def finished_results(output_dir: str, epochs: int):
    """The final test metrics of a run that has finished all `epochs` in `output_dir` (its
    results.json beside its model.keras), or None."""
    path = os.path.join(output_dir, "results.json")
    if not (os.path.isfile(path) and os.path.isfile(os.path.join(output_dir, "model.keras"))):
        return None
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return None
    return saved.get("test") if saved.get("epochs") == epochs else None


def load_run(run_dir: str, precision: str = ""):
    """(model, saved run record) of a run folder made by tools/train.py.

    The model computes in `precision`, by default the run's `--precision`: the one its final
    evaluation and export used, so that evaluating it again gives the same numbers."""
    record_path = os.path.join(run_dir, "config.json")
    model_path = os.path.join(run_dir, "model.keras")
    if not os.path.isfile(model_path):
        _, model_path = latest_checkpoint(run_dir)
    if not os.path.isfile(record_path) or not model_path:
        raise RunError(f"{run_dir} holds no trained model (model.keras or checkpoints/) with its "
                       "config.json: pass the --output_dir of a tools/train.py run")
    with open(record_path) as f:
        record = json.load(f)
    return load_model_file(model_path, precision or record["config"].get("precision", "float32")), record


def save_atomic(model, path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path[:-len(".keras")] + ".tmp.keras"
    model.save(tmp)
    os.replace(tmp, path)
