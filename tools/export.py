"""Export a trained run as a SavedModel for TF Serving.

    python tools/export.py --run_dir=runs/cifar100_ir100 [--export_dir=serving/balpoe]

Writes <export_dir>/<next version>/ with the signatures serving_default (image bytes),
predict_tensor, predict_with_prior and predict_with_log_prior (see balpoe_tf.export).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import balpoe_tf  # noqa: E402  (TensorFlow defaults before TF loads)

balpoe_tf.import_tensorflow_quietly()

from balpoe_tf import cli, export, settings  # noqa: E402


if __name__ == "__main__":
    cli.run_tool(settings.ExportConfig, export.export_from_config)
