"""Evaluate trained runs on the balanced and shifted test sets, with test-time priors.

    python tools/evaluate.py --run_dir=runs/cifar100_ir100[,runs/other,...] [--distributions=all]

Writes shifted_accuracy.{md,csv}, evaluation.json and reliability diagrams to
--output_dir (default RUN_DIR/evaluation); `--helpfull` lists every flag.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import balpoe_tf  # noqa: E402  (TensorFlow defaults before TF loads)

balpoe_tf.import_tensorflow_quietly()

from balpoe_tf import cli, evaluation, settings  # noqa: E402


if __name__ == "__main__":
    cli.run_tool(settings.EvalConfig, evaluation.evaluate_runs)
