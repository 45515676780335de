"""The precision a run computes in: the one --precision names, the one a resumed run started
with, or for --precision=auto the one measured faster for the run's own model on this machine
(`precision.choose_auto`, agreed by every worker of a multi-worker run)."""

import dataclasses

import numpy as np

import tensorflow as tf

from balpoe_tf import data as lt_data
from balpoe_tf import distribution, models, task
from balpoe_tf import precision as precision_lib
from balpoe_tf.run_config import RunConfig
from balpoe_tf.run_folder import resumed_run_settings


def measured_step(config: RunConfig, data: lt_data.LabeledData, batch: int):
    """`precision -> step` for `precision.measure_speeds`: the run's model compiled as the
    run compiles it, its `train_step` (mixup, losses, update, metrics) on one fixed random
    batch of the run's shape. Traced without AutoGraph, which the step does not need: tracing,
    most of what measuring costs on a small model, then takes 0.75 s instead of 1.9 s (ResNet-8)."""
    rng = np.random.default_rng(0)
    images = tf.constant(rng.standard_normal((batch, *data.image_shape), dtype=np.float32))
    labels = tf.constant(rng.integers(0, data.num_classes, batch), tf.int32)

    def make_step(name):
        with models.precision_policy(name):
            model = task.build_model(dataclasses.replace(config, precision=name), data, steps_per_epoch=1)
        model.optimizer.build(model.trainable_variables)
        step = tf.function(lambda: model.train_step((images, labels))["loss"], autograph=False,
                           jit_compile=config.jit_compile)
        return lambda: float(step())

    return make_step


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
        return precision_lib.PrecisionChoice(saved.precision, "resumed")
    model_key = precision_model_key(config, data, strategy.num_replicas_in_sync)
    batch = model_key["batch"]
    total_steps = config.epochs * lt_data.steps_per_epoch(len(data.train), config.batch_size)
    choice = precision_lib.choose_auto(model_key, precision_lib.runnable_candidates(gpus, flags),
                                       measured_step(config, data, batch), batch, total_steps, gpus, flags)
    return distribution.agree_on_precision(strategy, choice)
