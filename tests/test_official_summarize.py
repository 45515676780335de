"""benchmarks/official/summarize.py: the per-seed table and the curve along the schedule, from a
reproduce.json with its validation log and the official code's result JSONs (no PyTorch needed)."""

import importlib.util
import json
import os

import pytest
import tensorflow as tf

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("summarize",
                                              os.path.join(REPO, "benchmarks", "official", "summarize.py"))
summarize = importlib.util.module_from_spec(spec)
spec.loader.exec_module(summarize)


def _official_result(path, epochs, accuracy, ece):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"seed": 1, "epochs": epochs, "accuracy": accuracy, "ece": ece, "mce": 0.2,
                   "expert_accuracy": [0.5, 0.6, 0.4]}, f)


def _ours(tmp_path):
    run_dir = tmp_path / "ours" / "seed1" / "balpoe"
    writer = tf.summary.create_file_writer(str(run_dir / "tensorboard" / "validation"))
    with writer.as_default():
        for epoch, accuracy, ece in ((10, 0.40, 0.05), (20, 0.55, 0.04), (30, 0.60, 0.03)):
            # as Keras' TensorBoard callback: the 1-based epoch e is logged at step e - 1
            tf.summary.scalar("epoch_accuracy", accuracy, step=epoch - 1)
            tf.summary.scalar("epoch_ece", ece, step=epoch - 1)
    writer.close()
    uniform = {"none": {"accuracy": 0.6, "ece": 0.03, "mce": 0.1}}
    path = tmp_path / "reproduce.json"
    path.write_text(json.dumps({"runs": [
        {"method": "bs", "seed": 1, "finished": False, "run_dir": "elsewhere"},
        {"method": "balpoe", "seed": 1, "finished": True, "run_dir": str(run_dir),
         "results": {"uniform": uniform},
         "details": {"experts": {"expert0": {"accuracy": 0.5}, "ensemble": {"accuracy": 0.6}}}}]}))
    return str(path)


def test_curve_pairs_epochs_that_both_sides_evaluated(tmp_path):
    ours = _ours(tmp_path)
    official = tmp_path / "official"
    _official_result(str(official / "snapshots" / "ep20.json"), 20, 0.50, 0.02)
    _official_result(str(official / "snapshots" / "ep30.json"), 30, 0.625, 0.01)
    _official_result(str(official / "snapshots" / "ep40.json"), 40, 0.70, 0.01)  # ours has no epoch 40
    (official / "comparison.json").write_text("[1, 2]")  # not a result: ignored

    curve = summarize.our_curve(ours)
    assert sorted(curve) == [10, 20, 30]
    assert curve[20] == (pytest.approx(0.55), pytest.approx(0.04))
    rows = summarize.curve_table(curve, summarize.official_curve(str(official)))
    assert rows[2:] == ["| 20 | 55.0 | 50.0 | +5.0 | 4.0 | 2.0 |", "| 30 | 60.0 | 62.5 | -2.5 | 3.0 | 1.0 |"]


def test_table_per_seed_and_mean(tmp_path):
    ours = _ours(tmp_path)
    official = tmp_path / "official"
    _official_result(str(official / "seed1.json"), 200, 0.5, 0.04)
    table = list(summarize.rows(ours, str(official)))
    assert table == [("balpoe_tf", 1, 0.6, 0.03, 0.1, [0.5]), ("official", 1, 0.5, 0.04, 0.2, [0.5, 0.6, 0.4])]
