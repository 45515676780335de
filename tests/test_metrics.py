import math

import numpy as np
import pytest

from balpoe_tf import metrics


def test_ece_mce_by_hand():
    # conf 0.9 right, 0.9 wrong (bin 13: acc 0.5, gap 0.4), 0.62 right (bin 9: gap 0.38),
    # 0.7 right (bin 10: gap 0.3). ECE = (2*0.4 + 0.38 + 0.3) / 4 = 0.37, MCE = 0.4.
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.38, 0.62], [0.3, 0.7]], np.float32)
    labels = np.array([0, 1, 1, 1])
    m = metrics.CalibrationError(from_logits=False)
    m.update_state(labels, probs)
    result = m.result()
    assert float(result["ece"]) == pytest.approx(0.37, abs=1e-6)
    assert float(result["mce"]) == pytest.approx(0.4, abs=1e-6)
    np.testing.assert_array_equal(np.flatnonzero(m.count.numpy()), [9, 10, 13])


def test_calibration_streams_like_one_batch():
    rng = np.random.RandomState(0)
    logits = rng.randn(40, 5).astype(np.float32) * 3
    labels = rng.randint(0, 5, 40)
    whole, parts = metrics.CalibrationError(), metrics.CalibrationError()
    whole.update_state(labels, logits)
    for i in range(0, 40, 7):
        parts.update_state(labels[i:i + 7], logits[i:i + 7])
    for k in ("ece", "mce"):
        assert float(whole.result()[k]) == pytest.approx(float(parts.result()[k]), abs=1e-6)


def test_group_accuracy_by_hand():
    m = metrics.GroupAccuracy(3, [150, 50, 5])  # many, medium, few
    labels = np.array([0, 0, 1, 2])
    preds = np.eye(3)[[0, 1, 1, 0]]  # class 0: 1/2, class 1: 1/1, class 2: 0/1
    m.update_state(labels, preds)
    r = {k: float(v) for k, v in m.result().items()}
    assert r == pytest.approx({"accuracy": 0.5, "many_accuracy": 0.5, "medium_accuracy": 1.0,
                               "few_accuracy": 0.0})
    np.testing.assert_allclose(m.per_class(), [0.5, 1.0, 0.0])


def test_empty_group_is_nan():
    m = metrics.GroupAccuracy(2, [150, 150])
    m.update_state(np.array([0, 1]), np.eye(2))
    assert math.isnan(float(m.result()["few_accuracy"]))
    with pytest.raises(ValueError, match="3 class counts for 2 classes"):
        m.train_counts = [1, 2, 3]


def test_evaluate_logits():
    logits = np.array([[0.0, math.log(3.0)], [0.0, math.log(3.0)]], np.float32)  # p = (1/4, 3/4)
    labels = np.array([1, 0])
    experts = np.stack([logits, -logits], axis=1)
    r = metrics.evaluate_logits(labels, logits, [500, 5], expert_logits=experts)
    assert r["nll"] == pytest.approx((-math.log(0.75) - math.log(0.25)) / 2, rel=1e-5)
    assert r["accuracy"] == 0.5 and r["many_accuracy"] == 0.0 and r["few_accuracy"] == 1.0
    assert r["expert0_accuracy"] == 0.5 and r["expert1_accuracy"] == 0.5
    # Both samples at confidence 0.75 (bin 11), accuracy 0.5.
    assert r["ece"] == pytest.approx(0.25, abs=1e-6) and r["mce"] == pytest.approx(0.25, abs=1e-6)
