"""Shared test setup: TensorFlow defaults first, tiny datasets, no downloads."""

import numpy as np
import pytest

import balpoe_tf  # noqa: F401  (sets TF env before TensorFlow loads)
from balpoe_tf import data as lt_data


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
