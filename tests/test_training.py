import math

import numpy as np
import pytest
import tensorflow as tf
from scipy import stats

from balpoe_tf import losses, training


def _sgd_steps(lrs, grad=0.5, w0=1.0):
    var = tf.Variable([w0])
    schedule = training.WarmupStepSchedule(lrs[0], 1, 0, [1], gamma=lrs[1] / lrs[0])
    opt = training.SGDWithL2(schedule, momentum=0.9, nesterov=True, l2=0.1)
    out = []
    for _ in lrs:
        opt.apply_gradients([(tf.constant([grad]), var)])
        out.append(float(var.numpy()[0]))
    return out


def test_sgd_matches_pytorch_by_hand():
    # Step 1: g = 0.5 + 0.1*1 = 0.6, buf = 0.6, step = 0.6 + 0.9*0.6 = 1.14, w = 1 - 0.1*1.14 = 0.886
    # Step 2: g = 0.5 + 0.1*0.886 = 0.5886, buf = 0.54 + 0.5886 = 1.1286,
    #         step = 0.5886 + 0.9*1.1286 = 1.60434, w = 0.886 - 0.1*1.60434 = 0.725566
    np.testing.assert_allclose(_sgd_steps([0.1, 0.1]), [0.886, 0.725566], atol=1e-6)


def test_sgd_momentum_buffer_is_lr_free():
    # After the LR drops to 0.01 the step is lr * 1.60434 (PyTorch); Keras' SGD would
    # carry the old LR inside its velocity instead.
    np.testing.assert_allclose(_sgd_steps([0.1, 0.01]), [0.886, 0.886 - 0.01 * 1.60434], atol=1e-6)


def test_sgd_freezes_the_pretrained_variables_then_scales_their_step():
    pretrained, fresh = tf.Variable([1.0]), tf.Variable([1.0])
    opt = training.SGDWithL2(0.1, momentum=0.9, nesterov=True, l2=0.1, pretrained=[0], pretrained_lr_factor=0.5,
                             frozen_steps=2)
    for _ in range(2):
        opt.apply_gradients([(tf.constant([0.5]), pretrained), (tf.constant([0.5]), fresh)])
    # Frozen: not moved, L2 included, and nothing left in its momentum buffer to move it later.
    assert float(pretrained.numpy()[0]) == 1.0 and float(opt.buffers[0].numpy()[0]) == 0.0
    np.testing.assert_allclose(fresh.numpy(), [0.725566], atol=1e-6)  # as test_sgd_matches_pytorch_by_hand
    opt.apply_gradients([(tf.constant([0.5]), pretrained), (tf.constant([0.5]), fresh)])
    # First step of its own at half the learning rate: g = 0.6 * 0.5, w = 1 - 0.1 * (0.3 + 0.9 * 0.3)
    np.testing.assert_allclose(pretrained.numpy(), [1 - 0.1 * 0.57], atol=1e-6)
    config = opt.get_config()
    assert (config["pretrained"], config["pretrained_lr_factor"], config["frozen_steps"]) == ([0], 0.5, 2)


def test_sgd_without_momentum_or_nesterov():
    var = tf.Variable([2.0])
    training.SGDWithL2(0.5, momentum=0.0, l2=0.0).apply_gradients([(tf.constant([1.0]), var)])
    assert float(var.numpy()[0]) == pytest.approx(1.5)
    var = tf.Variable([1.0])
    opt = training.SGDWithL2(0.1, momentum=0.9, nesterov=False, l2=0.0)
    for _ in range(2):
        opt.apply_gradients([(tf.constant([1.0]), var)])
    # buf: 1, then 1.9; w: 1 - 0.1 - 0.19
    assert float(var.numpy()[0]) == pytest.approx(0.71)


def test_warmup_step_schedule_reference_values():
    s = training.WarmupStepSchedule(0.1, steps_per_epoch=10, warmup_epochs=5, milestones=[160, 180])
    lr = lambda step: float(s(step))  # noqa: E731
    assert [lr(10 * e) for e in range(6)] == pytest.approx([0.02, 0.04, 0.06, 0.08, 0.1, 0.1])
    assert lr(9) == pytest.approx(0.02)  # constant within an epoch
    assert lr(1599) == pytest.approx(0.1)
    assert lr(1600) == pytest.approx(0.01)
    assert lr(1799) == pytest.approx(0.01)
    assert lr(1800) == pytest.approx(0.001)
    assert lr(1999) == pytest.approx(0.001)


def test_cosine_schedule_values():
    s = training.EpochCosineSchedule(0.025, steps_per_epoch=2, epochs=180)
    assert float(s(0)) == pytest.approx(0.025)
    assert float(s(2 * 60 + 1)) == pytest.approx(0.025 * (1 + math.cos(math.pi / 3)) / 2)
    assert float(s(2 * 90)) == pytest.approx(0.0125)
    assert float(s(2 * 179)) == pytest.approx(0.025 * (1 + math.cos(math.pi * 179 / 180)) / 2, abs=1e-8)


def test_schedule_config_round_trip():
    s = training.WarmupStepSchedule(0.1, 7, 5, [160, 180])
    again = training.WarmupStepSchedule.from_config(s.get_config())
    assert float(again(7 * 170)) == pytest.approx(float(s(7 * 170)))


def test_mixup_off_with_alpha_zero():
    xi, perm = training.mixup_draw(0.0, 5, tf.constant([0, 1], tf.int64))
    assert float(xi) == 1.0
    np.testing.assert_array_equal(perm, np.arange(5))


def test_mixup_draws_are_seeded_permutations():
    a = training.mixup_draw(0.4, 16, tf.constant([3, 9], tf.int64))
    b = training.mixup_draw(0.4, 16, tf.constant([3, 9], tf.int64))
    c = training.mixup_draw(0.4, 16, tf.constant([3, 10], tf.int64))
    assert float(a[0]) == float(b[0]) and float(a[0]) != float(c[0])
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_array_equal(np.sort(a[1]), np.arange(16))
    assert 0.0 <= float(a[0]) <= 1.0


@pytest.mark.parametrize("alpha", [0.2, 0.8])
def test_mixup_coefficient_is_beta_distributed(alpha):
    draw = tf.function(lambda i: training.mixup_draw(alpha, 2, tf.stack([tf.constant(5, tf.int64), i]))[0])
    xs = np.array([float(draw(tf.constant(i, tf.int64))) for i in range(600)])
    assert stats.kstest(xs, stats.beta(alpha, alpha).cdf).pvalue > 1e-3
    assert xs.var() == pytest.approx(1 / (4 * (2 * alpha + 1)), rel=0.2)


def test_mix_and_mixup_loss_by_hand():
    images = np.array([[1.0], [3.0]], np.float32)
    np.testing.assert_allclose(training.mix(images, 0.25, [1, 0]), [[2.5], [1.5]])
    loss = losses.LogitAdjustedLoss([3, 1], [1.0], target_mean_lambda=1.0)
    logits = np.array([[[2.0, 0.5]], [[0.0, 1.0]]], np.float32)
    y, perm = np.array([1, 0]), np.array([1, 0])
    plain = loss.call(y, logits).numpy()
    swapped = loss.call(y[perm], logits).numpy()
    # xi = 1 reproduces the plain loss, xi = 0 the permuted labels' loss.
    np.testing.assert_allclose(training.mixup_loss(loss, y, logits, 1.0, perm), plain, rtol=1e-6)
    np.testing.assert_allclose(training.mixup_loss(loss, y, logits, 0.0, perm), swapped, rtol=1e-6)
    np.testing.assert_allclose(training.mixup_loss(loss, y, logits, 0.3, perm),
                               0.3 * plain + 0.7 * swapped, rtol=1e-6)
