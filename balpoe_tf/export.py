"""Export a trained ensemble as a SavedModel that TF Serving loads as it is.

Layout: `<export_dir>/<version>/saved_model.pb` + `variables/`, versions 1, 2, ..., and
`assets.extra/balpoe_tf.json` (class names, training counts, mean lambda, calibration) for
tools/predict.py.
Signatures (all return probabilities, logits, expert_logits, top_k_classes,
top_k_scores, top_k_names):

- `serving_default(images)`: encoded JPEG / PNG / GIF / BMP / WebP bytes, `[batch]` strings;
  decoding, resizing and normalisation happen in the graph.
- `predict_tensor(images)`: `[batch, H, W, C]` float32, already normalised (`PREDICT_TENSOR_INPUT`;
  the metadata holds the image shape, mean and std).
- `predict_with_prior(images, prior)`: bytes plus a target prior of C values; the post-hoc
  adjustment `+ log p - lambda_bar * log pi_train` is applied in the graph.
- `predict_with_log_prior(images, log_prior)`: the same with the prior's log.
- `predict_calibrated_with_prior(images, prior)`, for a run trained with a held-out split:
  the calibrated balanced logits plus `log p` (`label_shift.adapt`), to serve a deployment
  prior estimated by the calibrated estimators.
"""

import json
import math
import os
import shutil

import numpy as np

import keras
import tensorflow as tf

from balpoe_tf import data as lt_data
from balpoe_tf import label_shift, models
from balpoe_tf import precision as precision_lib
from balpoe_tf.config import RunError
from balpoe_tf.data import PRIOR_FLOOR
from balpoe_tf.settings import ExportConfig
from balpoe_tf.run_folder import check_writable_folder, load_run, read_record, RunFolder, RunRecord

# Classes and training prior of an export, in its assets.extra folder.
METADATA_NAME = "balpoe_tf.json"

SIGNATURES = ("serving_default", "predict_tensor", "predict_with_prior", "predict_with_log_prior")

# What predict_tensor takes, in words, for the metadata.
PREDICT_TENSOR_INPUT = ("float32 [batch, H, W, C] (image_shape): each image's pixels, 0-255 in RGB order (or grey), "
                        "after the test transform (resized to H x W, or with test_crop > 0 the shorter side resized "
                        "to H / test_crop and the centre H x W cropped), normalised as (pixels / 255 - mean) / std")


def next_version(export_dir: str) -> int:
    """One more than the largest integer version folder in `export_dir` (1 if none)."""
    versions = [int(d) for d in os.listdir(export_dir) if d.isdigit()] if os.path.isdir(export_dir) else []
    return max(versions, default=0) + 1


def serving_functions(model, mean, std, class_names, train_counts, mean_lambda: float, top_k: int = 5,
                      test_crop: float = 0.0, max_pixels: int = lt_data.MAX_IMAGE_PIXELS, calibration=None):
    """The serving functions of `model` (see the module docstring).

    Args:
        model: a `models.BalPoENetwork` (or the `task.BalPoEModel` that extends it).
        mean, std: per-channel normalisation of the training run.
        class_names: one name per class.
        train_counts: training images per class (the prior the model was trained on).
        mean_lambda: the ensemble's mean lambda.
        top_k: how many classes the top-k outputs hold (at most C).
        test_crop: the run's test-time centre-crop fraction (`LabeledData.test_crop`).
        max_pixels: larger images are refused from their header, before decoding.
        calibration: a `label_shift.Calibration` of the run (its held-out split); with it,
            `predict_calibrated_with_prior` is added.

    Returns:
        `{signature name: (function, input signature)}`.
    """
    shape = tuple(model.image_shape)
    num_classes = model.num_classes
    k = min(top_k, num_classes)
    normalize = lt_data.normalizer(mean, std)
    names = tf.constant([str(n) for n in class_names])
    trained_log_prior = tf.constant(label_shift.trained_log_prior(train_counts, mean_lambda), tf.float32)

    def outputs(logits, expert_logits):
        probs = tf.nn.softmax(logits, axis=-1)
        scores, ids = tf.math.top_k(probs, k)
        return {"probabilities": probs, "logits": logits, "expert_logits": expert_logits,
                "top_k_classes": ids, "top_k_scores": scores, "top_k_names": tf.gather(names, ids)}

    def run(images, bias=None):
        # The model's ops wait for the check: in a graph nothing else orders them, and a
        # reshape deep in the network would otherwise fail first, naming no input.
        check = tf.debugging.assert_equal(tf.shape(images)[1:], shape,
                                          message=f"images must be a [batch, {', '.join(map(str, shape))}] tensor")
        with tf.control_dependencies([check]):
            images = tf.identity(images)
        out = model(images, training=False)
        logits, experts = out["logits"], out["expert_logits"]
        if bias is not None:
            logits, experts = logits + bias, experts + bias
        return outputs(logits, experts)

    def decode_one(element):
        index, contents = element
        # Checked one after another, each naming the image's place in the batch (from 0): a
        # decoder's own error would not say which image it was.
        checks = [
            (lambda c: tf.strings.length(c) > 0, "is empty (0 bytes)"),
            (lt_data.image_file_ok, "is not a JPEG, PNG, GIF, BMP or WebP image"),
            (lt_data.image_complete, "is truncated (its end is missing)"),
            (lt_data.decodes_as_pillow, "is a BMP of 8 bits or fewer per pixel: send it as PNG"),
            (lambda c: lt_data.image_pixels(c) <= max_pixels,
             f"has more than {max_pixels:,} pixels (width x height): downscale it before sending"),
        ]
        for holds, problem in checks:
            with tf.control_dependencies([tf.debugging.Assert(holds(contents), [tf.strings.format(
                    "image {} of the batch " + problem, [index])])]):
                contents = tf.identity(contents)
        return lt_data.test_transform(contents, shape, test_crop)

    def decode(images):
        indexed = (tf.range(tf.size(images), dtype=tf.int64), images)
        return normalize(tf.map_fn(decode_one, indexed, fn_output_signature=tf.TensorSpec(shape, tf.float32)))

    def check_length(prior):
        return tf.debugging.assert_equal(tf.size(prior), num_classes,
                                         message=f"the prior must have {num_classes} entries, one per class")

    def log_prior_bias(log_prior):
        checks = [check_length(log_prior),
                  tf.debugging.assert_equal(tf.reduce_any(tf.math.is_nan(log_prior)), False,
                                            message="log_prior must not be NaN")]
        with tf.control_dependencies(checks):
            return tf.maximum(log_prior, np.log(PRIOR_FLOOR)) - trained_log_prior

    def log_of_prior(prior):
        checks = [check_length(prior),
                  tf.debugging.assert_non_negative(prior, message="prior must have no negative entries"),
                  tf.debugging.assert_positive(tf.reduce_sum(prior), message="prior must have a positive sum")]
        with tf.control_dependencies(checks):
            return tf.math.log(tf.maximum(prior / tf.reduce_sum(prior), PRIOR_FLOOR))

    def with_prior(images, prior):
        return run(decode(images), log_prior_bias(log_of_prior(prior)))

    def calibrated_with_prior(images, prior):
        # label_shift.adapt in the graph: balanced logits / T + b + log p (the experts get the
        # prior alone).
        log_p = log_of_prior(prior)
        out = model(decode(images), training=False)
        balanced = out["logits"] - trained_log_prior
        logits = balanced / calibration.temperature + tf.constant(calibration.biases, tf.float32) + log_p
        return outputs(logits, out["expert_logits"] - trained_log_prior + log_p)

    image_bytes = tf.TensorSpec([None], tf.string, name="images")
    # The prior's length is checked in the graph: a declared [C] would let TensorFlow fold
    # the check away and fail later with a shape error that names no input.
    prior_spec = lambda name: tf.TensorSpec([None], tf.float32, name=name)  # noqa: E731
    functions = {
        "serving_default": (lambda images: run(decode(images)), [image_bytes]),
        "predict_tensor": (run, [tf.TensorSpec((None,) + shape, tf.float32, name="images")]),
        "predict_with_prior": (with_prior, [image_bytes, prior_spec("prior")]),
        "predict_with_log_prior": (lambda images, log_prior: run(decode(images), log_prior_bias(log_prior)),
                                   [image_bytes, prior_spec("log_prior")]),
    }
    if calibration is not None:
        functions["predict_calibrated_with_prior"] = (calibrated_with_prior, [image_bytes, prior_spec("prior")])
    return functions


def export_saved_model(model, export_dir: str, mean, std, class_names, train_counts,
                       mean_lambda: float, top_k: int = 5, test_crop: float = 0.0,
                       max_pixels: int = lt_data.MAX_IMAGE_PIXELS, calibration=None) -> str:
    """Write the next version of `model` under `export_dir`; returns its folder. A
    `label_shift.Calibration` goes into the metadata, for estimating deployment priors.

    The version is written in a hidden folder and renamed when whole: TF Serving, which loads
    every numbered folder it finds, never sees a part (a run stopped while exporting leaves the
    hidden one, which `run_folder.remove_partial_files` deletes)."""
    version = str(next_version(export_dir))
    path, partial = os.path.join(export_dir, version), os.path.join(export_dir, f".partial-{version}")
    shutil.rmtree(partial, ignore_errors=True)
    archive = keras.export.ExportArchive()
    archive.track(model)
    functions = serving_functions(model, mean, std, class_names, train_counts, mean_lambda, top_k, test_crop,
                                  max_pixels, calibration)
    for name, (fn, signature) in functions.items():
        archive.add_endpoint(name, fn, input_signature=signature)
    archive.write_out(partial, verbose=False)
    # TF Serving ignores assets.extra (beyond its warm-up file); tools/predict.py reads the
    # classes and the training prior from here.
    os.makedirs(os.path.join(partial, "assets.extra"))
    with open(os.path.join(partial, "assets.extra", METADATA_NAME), "w") as f:
        json.dump({"class_names": [str(n) for n in class_names], "train_counts": [int(c) for c in train_counts],
                   "mean_lambda": float(mean_lambda), "image_shape": list(model.image_shape),
                   "test_crop": float(test_crop), "mean": [float(m) for m in mean], "std": [float(v) for v in std],
                   "predict_tensor_input": PREDICT_TENSOR_INPUT, "precision": model.dtype_policy.name,
                   "signatures": list(functions),
                   "calibration": None if calibration is None else calibration.to_dict()}, f, indent=1)
    os.rename(partial, path)
    return path


def export_run(model, record: RunRecord, export_dir: str, top_k: int = 5,
               max_pixels: int = lt_data.MAX_IMAGE_PIXELS, calibration=None) -> str:
    """Export a run from its model and its `RunRecord`."""
    data = record.data
    return export_saved_model(model, export_dir, data.mean, data.std, data.class_names, data.train_counts,
                              record.mean_lambda, top_k, data.test_crop, max_pixels, calibration)


# Images per measured prediction of tools/export.py --precision=auto.
SERVING_BATCH = 64


def serving_precision(run_dir: str) -> precision_lib.PrecisionChoice:
    """The precision a run's SavedModel predicts fastest in on this machine: float32 unless a
    mixed precision this hardware computes natively measured `precision.MIN_SPEEDUP` times as
    fast at prediction (cached as training's choice is)."""
    gpus, flags = precision_lib.gpu_capabilities(), precision_lib.cpu_flags()
    record = read_record(run_dir)
    if record is None:
        raise RunError(f"{run_dir} holds no config.json: pass the --output_dir of a tools/train.py run")
    shape = record.data.image_shape
    images = tf.random.stateless_normal([SERVING_BATCH, *shape], seed=[0, 0])

    def make_step(name):
        forward = models.forward_function(load_run(run_dir, name)[0])
        return lambda: forward(images)["logits"].numpy()

    settings = record.settings
    model_key = {"task": "prediction", "backbone": settings.backbone, "experts": settings.num_experts,
                 "classes": record.data.num_classes, "image_shape": shape, "batch": SERVING_BATCH}
    return precision_lib.choose_auto(model_key, precision_lib.runnable_candidates(gpus, flags), make_step,
                                     SERVING_BATCH, math.inf, gpus, flags)


def export_from_config(config: ExportConfig, log=print) -> str:
    export_dir = config.export_dir or RunFolder(config.run_dir).export
    check_writable_folder(export_dir, "export_dir")
    precision = config.precision
    if precision == "auto":
        choice = serving_precision(config.run_dir)
        log(choice.summary())
        precision = choice.precision
    model, record = load_run(config.run_dir, precision)
    holdout = label_shift.load_holdout(config.run_dir, record.data.train_counts)
    path = export_run(model, record, export_dir, config.top_k,
                      int(config.max_image_megapixels * 1e6), None if holdout is None else holdout.calibration)
    with open(os.path.join(path, "assets.extra", METADATA_NAME)) as f:
        signatures = json.load(f)["signatures"]
    log(f"SavedModel for TF Serving: {path} (signatures {', '.join(signatures)}; computes in "
        f"{model.dtype_policy.name})")
    return path
