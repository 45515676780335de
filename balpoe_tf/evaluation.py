"""The paper's evaluation protocol: shifted (forward / backward long-tailed) test sets,
test-time priors (none, known, estimated from the unlabeled test inputs), calibration and
paper-style tables.

The model runs once over the balanced test set; every shifted set is a subset of it, so
its metrics come from indexing the stored logits.
"""

import csv
import dataclasses
import os
from typing import Dict, Optional, Sequence

import numpy as np

import tensorflow as tf

from balpoe_tf import data as lt_data
from balpoe_tf import label_shift, models, reporting, run_config, run_folder
from balpoe_tf import metrics as lt_metrics
from balpoe_tf.config import RunError
from balpoe_tf.names import (DEFAULT_ESTIMATOR, DEFAULT_SAFEGUARD_LEVEL, DISTRIBUTIONS, parse_distribution,
                             PRIOR_MODES)
from balpoe_tf.progress import Progress
from balpoe_tf.run_data import load_data
from balpoe_tf.settings import EvalConfig

PRIOR_FLOOR = lt_data.PRIOR_FLOOR


def frequency_rank(train_counts) -> np.ndarray:
    """Each class's rank by training frequency, 0 for the most frequent (ties by class id)."""
    order = np.argsort(-np.asarray(train_counts), kind="stable")
    rank = np.empty(len(order), np.int64)
    rank[order] = np.arange(len(order))
    return rank


def shifted_counts(train_counts, n_max: int, name: str) -> np.ndarray:
    """Per-class test images of a shifted set: `int(n_max * (1/ratio)^(k/(C-1)))`, with k
    the class's training-frequency rank (reversed for backward)."""
    direction, ratio = parse_distribution(name)
    profile = lt_data.long_tailed_counts(n_max, len(train_counts), ratio, reverse=direction == "backward")
    return profile[frequency_rank(train_counts)]


def shifted_indices(test_labels, train_counts, name: str) -> np.ndarray:
    """Indices into the balanced test set that form the shifted set `name` (seeded, fixed)."""
    counts = lt_data.class_counts(test_labels, len(train_counts), "test label")
    if name == "uniform":
        return np.arange(len(test_labels))
    return lt_data.long_tailed_indices(np.asarray(test_labels), shifted_counts(train_counts, counts.min(), name))


def posthoc_adjust(logits, target_prior, train_counts, mean_lambda: float = 0.0):
    """Logits re-targeted to `target_prior`: `+ log p_target - lambda_bar * log pi_train`.

    For the balanced ensemble (mean lambda 0) this is the reference's `+ log p_test`; for
    other means it first removes the prior the ensemble was trained to target. Zero
    entries of the target prior are clamped to `PRIOR_FLOOR`.
    """
    target = np.asarray(target_prior, np.float64)
    if target.shape != (np.shape(logits)[-1],) or np.any(target < 0) or target.sum() <= 0:
        raise ValueError(f"target prior must be {np.shape(logits)[-1]} non-negative values with a "
                         f"positive sum, got shape {target.shape}")
    balanced = np.asarray(logits, np.float64) - label_shift.trained_log_prior(train_counts, mean_lambda)
    return label_shift.adapt(balanced, target / target.sum())


def brier_score(labels, probs) -> float:
    """Mean over samples of sum_c (p_c - [y = c])^2."""
    probs = np.asarray(probs, np.float64)
    onehot = np.eye(probs.shape[1])[np.asarray(labels)]
    return float(np.mean(np.sum((probs - onehot) ** 2, axis=1)))


def kl_divergence(p, q) -> float:
    """KL(p || q) of two distributions (q floored at 1e-12)."""
    p, q = np.asarray(p, np.float64), np.maximum(np.asarray(q, np.float64), 1e-12)
    mask = p > 0
    return float(np.sum(p[mask] * np.log(p[mask] / q[mask])))


def set_metrics(labels, logits, train_counts) -> dict:
    """Accuracy (over samples), many/medium/few (means of per-class accuracies; NaN for a
    group with no class present), ECE, MCE, NLL, Brier and overconfidence (mean top-1
    confidence minus accuracy: the sign ECE lacks, negative for an underconfident model) of
    one set of predictions."""
    out = lt_metrics.evaluate_logits(labels, np.asarray(logits, np.float32), train_counts)
    probs = label_shift.softmax(logits)
    out["brier"] = brier_score(labels, probs)
    out["overconfidence"] = float(np.mean(np.max(probs, axis=-1)) - out["accuracy"])
    out["size"] = int(len(labels))
    return out


@dataclasses.dataclass
class Predictions:
    """The model's outputs on the balanced test set."""

    labels: np.ndarray  # (N,)
    logits: np.ndarray  # (N, C) ensemble
    expert_logits: np.ndarray  # (N, M, C)


def predict(model, dataset: tf.data.Dataset, progress: Optional[Progress] = None) -> Predictions:
    """Labels, ensemble and expert logits of every batch of `dataset` (a `Progress` is told
    of each batch)."""
    preds = Predictions(*models.predict_dataset(model, dataset, progress))
    bad = int((~np.isfinite(preds.expert_logits)).any(axis=(1, 2)).sum())
    if bad:
        raise RunError(f"the model gives non-finite logits for {bad} of {len(preds.labels)} test "
                       "images (its weights diverged): no metrics are reported for it")
    return preds


def expert_report(preds: Predictions, train_counts, lambdas: Sequence[float]) -> dict:
    """Per expert: balanced accuracy, and KL(target prior pi^lambda || mean predicted
    distribution on the balanced test set), as in the paper's Fig. 3; also for the ensemble
    against its target pi^mean(lambda)."""
    rows = {}
    for m, lam in enumerate(list(lambdas) + [None]):
        logits = preds.logits if lam is None else preds.expert_logits[:, m]
        lam_value = float(np.mean(lambdas)) if lam is None else float(lam)
        target = label_shift.model_prior(train_counts, lam_value)
        marginal = label_shift.softmax(logits).mean(axis=0)
        rows["ensemble" if lam is None else f"expert{m}"] = {
            "lambda": lam_value,
            "accuracy": float(np.mean(np.argmax(logits, 1) == preds.labels)),
            "kl_target_to_marginal": kl_divergence(target, marginal),
        }
    return rows


def estimated_mode(estimator: str, primary: bool) -> str:
    """The results key of an estimator's rows: "estimated" for the one in use, else
    "estimated:NAME" (for comparing estimators)."""
    return "estimated" if primary else f"estimated:{estimator}"


def evaluate_predictions(preds: Predictions, train_counts, mean_lambda: float,
                         distributions: Sequence[str] = DISTRIBUTIONS,
                         prior_modes: Sequence[str] = PRIOR_MODES,
                         subsets: Optional[Dict[str, np.ndarray]] = None,
                         estimators: Optional[Sequence[str]] = None,
                         holdout: Optional[label_shift.Holdout] = None,
                         safeguard_level: float = DEFAULT_SAFEGUARD_LEVEL) -> dict:
    """Metrics of every (distribution, prior mode).

    Args:
        preds: balanced-test predictions.
        train_counts: training images per class.
        mean_lambda: the ensemble's mean lambda (its target prior is pi^mean_lambda).
        distributions: names from `DISTRIBUTIONS` (or other forwardR / backwardR).
        prior_modes: subset of `PRIOR_MODES`.
        subsets: optional fixed index sets by distribution name (e.g. from list files);
            others are built with `shifted_indices`.
        estimators: with "estimated" in `prior_modes`, the `names.ESTIMATORS` to
            measure: the first under "estimated", the others under "estimated:NAME"
            (default: the default estimator with a held-out split, plain EM without).
        holdout: the run's held-out predictions, for the estimators that need them.
        safeguard_level: see `label_shift.estimate_prior`.

    Returns:
        `{distribution: {prior_mode: metrics}}`; each distribution also has `counts`, and
        each estimate its `estimator`, `prior` and `prior_l1_error`.
    """
    num_classes = preds.logits.shape[1]
    base = label_shift.model_prior(train_counts, mean_lambda)
    trained_log_prior = label_shift.trained_log_prior(train_counts, mean_lambda)
    if estimators is None:
        estimators = label_shift.usable_estimators([DEFAULT_ESTIMATOR], holdout)
    modes = [m for m in prior_modes if m != "estimated"]
    if "estimated" in prior_modes:
        modes += [(name, i == 0) for i, name in enumerate(estimators)]
    results = {}
    for name in distributions:
        idx = (subsets or {}).get(name)
        if idx is None:
            idx = shifted_indices(preds.labels, train_counts, name)
        labels, logits = preds.labels[idx], preds.logits[idx]
        counts = np.bincount(labels, minlength=num_classes)
        entry = {"counts": counts.tolist()}
        for mode in modes:
            if mode == "none":
                entry[mode] = set_metrics(labels, logits, train_counts)
            elif mode == "known":
                prior = counts / counts.sum()
                entry[mode] = set_metrics(labels, posthoc_adjust(logits, prior, train_counts, mean_lambda),
                                          train_counts)
            elif isinstance(mode, tuple):
                estimator, primary = mode
                balanced = logits - trained_log_prior
                prior = label_shift.estimate_prior(estimator, balanced, base, holdout,
                                                   safeguard_level=safeguard_level, what=f"the {name} test set")
                adapted = label_shift.adapt(balanced, prior, label_shift.estimator_calibration(estimator, holdout))
                metrics = set_metrics(labels, adapted, train_counts)
                metrics.update(estimator=estimator, prior=prior.tolist(),
                               prior_l1_error=float(np.abs(prior - counts / counts.sum()).sum()))
                entry[estimated_mode(estimator, primary)] = metrics
            else:
                raise ValueError(f"unknown prior mode {mode!r}; choose from {PRIOR_MODES}")
        results[name] = entry
    return results


# ---------------------------------------------------------------------------------------
# Reports.

_TITLES = {"none": "no prior", "known": "+ known test prior"}


def _title(results: dict, mode: str) -> str:
    if mode in _TITLES:
        return _TITLES[mode]
    # Results saved before estimators had names came from plain EM.
    return f"+ prior estimated ({next(iter(results.values()))[mode].get('estimator', 'em')})"


def result_modes(results: dict) -> list:
    """The prior modes of one run's results, in table order."""
    first = next(iter(results.values()))
    return [m for m in first if m in PRIOR_MODES] + [m for m in first if m.startswith("estimated:")]


def _column(name):
    direction, ratio = parse_distribution(name)
    return "Uniform" if direction == "uniform" else f"{direction.capitalize()} {ratio:g}"


def accuracy_table(results_by_run: Dict[str, dict], metric: str = "accuracy") -> list:
    """Rows `[method, prior mode, value per distribution...]` in the paper's layout (%)."""
    rows = []
    for run, results in results_by_run.items():
        for mode in result_modes(results):
            rows.append([run, _title(results, mode)] + [100.0 * results[d][mode][metric] for d in results])
    return rows


def accuracy_header(results_by_run: Dict[str, dict]) -> list:
    """Column titles of `accuracy_table`: method, prior, then e.g. 'Forward 50' ... 'Backward 50'."""
    return ["method", "prior"] + [_column(d) for d in next(iter(results_by_run.values()))]


def accuracy_markdown(header: list, rows: list) -> list:
    """Markdown lines of an `accuracy_table` under `header` (one decimal)."""
    return reporting.markdown_table(header, [r[:2] + [f"{v:.1f}" for v in r[2:]] for r in rows])


def _leaf_statistics(values):
    values = np.array([v for v in values if v is not None and not np.isnan(v)], float)
    mean = float(values.mean()) if len(values) else float("nan")
    std = float(values.std(ddof=1)) if len(values) > 1 else float("nan")
    return mean, std


def mean_over_seeds(results: Sequence[dict]):
    """Mean and sample standard deviation, leaf by leaf, of equally shaped results of several seeds.

    Args:
        results: nested dicts of metrics (e.g. `evaluate_runs` results), one per seed.

    Returns:
        (mean, std), nested like one input. NaN entries (an empty group) are ignored and a leaf
        that is NaN in every seed stays NaN; the std of one seed is NaN; lists (per-class counts,
        estimated priors) are left out; names (the estimator) are kept as the first seed's.
    """
    first = results[0]
    if isinstance(first, str):
        return first, first
    if not isinstance(first, dict):
        return _leaf_statistics(results)
    pairs = {k: mean_over_seeds([r[k] for r in results])
             for k, v in first.items() if not isinstance(v, (list, tuple))}
    return {k: p[0] for k, p in pairs.items()}, {k: p[1] for k, p in pairs.items()}


# The reports of an evaluation, in its output folder.
REPORT_FILES = {"markdown": "shifted_accuracy.md", "csv": "shifted_accuracy.csv", "json": "evaluation.json"}


def write_reports(results_by_run: Dict[str, dict], details: Dict[str, dict], output_dir: str) -> dict:
    """shifted_accuracy.{md,csv}, evaluation.json (and the Markdown of the balanced details)."""
    os.makedirs(output_dir, exist_ok=True)
    header, rows = accuracy_header(results_by_run), accuracy_table(results_by_run)
    paths = {kind: os.path.join(output_dir, name) for kind, name in REPORT_FILES.items()}
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows([r[:2] + [f"{v:.2f}" for v in r[2:]] for r in rows])
    lines = ["Top-1 accuracy (%) over the samples of each test distribution.", "",
             *accuracy_markdown(header, rows)]
    lines += ["", "Balanced test set (%, NLL and Brier as they are; conf − acc is mean top-1 confidence "
                  "minus accuracy, negative for an underconfident model).", ""]
    balanced = []
    for run, results in results_by_run.items():
        for mode in result_modes(results) if "uniform" in results else ():
            if mode in results["uniform"]:
                m = results["uniform"][mode]
                balanced.append([run, _title(results, mode)] + [reporting.percent(m[k]) for k in (
                    "accuracy", "many_accuracy", "medium_accuracy", "few_accuracy", "ece", "mce", "overconfidence")]
                    + [f"{m['nll']:.3f}", f"{m['brier']:.3f}"])
    lines += reporting.markdown_table(["method", "prior", "accuracy", "many", "medium", "few", "ECE", "MCE",
                                       "conf − acc", "NLL", "Brier"], balanced)
    for run, detail in details.items():
        lines += ["", f"Experts of {run} on the balanced test set: accuracy (%) and "
                      "KL(target prior pi^lambda || mean predicted distribution).", ""]
        lines += reporting.markdown_table(["member", "lambda", "accuracy", "KL"], [
            [k, f"{v['lambda']:g}", f"{100 * v['accuracy']:.1f}", f"{v['kl_target_to_marginal']:.4f}"]
            for k, v in detail["experts"].items()])
    with open(paths["markdown"], "w") as f:
        f.write("\n".join(lines) + "\n")
    reporting.write_json(paths["json"], {"results": results_by_run, "details": details})
    return paths


# The per-bin sums `reliability_bins` returns, as named in a run's evaluation.json.
RELIABILITY_BINS = ("count", "confidence", "hits")


def reliability_bins(labels, logits, num_bins=lt_metrics.NUM_CALIBRATION_BINS):
    """(count, confidence sum, hits) per bin, for `reporting.reliability_diagram_png`."""
    metric = lt_metrics.CalibrationError(num_bins)
    metric.update_state(np.asarray(labels), np.asarray(logits, np.float32))
    return metric.count.numpy(), metric.confidence.numpy(), metric.hits.numpy()


# ---------------------------------------------------------------------------------------
# The evaluation command.


def _run_config(record: run_folder.RunRecord, config: EvalConfig) -> "run_config.RunConfig":
    saved = record.settings
    overrides = {k: getattr(config, k) for k in ("data_dir", "data_path", "data_root") if getattr(config, k)}
    return dataclasses.replace(saved, **overrides)


def list_subsets(shift_list_dir: str, test: lt_data.Split, num_classes: int,
                 distributions: Sequence[str], data_root: str = "") -> Dict[str, np.ndarray]:
    """Index sets of the test split named by standard shifted-set list files, whose paths
    are relative to `data_root` like the run's own lists."""
    if not shift_list_dir:
        return {}
    if not os.path.isdir(shift_list_dir):
        raise lt_data.DataError(f"--shift_list_dir {shift_list_dir!r} does not exist")
    if not test.is_files:
        raise lt_data.DataError("--shift_list_dir needs a run trained on image files (--dataset=list "
                                "or folder); array datasets get their shifted sets built")
    position = {os.path.normpath(p): i for i, p in enumerate(test.images.astype(str))}
    subsets = {}
    for name in distributions:
        matches = [f for f in sorted(os.listdir(shift_list_dir)) if f.endswith(f"_{name}.txt")]
        if not matches:
            continue
        path = os.path.join(shift_list_dir, matches[0])
        split = lt_data.read_image_list(path, data_root)
        lt_data.class_counts(split.labels, num_classes, f"{path}: label")
        idx = [position.get(os.path.normpath(p)) for p in split.images]
        missing = [p for p, i in zip(split.images, idx) if i is None]
        if missing:
            raise lt_data.DataError(f"{path} names {len(missing)} image(s) that are not in the run's test "
                                    f"list, e.g. {missing[0]!r}: the shifted sets must be subsets of it")
        if np.any(test.labels[idx] != split.labels):
            raise lt_data.DataError(f"{path}: labels disagree with the run's test list for the same images")
        subsets[name] = np.asarray(idx)
    return subsets


def evaluate_runs(config: EvalConfig, log=print) -> dict:
    """Evaluate each run on every requested distribution and prior mode; write reports."""
    runs = [r for r in config.run_dir.split(",") if r]
    distributions = DISTRIBUTIONS if config.distributions == "all" else \
        tuple(d for d in config.distributions.split(",") if d)
    modes = tuple(m for m in config.priors.split(",") if m)
    output_dir = config.output_dir or run_folder.RunFolder(runs[0]).evaluation
    run_folder.check_writable_folder(output_dir, "output_dir")
    results, details = {}, {}
    for run_dir in runs:
        model, record = run_folder.load_run(run_dir)
        saved_config = _run_config(record, config)
        data = load_data(saved_config, run_folder.RunFolder(run_dir).image_record, splits=("test",))
        train_counts = record.data.train_counts
        check_same_test_data(data, record, run_dir, model.num_classes)
        name = os.path.basename(os.path.normpath(run_dir))
        log(f"{name}: predicting {len(data.test)} test images")
        progress = Progress(f"{name}: predicting", lt_data.steps_per_epoch(len(data.test), config.batch_size),
                            len(data.test), config.progress_every)
        preds = predict(model, lt_data.test_pipeline(data, config.batch_size), progress)
        progress.close()
        mean_lambda = record.mean_lambda
        subsets = list_subsets(config.shift_list_dir, data.test, data.num_classes, distributions,
                               saved_config.data_root)
        holdout = label_shift.load_holdout(run_dir, train_counts)
        estimators = label_shift.usable_estimators(
            [config.prior_estimator] + [e for e in config.compare_estimators.split(",") if e], holdout)
        if estimators[0] != config.prior_estimator and "estimated" in modes:
            log(f"warning: {name} {label_shift.fallback_reason(config.prior_estimator)}")
        results[name] = evaluate_predictions(preds, train_counts, mean_lambda, distributions, modes, subsets,
                                             estimators, holdout, config.prior_safeguard)
        bins = reliability_bins(preds.labels, preds.logits)
        details[name] = {"lambdas": saved_config.lambdas, "mean_lambda": mean_lambda,
                         "experts": expert_report(preds, train_counts, saved_config.lambdas),
                         "reliability": dict(zip(RELIABILITY_BINS, (b.tolist() for b in bins)))}
        _write_diagrams(bins, run_dir, output_dir, name)
    paths = write_reports(results, details, output_dir)
    with open(paths["markdown"]) as f:
        log(f.read())
    log("reports: " + ", ".join(paths.values()))
    return results


def check_same_test_data(data: lt_data.LabeledData, record: run_folder.RunRecord, run_dir: str, num_classes: int):
    """Refuse test data other than the run's: by the test split's fingerprint (labels and image
    bytes or pixels) where the run recorded one, by the class counts for runs from before."""
    saved = record.data.test_fingerprint
    now = lt_data.fingerprint(data.test)
    if data.num_classes != num_classes:
        raise lt_data.DataError(f"the data loaded now ({data.name}) has {data.num_classes} classes, {run_dir} was "
                                f"trained on {num_classes}: check the data flags")
    if saved and now != saved:
        changes = run_folder.split_changes(run_dir, "test", data.test, data.class_names)
        raise lt_data.DataError(f"the test data loaded now ({data.name}, {len(data.test)} images) is not the test "
                                f"data {run_dir} was evaluated on at training: {changes} (fingerprint {now} now, "
                                f"{saved} in its config.json): check --data_path / --data_root / --data_dir")
    if not saved and data.train_counts().tolist() != record.data.train_counts:
        raise lt_data.DataError(f"the data loaded now ({data.name}, {data.num_classes} classes) is not the data "
                                f"{run_dir} was trained on: check the data flags")


def _write_diagrams(bins, run_dir: str, output_dir: str, name: str):
    """Balanced-test reliability diagram as PNG and in the run's TensorBoard."""
    png = reporting.reliability_diagram_png(*bins, name)
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, f"reliability_{name}.png"), "wb") as f:
        f.write(png)
    writer = tf.summary.create_file_writer(os.path.join(run_folder.RunFolder(run_dir).tensorboard, "evaluation"))
    with writer.as_default(step=0):
        tf.summary.image("reliability_diagram/balanced_test", tf.image.decode_png(png)[None])
    writer.flush()
