"""Where a run computes: the tf.distribute strategy --strategy names, what each worker of a
multi-worker run writes, and what the workers must agree on (the precision, a stop)."""

import dataclasses
import os

import numpy as np

import tensorflow as tf

from balpoe_tf import precision as precision_lib
from balpoe_tf.config import RunError
from balpoe_tf.run_config import RunConfig, STRATEGIES


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


def worker_config(config: RunConfig, strategy) -> RunConfig:
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


def agree_on_precision(strategy, choice: precision_lib.PrecisionChoice) -> precision_lib.PrecisionChoice:
    """Every worker of a multi-worker run must compute in the same precision: the workers'
    measurements are gathered and each takes `precision.slowest_worker` of them."""
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return choice
    local = tf.constant([precision_lib.worker_row(choice)], tf.float64)
    rows = strategy.gather(strategy.experimental_distribute_values_from_function(lambda _: local), axis=0)
    return precision_lib.slowest_worker(choice, rows.numpy())


def stop_agreement(strategy):
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
