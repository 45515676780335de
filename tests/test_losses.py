import math
import warnings

import numpy as np
import pytest

from balpoe_tf import losses

# One example, two classes: logits z = (2.0, 0.5), label 1, training counts (3, 1).
Z, COUNTS = np.array([[2.0, 0.5]], np.float32), [3, 1]


def _expected(tau):
    """-log( pi_1^tau e^z1 / sum_j pi_j^tau e^zj ), written out by hand."""
    w0, w1 = 0.75 ** tau * math.exp(2.0), 0.25 ** tau * math.exp(0.5)
    return -math.log(w1 / (w0 + w1))


def test_hand_computed_values():
    assert _expected(0) == pytest.approx(1.701413, abs=1e-6)   # plain CE
    assert _expected(1) == pytest.approx(2.670353, abs=1e-6)   # balanced softmax
    assert _expected(2) == pytest.approx(3.721714, abs=1e-6)   # inverse-prior expert


@pytest.mark.parametrize("lam", [1.0, 0.0, -1.0])
def test_single_expert(lam):
    loss = losses.LogitAdjustedLoss(COUNTS, [lam], target_mean_lambda=lam)
    value = loss.call(np.array([1]), Z[:, None, :]).numpy()
    np.testing.assert_allclose(value, [_expected(1 - lam)], rtol=1e-5)


def test_three_experts_average():
    logits = np.stack([Z, Z + 1.0, Z * 0.5], axis=1)  # (1, 3, 2)
    loss = losses.LogitAdjustedLoss(COUNTS, [1, 0, -1])
    expected = []
    for m, tau in enumerate([0, 1, 2]):
        z0, z1 = logits[0, m]
        w0, w1 = 0.75 ** tau * math.exp(z0), 0.25 ** tau * math.exp(z1)
        expected.append(-math.log(w1 / (w0 + w1)))
    np.testing.assert_allclose(loss.call(np.array([1]), logits).numpy(), [np.mean(expected)], rtol=1e-5)
    # Keras reduction: the batch mean.
    assert float(loss(np.array([1]), logits)) == pytest.approx(np.mean(expected), rel=1e-5)


def test_expert_count_mismatch():
    loss = losses.LogitAdjustedLoss(COUNTS, [1, 0, -1])
    with pytest.raises(ValueError, match="3 lambdas but the model has 2 experts"):
        loss.call(np.array([1]), np.zeros((1, 2, 2), np.float32))


def test_check_lambdas():
    with pytest.raises(ValueError, match="empty"):
        losses.check_lambdas([])
    with pytest.warns(UserWarning, match="mean lambda is 0.333333, not the target 0"):
        losses.check_lambdas([1, 0, 0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        losses.check_lambdas([1, 0, -1])
        losses.check_lambdas([1, -0.25, -1.5], target_mean=-0.25)


def test_config_round_trip():
    loss = losses.LogitAdjustedLoss(COUNTS, [1, 0, -1])
    again = losses.LogitAdjustedLoss.from_config(loss.get_config())
    logits = np.random.RandomState(0).randn(4, 3, 2).astype(np.float32)
    y = np.array([0, 1, 1, 0])
    np.testing.assert_allclose(again.call(y, logits), loss.call(y, logits))
