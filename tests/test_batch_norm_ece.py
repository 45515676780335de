"""benchmarks/batch_norm_ece.py: refreshing and averaging a model's batch-norm moving statistics."""

import importlib.util
import os

import numpy as np
import tensorflow as tf

from balpoe_tf import task
from balpoe_tf.training import mixup_draw

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("batch_norm_ece", os.path.join(REPO, "benchmarks", "batch_norm_ece.py"))
bn_ece = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bn_ece)


def tiny_model():
    model = task.BalPoEModel(4, num_experts=2, backbone="resnet8", input_shape=(8, 8, 3))
    model(np.zeros((1, 8, 8, 3), np.float32))
    return model


def batches(n, seed=0):
    rng = np.random.RandomState(seed)
    return [(tf.constant(rng.randn(6, 8, 8, 3).astype(np.float32) * 2 + 1), tf.zeros(6, tf.int32))
            for _ in range(n)]


def stem_moments(model, images):
    """The stem convolution's per-channel mean and unbiased variance over a batch."""
    out = model.trunk.stem(images).numpy().reshape(-1, model.trunk.width)
    return out.mean(0), out.var(0, ddof=1)


def stem_statistics(model):
    bn = model.trunk.stem_bn
    return bn.moving_mean.numpy(), bn.moving_variance.numpy()


def test_average_statistics_is_the_mean_of_the_batches_moments():
    model, data = tiny_model(), batches(3)
    bn_ece.average_statistics(model, data, alpha=0.0, seed=1)
    moments = [stem_moments(model, images) for images, _ in data]
    mean, variance = stem_statistics(model)
    np.testing.assert_allclose(mean, np.mean([m for m, _ in moments], 0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(variance, np.mean([v for _, v in moments], 0), rtol=1e-4)
    assert all(b.momentum == 0.9 for b in bn_ece.batch_norm_layers(model))  # restored


def test_refresh_moves_the_statistics_as_training_does():
    model, data = tiny_model(), batches(1, seed=2)
    before_mean, before_variance = stem_statistics(model)
    xis = bn_ece.refresh(model, data, alpha=0.0, seed=1)
    batch_mean, batch_variance = stem_moments(model, data[0][0])
    mean, variance = stem_statistics(model)
    assert xis == [1.0]
    np.testing.assert_allclose(mean, 0.9 * before_mean + 0.1 * batch_mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(variance, 0.9 * before_variance + 0.1 * batch_variance, rtol=1e-4)


def test_refresh_draws_mixup_as_seeded_and_leaves_the_weights():
    model, data = tiny_model(), batches(2)
    weights = [w.numpy() for w in model.trainable_weights]
    xis = bn_ece.refresh(model, data, alpha=0.8, seed=7)
    expected = [float(mixup_draw(0.8, 6, tf.constant([7, i], tf.int64))[0]) for i in range(2)]
    assert xis == expected
    for before, w in zip(weights, model.trainable_weights):
        np.testing.assert_array_equal(before, w.numpy())
