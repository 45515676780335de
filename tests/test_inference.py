import csv
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from balpoe_tf import data as lt_data, run_data
from balpoe_tf import evaluation, experiment, export, inference, label_shift, run_config, run_folder, settings
from balpoe_tf.config import ConfigError, RunError
from conftest import REPO
from image_corpus import write_corpus


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny trained digits run (with its SavedModel) and a folder of its test images as PNG."""
    root = tmp_path_factory.mktemp("predict")
    config = run_config.RunConfig(output_dir=str(root / "run"), dataset="digits", imbalance_ratio=10,
                                  augment="none", backbone="resnet8", epochs=1, batch_size=64,
                                  warmup_epochs=0, milestones=[], eval_every=1, checkpoint_every=1,
                                  holdout_fraction=0.2,
                                  precision="float32")  # as the SavedModel: they must agree to 1e-4
    experiment.train(config, log=lambda line: None)
    data = run_data.load_data(config)
    pixels = data.test.images[::40][:6]  # six test images
    images = root / "images" / "nested"
    images.mkdir(parents=True)
    paths = []
    for i, p in enumerate(pixels):
        path = images / f"{i}.png"
        path.write_bytes(tf.io.encode_png(p).numpy())
        paths.append(str(path))
    return root, config, data, pixels, paths


def _config(run, **overrides):
    flags = dict(model=str(run[0] / "run"), inputs=[str(run[0] / "images")])
    return settings.PredictConfig(**{**flags, **overrides})


def _probabilities(result):
    return np.array([[t["probability"] for t in p["top_k"]] for p in result["predictions"]])


def _model_logits(run):
    root, config, data, pixels, _ = run
    model, _ = run_folder.load_run(str(root / "run"))
    return model(lt_data.normalizer(data.mean, data.std)(pixels), training=False)["logits"].numpy()


@pytest.mark.slow
def test_run_folder_and_saved_model_agree_with_the_model(run):
    logs = []
    by_run = inference.predict_files(_config(run, top_k=3), log=logs.append)
    by_saved = inference.predict_files(_config(run, top_k=3, model=str(run[0] / "run" / "export")),
                                       log=lambda line: None)
    assert by_run["prior"] == "none" and [p["path"] for p in by_run["predictions"]] == run[4]
    probs = label_shift.softmax(_model_logits(run))
    top = np.argsort(-probs, axis=1)[:, :3]
    assert [[t["class"] for t in p["top_k"]] for p in by_run["predictions"]] == top.tolist()
    assert [p["top_k"][0]["name"] for p in by_run["predictions"]] == [run[2].class_names[c] for c in top[:, 0]]
    np.testing.assert_allclose(_probabilities(by_run), np.take_along_axis(probs, top, 1), atol=1e-5)
    np.testing.assert_allclose(_probabilities(by_saved), _probabilities(by_run), atol=1e-4)
    assert logs[0] == "6 image(s), 0 skipped; prior: no prior (the model's own)" and len(logs) == 7
    assert "%" in logs[1] and run[4][0][-20:] in logs[1]


@pytest.mark.slow
def test_given_and_estimated_priors_match_the_evaluation(run):
    prior = np.arange(1, 11, dtype=np.float64)
    given = inference.predict_files(_config(run, top_k=10, prior=",".join(map(str, prior))), log=lambda line: None)
    counts = run_folder.load_run(str(run[0] / "run"))[1].data.train_counts
    expected = label_shift.softmax(evaluation.posthoc_adjust(_model_logits(run), prior, counts, 0.0))
    order = [[t["class"] for t in p["top_k"]] for p in given["predictions"]]
    np.testing.assert_allclose(_probabilities(given), np.take_along_axis(expected, np.array(order), 1), atol=1e-5)
    np.testing.assert_allclose(given["prior_values"], prior / prior.sum())

    uniform = np.full(10, 0.1)  # mean lambda 0: the logits are balanced as they are
    holdout = label_shift.load_holdout(str(run[0] / "run"), run[2].train_counts())
    for model in (run[0] / "run", run[0] / "run" / "export"):  # the SavedModel carries the calibration
        estimated = inference.predict_files(_config(run, estimate_prior=True, prior_safeguard=0, model=str(model)),
                                            log=lambda line: None)
        expected = label_shift.estimate_prior("bcts_em", _model_logits(run), uniform, holdout, safeguard_level=0)
        assert estimated["prior"] == "estimated"
        np.testing.assert_allclose(estimated["prior_values"], expected, atol=1e-4)
    em = inference.predict_files(_config(run, estimate_prior=True, prior_estimator="em", prior_safeguard=0,
                                         save_prior=str(run[0] / "prior.json")), log=lambda line: None)
    np.testing.assert_allclose(inference.parse_prior(str(run[0] / "prior.json"), 10), em["prior_values"])
    raw = label_shift.em(label_shift.softmax(_model_logits(run)), uniform)
    np.testing.assert_allclose(em["prior_values"], label_shift.floor_estimate(raw, len(run[4]))[0], atol=1e-5)


@pytest.mark.slow
def test_without_a_held_out_split_plain_em_stands_in_as_in_the_evaluation(run, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(run[0] / "run", bare, ignore=shutil.ignore_patterns(label_shift.HOLDOUT_FILE))
    lines = []
    result = inference.predict_files(_config(run, model=str(bare), estimate_prior=True, prior_safeguard=0),
                                     log=lines.append)
    assert lines[0] == (f"warning: {bare} has no held-out split, so its estimated prior is plain EM (uncalibrated: "
                        "it over-corrects a miscalibrated model); train with --holdout_fraction=0.1 for "
                        "--prior_estimator=bcts_em")
    raw = label_shift.em(label_shift.softmax(_model_logits(run)), np.full(10, 0.1))
    np.testing.assert_allclose(result["prior_values"], label_shift.floor_estimate(raw, len(run[4]))[0], atol=1e-5)


def test_parse_prior_by_hand(tmp_path):
    np.testing.assert_allclose(inference.parse_prior("1,1,2", 3), [0.25, 0.25, 0.5])
    (tmp_path / "p.json").write_text("[2, 6]")
    np.testing.assert_allclose(inference.parse_prior(str(tmp_path / "p.json"), 2), [0.25, 0.75])
    (tmp_path / "p.txt").write_text("0.2\n0.3, 0.5\n")
    np.testing.assert_allclose(inference.parse_prior(str(tmp_path / "p.txt"), 3), [0.2, 0.3, 0.5])
    for bad, message in (("1,2", "expected 3 non-negative numbers"), ("1,-1,2", "non-negative"),
                         ("a,b,c", "expected 3 numbers"), ("0,0,0", "positive sum"),
                         ("missing.json", "--prior=missing.json: file not found")):
        with pytest.raises(lt_data.DataError, match=message):
            inference.parse_prior(bad, 3)


@pytest.mark.slow
def test_inputs_unreadable_files_and_outputs(run, tmp_path):
    images = tmp_path / "mixed"
    shutil.copytree(run[0] / "images", images)
    (images / "empty.png").write_bytes(b"")
    (images / "notes.jpg").write_text("not an image")
    (images / "readme.md").write_text("not looked at: no image extension")
    listed = tmp_path / "list.txt"
    listed.write_text("mixed/nested/0.png 3\nmixed/nested/1.png\n")
    logs = []
    result = inference.predict_files(settings.PredictConfig(
        model=str(run[0] / "run"), inputs=[str(images), str(listed), run[4][2]], output=str(tmp_path / "p.csv")),
        log=logs.append)
    assert len(result["predictions"]) == 6 + 2 + 1
    assert result["skipped"] == [{"path": str(images / "empty.png"), "reason": "empty file (0 bytes)"},
                                 {"path": str(images / "notes.jpg"),
                                  "reason": "not an image (neither TensorFlow nor Pillow can read it)"}]
    assert f"skipping {images / 'empty.png'}: empty file (0 bytes)" in logs
    with open(tmp_path / "p.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 9 * 5 + 2 and rows[0]["rank"] == "1" and rows[-1]["skipped_because"].startswith("not an image")
    inference.predict_files(_config(run, output=str(tmp_path / "p.json")), log=lambda line: None)
    saved = json.loads((tmp_path / "p.json").read_text())
    assert len(saved["predictions"]) == 6 and saved["prior_values"] is None

    with pytest.raises(lt_data.DataError, match=f"{images / 'empty.png'}: empty file .*--bad_images=skip"):
        inference.predict_files(settings.PredictConfig(model=str(run[0] / "run"), inputs=[str(images)],
                                                        bad_images="fail"), log=lambda line: None)
    with pytest.raises(lt_data.DataError, match="'missing.png' does not exist"):
        inference.image_paths(["missing.png"])


@pytest.mark.slow
def test_every_corpus_file_is_classified_or_named(run, tmp_path):
    kinds = write_corpus(tmp_path)
    results = []
    for model in (run[0] / "run", run[0] / "run" / "export", run[0] / "run" / "model.keras"):
        logs = []
        result = inference.predict_files(_config(run, model=str(model), inputs=[str(tmp_path)], top_k=10),
                                         log=logs.append)
        classified = {os.path.basename(p["path"]) for p in result["predictions"]}
        skipped = {os.path.basename(s["path"]): s["reason"] for s in result["skipped"]}
        assert classified == {name for name, kind in kinds.items() if kind.pixels is not None}
        for name, kind in kinds.items():
            if kind.pixels is None:
                assert kind.problem in skipped[name] and f"skipping {tmp_path / name}: {skipped[name]}" in logs
        results.append(_probabilities(result))
    # The run folder, its SavedModel and its model.keras see the same pixels (TIFF and palette BMP
    # included: converted with Pillow before the SavedModel is called).
    np.testing.assert_allclose(results[1], results[0], atol=1e-4)
    np.testing.assert_allclose(results[2], results[0])


@pytest.mark.slow
def test_bad_models_and_settings(run, tmp_path):
    with pytest.raises(RunError, match="neither a run folder"):
        inference.load_classifier(str(tmp_path))
    (tmp_path / "lone.keras").write_bytes(b"")
    with pytest.raises(RunError, match="is a file outside a run folder or SavedModel: --model takes a run folder"):
        inference.load_classifier(str(tmp_path / "lone.keras"))
    bare = tmp_path / "bare"
    shutil.copytree(run[0] / "run" / "export" / "1", bare)
    shutil.rmtree(bare / "assets.extra")
    with pytest.raises(RunError, match="lacks assets.extra/balpoe_tf.json.*tools/export.py"):
        inference.load_classifier(str(bare))
    with pytest.raises(ConfigError, match="--save_prior=p.json: must be empty without --estimate_prior or --prior"):
        settings.PredictConfig(model="m", inputs=["x"], save_prior="p.json")
    with pytest.raises(ConfigError, match="--estimate_prior=true: must be false when --prior is given"):
        settings.PredictConfig(model="m", inputs=["x"], prior="1,2", estimate_prior=True)
    with pytest.raises(ConfigError, match="--output=p.txt: must be empty or a file name ending in .csv or .json"):
        settings.PredictConfig(model="m", inputs=["x"], output="p.txt")
    with pytest.raises(ConfigError, match="--inputs=: must be one or more files"):
        settings.PredictConfig(model="m")


@pytest.mark.slow
def test_predict_tool(run):
    result = subprocess.run([sys.executable, "tools/predict.py", f"--model={run[0] / 'run'}",
                             f"--inputs={run[4][0]}", "--top_k=2"], cwd=REPO, capture_output=True, text=True,
                            timeout=600, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    assert lines[0] == "1 image(s), 0 skipped; prior: no prior (the model's own)"
    shown = lines[1].split("  ")[0]  # a long path is shown as "..." and its end
    assert run[4][0].endswith(shown.removeprefix("...")) and lines[1].count("%") == 2


@pytest.mark.slow
def test_saved_model_serves_the_calibrated_adaptation(run):
    saved = tf.saved_model.load(str(run[0] / "run" / "export" / "1"))
    serve = saved.signatures["predict_calibrated_with_prior"]
    with open(run[0] / "run" / "export" / "1" / "assets.extra" / "balpoe_tf.json") as f:
        assert json.load(f)["signatures"] == [*export.SIGNATURES, "predict_calibrated_with_prior"]  # all 5 named
    prior = np.arange(1, 11, dtype=np.float32)
    images = tf.constant([open(p, "rb").read() for p in run[4]])
    served = serve(images=images, prior=tf.constant(prior))["logits"].numpy()
    holdout = label_shift.load_holdout(str(run[0] / "run"), run[2].train_counts())
    expected = label_shift.adapt(_model_logits(run), prior / prior.sum(), holdout.calibration)
    np.testing.assert_allclose(served, expected, rtol=1e-4, atol=1e-4)
