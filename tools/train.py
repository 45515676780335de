"""Train a BalPoE ensemble (or a baseline) and evaluate it on the balanced test set.

    python tools/train.py --flagfile=configs/cifar100_ir100.flags [--any_flag=value ...]

Every field of `balpoe_tf.run_config.RunConfig` is a flag; `--help` lists them, grouped.
A run folder that holds a checkpoint of the same run is resumed from it.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import balpoe_tf  # noqa: E402  (TensorFlow defaults before TF loads)

balpoe_tf.import_tensorflow_quietly()

from balpoe_tf import cli, experiment, run_config  # noqa: E402


if __name__ == "__main__":
    cli.run_tool(run_config.RunConfig, experiment.train_with_baselines)
