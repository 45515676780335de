"""Classify your own images with a trained run or an exported SavedModel.

    python tools/predict.py --model=runs/demo --inputs=photo.jpg,more_photos/,list.txt \\
        [--top_k=5] [--prior=counts_or_probabilities | --estimate_prior] [--output=predictions.csv]

Prints each image's top classes with their probabilities; files that are not readable
images are named and skipped (or, with --bad_images=fail, stop the run).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import balpoe_tf  # noqa: E402  (TensorFlow defaults before TF loads)

balpoe_tf.import_tensorflow_quietly()

from balpoe_tf import cli, inference, settings  # noqa: E402


if __name__ == "__main__":
    cli.run_tool(settings.PredictConfig, inference.predict_files)
