"""Estimating an unknown test label prior from unlabeled predictions (label shift).

Plain maximum-likelihood EM (Saerens et al., 2002) assumes calibrated posteriors; with a
miscalibrated model it over-corrects. So the ensemble is first calibrated on a held-out
split of the training data (bias-corrected temperature scaling, BCTS; Alexandari et al.,
2020), EM runs on the calibrated posteriors and the estimate re-weights them (`adapt`).
Black-box shift estimation (BBSE; Lipton et al., 2018) and a Dirichlet-MAP EM
are offered beside it, and a likelihood-ratio test keeps the training-time prior when the
unlabeled data give no significant evidence of a shift.
"""

import dataclasses
import json
import os
import warnings
from typing import Optional

import numpy as np
from scipy import optimize, stats

from balpoe_tf.data.longtail import PRIOR_FLOOR, class_prior
from balpoe_tf.names import DEFAULT_SAFEGUARD_LEVEL, ESTIMATORS, NEEDS_HOLDOUT
from balpoe_tf.reporting import write_json

# Dirichlet concentration per class of "map_em", in pseudo-samples added to every class.
MAP_PSEUDO_COUNT = 10.0


def softmax(logits):
    """Softmax over the last axis, in float64."""
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def trained_log_prior(train_counts, mean_lambda: float) -> np.ndarray:
    """`lambda_bar * log pi_train`: what an ensemble with mean lambda adds to balanced
    logits by itself."""
    return mean_lambda * np.log(class_prior(train_counts))


def model_prior(train_counts, mean_lambda: float) -> np.ndarray:
    """The label prior an ensemble with mean lambda targets: pi^lambda_bar, normalised."""
    log_p = trained_log_prior(train_counts, mean_lambda)
    p = np.exp(log_p - log_p.max())
    return p / p.sum()


@dataclasses.dataclass
class Calibration:
    """Calibrated logits `logits / temperature + biases`.

    Attributes:
        temperature: > 1 softens an overconfident model, < 1 sharpens an underconfident one.
        biases: `(C,)` per-class offsets (for temperature scaling alone, only those that
            restating it for balanced logits adds; see `Holdout`).
        holdout_size: images it was fitted on.
        nll_before, nll_after: held-out NLL of the raw and calibrated logits.
    """

    temperature: float
    biases: np.ndarray
    holdout_size: int = 0
    nll_before: float = float("nan")
    nll_after: float = float("nan")

    def apply(self, logits) -> np.ndarray:
        return np.asarray(logits, np.float64) / self.temperature + self.biases

    def to_dict(self) -> dict:
        return {"temperature": float(self.temperature), "biases": [float(b) for b in self.biases],
                "holdout_size": int(self.holdout_size), "nll_before": float(self.nll_before),
                "nll_after": float(self.nll_after)}

    @classmethod
    def from_dict(cls, values: dict) -> "Calibration":
        return cls(float(values["temperature"]), np.asarray(values["biases"], np.float64),
                   int(values.get("holdout_size", 0)), float(values.get("nll_before", "nan")),
                   float(values.get("nll_after", "nan")))


def _nll(logits, labels) -> float:
    z = logits - logits.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-np.mean(log_p[np.arange(len(labels)), labels]))


def fit_calibration(logits, labels, biases: bool = True) -> Calibration:
    """Fit (bias-corrected) temperature scaling by maximum likelihood on labeled data.

    The NLL is convex in (1 / temperature, biases), so L-BFGS finds the optimum.

    Args:
        logits: `(N, C)` held-out logits.
        labels: `(N,)` their classes.
        biases: fit per-class biases (BCTS) or the temperature alone (TS).

    Returns:
        The fitted `Calibration` (posteriors calibrated for the data's own class mix).
    """
    logits = np.asarray(logits, np.float64)
    labels = np.asarray(labels, np.int64)
    n, c = logits.shape
    onehot = np.eye(c)[labels]

    def objective(theta):
        a, b = theta[0], (theta[1:] if biases else 0.0)
        z = a * logits + b
        z = z - z.max(axis=1, keepdims=True)
        log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        residual = (np.exp(log_p) - onehot) / n
        grad_a = np.sum(residual * logits)
        grad = np.concatenate([[grad_a], residual.sum(axis=0)]) if biases else np.array([grad_a])
        return -np.mean(log_p[np.arange(n), labels]), grad

    theta0 = np.concatenate([[1.0], np.zeros(c)]) if biases else np.array([1.0])
    bounds = [(1e-3, 1e3)] + [(None, None)] * (c if biases else 0)
    theta = optimize.minimize(objective, theta0, jac=True, method="L-BFGS-B", bounds=bounds,
                              options={"maxiter": 1000}).x
    calibration = Calibration(1.0 / theta[0], theta[1:] - theta[1:].mean() if biases else np.zeros(c), n)
    calibration.nll_before = _nll(logits, labels)
    calibration.nll_after = _nll(calibration.apply(logits), labels)
    return calibration


def em(probs, base_prior, pseudo_count: float = 0.0, tol: float = 1e-8, max_iter: int = 1000) -> np.ndarray:
    """Test prior by EM (Saerens et al., 2002), optionally maximum a posteriori.

    Args:
        probs: `(N, C)` posteriors under `base_prior`.
        base_prior: the prior the posteriors assume.
        pseudo_count: strength of a Dirichlet prior centred on `base_prior`, in
            pseudo-samples per class (0: maximum likelihood).
        tol: stop when the prior moves less than this (L1).
        max_iter: iteration limit.

    Returns:
        `(C,)` estimated test prior.
    """
    probs = np.asarray(probs, np.float64)
    base = np.asarray(base_prior, np.float64)
    prior = base.copy()
    for _ in range(max_iter):
        adjusted = probs * (prior / base)
        adjusted /= adjusted.sum(axis=1, keepdims=True)
        new = (adjusted.sum(axis=0) + pseudo_count * len(base) * base) / (len(probs) + pseudo_count * len(base))
        done = np.abs(new - prior).sum() < tol
        prior = new
        if done:
            break
    return prior


def bbse(holdout_labels, holdout_logits, logits, base_prior) -> np.ndarray:
    """Black-box shift estimation: solve P_test(pred = k) = sum_j P(pred = k | y = j) q_j
    with the confusion rates of the held-out split; negative solutions are clipped."""
    holdout_labels = np.asarray(holdout_labels)
    c = len(base_prior)
    confusion = np.zeros((c, c))
    np.add.at(confusion, (np.argmax(holdout_logits, axis=1), holdout_labels), 1.0)
    seen = confusion.sum(axis=0)
    rates = np.divide(confusion, seen, out=np.zeros_like(confusion), where=seen > 0)
    predicted = np.bincount(np.argmax(logits, axis=1), minlength=c) / len(logits)
    q = np.linalg.lstsq(rates, predicted, rcond=None)[0]
    q = np.where(seen > 0, np.maximum(q, 0.0), np.asarray(base_prior))
    return q / q.sum() if q.sum() > 0 else np.asarray(base_prior, np.float64)


def log_likelihood_ratio(probs, prior, base_prior) -> float:
    """log p(x_1..N | prior) - log p(x_1..N | base_prior) of unlabeled data, from posteriors
    under `base_prior`."""
    ratio = np.asarray(prior, np.float64) / np.asarray(base_prior, np.float64)
    return float(np.sum(np.log(np.asarray(probs, np.float64) @ ratio)))


def shift_is_significant(probs, prior, base_prior, level: float) -> bool:
    """Whether 2 x the log-likelihood ratio exceeds the chi-square(C - 1) quantile at
    `level` (Wilks): the data favour `prior` over `base_prior` beyond chance."""
    if level <= 0:
        return True
    statistic = 2.0 * log_likelihood_ratio(probs, prior, base_prior)
    return statistic > stats.chi2.ppf(1.0 - level, len(base_prior) - 1)


@dataclasses.dataclass
class Holdout:
    """A run's held-out predictions (balanced logits: the trained prior removed) and the
    calibrations fitted on them.

    The held-out images follow the training distribution, so the calibration is fitted as
    Alexandari et al. do, on the logits of that distribution (`balanced + log pi_train`)
    without re-weighting, and then stated for balanced logits. Re-weighting the held-out
    images to a balanced mix, measured, gave noisier biases: the tail classes have only a
    few held-out images each (docs/reproducing.md).
    """

    labels: np.ndarray
    balanced_logits: np.ndarray
    calibration: Calibration
    temperature_only: Calibration

    @classmethod
    def fit(cls, labels, balanced_logits, train_prior) -> "Holdout":
        log_prior = np.log(np.asarray(train_prior, np.float64))
        source_logits = np.asarray(balanced_logits, np.float64) + log_prior
        return cls(np.asarray(labels), np.asarray(balanced_logits, np.float64),
                   _balanced_frame(fit_calibration(source_logits, labels), log_prior),
                   _balanced_frame(fit_calibration(source_logits, labels, biases=False), log_prior))


def _balanced_frame(calibration: Calibration, log_prior) -> Calibration:
    """The calibration of `balanced + log_prior` logits restated for balanced logits:
    `(z + log pi) / T + b - log pi = z / T + b + (1 / T - 1) log pi`."""
    biases = calibration.biases + (1.0 / calibration.temperature - 1.0) * log_prior
    return dataclasses.replace(calibration, biases=biases - biases.mean())


def usable_estimators(names, holdout: Optional[Holdout] = None, calibration: Optional[Calibration] = None) -> list:
    """`names` without repeats and without those that the model at hand cannot use: bbse and
    ts_em need its held-out split, bcts_em that or its calibration (a SavedModel's). Plain EM
    stands in for the first when it is one of them (`fallback_reason` says why)."""
    def usable(name):
        return name not in NEEDS_HOLDOUT or holdout is not None or (name == "bcts_em" and calibration is not None)

    kept = [e for e in dict.fromkeys(names) if usable(e)]
    return kept if kept and kept[0] == names[0] else ["em"] + [e for e in kept if e != "em"]


def fallback_reason(estimator: str) -> str:
    """Why plain EM stood in for `estimator` (the end of a warning about a model)."""
    return (f"has no held-out split, so its estimated prior is plain EM (uncalibrated: it over-corrects a "
            f"miscalibrated model); train with --holdout_fraction=0.1 for --prior_estimator={estimator}")


def estimator_calibration(method: str, holdout: Optional[Holdout] = None,
                          calibration: Optional[Calibration] = None) -> Optional[Calibration]:
    """The calibration an estimator works with (None for those on the raw posteriors): the
    held-out split's BCTS for "bcts_em" (or the given one, e.g. a SavedModel's), its
    temperature alone for "ts_em"."""
    if method == "ts_em":
        return None if holdout is None else holdout.temperature_only
    if method == "bcts_em":
        return holdout.calibration if holdout is not None else calibration
    return None


def adapt(balanced_logits, prior, calibration: Optional[Calibration] = None) -> np.ndarray:
    """Logits for inputs drawn with label prior `prior`: the (calibrated) balanced logits
    plus `log prior` (zero entries floored at `PRIOR_FLOOR`). With the estimator's own
    calibration this is the adaptation of Alexandari et al.: the calibrated posterior
    re-weighted by the prior."""
    z = np.asarray(balanced_logits, np.float64) if calibration is None else calibration.apply(balanced_logits)
    return z + np.log(np.maximum(np.asarray(prior, np.float64), PRIOR_FLOOR))


def floor_estimate(prior, num_inputs: int):
    """`(prior, switched off)`: an estimated prior with no class below half an input's share,
    `1 / (2 N)`, renormalised, and the classes that were below it. N unlabeled inputs cannot
    tell a prior below about 1 / N from 0, and an overconfident model's EM pushes such classes
    to 1e-30 and less, which switches them off (measured: balanced accuracy 64 -> 40 % on a
    backward-shifted set)."""
    prior = np.asarray(prior, np.float64)
    floor = 1.0 / (2.0 * num_inputs)
    low = np.flatnonzero(prior < floor)
    floored = np.maximum(prior, floor)
    return floored / floored.sum(), low


def estimate_prior(method: str, balanced_logits, base_prior, holdout: Optional[Holdout] = None,
                   calibration: Optional[Calibration] = None,
                   safeguard_level: float = DEFAULT_SAFEGUARD_LEVEL, what: str = "the inputs") -> np.ndarray:
    """The test prior of a batch of unlabeled inputs.

    Args:
        method: one of `ESTIMATORS`.
        balanced_logits: `(N, C)` ensemble logits with the trained prior removed
            (`logits - mean_lambda * log pi_train`).
        base_prior: the prior the model predicts with by itself (`pi_train^mean_lambda`,
            uniform for mean lambda 0), which the safeguard keeps.
        holdout: the run's held-out predictions (needed by `NEEDS_HOLDOUT`).
        calibration: for "bcts_em" when only the calibration is at hand (a served model).
        safeguard_level: keep `base_prior` unless the likelihood-ratio test rejects it at
            this level (0: always take the estimate).
        what: the inputs, for the warning when the estimate is floored (`floor_estimate`).

    Returns:
        `(C,)` estimated prior.
    """
    if method not in ESTIMATORS:
        raise ValueError(f"unknown prior estimator {method!r}; choose from {ESTIMATORS}")
    calibration = estimator_calibration(method, holdout, calibration)
    if method in NEEDS_HOLDOUT and (holdout is None if method == "bbse" else calibration is None):
        raise ValueError(f"the {method} prior estimator needs a held-out split: train with --holdout_fraction "
                         "(e.g. 0.1), or choose the em or map_em estimator")
    base = np.asarray(base_prior, np.float64)
    log_base = np.log(base)
    probs = softmax((balanced_logits if calibration is None else calibration.apply(balanced_logits)) + log_base)
    if method == "bbse":
        prior = bbse(holdout.labels, holdout.balanced_logits + log_base, np.asarray(balanced_logits) + log_base,
                     base)
    else:
        prior = em(probs, base, MAP_PSEUDO_COUNT if method == "map_em" else 0.0)
    if not shift_is_significant(probs, prior, base, safeguard_level):
        return base
    floored, low = floor_estimate(prior, len(probs))
    if len(low):
        warnings.warn(f"the {method} estimate of the label prior of {what} gave {len(low)} class(es) less than half an "
                      f"input's share of the {len(probs)} (class {', '.join(map(str, low[:10]))}"
                      f"{', ...' if len(low) > 10 else ''}: down to {prior[low].min():.2g}), which would switch them "
                      f"off; floored at 1/(2N) = {1 / (2 * len(probs)):.2g}"
                      + ("" if calibration is not None else ". A calibrated estimator (bcts_em, with a held-out split) "
                                                            "over-corrects less"), stacklevel=2)
    return floored


HOLDOUT_FILE = "holdout_predictions.npz"
CALIBRATION_FILE = "calibration.json"
# How the recorded calibrations were fitted (Holdout.fit); a record without it is refitted.
CALIBRATION_FIT = "training-mix logits, restated for balanced logits"


def save_holdout(run_dir: str, labels, balanced_logits, train_counts) -> Holdout:
    """Store a run's held-out predictions, fit the calibrations and record them
    (`calibration.json`: temperature, biases for balanced logits, and the held-out NLL
    before and after)."""
    holdout = Holdout.fit(labels, balanced_logits, class_prior(train_counts))
    np.savez(os.path.join(run_dir, HOLDOUT_FILE), labels=np.asarray(labels),
             balanced_logits=np.asarray(balanced_logits, np.float32))
    # Written last and whole: its presence says the run's calibration is done (run_folder.missing_artefacts).
    write_json(os.path.join(run_dir, CALIBRATION_FILE), {"fit": CALIBRATION_FIT, "bcts": holdout.calibration.to_dict(),
                                                         "temperature_scaling": holdout.temperature_only.to_dict()})
    return holdout


def load_holdout(run_dir: str, train_counts) -> Optional[Holdout]:
    """The held-out predictions of a run trained with --holdout_fraction (None without), with
    the calibrations recorded in its calibration.json; refitted (with the run's `train_counts`)
    only when that record is missing or was fitted another way (an earlier version re-weighted
    the held-out images), since fitting on an iNaturalist-sized split takes a while."""
    path = os.path.join(run_dir, HOLDOUT_FILE)
    if not os.path.isfile(path):
        return None
    with np.load(path) as saved:
        labels, balanced_logits = saved["labels"], saved["balanced_logits"].astype(np.float64)
    record_path = os.path.join(run_dir, CALIBRATION_FILE)
    record = {}
    if os.path.isfile(record_path):
        with open(record_path) as f:
            record = json.load(f)
    if record.get("fit") == CALIBRATION_FIT:
        return Holdout(labels, balanced_logits, Calibration.from_dict(record["bcts"]),
                       Calibration.from_dict(record["temperature_scaling"]))
    return Holdout.fit(labels, balanced_logits, class_prior(train_counts))
