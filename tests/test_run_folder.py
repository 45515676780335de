"""The run folder's names and its typed record of config.json."""

import dataclasses
import json

import pytest

from balpoe_tf import run_folder
from balpoe_tf.config import RunError
from balpoe_tf.run_config import RunConfig


def _data_record(**changes):
    return run_folder.DataRecord(**{
        "name": "digits", "num_classes": 3, "train_size": 7, "test_size": 6, "train_counts": [4, 2, 1],
        "class_names": ["a", "b", "c"], "mean": [0.5], "std": [0.25], "image_shape": [8, 8, 1], **changes})


def test_file_names_are_spelled_in_one_place():
    folder = run_folder.RunFolder("runs/a")
    assert (folder.config, folder.model, folder.flags) == ("runs/a/config.json", "runs/a/model.keras",
                                                           "runs/a/flags.txt")
    assert run_folder.checkpoint_path("runs/a", 3, 20) == f"{folder.checkpoints}/epoch_0003_step_000020.keras"


def test_record_round_trips_through_config_json(tmp_path):
    assert run_folder.read_record(str(tmp_path)) is None  # a new folder
    config = dataclasses.asdict(RunConfig(lambdas=[-1.0, 0.0, 2.0], precision="mixed_bfloat16"))
    record = run_folder.RunRecord(config, _data_record(test_fingerprint="ab12"), steps_per_epoch=5)
    (tmp_path / "config.json").write_text(json.dumps(record.to_dict()))
    read = run_folder.read_record(str(tmp_path))
    assert read == record
    assert read.mean_lambda == pytest.approx(1 / 3)
    assert read.settings.precision == "mixed_bfloat16"


def test_a_record_from_an_earlier_version_reads_with_the_defaults_of_then(tmp_path):
    # Written before fingerprints, test crops and --precision existed, with a key since dropped.
    config = {k: v for k, v in dataclasses.asdict(RunConfig()).items() if k != "precision"}
    data = {k: v for k, v in dataclasses.asdict(_data_record()).items()
            if k not in ("test_crop", "train_fingerprint", "test_fingerprint", "left_out", "holdout_size")}
    (tmp_path / "config.json").write_text(json.dumps({"config": {**config, "retired_flag": 1},
                                                      "data": {**data, "retired_field": 2}}))
    read = run_folder.read_record(str(tmp_path))
    assert (read.data.test_fingerprint, read.data.test_crop, read.data.left_out) == (None, 0.0, [])
    assert read.settings.precision == "float32"  # what every run computed in before the flag
    assert read.settings.backbone == RunConfig().backbone


@pytest.mark.parametrize("text", ["{not json", json.dumps({"config": {}}), "[1, 2]"])
def test_a_damaged_record_is_named_with_the_fix(tmp_path, text):
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(RunError, match=r"config.json is not a run record of tools/train.py .*new --output_dir"):
        run_folder.read_record(str(tmp_path))


def test_a_finished_run_is_one_with_every_artefact_it_promises(tmp_path):
    config = RunConfig(output_dir=str(tmp_path), epochs=3, warmup_epochs=0, milestones=[], holdout_fraction=0.1)
    folder = run_folder.RunFolder(str(tmp_path))
    everything = [folder.model, folder.reliability, str(tmp_path / "calibration.json"), folder.export, folder.results]
    assert sorted(run_folder.missing_artefacts(config)) == sorted(everything)
    for path in (folder.model, folder.reliability, tmp_path / "calibration.json"):
        open(path, "w").close()
    (tmp_path / "export" / ".partial-1").mkdir(parents=True)
    (tmp_path / "export" / ".partial-1" / "saved_model.pb").write_bytes(b"")  # not yet in place
    (tmp_path / "results.json").write_text(json.dumps({"epochs": 2, "test": {"accuracy": 0.5}}))  # another run's
    assert run_folder.missing_artefacts(config) == [folder.export, folder.results]
    (tmp_path / "export" / "1").mkdir()
    (tmp_path / "export" / "1" / "saved_model.pb").write_bytes(b"")
    assert run_folder.finished_results(dataclasses.replace(config, epochs=2)) == {"accuracy": 0.5}
    assert run_folder.missing_artefacts(dataclasses.replace(config, holdout_fraction=0.0, export=False, epochs=2)) == []


def test_what_a_stopped_write_left_is_removed(tmp_path):
    leftovers = [tmp_path / "checkpoints" / "epoch_0003.tmp.keras", tmp_path / "model.tmp.keras",
                 tmp_path / "results.json.123.tmp", tmp_path / "export" / ".partial-2"]
    kept = [tmp_path / "checkpoints" / "epoch_0002.keras", tmp_path / "export" / "1"]
    for path in leftovers + kept:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.mkdir() if "export" in str(path) else path.write_bytes(b"x")
    run_folder.remove_partial_files(str(tmp_path))
    assert [p.exists() for p in leftovers] == [False] * 4 and all(p.exists() for p in kept)
