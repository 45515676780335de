import csv
import glob
import math
import shutil

import numpy as np
import pytest
import tensorflow as tf

from balpoe_tf import data as lt_data, run_data
from balpoe_tf import evaluation, experiment, label_shift, run_config, settings
from balpoe_tf.config import ConfigError, RunError

CIFAR100_SIZES = {"forward50": 2486, "forward25": 2956, "forward10": 3876, "forward5": 4932,
                  "forward2": 7166, "uniform": 10000}


def test_shifted_set_sizes_cifar100():
    labels = np.repeat(np.arange(100), 100)
    train_counts = lt_data.long_tailed_counts(500, 100, 100)
    for name, size in CIFAR100_SIZES.items():
        for direction in ("forward", "backward"):
            full = name.replace("forward", direction)
            idx = evaluation.shifted_indices(labels, train_counts, full)
            assert len(idx) == size, full
    fwd = np.bincount(labels[evaluation.shifted_indices(labels, train_counts, "forward50")], minlength=100)
    bwd = np.bincount(labels[evaluation.shifted_indices(labels, train_counts, "backward50")], minlength=100)
    assert (fwd[0], fwd[-1], bwd[0], bwd[-1]) == (100, 2, 2, 100)


def test_shift_follows_training_frequency_rank():
    np.testing.assert_array_equal(evaluation.frequency_rank([5, 50, 20, 20]), [3, 0, 1, 2])
    # n_max 10, ratio 4 over 3 classes: profile 10, 5, 2 by rank.
    np.testing.assert_array_equal(evaluation.shifted_counts([5, 50, 20], 10, "forward4"), [2, 10, 5])
    np.testing.assert_array_equal(evaluation.shifted_counts([5, 50, 20], 10, "backward4"), [10, 2, 5])
    with pytest.raises(ValueError, match="unknown distribution 'sideways3'"):
        evaluation.parse_distribution("sideways3")


def test_shifted_indices_are_fixed_subsets():
    labels = np.repeat(np.arange(4), 10)
    a = evaluation.shifted_indices(labels, [40, 30, 20, 10], "forward5")
    b = evaluation.shifted_indices(labels, [40, 30, 20, 10], "forward5")
    np.testing.assert_array_equal(a, b)
    assert len(set(a.tolist())) == len(a)
    np.testing.assert_array_equal(np.bincount(labels[a]), [10, 5, 3, 2])  # int(10 * 0.2^(k/3))


def test_posthoc_adjustment_by_hand():
    logits = np.zeros((1, 2))
    np.testing.assert_allclose(evaluation.posthoc_adjust(logits, [0.75, 0.25], [3, 1]),
                               [[math.log(0.75), math.log(0.25)]])
    # A model that targets the training prior (mean lambda 1) first has it removed.
    np.testing.assert_allclose(evaluation.posthoc_adjust(logits, [0.5, 0.5], [3, 1], mean_lambda=1.0),
                               [[math.log(0.5 / 0.75), math.log(0.5 / 0.25)]])
    clamped = evaluation.posthoc_adjust(logits, [1.0, 0.0], [3, 1])
    assert np.all(np.isfinite(clamped)) and clamped[0, 1] == pytest.approx(math.log(evaluation.PRIOR_FLOOR))
    with pytest.raises(ValueError, match="2 non-negative values"):
        evaluation.posthoc_adjust(logits, [0.5, 0.25, 0.25], [3, 1])
    with pytest.raises(ValueError, match="non-negative"):
        evaluation.posthoc_adjust(logits, [1.5, -0.5], [3, 1])


def test_brier_and_kl_by_hand():
    assert evaluation.brier_score([0], [[0.75, 0.25]]) == pytest.approx(0.125)
    assert evaluation.kl_divergence([0.5, 0.5], [0.25, 0.75]) == pytest.approx(
        0.5 * math.log(2) + 0.5 * math.log(2 / 3))


def test_empty_class_in_shifted_set_is_reported_as_nan():
    labels = np.repeat(np.arange(3), 2)
    logits = np.eye(3)[labels] * 5.0
    preds = evaluation.Predictions(labels, logits, logits[:, None, :])
    out = evaluation.evaluate_predictions(preds, [200, 50, 5], 0.0, ["forward50", "uniform"])
    assert out["forward50"]["counts"] == [2, 0, 0]
    known = out["forward50"]["known"]
    assert known["accuracy"] == 1.0 and known["size"] == 2
    assert math.isnan(known["few_accuracy"]) and math.isnan(known["medium_accuracy"])
    assert out["uniform"]["none"]["few_accuracy"] == 1.0


def test_overconfidence_by_hand():
    # Confidences 0.75 (right) and 0.6 (wrong): mean confidence 0.675, accuracy 0.5.
    logits = np.log([[0.75, 0.25], [0.6, 0.4]])
    out = evaluation.set_metrics([0, 1], logits, [10, 10])
    assert out["overconfidence"] == pytest.approx(0.175, abs=1e-6)
    assert evaluation.set_metrics([0, 0], logits, [10, 10])["overconfidence"] == pytest.approx(-0.325, abs=1e-6)


def test_mean_over_seeds_by_hand():
    nan = float("nan")
    seeds = [{"run": {"uniform": {"none": {"accuracy": 0.5, "few_accuracy": nan}, "counts": [3, 1]}}},
             {"run": {"uniform": {"none": {"accuracy": 0.7, "few_accuracy": nan}, "counts": [3, 1]}}},
             {"run": {"uniform": {"none": {"accuracy": 0.9, "few_accuracy": 0.4}, "counts": [3, 1]}}}]
    mean, std = evaluation.mean_over_seeds(seeds)
    assert mean["run"]["uniform"]["none"]["accuracy"] == pytest.approx(0.7)
    assert std["run"]["uniform"]["none"]["accuracy"] == pytest.approx(0.2)  # sample std of .5 .7 .9
    # An empty group (NaN) in two seeds: the mean is the one seed that has it, with no std.
    assert mean["run"]["uniform"]["none"]["few_accuracy"] == pytest.approx(0.4)
    assert math.isnan(std["run"]["uniform"]["none"]["few_accuracy"])
    assert "counts" not in mean["run"]["uniform"]
    one_mean, one_std = evaluation.mean_over_seeds(seeds[:1])
    assert one_mean["run"]["uniform"]["none"]["accuracy"] == 0.5
    assert math.isnan(one_std["run"]["uniform"]["none"]["accuracy"])
    assert math.isnan(evaluation.mean_over_seeds(seeds[:2])[0]["run"]["uniform"]["none"]["few_accuracy"])


def test_list_subsets(tmp_path):
    paths = np.array([str(tmp_path / f"{i}.png") for i in range(4)])
    test = lt_data.Split(paths, np.array([0, 0, 1, 1]))
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "x_forward2.txt").write_text("0.png 0\n2.png 1\n3.png 1\n")
    subsets = evaluation.list_subsets(str(lists), test, 2, ["forward2", "uniform"], str(tmp_path))
    np.testing.assert_array_equal(subsets["forward2"], [0, 2, 3])
    assert "uniform" not in subsets
    (lists / "x_forward2.txt").write_text("0.png 5\n")
    with pytest.raises(lt_data.DataError, match="label 5 is outside \\[0, 2\\)"):
        evaluation.list_subsets(str(lists), test, 2, ["forward2"], str(tmp_path))
    (lists / "x_forward2.txt").write_text("0.png 1\n")
    with pytest.raises(lt_data.DataError, match="labels disagree"):
        evaluation.list_subsets(str(lists), test, 2, ["forward2"], str(tmp_path))
    (lists / "x_forward2.txt").write_text("9.png 1\n")
    with pytest.raises(lt_data.DataError, match="not in the run's test list"):
        evaluation.list_subsets(str(lists), test, 2, ["forward2"], str(tmp_path))


@pytest.mark.slow
def test_evaluate_a_trained_run_end_to_end(tmp_path, capsys):
    run = tmp_path / "tiny"
    config = run_config.RunConfig(output_dir=str(run), dataset="digits", imbalance_ratio=10,
                                  augment="none", backbone="resnet8", epochs=1, batch_size=64,
                                  warmup_epochs=0, milestones=[], eval_every=1, checkpoint_every=1,
                                  holdout_fraction=0.2)
    experiment.train(config, log=lambda line: None)
    logs = []
    capsys.readouterr()
    results = evaluation.evaluate_runs(settings.EvalConfig(run_dir=str(run), progress_every=1e-9,
                                                             compare_estimators="em,bbse"), log=logs.append)
    assert "tiny: predicting  step 2/2  " in capsys.readouterr().out
    out = run / "evaluation"
    for name in ("shifted_accuracy.md", "shifted_accuracy.csv", "evaluation.json", "reliability_tiny.png"):
        assert (out / name).exists(), name
    with open(out / "shifted_accuracy.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0][:3] == ["method", "prior", "Forward 50"] and rows[0][-1] == "Backward 50"
    assert [r[1] for r in rows[1:]] == ["no prior", "+ known test prior", "+ prior estimated (bcts_em)",
                                        "+ prior estimated (em)", "+ prior estimated (bbse)"]
    uniform = results["tiny"]["uniform"]
    assert uniform["estimated"]["estimator"] == "bcts_em" and uniform["estimated:bbse"]["estimator"] == "bbse"
    assert uniform["estimated"]["prior_l1_error"] == pytest.approx(
        np.abs(np.array(uniform["estimated"]["prior"]) - 0.1).sum())
    assert "| ECE | MCE | conf − acc |" in (out / "shifted_accuracy.md").read_text()
    assert set(results["tiny"]) == set(evaluation.DISTRIBUTIONS)
    assert results["tiny"]["uniform"]["none"]["size"] == 400
    assert glob.glob(str(run / "tensorboard" / "evaluation" / "events.*"))
    assert any("Forward 50" in line for line in logs)

    # Without a held-out split the estimated prior is plain EM, and the log says why.
    bare = tmp_path / "bare"
    shutil.copytree(run, bare, ignore=shutil.ignore_patterns(label_shift.HOLDOUT_FILE))
    logs = []
    results = evaluation.evaluate_runs(settings.EvalConfig(run_dir=str(bare), distributions="uniform"),
                                       log=logs.append)
    assert results["bare"]["uniform"]["estimated"]["estimator"] == "em"
    assert "warning: bare has no held-out split, so its estimated prior is plain EM" in logs[1]

    with pytest.raises(RunError, match="holds no trained model"):
        evaluation.evaluate_runs(settings.EvalConfig(run_dir=str(tmp_path / "nothing")))
    with pytest.raises(ConfigError, match="--distributions=forward50,up: must be 'all' or"):
        settings.EvalConfig(run_dir=str(run), distributions="forward50,up")
    with pytest.raises(ConfigError, match="--priors=none,oracle: must be a comma-separated list of one of"):
        settings.EvalConfig(run_dir=str(run), priors="none,oracle")


def _image_folder(root, seed=0):
    rng = np.random.RandomState(seed)
    for split, per_class in (("train", (12, 4)), ("test", (3, 3))):
        for c, n in enumerate(per_class):
            (root / split / f"c{c}").mkdir(parents=True)
            for i in range(n):
                (root / split / f"c{c}" / f"{i}.png").write_bytes(
                    tf.io.encode_png(rng.randint(0, 256, (8, 8, 3)).astype(np.uint8)).numpy())


@pytest.mark.slow
def test_evaluation_refuses_other_test_images_and_an_unwritable_output(tmp_path):
    _image_folder(tmp_path / "images")
    run = tmp_path / "run"
    config = run_config.RunConfig(output_dir=str(run), dataset="folder", data_path=str(tmp_path / "images"),
                                  image_size=8, imbalance_ratio=0, augment="none", backbone="resnet8", epochs=1,
                                  batch_size=8, warmup_epochs=0, milestones=[], export=False)
    experiment.train(config, log=lambda line: None)
    flags = dict(run_dir=str(run), distributions="uniform", priors="none")
    evaluation.evaluate_runs(settings.EvalConfig(**flags), log=lambda line: None)
    (tmp_path / "file").write_text("")
    with pytest.raises(RunError, match=f"--output_dir={tmp_path / 'file'}: is a file, not a folder"):
        evaluation.evaluate_runs(settings.EvalConfig(**flags, output_dir=str(tmp_path / "file")))
    # Another image of the same class: same class counts, other data.
    replaced = tmp_path / "images" / "test" / "c1" / "0.png"
    replaced.write_bytes(tf.io.encode_png(np.zeros((8, 8, 3), np.uint8)).numpy())
    with pytest.raises(lt_data.DataError, match=r"the test data loaded now .* is not the test data .*: 1 file\(s\) "
                                                r"changed \(c1/0.png\) \(fingerprint [0-9a-f]{16} now, [0-9a-f]{16} in "
                                                r"its config.json\)"):
        evaluation.evaluate_runs(settings.EvalConfig(**flags), log=lambda line: None)


@pytest.mark.slow
def test_shifted_sets_of_a_run_streamed_from_tfds(tmp_path):
    import tensorflow_datasets as tfds

    run = tmp_path / "streamed"
    config = run_config.RunConfig(output_dir=str(run), dataset="tfds:mnist", tfds_in_memory="no", image_size=28,
                                  imbalance_ratio=2, augment="none", backbone="resnet8", epochs=1, batch_size=64,
                                  warmup_epochs=0, milestones=[], eval_every=1, checkpoint_every=1, export=False)
    with tfds.testing.mock_data(num_examples=300):
        experiment.train(config, log=lambda line: None)
        data = run_data.load_data(config)
        results = evaluation.evaluate_runs(settings.EvalConfig(run_dir=str(run), priors="none,known"),
                                           log=lambda line: None)
    assert data.test.stream is not None
    assert set(results["streamed"]) == set(evaluation.DISTRIBUTIONS)
    assert results["streamed"]["uniform"]["none"]["size"] == len(data.test) == 300
    expected = evaluation.shifted_indices(data.test.labels, data.train_counts(), "forward10")
    assert results["streamed"]["forward10"]["none"]["size"] == len(expected)


def test_calibrated_estimators_adapt_the_calibrated_logits():
    rng = np.random.RandomState(0)
    labels = np.repeat(np.arange(3), 50)
    logits = rng.randn(150, 3) + 2.0 * np.eye(3)[labels]
    holdout = label_shift.Holdout.fit(labels[::3], logits[::3] * 0.5, [1 / 3] * 3)
    preds = evaluation.Predictions(labels, logits, logits[:, None, :])
    out = evaluation.evaluate_predictions(preds, [50, 50, 50], 0.0, ["uniform"], ["estimated"],
                                          estimators=["bcts_em"], holdout=holdout, safeguard_level=0)
    estimate = out["uniform"]["estimated"]
    adapted = label_shift.adapt(logits, estimate["prior"], holdout.calibration)
    assert estimate["accuracy"] == pytest.approx(np.mean(np.argmax(adapted, 1) == labels))
    assert estimate["nll"] == pytest.approx(-np.mean(np.log(label_shift.softmax(adapted)[np.arange(150), labels])),
                                            rel=1e-4)
