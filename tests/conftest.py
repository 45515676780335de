"""Shared test setup: TensorFlow defaults first, tiny datasets, no downloads."""

import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from absl import flags

import balpoe_tf  # noqa: F401  (sets TF env before TensorFlow loads)
from balpoe_tf import cli, precision
from balpoe_tf import data as lt_data

REPO = Path(__file__).resolve().parents[1]

# --precision=auto caches its measurements: tests (and the tools they start) use a cache of
# their own, never the user's, whose measurements would change what auto picks.
os.environ["BALPOE_TF_CACHE_DIR"] = tempfile.mkdtemp(prefix="balpoe_tf_test_cache_")


# Two float32 computations of the same values by different kernels (another CPU's instruction set,
# another order of summation) differ by a few units in the last place of the largest value each
# sum passes through: 1e-5 of the values' scale is about 80 float32 ulps (2**-23 = 1.2e-7).
FLOAT32_TOLERANCE = 1e-5


def assert_float32_close(actual, expected, tolerance=FLOAT32_TOLERANCE):
    """`actual` equals `expected` up to float32 rounding: within `tolerance` times the largest
    magnitude of `expected`."""
    expected = np.asarray(expected, np.float64)
    np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=0,
                               atol=tolerance * max(float(np.max(np.abs(expected))), 1e-30))


def skip_without_kernels(precision_name):
    """Skip the calling test, saying why, where TensorFlow has no kernel for `precision_name` in
    this process (oneDNN capped below the CPU's own instructions: docs/architecture.md, "Testing")."""
    problem = precision.kernel_problem(precision_name)
    if problem:
        pytest.skip(f"TensorFlow has no {precision_name} kernel in this process ({problem})")


def parse_config(config_class, *args):
    """`config_class` filled from command-line flags, as a tool would fill it."""
    values = flags.FlagValues()
    cli.define_flags(config_class, values)
    cwd = os.getcwd()
    os.chdir(REPO)  # flag files include others by paths relative to the project's root
    try:
        values(["tool", *args])
    finally:
        os.chdir(cwd)
    return cli.config_from_flags(config_class, values)


def synthetic_data(num_classes=4, per_class=12, test_per_class=3, size=8, channels=3,
                   seed=0, name="synthetic"):
    """A balanced, learnable dataset: each class is a distinct constant colour plus noise."""
    rng = np.random.RandomState(seed)
    colours = rng.randint(0, 256, size=(num_classes, channels))

    def split(n):
        labels = np.repeat(np.arange(num_classes), n)
        noise = rng.randint(-20, 21, size=(len(labels), size, size, channels))
        images = np.clip(colours[labels][:, None, None, :] + noise, 0, 255).astype(np.uint8)
        return images, labels

    (x_tr, y_tr), (x_te, y_te) = split(per_class), split(test_per_class)
    return lt_data.from_arrays(name, x_tr, y_tr, x_te, y_te)


@pytest.fixture
def tiny_data():
    return synthetic_data()


IMAGENET_LT_SIZES = {"train": 2000, "validation": 20, "test": 30}


def mock_imagenet_lt_records(self, split, decoders=None, read_config=None, **kwargs):
    """`as_dataset_fn` of `tfds.testing.mock_data` for TFDS's imagenet_lt: record i of a split
    (sizes above) has label i % 1000 and a 12 x 10 PNG of grey level i % 256."""
    n = IMAGENET_LT_SIZES[str(split).split("[")[0]]
    skip = decoders is not None and "image" in decoders

    def record(i):
        png = tf.io.encode_png(tf.fill([12, 10, 3], tf.cast(i % 256, tf.uint8)))
        return {"image": png if skip else tf.io.decode_png(png, 3), "label": i % 1000,
                "file_name": tf.strings.as_string(i)}

    return tf.data.Dataset.range(n).map(record)
