"""A run's folder, its one owner: the names of its files (`RunFolder`), its record
(`RunRecord`, config.json), checkpoints (atomic, with fallback past an unreadable one) and the
checks that a resumed run is the same run."""

import dataclasses
import glob
import io
import json
import os
import re
import shutil
import tempfile
from typing import Callable, List, Optional

import numpy as np

import keras

# Imported for their Keras registrations: a saved model names its loss, optimizer and schedules.
from balpoe_tf import losses, task, training  # noqa: F401
from balpoe_tf import label_shift
from balpoe_tf.config import error_line, RunError
from balpoe_tf.data import fingerprint
from balpoe_tf.models import precision_policy
from balpoe_tf.reporting import write_atomic
from balpoe_tf.run_config import RUN_CONTROL, RunConfig


@dataclasses.dataclass(frozen=True)
class RunFolder:
    """The files of a run folder that tools/train.py writes: the one place their names are spelled
    (but for the held-out predictions, which `label_shift` names).

    Attributes:
        path: the folder (--output_dir).
    """

    path: str

    def _file(self, name: str) -> str:
        return os.path.join(self.path, name)

    config = property(lambda self: self._file("config.json"))  # `RunRecord`
    flags = property(lambda self: self._file("flags.txt"))  # every setting, a flag file
    results = property(lambda self: self._file("results.json"))  # the final balanced-test metrics
    model = property(lambda self: self._file("model.keras"))  # the final model
    results_table = property(lambda self: self._file("results.md"))  # with --compare: the run and its baselines
    reliability = property(lambda self: self._file("reliability_diagram.png"))
    tensorboard = property(lambda self: self._file("tensorboard"))
    export = property(lambda self: self._file("export"))  # SavedModel versions
    evaluation = property(lambda self: self._file("evaluation"))  # tools/evaluate.py's default reports
    image_record = property(lambda self: self._file("image_check"))  # `data.check_image_files`'s record
    data_files = property(lambda self: self._file("data_files.npz"))  # `write_data_files`: each split's files
    checkpoints = property(lambda self: self._file("checkpoints"))


@dataclasses.dataclass
class DataRecord:
    """The data of a run as its record keeps it (`LabeledData` without the images)."""

    name: str
    num_classes: int
    train_size: int
    test_size: int
    train_counts: List[int]
    class_names: List[str]
    mean: List[float]
    std: List[float]
    image_shape: List[int]
    holdout_size: int = 0
    test_crop: float = 0.0
    train_fingerprint: Optional[str] = None  # absent from runs recorded before fingerprints
    test_fingerprint: Optional[str] = None
    left_out: list = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class RunRecord:
    """A run's config.json: its settings (as saved: `settings` completes them), its data, how its
    precision was chosen, its schedule, optimizer, model and the versions that wrote it."""

    config: dict
    data: DataRecord
    precision_choice: dict = dataclasses.field(default_factory=dict)
    init_from: dict = dataclasses.field(default_factory=dict)  # what --init_from loaded (`pretrained.InitReport`)
    steps_per_epoch: int = 0
    lr_by_epoch: list = dataclasses.field(default_factory=list)
    optimizer: dict = dataclasses.field(default_factory=dict)
    model: dict = dataclasses.field(default_factory=dict)
    versions: dict = dataclasses.field(default_factory=dict)

    @property
    def settings(self) -> RunConfig:
        """The run's settings; one added after the run was saved has its default then
        (float32 for the precision)."""
        known = {f.name for f in dataclasses.fields(RunConfig)}
        return RunConfig(**{**dataclasses.asdict(RunConfig()), "precision": "float32",
                            **{k: v for k, v in self.config.items() if k in known}})

    @property
    def mean_lambda(self) -> float:
        return float(np.mean(self.config["lambdas"]))

    @classmethod
    def from_dict(cls, values: dict) -> "RunRecord":
        fields = {f.name for f in dataclasses.fields(cls)}
        data_fields = {f.name for f in dataclasses.fields(DataRecord)}
        record = {k: v for k, v in values.items() if k in fields}
        record["data"] = DataRecord(**{k: v for k, v in values["data"].items() if k in data_fields})
        return cls(**record)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def read_record(run_dir: str) -> Optional[RunRecord]:
    """The `RunRecord` of a run folder, or None when it holds no config.json yet."""
    path = RunFolder(run_dir).config
    try:
        with open(path) as f:
            return RunRecord.from_dict(json.load(f))
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise RunError(f"{path} is not a run record of tools/train.py ({type(e).__name__}: {e}): restore it, "
                       "or start the run in a new --output_dir") from None


def check_writable_folder(path: str, flag: str):
    """Refuse, before any work, a folder a tool cannot write in: `RunError` naming the flag,
    the path and the problem. A folder that does not exist yet is fine where it can be made.

    Args:
        path: the folder the tool will write in.
        flag: the flag that named it, for the message.
    """
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


def checkpoint_path(output_dir: str, epoch: int, step: int = 0) -> str:
    """Where the checkpoint of `epoch` finished epochs and `step` steps of the next one goes:
    `checkpoints/epoch_NNNN.keras` at an epoch's end, `epoch_NNNN_step_SSSSSS.keras` inside one."""
    name = f"epoch_{epoch:04d}" + (f"_step_{step:06d}" if step else "") + ".keras"
    return os.path.join(RunFolder(output_dir).checkpoints, name)


def checkpoints(output_dir: str) -> list:
    """((epoch, step), path) of every checkpoint in a run folder, newest first: `epoch`
    finished epochs and `step` steps of the next (0 at an epoch's end)."""
    found = []
    for path in glob.glob(os.path.join(RunFolder(output_dir).checkpoints, "epoch_*.keras")):
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
            raise RunError(f"{path} is not a readable Keras model ({error_line(e, limit=None)})") from e


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


def resumed_run_settings(output_dir: str) -> Optional[RunConfig]:
    """The settings of the run whose checkpoint `output_dir` holds (`RunRecord.settings`), or
    None when it holds no checkpoint: a run started there is a new one."""
    _, checkpoint = latest_checkpoint(output_dir)
    if checkpoint is None:
        return None
    record = read_record(output_dir)
    if record is None:
        raise RunError(f"{output_dir} holds checkpoint {checkpoint} but no config.json, so it "
                       "cannot be resumed safely: use a new --output_dir or delete the folder")
    return record.settings


def check_run_folder(config: RunConfig):
    """Fail if the run folder holds another run's checkpoint that this config cannot resume."""
    resumed = resumed_run_settings(config.output_dir)
    if resumed is None:
        return
    saved, current = dataclasses.asdict(resumed), dataclasses.asdict(config)
    if current["precision"] == "auto":  # auto resumes a run in the precision it started with
        current["precision"] = saved["precision"]
    diffs = [f"--{k}: saved {saved[k]!r}, now {current[k]!r}" for k in current
             if k not in RUN_CONTROL and saved[k] != current[k]]
    if diffs:
        raise RunError(f"{config.output_dir} holds a checkpoint of a different run ("
                       + "; ".join(diffs) + "): use a new --output_dir, or the saved settings "
                       f"(--flagfile={RunFolder(config.output_dir).flags}) to resume it")


def missing_artefacts(config: RunConfig) -> List[str]:
    """What a finished run of `config` promises and its folder lacks: the model, results.json
    (for all `--epochs`), the reliability diagram, calibration.json with a held-out split, and a
    SavedModel with --export."""
    folder = RunFolder(config.output_dir)
    missing = [path for path in (folder.model, folder.reliability) if not os.path.isfile(path)]
    calibration = os.path.join(folder.path, label_shift.CALIBRATION_FILE)
    if config.holdout_fraction and not os.path.isfile(calibration):
        missing.append(calibration)
    if config.export and not glob.glob(os.path.join(folder.export, "[0-9]*", "saved_model.pb")):
        missing.append(folder.export)
    if _saved_results(folder, config.epochs) is None:
        missing.append(folder.results)
    return missing


def _saved_results(folder: RunFolder, epochs: int) -> Optional[dict]:
    """The test metrics results.json holds for a run of `epochs`, or None (absent, unreadable,
    another run's)."""
    try:
        with open(folder.results) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return None
    return saved.get("test") if saved.get("epochs") == epochs else None


def finished_results(config: RunConfig):
    """The final test metrics of a run of `config` that has finished and written everything it
    promises (`missing_artefacts`), or None."""
    return None if missing_artefacts(config) else _saved_results(RunFolder(config.output_dir), config.epochs)


# How many changed files a message names.
NAMED_FILES = 3


def _split_files(split) -> Optional[dict]:
    """`{path relative to the split's common folder: (label, content digest)}` of a split of
    checked image files (moving the data elsewhere changes no key), or None for other splits."""
    if split is None or not split.is_files or split.digests is None or not len(split):
        return None
    paths = [str(p) for p in split.images]
    root = os.path.commonpath(paths) if len(paths) > 1 else os.path.dirname(paths[0])
    return {os.path.relpath(p, root): (int(label), int(digest))
            for p, label, digest in zip(paths, split.labels, split.digests)}


def write_data_files(output_dir: str, data) -> None:
    """Record the files, labels and content digests of `data`'s image-file splits (`data_files.npz`),
    so that `split_changes` can name what changed."""
    arrays = {}
    for name in ("train", "test"):
        files = _split_files(getattr(data, name))
        if files:
            arrays[f"{name}_paths"] = np.array(list(files), dtype=str)
            arrays[f"{name}_items"] = np.array(list(files.values()), np.int64)
    if arrays:
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **arrays)
        write_atomic(RunFolder(output_dir).data_files, buffer.getvalue())


def _recorded_files(output_dir: str, name: str) -> Optional[dict]:
    try:
        with np.load(RunFolder(output_dir).data_files) as saved:
            return {str(p): tuple(int(v) for v in item)
                    for p, item in zip(saved[f"{name}_paths"], saved[f"{name}_items"])}
    except (OSError, KeyError, ValueError):
        return None


def split_changes(output_dir: str, name: str, split, class_names, counts_before=None) -> str:
    """What differs between split `name` as `output_dir` recorded it and `split` now: the files
    added, removed and changed (content or label), the first few named, and the classes whose
    counts moved (from `counts_before`, else from the recorded files)."""
    parts = []
    before, now = _recorded_files(output_dir, name), _split_files(split)
    if counts_before is None and before is not None:
        counts_before = np.bincount([label for label, _ in before.values()], minlength=len(class_names))
    if before is not None and now is not None:
        added, removed = sorted(now.keys() - before.keys()), sorted(before.keys() - now.keys())
        changed = sorted(p for p in now.keys() & before.keys() if now[p] != before[p])
        for label, paths in (("added", added), ("removed", removed), ("changed", changed)):
            if paths:
                parts.append(f"{len(paths)} file(s) {label} ({', '.join(paths[:NAMED_FILES])}"
                             + (" ..." if len(paths) > NAMED_FILES else "") + ")")
    counts_now = np.bincount(np.asarray(split.labels, np.int64), minlength=len(class_names))
    counts_before = counts_now if counts_before is None else counts_before
    moved = [f"{class_names[c]} {counts_before[c]} -> {counts_now[c]}" for c in range(len(class_names))
             if c < len(counts_before) and counts_before[c] != counts_now[c]]
    if moved:
        parts.append("class counts moved: " + ", ".join(moved[:10]) + (" ..." if len(moved) > 10 else ""))
    return "; ".join(parts) or "the same files and counts, other images or labels"


def check_same_training_data(output_dir: str, record: RunRecord, data) -> None:
    """Refuse to resume the run of `output_dir` on training data other than it started with:
    compared by fingerprint (labels and image bytes or pixels) where the run recorded one, by
    class counts for runs from before. The class prior is part of the loss."""
    saved, now = record.data.train_fingerprint, fingerprint(data.train)
    same = now == saved if saved and now else data.train_counts().tolist() == record.data.train_counts
    if same:
        return
    changes = split_changes(output_dir, "train", data.train, data.class_names, record.data.train_counts)
    raise RunError(f"the training data is not what {output_dir} started with: {changes}. The class prior is part "
                   "of the loss, so resuming would train another run under this name: restore the data, or start "
                   "a new --output_dir")


# Files a write that was stopped half-way leaves: a checkpoint or model being saved, an export
# being written (`export.export_saved_model` writes into a hidden folder first).
PARTIAL_FILES = ("*.tmp.keras", os.path.join("checkpoints", "*.tmp.keras"), "*.tmp",
                 os.path.join("export", ".partial-*"))


def remove_partial_files(output_dir: str):
    """Delete what writes stopped half-way left in a run folder (a second Ctrl-C during a save,
    kill -9): nothing reads them, and they would stay for good."""
    for pattern in PARTIAL_FILES:
        for path in glob.glob(os.path.join(output_dir, pattern)):
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


def load_run(run_dir: str, precision: str = ""):
    """(model, `RunRecord`) of a run folder made by tools/train.py.

    The model computes in `precision`, by default the run's `--precision`: the one its final
    evaluation and export used, so that evaluating it again gives the same numbers."""
    model_path = RunFolder(run_dir).model
    if not os.path.isfile(model_path):
        _, model_path = latest_checkpoint(run_dir)
    record = read_record(run_dir)
    if record is None or not model_path:
        raise RunError(f"{run_dir} holds no trained model (model.keras or checkpoints/) with its "
                       "config.json: pass the --output_dir of a tools/train.py run")
    return load_model_file(model_path, precision or record.settings.precision), record


def save_atomic(model, path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path[:-len(".keras")] + ".tmp.keras"
    model.save(tmp)
    os.replace(tmp, path)
