"""BalPoE: Balanced Product of Calibrated Experts for long-tailed recognition.

Importing this package sets the TensorFlow defaults the project relies on, so
import it before `tensorflow` or `keras`.
"""

import os

# Keras 3 picks its backend at import time; the custom train_step is TensorFlow.
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
# oneDNN kernels doubled ResNet-32 training throughput on the project's CPUs
# (see docs in README); TensorFlow reads this only when it is first imported.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__version__ = "0.1.0"
