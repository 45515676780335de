import json
import os

import numpy as np
import pytest
import tensorflow as tf
from tensorboard.compat.proto import event_pb2, summary_pb2

from balpoe_tf import experiment, reproduction, run_config, run_data, run_folder, settings
from balpoe_tf.config import RunError


def _base(tmp_path, **overrides):
    settings = dict(output_dir=str(tmp_path / "unused"), dataset="digits", imbalance_ratio=10, augment="none",
                    backbone="resnet8", epochs=2, batch_size=64, warmup_epochs=1, milestones=[], eval_every=2,
                    checkpoint_every=1, export=False, deterministic=True)
    return run_config.RunConfig(**{**settings, **overrides})


def test_method_configs_change_only_what_makes_the_method(tmp_path):
    base = _base(tmp_path, mixup_alpha=0.8)
    bs = reproduction.method_config(base, "bs", 2, "root")
    assert (bs.num_experts, bs.lambdas, bs.mixup_alpha, bs.seed, bs.output_dir) == (1, [0.0], 0.0, 2, "root/seed2/bs")
    erm = reproduction.method_config(base, "balpoe_no_mixup", 1, "root")
    assert (erm.num_experts, erm.lambdas, erm.mixup_alpha) == (3, [1.0, 0.0, -1.0], 0.0)
    assert reproduction.method_config(base, "uniform", 1, "root").lambdas == [0.0, 0.0, 0.0]
    ce = reproduction.method_config(base, "ce", 1, "root")
    assert (ce.lambdas, ce.target_mean_lambda, ce.epochs, ce.lr) == ([1.0], 1.0, base.epochs, base.lr)
    with pytest.raises(RunError, match="unknown method 'ldam'"):
        reproduction.method_config(base, "ldam", 1, "root")


def _write_events(path, records):
    with tf.io.TFRecordWriter(str(path)) as writer:
        for wall_time, tag in records:
            event = event_pb2.Event(wall_time=wall_time, file_version="brain.Event:2" if tag is None else "")
            if tag:
                event.summary.CopyFrom(summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=tag, simple_value=1)]))
            writer.write(event.SerializeToString())


def test_training_time_sums_each_process_and_skips_downtime(tmp_path):
    folder = tmp_path / "tensorboard" / "train"
    folder.mkdir(parents=True)
    # First process: starts at 100, epochs end at 130 and 160; the run is resumed at 1000, one epoch at 1040.
    _write_events(folder / "events.out.tfevents.1", [(100, None), (130, "epoch_accuracy"), (130, "epoch_loss"),
                                                     (160, "epoch_loss")])
    _write_events(folder / "events.out.tfevents.2", [(1000, None), (1040, "epoch_loss")])
    assert reproduction.training_time(str(tmp_path)) == {"seconds": 100.0, "epochs_timed": 3}


def test_summary_row_by_hand():
    metrics = {"accuracy": 0.84216, "many_accuracy": 0.9, "medium_accuracy": 0.8, "few_accuracy": float("nan"),
               "ece": 0.0631, "mce": 0.158, "nll": 0.5123}
    entry = {"method": "balpoe", "seed": 1, "epochs": 200, "epoch": 200, "finished": True, "commit": "abc",
             "results": {"uniform": {"none": metrics}}, "train_size": 12406,
             "time": {"seconds": 7200.0, "epochs_timed": 100}}
    assert reproduction.summary_row(entry) == {
        "method": "balpoe", "seed": 1, "epochs": 200, "finished": True, "epochs_done": 200, "accuracy": 84.22,
        "many": 90.0, "medium": 80.0, "few": None, "ece": 6.31, "mce": 15.8, "nll": 0.51, "commit": "abc",
        "wall_clock_hours": 2.0, "images_per_s": 172.3}
    assert reproduction.summary_row({**entry, "finished": False, "epoch": 40}) == {
        "method": "balpoe", "seed": 1, "epochs": 200, "finished": False, "epochs_done": 40}


def test_merge_summary_keeps_finished_rows_a_new_report_lacks():
    row = lambda method, finished, accuracy=None: {"method": method, "seed": 1, "finished": finished,
                                                   **({"accuracy": accuracy} if finished else {})}
    previous = {"title": "T", "summary": [row("balpoe", True, 79.2), row("bs", True, 72.2), row("ce", False)]}
    # Another run root: BalPoE and BS not there, CE and BalPoE without mixup finished, a new BS run started.
    new = {"title": "T", "summary": [row("balpoe", False), row("bs", False), row("balpoe_no_mixup", True, 80.0),
                                     row("ce", True, 71.0)]}
    assert reproduction.merge_summary(previous, new) == {"title": "T", "summary": [
        row("balpoe", True, 79.2), row("bs", True, 72.2), row("ce", True, 71.0), row("balpoe_no_mixup", True, 80.0)]}
    rerun = {"title": "T", "summary": [row("bs", True, 73.0)]}
    assert reproduction.merge_summary(previous, rerun)["summary"][1] == row("bs", True, 73.0)
    assert reproduction.merge_summary(None, new) == new
    with pytest.raises(RunError, match="holds the results of 'T', not of 'U'.*--title"):
        reproduction.merge_summary(previous, {**new, "title": "U"}, "bench.json")


def test_write_report_merges_into_the_summary_file_and_checks_its_title(tmp_path):
    summary_json = tmp_path / "bench.json"
    finished = {"title": "T", "summary": [{"method": "bs", "seed": 1, "finished": True, "accuracy": 72.2}]}
    summary_json.write_text(json.dumps(finished))
    entries = [{"method": "ce", "seed": 1, "epochs": 200, "epoch": 3, "finished": False}]
    with pytest.raises(RunError, match="bench.json holds the results of 'T'"):
        reproduction.write_report(entries, str(tmp_path / "root"), "U", str(summary_json))
    assert not (tmp_path / "root").exists()
    reproduction.write_report(entries, str(tmp_path / "root"), "T", str(summary_json))
    assert json.loads(summary_json.read_text())["summary"] == finished["summary"] + [
        {"method": "ce", "seed": 1, "epochs": 200, "finished": False, "epochs_done": 3}]


def _png_width(png):
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(png[16:20], "big")  # IHDR width


def test_reliability_figure_has_one_panel_per_finished_method():
    bins = {"count": [0, 2, 2], "confidence": [0.0, 1.2, 1.8], "hits": [0, 1, 2]}
    done = lambda method, seed: {"method": method, "seed": seed, "finished": True, "details": {"reliability": bins}}
    assert reproduction.reliability_figure([{"method": "balpoe", "seed": 1, "finished": False}]) is None
    one = reproduction.reliability_figure([done("balpoe", 1), done("balpoe", 2)])
    three = reproduction.reliability_figure([done("balpoe", 1), done("bs", 1), done("ce", 1),
                                             {"method": "balpoe_no_mixup", "seed": 1, "finished": False}])
    assert _png_width(three) == 3 * _png_width(one)


@pytest.mark.slow
def test_reproduction_resumes_and_reports_at_any_time(tmp_path):
    base, root = _base(tmp_path), str(tmp_path / "root")
    report_only = settings.ReproduceConfig(methods=["balpoe", "bs"], seeds=[1], run_root=root, train=False)
    reproduction.reproduce(base, report_only, log=lambda line: None)
    text = (tmp_path / "root" / "reproduce.md").read_text()
    assert text.count("| not started |") == 2 and "No run has finished yet." in text

    # An interrupted BalPoE run: one epoch checkpointed, nothing final.
    balpoe = reproduction.method_config(base, "balpoe", 1, root)
    experiment.train(balpoe, log=lambda line: None)
    for name in ("results.json", "model.keras", "checkpoints/epoch_0002.keras"):
        os.remove(os.path.join(balpoe.output_dir, name))
    reproduction.reproduce(base, report_only, log=lambda line: None)
    assert "| BalPoE | 1 | unfinished: epoch 1/2 |" in (tmp_path / "root" / "reproduce.md").read_text()

    lines = []
    summary_json = str(tmp_path / "benchmark.json")
    entries = reproduction.reproduce(base, settings.ReproduceConfig(
        methods=["balpoe", "bs"], seeds=[1], run_root=root, summary_json=summary_json), log=lines.append)
    assert "resuming from" in "\n".join(lines) and [e["finished"] for e in entries] == [True, True]
    # BS computes in the precision --precision=auto chose for the BalPoE run started before it.
    bs = run_folder.read_record(reproduction.method_config(base, "bs", 1, root).output_dir)
    assert bs.config["precision"] == run_folder.read_record(balpoe.output_dir).config["precision"]
    assert bs.precision_choice["how"] == "compared"
    text = (tmp_path / "root" / "reproduce.md").read_text()
    assert "| BalPoE | 1 | finished |" in text and "| BS (lambda 0) | 1 | finished |" in text
    assert "| BalPoE | no prior |" in text and "| BS (lambda 0) | + prior estimated (em) |" in text
    assert "| BalPoE | expert2 | -1 |" in text and "BalPoE > BS > CE" not in text  # CE was not run
    summary = json.loads((tmp_path / "root" / "reproduce.json").read_text())["summary"]
    assert json.loads(open(summary_json).read()) == {"title": "digits, IR 10, 2 epochs", "summary": summary}
    assert [row["method"] for row in summary] == ["balpoe", "bs"]
    for row in summary:
        assert row["wall_clock_hours"] > 0 and row["images_per_s"] > 0 and 0 <= row["accuracy"] <= 100
    assert os.path.isfile(os.path.join(balpoe.output_dir, "evaluation", "reliability_balpoe.png"))
    reliability = entries[0]["details"]["reliability"]
    assert sum(reliability["count"]) == len(run_data.load_data(base).test)
    figure = (tmp_path / "root" / "reliability.png").read_bytes()
    assert _png_width(figure) == 2 * _png_width(reproduction.reliability_figure(entries[:1]))  # BalPoE and BS
    assert "reliability.png" in text

    lines = []
    reproduction.reproduce(base, report_only, log=lines.append)  # evaluations are reused
    assert not any(line.startswith("evaluated") for line in lines)
    assert np.isclose(json.loads((tmp_path / "root" / "reproduce.json").read_text())["summary"][0]["accuracy"],
                      summary[0]["accuracy"])

    # An evaluation from before the reliability bins were kept is redone.
    cached = os.path.join(balpoe.output_dir, "evaluation", "evaluation.json")
    with open(cached) as f:
        saved = json.load(f)
    del saved["details"]["balpoe"]["reliability"]
    with open(cached, "w") as f:
        json.dump(saved, f)
    lines = []
    reproduction.reproduce(base, report_only, log=lines.append)
    assert [line for line in lines if line.startswith("evaluated")] == [f"evaluated {balpoe.output_dir}"]
