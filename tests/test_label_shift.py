import json
import math

import numpy as np
import pytest

from balpoe_tf import label_shift, names

CENTRES = np.array([-2.0, 0.0, 2.0])
UNIFORM = np.full(3, 1 / 3)


def _gaussian_logits(labels, rng):
    """Exact log-likelihoods of three unit Gaussians at -2, 0, 2: logits whose softmax is
    the calibrated posterior under a uniform prior."""
    x = rng.randn(len(labels)) + CENTRES[labels]
    return -0.5 * (x[:, None] - CENTRES) ** 2


def _accuracy(logits, labels, prior):
    return np.mean(np.argmax(logits + np.log(prior), axis=1) == labels)


def test_em_recovers_a_known_prior_from_calibrated_posteriors():
    rng = np.random.RandomState(0)
    true_prior = np.array([0.6, 0.3, 0.1])
    labels = rng.choice(3, size=30000, p=true_prior)
    probs = label_shift.softmax(_gaussian_logits(labels, rng))
    estimate = label_shift.em(probs, UNIFORM)
    assert np.abs(estimate - true_prior).sum() < 0.03
    assert np.abs(probs.mean(0) - true_prior).sum() > 0.1  # the naive average is far off


def test_underconfident_model_plain_em_hurts_the_uniform_set_and_calibrated_em_does_not():
    rng = np.random.RandomState(1)
    train_prior = np.array([0.7, 0.2, 0.1])
    holdout_labels = rng.choice(3, size=10000, p=train_prior)  # held out from the (long-tailed) training data
    test_labels = rng.choice(3, size=6000)  # a uniform test set
    # Underconfident (a third of the calibrated logits) and biased towards class 0 by 0.4.
    distort = np.array([0.4, 0.0, 0.0])
    holdout_logits = _gaussian_logits(holdout_labels, rng) / 3 + distort
    test_logits = _gaussian_logits(test_labels, rng) / 3 + distort
    holdout = label_shift.Holdout.fit(holdout_labels, holdout_logits, train_prior)
    assert holdout.calibration.temperature == pytest.approx(1 / 3, rel=0.1)
    np.testing.assert_allclose(holdout.calibration.biases, -(distort - distort.mean()) * 3, atol=0.2)

    no_prior = _accuracy(test_logits, test_labels, UNIFORM)
    plain = label_shift.em(label_shift.softmax(test_logits), UNIFORM)
    default = label_shift.estimate_prior(names.DEFAULT_ESTIMATOR, test_logits, UNIFORM, holdout)
    assert np.abs(plain - UNIFORM).sum() > 0.3  # plain EM over-corrects the flat posteriors ...
    assert _accuracy(test_logits, test_labels, plain) < no_prior - 0.02  # ... and loses accuracy
    assert np.abs(default - UNIFORM).sum() < 0.05
    assert _accuracy(test_logits, test_labels, default) >= no_prior - 0.01


def test_calibrated_em_recovers_a_shifted_prior_of_an_underconfident_model():
    rng = np.random.RandomState(2)
    holdout_labels = rng.choice(3, size=10000, p=[0.7, 0.2, 0.1])
    true_prior = np.array([0.1, 0.3, 0.6])
    test_labels = rng.choice(3, size=6000, p=true_prior)
    holdout = label_shift.Holdout.fit(holdout_labels, _gaussian_logits(holdout_labels, rng) / 3, [0.7, 0.2, 0.1])
    estimate = label_shift.estimate_prior("bcts_em", _gaussian_logits(test_labels, rng) / 3, UNIFORM, holdout)
    assert np.abs(estimate - true_prior).sum() < 0.05


def test_calibration_is_stated_for_balanced_logits():
    # Calibrated for the source mix: (z + log pi) / T + b - log pi = z / T + b + (1 / T - 1) log pi.
    log_prior = np.log([0.8, 0.2])
    source = label_shift.Calibration(0.5, np.array([0.3, -0.3]))
    balanced = label_shift._balanced_frame(source, log_prior)
    z = np.array([[1.0, -2.0], [0.5, 0.25]])
    expected = source.apply(z + log_prior) - log_prior
    np.testing.assert_allclose(balanced.apply(z) - balanced.apply(z)[:, :1], expected - expected[:, :1])
    assert balanced.biases.sum() == pytest.approx(0.0)


def test_map_em_and_likelihood_ratio_by_hand():
    one_hot = np.tile([1.0, 0.0], (10, 1))
    # ML gives all mass to class 0; 5 pseudo-samples per class centred on uniform: (10 + 5) / (10 + 10).
    np.testing.assert_allclose(label_shift.em(one_hot, [0.5, 0.5], pseudo_count=5), [0.75, 0.25], atol=1e-6)
    assert label_shift.log_likelihood_ratio([[0.5, 0.5]], [0.8, 0.2], [0.5, 0.5]) == pytest.approx(0.0)
    assert label_shift.log_likelihood_ratio([[1.0, 0.0]], [0.8, 0.2], [0.5, 0.5]) == pytest.approx(math.log(1.6))
    # 2 * 10 * log(1.6) = 9.4 exceeds the chi2(1) 1% quantile 6.63; at 0.1% (10.83) it does not.
    assert label_shift.shift_is_significant(one_hot, [0.8, 0.2], [0.5, 0.5], 0.01)
    assert not label_shift.shift_is_significant(one_hot, [0.8, 0.2], [0.5, 0.5], 0.001)


def test_safeguard_keeps_the_model_prior_without_evidence():
    probs = np.array([[0.6, 0.4], [0.4, 0.6]])  # two inputs: no evidence either way
    shifted = label_shift.estimate_prior("em", np.log(probs) + [0.0, 0.2], [0.5, 0.5], safeguard_level=0.01)
    np.testing.assert_allclose(shifted, [0.5, 0.5])
    with pytest.warns(UserWarning, match="floored at 1/\\(2N\\) = 0.25"):  # EM takes class 0 to 4e-8
        unguarded = label_shift.estimate_prior("em", np.log(probs) + [0.0, 0.2], [0.5, 0.5], safeguard_level=0)
    assert unguarded[1] > 0.5


def test_bbse_with_a_perfect_classifier_counts_its_predictions():
    holdout_labels = np.array([0, 1, 2, 2])
    logits = np.eye(3)[[0, 0, 0, 1, 2, 2, 2, 2]] * 4.0
    holdout = label_shift.Holdout.fit(holdout_labels, np.eye(3)[holdout_labels] * 4.0, UNIFORM)
    q = label_shift.estimate_prior("bbse", logits, UNIFORM, holdout, safeguard_level=0)
    np.testing.assert_allclose(q, [3 / 8, 1 / 8, 4 / 8])


def test_estimators_that_need_a_held_out_split_say_so():
    for method in names.NEEDS_HOLDOUT:
        with pytest.raises(ValueError, match="needs a held-out split: train with --holdout_fraction"):
            label_shift.estimate_prior(method, np.zeros((2, 3)), UNIFORM)
    with pytest.raises(ValueError, match="unknown prior estimator 'magic'"):
        label_shift.estimate_prior("magic", np.zeros((2, 3)), UNIFORM)


def test_model_prior_by_hand():
    np.testing.assert_allclose(label_shift.model_prior([3, 1], 0.0), [0.5, 0.5])
    np.testing.assert_allclose(label_shift.model_prior([3, 1], -1.0), [0.25, 0.75])


def test_holdout_round_trip(tmp_path):
    rng = np.random.RandomState(3)
    labels = rng.choice(3, size=300)
    logits = _gaussian_logits(labels, rng)
    assert label_shift.load_holdout(str(tmp_path), [5, 3, 2]) is None
    saved = label_shift.save_holdout(str(tmp_path), labels, logits, [5, 3, 2])
    loaded = label_shift.load_holdout(str(tmp_path), [5, 3, 2])
    np.testing.assert_array_equal(loaded.labels, labels)
    record = json.loads((tmp_path / label_shift.CALIBRATION_FILE).read_text())
    assert record["bcts"]["nll_after"] <= record["bcts"]["nll_before"]
    # The recorded calibrations are read back exactly, not refitted.
    for ours, theirs in ((loaded.calibration, saved.calibration), (loaded.temperature_only, saved.temperature_only)):
        assert ours.temperature == theirs.temperature
        np.testing.assert_array_equal(ours.biases, theirs.biases)
    # A record of another fitting method (an earlier version's, without "fit"), or none, is refitted.
    stale = {**record, "bcts": {**record["bcts"], "temperature": 9.0}}
    del stale["fit"]
    (tmp_path / label_shift.CALIBRATION_FILE).write_text(json.dumps(stale))
    for record_left in (True, False):
        assert (tmp_path / label_shift.CALIBRATION_FILE).exists() == record_left
        refitted = label_shift.load_holdout(str(tmp_path), [5, 3, 2])
        assert refitted.calibration.temperature == pytest.approx(saved.calibration.temperature, rel=1e-4)
        np.testing.assert_allclose(refitted.calibration.apply(logits), saved.calibration.apply(logits), atol=1e-4)
        (tmp_path / label_shift.CALIBRATION_FILE).unlink(missing_ok=True)


def test_adapt_by_hand():
    calibration = label_shift.Calibration(2.0, np.array([1.0, 0.0]))
    np.testing.assert_allclose(label_shift.adapt([[2.0, 0.0]], [0.25, 0.75], calibration),
                               [[2.0 / 2 + 1 + math.log(0.25), math.log(0.75)]])
    np.testing.assert_allclose(label_shift.adapt([[2.0, 0.0]], [0.0, 1.0]), [[2.0 + math.log(1e-8), 0.0]])
    assert label_shift.estimator_calibration("em", calibration=calibration) is None
    assert label_shift.estimator_calibration("bcts_em", calibration=calibration) is calibration


def test_an_estimate_is_floored_at_half_an_inputs_share_by_hand():
    prior, low = label_shift.floor_estimate([0.6, 0.4 - 1e-30, 1e-30], num_inputs=10)
    # Half of one of 10 inputs is 0.05; the rest keep their proportions after renormalising.
    np.testing.assert_allclose(prior, np.array([0.6, 0.4, 0.05]) / 1.05)
    assert low.tolist() == [2]
    same, none = label_shift.floor_estimate([0.5, 0.3, 0.2], num_inputs=10)
    np.testing.assert_allclose(same, [0.5, 0.3, 0.2]) and not len(none)


def test_plain_em_that_switches_a_class_off_is_floored_with_a_warning():
    # An overconfident model on 20 inputs, none of class 2: plain EM drives class 2 towards 0.
    rng = np.random.RandomState(0)
    labels = rng.randint(0, 2, 20)
    logits = np.full((20, 3), -8.0)
    logits[np.arange(20), labels] = 8.0
    with pytest.warns(UserWarning, match=r"the em estimate of the label prior of the backward50 test set gave 1 "
                                         r"class\(es\) less than half an input's share of the 20 \(class 2: down to "
                                         r".*floored at 1/\(2N\) = 0.025"):
        prior = label_shift.estimate_prior("em", logits, np.full(3, 1 / 3), safeguard_level=0,
                                           what="the backward50 test set")
    assert prior[2] == pytest.approx(0.025 / (1 + 0.025)) and prior.sum() == pytest.approx(1.0)
