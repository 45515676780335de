"""Classify image files with a trained run or an exported SavedModel (tools/predict.py).

Both kinds of model give the ensemble's *balanced* logits (the training prior it targets,
pi^lambda_bar, removed); a deployment prior is then added post hoc, `+ log p`, as the
evaluation and the `predict_with_prior` signature do. With no prior the model's own
prediction is kept.
"""

import csv
import dataclasses
import json
import os
from typing import Callable, List, Optional, Sequence

import numpy as np

import tensorflow as tf

from balpoe_tf import data as lt_data
from balpoe_tf import export, label_shift, models, reporting, run_folder
from balpoe_tf.config import RunError
from balpoe_tf.settings import PredictConfig


METADATA_FILE = os.path.join("assets.extra", export.METADATA_NAME)


@dataclasses.dataclass
class Classifier:
    """What predictions need of a model: its classes, the prior it targets and a function
    from encoded image bytes to balanced logits `(N, C)`."""

    class_names: List[str]
    image_shape: tuple
    train_counts: List[int]
    mean_lambda: float
    balanced_logits: Callable[[Sequence[bytes]], np.ndarray]
    source: str
    holdout: Optional[label_shift.Holdout] = None  # a run folder's held-out predictions
    calibration: Optional[label_shift.Calibration] = None  # a SavedModel's calibration

    def trained_log_prior(self) -> np.ndarray:
        """`lambda_bar * log pi_train`: what the model adds to balanced logits by itself."""
        return label_shift.trained_log_prior(self.train_counts, self.mean_lambda)


def _saved_model_dir(path: str) -> Optional[str]:
    if os.path.isfile(os.path.join(path, "saved_model.pb")):
        return path
    versions = [d for d in os.listdir(path) if d.isdigit() and os.path.isfile(os.path.join(path, d, "saved_model.pb"))]
    return os.path.join(path, max(versions, key=int)) if versions else None


def load_classifier(path: str) -> Classifier:
    """A `Classifier` from a run folder (its model.keras) or an exported SavedModel; a run's
    model.keras (or checkpoint) or a SavedModel's saved_model.pb stands for its folder."""
    if os.path.isfile(path):
        folder = os.path.dirname(os.path.abspath(path))
        if path.endswith(".keras"):  # RUN/model.keras, or RUN/checkpoints/epoch_N.keras
            folder = folder if os.path.isfile(run_folder.RunFolder(folder).config) else os.path.dirname(folder)
        if not (os.path.isfile(run_folder.RunFolder(folder).config)
                or os.path.isfile(os.path.join(folder, "saved_model.pb"))):
            raise RunError(f"--model {path!r} is a file outside a run folder or SavedModel: --model takes a run "
                           "folder of tools/train.py (holding config.json and model.keras) or a SavedModel folder")
        path = folder
    if not os.path.isdir(path):
        raise RunError(f"--model {path!r} does not exist: pass a run folder or an exported SavedModel")
    if os.path.isfile(run_folder.RunFolder(path).config):
        model, record = run_folder.load_run(path)
        data = record.data
        shape, normalize = tuple(model.image_shape), lt_data.normalizer(data.mean, data.std)
        bias = label_shift.trained_log_prior(data.train_counts, record.mean_lambda)
        forward = models.forward_function(model)

        def balanced(contents):
            images = tf.stack([lt_data.test_transform(c, shape, data.test_crop) for c in contents])
            return forward(normalize(images))["logits"].numpy().astype(np.float64) - bias

        return Classifier(list(data.class_names), shape, data.train_counts, record.mean_lambda, balanced, path,
                          holdout=label_shift.load_holdout(path, data.train_counts))
    saved = _saved_model_dir(path)
    if saved is None:
        raise RunError(f"{path} is neither a run folder (config.json) nor a SavedModel "
                       "(saved_model.pb, or version folders holding one)")
    if not os.path.isfile(os.path.join(saved, METADATA_FILE)):
        raise RunError(f"{saved} lacks {METADATA_FILE} (class names and training prior; exports "
                       "before this version do): export it again with tools/export.py --run_dir=RUN")
    with open(os.path.join(saved, METADATA_FILE)) as f:
        meta = json.load(f)
    # predict_with_log_prior with log p = 0 removes the trained prior: the balanced logits.
    signature = tf.saved_model.load(saved).signatures["predict_with_log_prior"]
    zeros = tf.zeros([len(meta["class_names"])], tf.float32)

    def balanced(contents):
        return signature(images=tf.constant(list(contents)), log_prior=zeros)["logits"].numpy().astype(np.float64)

    calibration = meta.get("calibration")
    return Classifier(meta["class_names"], tuple(meta["image_shape"]), meta["train_counts"], meta["mean_lambda"],
                      balanced, saved,
                      calibration=None if calibration is None else label_shift.Calibration.from_dict(calibration))


def image_paths(inputs: Sequence[str]) -> List[str]:
    """Every image file named by `inputs`: files as given, folders searched recursively
    (by extension), list files line by line."""
    paths = []
    for item in inputs:
        if os.path.isdir(item):
            paths += lt_data.image_files(item)[0]
        elif item.lower().endswith(".txt") and os.path.isfile(item):
            with open(item) as f:
                names = [line.split()[0] for line in f if line.strip()]
            paths += [n if os.path.isabs(n) else os.path.join(os.path.dirname(item), n) for n in names]
        elif os.path.exists(item):
            paths.append(item)
        else:
            raise lt_data.DataError(f"{item!r} does not exist: give image files, folders or .txt list files")
    if not paths:
        raise lt_data.DataError(f"no image files in {', '.join(inputs)} "
                                f"(looked for {', '.join(lt_data.IMAGE_EXTENSIONS)})")
    return paths


def parse_prior(text: str, num_classes: int) -> np.ndarray:
    """A prior from a comma list or a file (counts or probabilities), normalised."""
    source = text
    if os.path.isfile(text):
        with open(text) as f:
            source = f.read()
        try:
            values = json.loads(source)
        except json.JSONDecodeError:
            values = source.replace(",", " ").split()
    else:
        values = text.split(",")
    try:
        prior = np.array([float(v) for v in values], np.float64)
    except (TypeError, ValueError):
        if len(values) == 1:  # one word that is not a number: a file's name
            raise lt_data.DataError(f"--prior={text}: file not found (give a file of numbers or a JSON list, or "
                                    f"{num_classes} comma-separated counts or probabilities)") from None
        raise lt_data.DataError(f"--prior {text!r}: expected {num_classes} numbers (counts or probabilities)")
    if prior.shape != (num_classes,) or (prior < 0).any() or not np.isfinite(prior).all() or prior.sum() <= 0:
        raise lt_data.DataError(f"--prior {text!r}: expected {num_classes} non-negative numbers with a positive "
                                f"sum (one per class), got {prior.size}")
    return prior / prior.sum()


def predict_files(config: PredictConfig, log: Callable[[str], None] = print) -> dict:
    """Classify every image of `config.inputs`; print a table, optionally write CSV/JSON.

    Returns:
        `{"prior": mode, "prior_values": list or None, "predictions": [{"path", "top_k":
        [{"class", "name", "probability"}]}], "skipped": [{"path", "reason"}]}`.
    """
    for flag in ("output", "save_prior"):
        if getattr(config, flag):
            run_folder.check_writable_file(getattr(config, flag), flag)
    classifier = load_classifier(config.model)
    num_classes = len(classifier.class_names)
    known = parse_prior(config.prior, num_classes) if config.prior else None
    good, contents, skipped = [], [], []
    for path in image_paths(config.inputs):
        try:
            with open(path, "rb") as f:
                reason, usable = lt_data.inspect_bytes(f.read(), classifier.image_shape[-1])
        except OSError as e:
            reason = f"cannot be read ({e.strerror})"
        if not reason:
            good.append(path)
            contents.append(usable)
            continue
        if config.bad_images == "fail":
            raise lt_data.DataError(f"{path}: {reason} (use --bad_images=skip to leave such files out)")
        log(f"skipping {path}: {reason}")
        skipped.append({"path": path, "reason": reason})
    if not good:
        raise lt_data.DataError("none of the given files is a readable image")
    balanced = np.concatenate([classifier.balanced_logits(contents[i:i + config.batch_size])
                               for i in range(0, len(contents), config.batch_size)])
    calibration = None
    if known is not None:
        mode, prior = "given", known
    elif config.estimate_prior:
        mode = "estimated"
        model_prior = label_shift.model_prior(classifier.train_counts, classifier.mean_lambda)
        (estimator,) = label_shift.usable_estimators([config.prior_estimator], classifier.holdout,
                                                     classifier.calibration)
        if estimator != config.prior_estimator:  # as tools/evaluate.py does
            log(f"warning: {config.model} {label_shift.fallback_reason(config.prior_estimator)}")
        prior = label_shift.estimate_prior(estimator, balanced, model_prior, classifier.holdout,
                                           classifier.calibration, config.prior_safeguard, "the given images")
        calibration = label_shift.estimator_calibration(estimator, classifier.holdout, classifier.calibration)
    else:
        mode, prior = "none", None
    logits = balanced + classifier.trained_log_prior() if prior is None else \
        label_shift.adapt(balanced, prior, calibration)
    probs = label_shift.softmax(logits)
    k = min(config.top_k, num_classes)
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    predictions = [{"path": path, "top_k": [{"class": int(c), "name": classifier.class_names[c],
                                             "probability": float(p[c])} for c in row]}
                   for path, p, row in zip(good, probs, order)]
    result = {"model": classifier.source, "prior": mode, "prior_values": None if prior is None else prior.tolist(),
              "predictions": predictions, "skipped": skipped}
    for line in prediction_table(result):
        log(line)
    if config.output:
        write_predictions(result, config.output)
        log(f"wrote {config.output}")
    if config.save_prior:
        reporting.write_json(config.save_prior, prior.tolist())
        log(f"wrote the prior to {config.save_prior}")
    return result


def prediction_table(result: dict) -> List[str]:
    """Terminal lines: one per image, its top classes with probabilities."""
    titles = {"none": "no prior (the model's own)", "given": "the given prior",
              "estimated": "the prior estimated from these images"}
    lines = [f"{len(result['predictions'])} image(s), {len(result['skipped'])} skipped; "
             f"prior: {titles[result['prior']]}"]
    width = min(max(len(p["path"]) for p in result["predictions"]), 60)
    for p in result["predictions"]:
        path = p["path"] if len(p["path"]) <= width else "..." + p["path"][-(width - 3):]
        lines.append(f"{path:<{width}}  "
                     + "  ".join(f"{t['name']} {100 * t['probability']:5.1f}%" for t in p["top_k"]))
    return lines


def write_predictions(result: dict, path: str):
    """CSV (path, rank, class, name, probability; skipped files with their reason) or JSON."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if path.lower().endswith(".json"):
        reporting.write_json(path, result)
        return
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "rank", "class", "name", "probability", "skipped_because"])
        for p in result["predictions"]:
            for rank, t in enumerate(p["top_k"], 1):
                writer.writerow([p["path"], rank, t["class"], t["name"], f"{t['probability']:.6f}", ""])
        for s in result["skipped"]:
            writer.writerow([s["path"], "", "", "", "", s["reason"]])
