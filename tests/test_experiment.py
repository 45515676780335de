import dataclasses
import glob
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from balpoe_tf import (callbacks, distribution, experiment, precision, reporting, run_config, run_data, run_folder,
                       run_precision, task)
from balpoe_tf.config import RunError
from balpoe_tf import data as lt_data
from conftest import mock_imagenet_lt_records, parse_config, skip_without_kernels
from image_corpus import write_corpus

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted(glob.glob(str(REPO / "configs" / "*.flags")))
# The demo config, made tiny: 3 epochs, no LR decay, no baselines.
TINY = ["--flagfile=configs/demo.flags", "--compare=", "--epochs=3", "--warmup_epochs=2", "--milestones=",
        "--eval_every=1", "--checkpoint_every=1", "--deterministic"]


def run_cli(*args, timeout=900, tool="tools/train.py", **environment):
    """A tool run as a user runs it: TensorFlow's log level left to the tool, `environment` added."""
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"} | environment
    return subprocess.run([sys.executable, tool, *args], cwd=REPO, capture_output=True, text=True, env=env,
                          timeout=timeout)


def parse(*args) -> run_config.RunConfig:
    return parse_config(run_config.RunConfig, *args)


def _balanced_cifar(num_classes, per_class=100, shape=(32, 32, 3)):
    rng = np.random.RandomState(0)
    labels = np.repeat(np.arange(num_classes), per_class)
    images = rng.randint(0, 256, (len(labels), *shape), dtype=np.uint8)
    stats = dict(mean=lt_data.CIFAR_MEAN, std=lt_data.CIFAR_STD) if shape[-1] == 3 else {}
    return lt_data.from_arrays(f"cifar{num_classes}", images, labels, images[::per_class],
                               labels[::per_class], **stats)


def _config_groups():
    """Config files grouped by what their dry run exercises (data, experts, augmentation,
    backbone); each group's first file is dry-run, all of them are parsed."""
    groups = {}
    for path in CONFIGS:
        c = parse(f"--flagfile={path}")
        groups.setdefault(f"{c.dataset}-M{c.num_experts}-{c.augment}-{c.backbone}", []).append(path)
    return groups


CONFIG_GROUPS = _config_groups()
# ImageNet-LT / iNaturalist configs need their list files and a full-size step takes minutes on
# CPU: their data pipeline and model are built on generated JPEGs below instead.
LARGE_SCALE = sorted(g for g in CONFIG_GROUPS if g.startswith(("list-", lt_data.TFDS_PREFIX)))


def test_config_files_cover_the_paper():
    names = {os.path.basename(p)[:-len(".flags")] for p in CONFIGS}
    for c in (10, 100):
        for ir in (10, 50, 100):
            assert {f"cifar{c}_ir{ir}", f"cifar{c}_ir{ir}_long"} <= names
    for baseline in ("ce", "bs", "erm", "uniform"):
        assert f"cifar100_ir100_{baseline}" in names
    assert "demo" in names
    for name in ("imagenet_lt", "imagenet_lt_r50", "inat2018"):
        assert {name, f"{name}_long"} <= names


def _jpeg_lists(root, num_classes=3, per_class=2):
    lines = []
    for c in range(num_classes):
        for i in range(per_class):
            path = f"img/{c}_{i}.jpg"
            image = np.full((48 + 8 * i, 40, 3), 60 * c, np.uint8)
            os.makedirs(root / "img", exist_ok=True)
            tf.io.write_file(str(root / path), tf.io.encode_jpeg(image))
            lines.append(f"{path} {c}")
    (root / "train.txt").write_text("\n".join(lines) + "\n")
    (root / "test.txt").write_text("\n".join(lines) + "\n")


@pytest.mark.slow
@pytest.mark.parametrize("group", LARGE_SCALE)
def test_large_scale_configs_build_data_and_model(group, tmp_path):
    _jpeg_lists(tmp_path)
    (path, *others) = CONFIG_GROUPS[group]
    full = parse(f"--flagfile={path}")
    assert full.image_size == 224 and full.test_crop == 0.875 and full.schedule == "cosine"
    for other in [path, *others]:
        if other.endswith("_long.flags"):
            long = parse(f"--flagfile={other}")
            assert (long.epochs, long.augment, long.schedule) == (400, "randaugment", "cosine")
    assert full.backbone in ("resnet50", "resnext50") and len(full.lambdas) == full.num_experts == 3
    c = full.num_classes or 1000
    one_per_class = lt_data.Split(np.array(["unused.jpg"] * c), np.arange(c))
    stand_in = lt_data.LabeledData("stand-in", one_per_class, one_per_class, tuple(map(str, range(c))),
                                   (224, 224, 3), lt_data.IMAGENET_MEAN, lt_data.IMAGENET_STD)
    model = task.build_model(full, stand_in, steps_per_epoch=10)
    assert model.num_classes == c and model.image_shape == (224, 224, 3)
    # The pipeline of the config on the generated JPEGs, at a small size.
    small = dataclasses.replace(full, dataset="list", train_list=str(tmp_path / "train.txt"),
                                test_list=str(tmp_path / "test.txt"), data_root=str(tmp_path), num_classes=3,
                                image_size=32)
    data = run_data.load_data(small)
    images, labels = next(iter(lt_data.train_pipeline(data, 4, 1, augment=small.augment)))
    assert images.shape == (4, 32, 32, 3) and labels.shape == (4,)
    test_images, _ = next(iter(lt_data.test_pipeline(data, 6)))
    assert test_images.shape == (6, 32, 32, 3)


@pytest.mark.slow
def test_imagenet_lt_from_tfds_dry_run(tmp_path):
    import tensorflow_datasets as tfds

    config = parse("--flagfile=configs/imagenet_lt_tfds.flags", "--backbone=resnet8", "--image_size=32",
                   "--batch_size=16", f"--output_dir={tmp_path}", "--dry_run")
    assert (config.dataset, config.tfds_split_test, config.imbalance_ratio) == ("tfds:imagenet_lt", "test", 0)
    logs = []
    with tfds.testing.mock_data(as_dataset_fn=mock_imagenet_lt_records, policy=tfds.testing.MockPolicy.USE_CODE):
        experiment.train(config, log=logs.append)
    assert "data imagenet_lt: 2000 training images in 1000 classes (max 2, min 2), 30 test images" in logs
    assert any(line.startswith("dry run: batch (16, 32, 32, 3)") for line in logs), logs


@pytest.mark.slow
def test_bfloat16_under_a_capped_onednn_trains_or_is_refused_in_one_line(tmp_path):
    # On an AVX-512 CPU TensorFlow sends bfloat16 to oneDNN, which the cap leaves without a kernel:
    # refused. Where it has kernels (a CPU without AVX-512, TensorFlow's own kernels) it trains.
    result = run_cli("--flagfile=configs/demo.flags", "--precision=mixed_bfloat16", "--dry_run",
                     f"--output_dir={tmp_path}", ONEDNN_MAX_CPU_ISA="AVX2")
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    if result.returncode == 2:
        assert result.stderr.strip().splitlines()[-1].startswith(
            "error: precision mixed_bfloat16: TensorFlow has no convolution kernel for it in this process"), \
            result.stderr[-3000:]
    else:
        assert result.returncode == 0 and "dry run: batch" in result.stdout, result.stderr[-3000:]


def test_auto_does_not_measure_a_precision_without_kernels(tmp_path, monkeypatch):
    monkeypatch.setattr(precision, "kernel_problem", lambda name: "AbortedError: no primitive")
    monkeypatch.setattr(precision, "measure_speeds", lambda *args: pytest.fail("measured a precision it cannot run"))
    config = parse("--flagfile=configs/demo.flags", f"--output_dir={tmp_path}")
    choice = run_precision.choose_precision(config, run_data.load_data(config), tf.distribute.get_strategy(), [],
                                            {"avx512f", "avx512_bf16"})
    assert (choice.precision, choice.how) == ("float32", "no candidate")


def test_auto_precision_resumes_a_run_in_the_precision_it_started_with(tmp_path, monkeypatch):
    config = parse("--flagfile=configs/demo.flags", f"--output_dir={tmp_path}")
    data = run_data.load_data(config)
    strategy = tf.distribute.get_strategy()
    assert config.precision == "auto"
    new = run_precision.choose_precision(config, data, strategy, [], {"avx512f"})
    assert (new.precision, new.how) == ("float32", "no candidate")  # a new run
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "epoch_0001.keras").write_bytes(b"")
    record = run_folder.RunRecord({"precision": "mixed_bfloat16"}, run_folder.DataRecord(
        "digits", 10, 100, 10, [10] * 10, [str(c) for c in range(10)], [0.5], [0.25], [8, 8, 1]))
    (tmp_path / "config.json").write_text(json.dumps(record.to_dict()))
    resumed = run_precision.choose_precision(config, data, strategy, [], {"avx512f"})
    assert (resumed.precision, resumed.how) == ("mixed_bfloat16", "resumed")
    explicit = dataclasses.replace(config, precision="float32")  # check_run_folder then refuses it
    assert run_precision.choose_precision(explicit, data, strategy, [], {"avx512_bf16"}).how == "given"
    (tmp_path / "config.json").unlink()
    with pytest.raises(RunError, match="but no config.json"):
        run_precision.choose_precision(config, data, strategy, [], {"avx512_bf16"})


def test_training_warns_of_emulated_precision(monkeypatch, tmp_path):
    skip_without_kernels("mixed_bfloat16")
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx2", "avx512f"})
    config = parse("--flagfile=configs/demo.flags", "--precision=mixed_bfloat16", f"--output_dir={tmp_path}",
                   "--dry_run")
    logs = []
    experiment.train(config, log=logs.append)
    assert keras.mixed_precision.global_policy().name == "float32"  # restored after the run
    assert "precision mixed_bfloat16 (--precision=mixed_bfloat16)" in logs
    assert any(line.startswith("warning: --precision=mixed_bfloat16 on a CPU without avx512_bf16, amx_bf16 or "
                               "avx_ne_convert: TensorFlow emulates it") for line in logs), logs


def test_auto_precision_is_measured_chosen_recorded_and_shared_with_the_baselines(monkeypatch, tmp_path):
    skip_without_kernels("mixed_bfloat16")
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    monkeypatch.setattr(precision, "gpu_capabilities", lambda: [])
    measured = []

    def measure(make_step, candidates, images_per_step, total_steps):
        measured.append((candidates, images_per_step, total_steps))
        return {"rates": {"float32": 100.0, "mixed_bfloat16": 150.0}, "speedups": {"mixed_bfloat16": 1.5},
                "float32_step": 0.5, "measuring_cost": 1.0}

    monkeypatch.setattr(precision, "measure_speeds", measure)
    config = parse(*TINY, "--epochs=1", "--warmup_epochs=0", "--compare=ce", "--noexport",
                   f"--output_dir={tmp_path}")
    logs = []
    experiment.train_with_baselines(config, log=logs.append)
    assert measured == [(("mixed_bfloat16",), 64, 8)]  # once: the baseline takes its run's precision
    assert any(line.startswith("precision mixed_bfloat16 (--precision=auto, measured now on this machine and "
                               "model: training images/s mixed_bfloat16 150, float32 100; mixed_bfloat16 1.50x "
                               "float32") for line in logs), logs
    assert "precision mixed_bfloat16 (--precision=auto: the precision of the run this baseline is compared with)" \
        in logs
    record = json.loads((tmp_path / "config.json").read_text())
    assert record["config"]["precision"] == "mixed_bfloat16"
    assert record["precision_choice"]["how"] == "measured"
    assert record["precision_choice"]["speedups"] == {"mixed_bfloat16": 1.5}
    assert json.loads((tmp_path / "baseline_ce" / "config.json").read_text())["config"]["precision"] == \
        "mixed_bfloat16"
    # Resumed, the run keeps its precision and the measurement it came from.
    os.remove(tmp_path / "results.json")
    logs.clear()
    experiment.train(config, log=logs.append)
    assert "precision mixed_bfloat16 (--precision=auto: the precision this run started with)" in logs
    assert json.loads((tmp_path / "config.json").read_text())["precision_choice"] == record["precision_choice"]
    assert len(measured) == 1


@pytest.mark.slow
@pytest.mark.parametrize("group", sorted(set(CONFIG_GROUPS) - set(LARGE_SCALE)))
def test_config_files_build_their_run(group, monkeypatch, tmp_path):
    # CIFAR comes from TFDS (or an image folder), Fashion-MNIST from a Debian package, none of
    # which tests have: generated balanced stand-ins with 100 images per class (enough for IR
    # 100) replace them.
    for name, classes in (("cifar10", 10), ("cifar100", 100), ("folder", 10)):
        monkeypatch.setitem(lt_data.DATASETS, name, lambda o, c=classes: _balanced_cifar(c))
    monkeypatch.setitem(lt_data.DATASETS, "idx", lambda o: _balanced_cifar(10, shape=(28, 28, 1)))
    paths = CONFIG_GROUPS[group]
    for path in paths:
        config = parse(f"--flagfile={path}", f"--output_dir={tmp_path}", "--dry_run")
        assert len(config.lambdas) == config.num_experts, path
    logs = []
    assert experiment.train_with_baselines(config, log=logs.append)
    assert any(line.startswith("dry run: batch") for line in logs), logs
    assert not os.listdir(tmp_path)  # a dry run writes nothing


def test_setting_files_are_a_few_lines_on_their_base():
    ir50, ir100 = (dataclasses.asdict(parse(f"--flagfile=configs/cifar100_ir{r}.flags")) for r in (50, 100))
    assert {k for k in ir50 if ir50[k] != ir100[k]} == {"imbalance_ratio", "output_dir"}
    for path in CONFIGS:
        text = Path(path).read_text()
        if "--flagfile=" in text:
            assert sum(1 for line in text.splitlines() if line.startswith("--")) <= 12, path


def test_paper_settings_in_configs():
    c = parse("--flagfile=configs/cifar100_ir100.flags")
    assert (c.dataset, c.imbalance_ratio, c.epochs, c.batch_size, c.lr, c.warmup_epochs) == \
        ("cifar100", 100.0, 200, 128, 0.1, 5)
    assert (c.milestones, c.weight_decay, c.mixup_alpha, c.lambdas, c.scale) == \
        ([160, 180], 5e-4, 0.4, [1.0, 0.0, -1.0], 30.0)
    long = parse("--flagfile=configs/cifar10_ir10_long.flags")
    assert (long.epochs, long.warmup_epochs, long.milestones, long.augment, long.mixup_alpha) == \
        (400, 10, [320, 360], "autoaugment", 0.8)
    ce = parse("--flagfile=configs/cifar100_ir100_ce.flags")
    assert (ce.num_experts, ce.lambdas, ce.mixup_alpha) == (1, [1.0], 0.0)
    # Any flag can be overridden after the flag file.
    assert parse("--flagfile=configs/cifar100_ir100.flags", "--lr=0.05").lr == 0.05


def test_baseline_configs():
    base = parse("--flagfile=configs/cifar100_ir100.flags", "--output_dir=/r")
    ce = run_config.baseline_config(base, "ce")
    assert (ce.num_experts, ce.lambdas, ce.mixup_alpha, ce.output_dir) == (1, [1.0], 0.0, "/r/baseline_ce")
    assert run_config.baseline_config(base, "uniform").lambdas == [0.0, 0.0, 0.0]
    assert run_config.baseline_config(base, "erm").mixup_alpha == 0.0
    with pytest.raises(RunError, match="unknown baseline 'xx'"):
        run_config.baseline_config(base, "xx")


def test_format_table():
    table = reporting.format_table({"a": {"accuracy": 0.5, "few_accuracy": float("nan"), "nll": 1.23456}},
                                   columns=("accuracy", "few_accuracy", "nll"))
    assert table.splitlines() == ["| run | accuracy | few | nll |", "|---|---|---|---|",
                                  "| a | 50.0 | n/a | 1.235 |"]


def _strict_loads(text):
    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")
    return json.loads(text, parse_constant=refuse)


def test_json_files_are_standard_json(tmp_path):
    nan = float("nan")
    reporting.write_json(tmp_path / "r.json", {"a": nan, "b": [1.0, nan], "c": {"d": 0.5, "e": (nan,)}})
    assert _strict_loads((tmp_path / "r.json").read_text()) == {"a": None, "b": [1.0, None],
                                                                "c": {"d": 0.5, "e": [None]}}
    assert reporting.percent(None) == "n/a"


def test_a_benchmark_names_the_cpu_it_ran_on(tmp_path, capsys):
    markdown = reporting.write_benchmark(str(tmp_path / "b.json"), {"date": "2026-12-06"}, ["| a |"])
    assert json.loads((tmp_path / "b.json").read_text()) == {"cpu": precision.cpu_model(), "date": "2026-12-06"}
    assert Path(markdown).read_text() == f"CPU: {precision.cpu_model()}\n\n| a |\n"
    reporting.write_benchmark(str(tmp_path / "c.json"), {"cpu": "AMD EPYC (Zen 3)"}, [])  # measured elsewhere
    assert json.loads((tmp_path / "c.json").read_text())["cpu"] == "AMD EPYC (Zen 3)"


@pytest.mark.slow
def test_train_cli_end_to_end(tmp_path):
    out = tmp_path / "run"
    result = run_cli(*TINY, "--compare=ce", "--progress_every=1e-9", f"--output_dir={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "img/s" in result.stdout and "ETA" in result.stdout and "epoch 3/3" in result.stdout
    # Not a terminal: plain progress lines inside epochs and evaluations, then each epoch's summary.
    lines = result.stdout.splitlines()
    assert any(line.startswith("epoch 1/3  step 8/8  ") for line in lines)
    assert any(line.startswith("epoch 3/3 evaluating  step 2/2  ") for line in lines)
    assert lines.index(next(line for line in lines if line.startswith("epoch 1/3  lr"))) > \
        lines.index(next(line for line in lines if line.startswith("epoch 1/3  step 8/8")))
    assert "| ce |" in result.stdout and "| BalPoE (lambdas 1,0,-1) |" in result.stdout
    for name in ("flags.txt", "config.json", "results.json", "results.md", "model.keras",
                 "reliability_diagram.png", "checkpoints/epoch_0003.keras", "baseline_ce/model.keras"):
        assert (out / name).exists(), name
    record = json.loads((out / "config.json").read_text())
    assert record["lr_by_epoch"] == pytest.approx([0.05, 0.1, 0.1])
    # --precision=auto is recorded as what it resolved to, and why; the SavedModel computes in float32.
    choice = record["precision_choice"]
    assert record["config"]["precision"] == choice["precision"] and choice["how"] in ("short run", "no candidate")
    assert f"precision {choice['precision']} (--precision=auto: " in result.stdout
    (version,) = glob.glob(str(out / "export" / "*"))
    assert json.loads((Path(version) / "assets.extra" / "balpoe_tf.json").read_text())["precision"] == "float32"
    assert record["config"]["lambdas"] == [1.0, 0.0, -1.0]
    results = _strict_loads((out / "results.json").read_text())["test"]
    assert 0.0 <= results["accuracy"] <= 1.0 and "few_accuracy" in results and "ece" in results
    # The recorded flags reproduce the run's settings.
    saved = parse(f"--flagfile={out / 'flags.txt'}")
    assert dataclasses.asdict(saved) == record["config"]
    tags = set()
    for event_file in glob.glob(str(out / "tensorboard" / "**" / "events.*"), recursive=True):
        for event in tf.compat.v1.train.summary_iterator(event_file):
            tags.update(v.tag for v in event.summary.value)
    for tag in ("epoch_loss", "epoch_accuracy", "epoch_few_accuracy", "epoch_ece",
                "epoch_expert2_accuracy", "learning_rate", "reliability_diagram", "_hparams_/session_start_info"):
        assert tag in tags, (tag, sorted(tags))
    _check_hparams_dashboard(out, results, _strict_loads((out / "baseline_ce" / "results.json").read_text())["test"])


def _check_hparams_dashboard(out, balpoe_results, ce_results):
    """What TensorBoard's HParams plugin reads, loaded with TensorBoard's own event loading:
    one session per run (BalPoE and its baseline) with its hparams and final metrics, and
    the declared columns."""
    from tensorboard.backend.event_processing import plugin_event_multiplexer
    from tensorboard.plugins.hparams import metadata

    mux = plugin_event_multiplexer.EventMultiplexer()
    mux.AddRunsFromDirectory(str(out))
    mux.Reload()
    content = mux.PluginRunToTagToContent(metadata.PLUGIN_NAME)
    sessions = {run: metadata.parse_session_start_info_plugin_data(tags[metadata.SESSION_START_INFO_TAG])
                for run, tags in content.items() if metadata.SESSION_START_INFO_TAG in tags}
    assert set(sessions) == {"tensorboard", os.path.join("baseline_ce", "tensorboard")}
    lambdas = {run: info.hparams["lambdas"].string_value for run, info in sessions.items()}
    assert lambdas == {"tensorboard": "1.0,0.0,-1.0", os.path.join("baseline_ce", "tensorboard"): "1.0"}
    experiment_info = metadata.parse_experiment_plugin_data(content["tensorboard"][metadata.EXPERIMENT_TAG])
    assert [m.name.tag for m in experiment_info.metric_infos] == [f"final/{m}" for m in callbacks.FINAL_METRICS]
    domains = {h.name: list(h.domain_discrete.values) for h in experiment_info.hparam_infos}
    assert "none" in [v.string_value for v in domains["augment"]] and "output_dir" not in domains
    assert not domains["dataset"] and not domains["backbone"]  # tfds:NAME, hub:PRESET: any name, no list
    for run, results in (("tensorboard", balpoe_results), (os.path.join("baseline_ce", "tensorboard"), ce_results)):
        for name in ("accuracy", "ece", "nll"):
            (event,) = mux.Tensors(run, f"final/{name}")
            assert event.step == 3 and tf.make_ndarray(event.tensor_proto) == pytest.approx(results[name], rel=1e-6)


def _weights(path):
    model = keras.saving.load_model(path)
    return model, [w.numpy() for w in model.weights]


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_weights(tmp_path):
    args = [*TINY, "--epochs=10"]
    full = run_cli(*args, f"--output_dir={tmp_path / 'full'}")
    assert full.returncode == 0, full.stderr[-3000:]

    killed = tmp_path / "killed"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.Popen([sys.executable, "tools/train.py", *args, f"--output_dir={killed}"], cwd=REPO,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "epoch_0003.keras").exists():
        assert proc.poll() is None and time.time() < deadline, "run ended before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "model.keras").exists()  # it really was killed mid-run

    resumed = run_cli(*args, f"--output_dir={killed}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout and "epoch 10/10" in resumed.stdout
    a, wa = _weights(tmp_path / "full" / "model.keras")
    b, wb = _weights(killed / "model.keras")
    assert int(a.optimizer.iterations) == int(b.optimizer.iterations) == 10 * 8
    for x, y in zip(wa, wb):
        np.testing.assert_allclose(x, y, atol=1e-5)
    for x, y in zip(a.optimizer.variables, b.optimizer.variables):  # momentum buffers
        np.testing.assert_allclose(x.numpy(), y.numpy(), atol=1e-5)


@pytest.mark.slow
def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    config = parse(*TINY, f"--output_dir={tmp_path / 'run'}", "--noexport")
    experiment.train(config, log=lambda line: None)
    _, uninterrupted = _weights(tmp_path / "run" / "model.keras")
    newest = tmp_path / "run" / "checkpoints" / "epoch_0003.keras"
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated, as by a machine stopping mid-write
    os.remove(tmp_path / "run" / "model.keras")

    lines = []
    experiment.train(config, log=lines.append)
    assert any(line.startswith(f"warning: {newest} is not a readable Keras model") for line in lines), lines
    assert f"resuming from {newest.parent / 'epoch_0002.keras'} (epoch 2)" in lines
    assert (tmp_path / "run" / "checkpoints" / "epoch_0003.keras.unreadable").stat().st_size == 1000  # kept
    _, resumed = _weights(tmp_path / "run" / "model.keras")
    for x, y in zip(uninterrupted, resumed):
        np.testing.assert_allclose(x, y, atol=1e-5)

    os.remove(tmp_path / "run" / "model.keras")
    for path in (tmp_path / "run" / "checkpoints").glob("epoch_*.keras"):
        path.write_bytes(b"PK\x03\x04 damaged")
    with pytest.raises(RunError, match="no checkpoint in .* can be read"):
        experiment.train(config, log=lambda line: None)
    assert len(list((tmp_path / "run" / "checkpoints").glob("epoch_*.keras"))) == 2  # nothing renamed


@pytest.mark.slow
def test_diverged_run_stops_keeps_the_last_good_checkpoint_and_reports_nothing(tmp_path):
    out = tmp_path / "run"
    # LR x 1e8 from epoch 3 (0-based 2) on: epochs 1 and 2 train normally, then the loss explodes.
    result = run_cli(*TINY, "--epochs=4", "--warmup_epochs=0", "--milestones=2", "--gamma=1e8",
                     f"--output_dir={out}")
    assert result.returncode == 1, result.stderr[-3000:]
    error = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "Traceback" not in result.stderr
    assert "training diverged at epoch 3, step " in error[0] and "(LR 1e+07)" in error[0]
    assert f"the last good checkpoint is {out / 'checkpoints' / 'epoch_0002.keras'}" in error[0]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["epoch_0001.keras", "epoch_0002.keras"]
    model, weights = _weights(out / "checkpoints" / "epoch_0002.keras")
    assert all(np.isfinite(w).all() for w in weights) and int(model.optimizer.iterations) == 2 * 8
    for name in ("model.keras", "results.json", "results.md", "export", "reliability_diagram.png"):
        assert not (out / name).exists(), name


@pytest.mark.slow
def test_same_seed_gives_identical_weights(tmp_path):
    for name in ("a", "b"):
        result = run_cli(*TINY, "--epochs=2", "--augment=cifar", f"--output_dir={tmp_path / name}")
        assert result.returncode == 0, result.stderr[-3000:]
    _, wa = _weights(tmp_path / "a" / "model.keras")
    _, wb = _weights(tmp_path / "b" / "model.keras")
    for x, y in zip(wa, wb):
        np.testing.assert_array_equal(x, y)


@pytest.mark.slow
def test_clear_errors(tmp_path):
    result = run_cli("--flagfile=configs/demo.flags", "--learning_rate=0.1")
    assert result.returncode != 0 and "Unknown command line flag 'learning_rate'" in result.stderr
    result = run_cli("--flagfile=configs/nope.flags")
    assert result.returncode != 0 and "Unable to open flagfile" in result.stderr
    result = run_cli("--dataset=cifar100", f"--data_dir={tmp_path}", "--dry_run")
    assert result.returncode == 2 and "not available offline" in result.stderr and "--data_dir" in result.stderr
    result = run_cli("--flagfile=configs/demo.flags", "--lambdas=1,0", "--dry_run")
    assert result.returncode == 2 and "--lambdas=1,0: must be one value per expert: 3" in result.stderr
    assert "Traceback" not in result.stderr


def _corpus_folder(root):
    """An image folder of two classes: class a holds the whole image corpus, good and bad."""
    for split in ("train", "test"):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
    kinds = write_corpus(root / "train" / "a")
    for folder in (root / "train" / "b", root / "test" / "a", root / "test" / "b"):
        write_corpus(folder, ["rgb.png", "gray.jpg"])
    return kinds


@pytest.mark.slow
def test_bad_image_files_are_refused_before_any_work_or_left_out(tmp_path):
    kinds = _corpus_folder(tmp_path / "images")
    bad = sorted(name for name, kind in kinds.items() if kind.pixels is None)
    out = tmp_path / "run"
    args = ["--dataset=folder", f"--data_path={tmp_path / 'images'}", "--image_size=16", "--imbalance_ratio=0",
            "--augment=none", "--backbone=resnet8", "--epochs=1", "--batch_size=8", "--warmup_epochs=0",
            "--milestones=", "--noexport", "--precision=float32", f"--output_dir={out}"]
    refused = run_cli(*args)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
    assert refused.stderr.startswith(f"error: {len(bad)} image file(s) cannot be used:\n"), refused.stderr[-3000:]
    for name in bad:
        assert str(tmp_path / "images" / "train" / "a" / name) in refused.stderr
    assert "--bad_images=skip" in refused.stderr and not out.exists()  # nothing was written

    skipped = run_cli(*args, "--bad_images=skip")
    assert skipped.returncode == 0, skipped.stderr[-3000:]
    assert f"left out {len(bad)} image file(s) that cannot be used" in skipped.stdout
    record = json.loads((out / "config.json").read_text())
    assert sorted(os.path.basename(e["path"]) for e in record["data"]["left_out"]) == bad
    assert record["data"]["train_counts"] == [len(kinds) - len(bad), 2]  # the prior is that of the images used
    assert record["data"]["train_fingerprint"] and record["data"]["test_fingerprint"]


@pytest.mark.slow
def test_a_start_without_noise_a_finished_run_left_alone_and_unwritable_folders_named(tmp_path):
    out = tmp_path / "run"
    first = run_cli(*TINY, "--epochs=1", "--warmup_epochs=0", f"--output_dir={out}")
    assert first.returncode == 0, first.stderr[-3000:]
    # TensorFlow's C++ start-up lines (the CUDA probe among them) are not shown.
    assert first.stderr == "", first.stderr[-3000:]
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    again = run_cli(*TINY, "--epochs=1", "--warmup_epochs=0", f"--output_dir={out}")
    assert again.returncode == 0 and f"{out} has finished all 1 epochs" in again.stdout, again.stderr[-3000:]
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == files  # no new export version
    assert again.stdout.startswith(f"{out} has finished") and "epoch 1/1" not in again.stdout  # nothing trained

    (tmp_path / "file").write_text("")
    for bad, problem in ((tmp_path / "file", "is a file, not a folder"),
                         (tmp_path / "file" / "run", f"cannot be made, {tmp_path / 'file'} is a file"),
                         ("/sys/balpoe_run", "cannot write there (in /sys, where it would be made)")):
        result = run_cli(*TINY, f"--output_dir={bad}")
        assert result.returncode == 2 and result.stderr.startswith(f"error: --output_dir={bad}: {problem}"), \
            result.stderr[-3000:]
    result = run_cli(f"--run_dir={out}", f"--export_dir={tmp_path / 'file'}", tool="tools/export.py")
    assert result.returncode == 2 and result.stderr == (f"error: --export_dir={tmp_path / 'file'}: is a file, not a "
                                                        "folder: give a folder (new or existing)\n")


@pytest.mark.slow
def test_help_lists_the_tools_own_flags_in_groups_and_a_quick_run_checks_a_flag_file(tmp_path):
    result = run_cli("--help")
    assert result.returncode == 0 and result.stderr == ""
    for line in ("Data:", "Model:", "Optimisation:", "Run control:", "  --dataset=digits", "  --precision=auto",
                 "  --quick=false"):
        assert line in result.stdout.splitlines(), line
    quick = run_cli("--flagfile=configs/demo.flags", "--quick", f"--output_dir={tmp_path}")
    assert quick.returncode == 0, quick.stderr[-3000:]
    record = json.loads((tmp_path / "quick" / "config.json").read_text())
    assert (record["config"]["epochs"], record["config"]["milestones"], record["config"]["compare"]) == (2, [], [])
    assert record["data"]["train_size"] <= 5 * 64 and "epoch 2/2" in quick.stdout
    assert not (tmp_path / "baseline_ce").exists() and (tmp_path / "quick" / "export").is_dir()


@pytest.mark.slow
def test_incompatible_run_folder_is_refused(tmp_path):
    config = parse(*TINY, "--epochs=1", "--warmup_epochs=1", f"--output_dir={tmp_path}")
    experiment.train(config, log=lambda line: None)
    with pytest.raises(RunError, match="checkpoint of a different run.*--lambdas"):
        run_folder.check_run_folder(dataclasses.replace(config, lambdas=[0.0, 0.0, 0.0]))
    run_folder.check_run_folder(dataclasses.replace(config, eval_every=5))  # run control may change
    # A run saved before a setting existed resumes when the setting keeps its default.
    record = json.loads((tmp_path / "config.json").read_text())
    del record["config"]["tfds_split_train"]
    (tmp_path / "config.json").write_text(json.dumps(record))
    run_folder.check_run_folder(config)
    assert config.precision == "auto"  # resumes in the saved precision, whatever this machine would pick
    del record["config"]["precision"]  # saved when the default was float32
    (tmp_path / "config.json").write_text(json.dumps(record))
    run_folder.check_run_folder(dataclasses.replace(config, precision="float32"))
    with pytest.raises(RunError, match="--precision: saved 'float32', now 'mixed_bfloat16'"):
        run_folder.check_run_folder(dataclasses.replace(config, precision="mixed_bfloat16"))
    with pytest.raises(RunError, match="--tfds_split_train: saved 'train', now 'x'"):
        run_folder.check_run_folder(dataclasses.replace(config, tfds_split_train="x"))
    os.remove(tmp_path / "config.json")
    with pytest.raises(RunError, match="no config.json"):
        run_folder.check_run_folder(config)


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _seed_precision_cache(folder, config, replicas, speedup):
    """Cache a measurement of `speedup` for every mixed precision auto would measure here, for
    the run `config` split over `replicas`; returns the candidates (none: nothing to measure)."""
    gpus, flags = precision.gpu_capabilities(), precision.cpu_flags()
    candidates = precision.runnable_candidates(gpus, flags)
    key = run_precision.precision_model_key(config, run_data.load_data(config), replicas)

    def measure(make_step, candidates, images_per_step, total_steps):
        return {"rates": {"float32": 100.0, **{c: 100.0 * speedup for c in candidates}},
                "speedups": {c: speedup for c in candidates}, "float32_step": 0.1, "measuring_cost": 1.0}

    old = os.environ["BALPOE_TF_CACHE_DIR"]
    os.environ["BALPOE_TF_CACHE_DIR"] = str(folder)
    try:
        precision.choose_auto(key, candidates, None, key["batch"], 10 ** 9, gpus, flags, measure=measure)
    finally:
        os.environ["BALPOE_TF_CACHE_DIR"] = old
    return candidates


def _start(args, env=None):
    env = {k: v for k, v in (env or os.environ).items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    return subprocess.Popen([sys.executable, "tools/train.py", *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for_line(proc, line, timeout=300):
    """Read `proc`'s output until `line` appears (the progress line of a step)."""
    deadline = time.time() + timeout
    for out in proc.stdout:
        if out.startswith(line):
            return
        assert time.time() < deadline, f"no {line!r} in time"
    raise AssertionError(f"the run ended before {line!r}: {proc.stderr.read()[-3000:]}")


@pytest.mark.slow
def test_a_signal_at_a_random_step_saves_where_the_run_is_and_it_resumes_exactly(tmp_path):
    import random

    args = [*TINY, "--epochs=3", "--precision=float32", "--noexport", "--progress_every=1e-9"]
    full = run_cli(*args, f"--output_dir={tmp_path / 'full'}")
    assert full.returncode == 0, full.stderr[-3000:]
    step = random.randrange(1, 3 * 8 - 1)  # of 24: the signal lands in one of the steps after it
    signum = random.choice([signal.SIGINT, signal.SIGTERM])
    out = tmp_path / "stopped"
    proc = _start([*args, f"--output_dir={out}"])
    _wait_for_line(proc, f"epoch {step // 8 + 1}/3  step {step % 8 + 1}/8 ")
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum, (step, signum, stderr[-3000:])
    (line,) = stderr.splitlines()
    saved = re.search(r"stopped by (SIG\w+) at (?:step (\d+)/8 of epoch (\d)/3|the end of epoch (\d)/3): saved "
                      r"(\S+), nothing is lost\. The same command resumes it: python tools/train\.py ", line)
    assert saved and saved.group(1) == signal.Signals(signum).name, line
    assert os.path.isfile(saved.group(5)) and not (out / "model.keras").exists()
    stopped_at = (int(saved.group(3)) - 1) * 8 + int(saved.group(2)) if saved.group(2) else int(saved.group(4)) * 8
    assert step < stopped_at <= step + 3, (step, line)  # the step under way, or one or two after it

    resumed = run_cli(*args, f"--output_dir={out}")
    assert resumed.returncode == 0 and f"resuming from {saved.group(5)}" in resumed.stdout, resumed.stderr[-3000:]
    a, wa = _weights(tmp_path / "full" / "model.keras")
    b, wb = _weights(out / "model.keras")
    assert int(a.optimizer.iterations) == int(b.optimizer.iterations) == 3 * 8
    for x, y in zip(wa, wb):
        np.testing.assert_allclose(x, y, atol=1e-5)
    for x, y in zip(a.optimizer.variables, b.optimizer.variables):
        np.testing.assert_allclose(x.numpy(), y.numpy(), atol=1e-5)
    results = [json.loads((folder / "results.json").read_text())["test"] for folder in (tmp_path / "full", out)]
    assert results[0]["accuracy"] == pytest.approx(results[1]["accuracy"], abs=1e-6)


def _two_workers(args, out, caches=None):
    """Two workers of one run on loopback; worker i with its --precision=auto cache in `caches[i]`."""
    ports = [_free_port(), _free_port()]
    procs = []
    for index in range(2):
        tf_config = {"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
                     "task": {"type": "worker", "index": index}}
        env = dict(os.environ, TF_CONFIG=json.dumps(tf_config))
        if caches:
            env["BALPOE_TF_CACHE_DIR"] = str(caches[index])
        procs.append(_start([*args, f"--output_dir={out}"], env))
    return procs


MULTI_WORKER = [*TINY, "--epochs=3", "--strategy=multi_worker", "--sync_bn", "--noexport", "--progress_every=1e-9"]


@pytest.mark.slow
def test_two_workers_agree_stop_together_and_resume_exactly(tmp_path):
    # Each worker finds its own cached measurement of --precision=auto: the first found a mixed
    # precision faster, the second did not, so both must train in float32.
    caches = [tmp_path / "cache0", tmp_path / "cache1"]
    candidates = [_seed_precision_cache(folder, parse(*MULTI_WORKER), 2, speedup) for folder, speedup in
                  zip(caches, (1.5, 0.9))][0]
    outputs = [p.communicate(timeout=600) for p in _two_workers(MULTI_WORKER, tmp_path / "full", caches)]
    for stdout, stderr in outputs:
        assert "\nprecision float32 (--precision=auto" in stdout, stderr[-3000:]
    if candidates:  # the first worker gave up its faster measurement for the second's
        assert "precision float32 (--precision=auto: the precision every worker measured fastest" in outputs[0][0]
    # The chief writes the run folder; worker 1 its own sub-folder. With synchronised BN
    # even the moving statistics agree (per-replica BN keeps each worker's own).
    _, uninterrupted = _weights(tmp_path / "full" / "model.keras")
    _, worker = _weights(tmp_path / "full" / "worker1" / "model.keras")
    for a, b in zip(uninterrupted, worker):
        np.testing.assert_allclose(a, b, atol=1e-6)
    assert json.loads((tmp_path / "full" / "results.json").read_text())["epochs"] == 3

    # A worker killed mid-epoch: the other stops within seconds, naming it.
    lost = tmp_path / "lost"
    procs = _two_workers(MULTI_WORKER, lost)
    _wait_for_line(procs[1], "epoch 2/3  step 3/8 ")
    procs[1].kill()
    start = time.time()
    _, stderr = procs[0].communicate(timeout=120)
    assert procs[0].returncode == 3 and time.time() - start < 60, stderr[-3000:]
    assert stderr.startswith("error: lost worker 1 of the multi-worker run") and "Traceback" not in stderr
    assert "resume from the chief's newest checkpoint (epoch 1)" in stderr
    procs[1].communicate()

    # SIGTERM to the chief: every worker checkpoints the same step and stops.
    procs = _two_workers(MULTI_WORKER, lost)
    _wait_for_line(procs[0], "epoch 3/3  step 2/8 ")
    procs[0].send_signal(signal.SIGTERM)
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [143, 143], errors
    steps = [re.search(r"stopped by SIGTERM at step (\d)/8 of epoch 3/3", e).group(1) for e in errors]
    assert steps[0] == steps[1], errors
    assert (lost / "checkpoints" / f"epoch_0002_step_00000{steps[0]}.keras").is_file()
    assert (lost / "worker1" / "checkpoints" / f"epoch_0002_step_00000{steps[0]}.keras").is_file()

    # Started again, both resume from the chief's checkpoint and end as the uninterrupted run.
    procs = _two_workers(MULTI_WORKER, lost)
    outputs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-3000:] for o in outputs]
    for stdout, _ in outputs:
        assert f"resuming from {lost / 'checkpoints' / f'epoch_0002_step_00000{steps[0]}.keras'}" in stdout
    for folder in (lost, lost / "worker1"):
        _, resumed = _weights(folder / "model.keras")
        for a, b in zip(uninterrupted, resumed):
            np.testing.assert_allclose(a, b, atol=1e-5)


def test_strategy_errors(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(RunError, match="TF_CONFIG"):
        distribution.make_strategy("multi_worker")
    with pytest.raises(RunError, match="unknown --strategy 'tpu'"):
        distribution.make_strategy("tpu")


def _png_folder(root, counts, seed=0):
    rng = np.random.RandomState(seed)
    for split, per_class in (("train", counts), ("test", [2] * len(counts))):
        for c, n in enumerate(per_class):
            folder = root / split / f"class_{'abc'[c]}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                tf.io.write_file(str(folder / f"{i}.png"), tf.io.encode_png(rng.randint(0, 256, (8, 8, 3), np.uint8)))


@pytest.mark.slow
def test_a_resumed_run_refuses_training_data_that_changed_naming_what(tmp_path):
    images, out = tmp_path / "images", tmp_path / "run"
    _png_folder(images, [6, 4, 3])
    config = parse("--dataset=folder", f"--data_path={images}", "--image_size=8", "--imbalance_ratio=0",
                   "--augment=none", "--backbone=resnet8", "--epochs=2", "--batch_size=4", "--warmup_epochs=0",
                   "--milestones=", "--noexport", "--precision=float32", "--checkpoint_every=1",
                   f"--output_dir={out}")
    experiment.train(config, log=lambda line: None)
    # As a run stopped after epoch 1: its final checkpoint and results gone.
    for path in [out / "results.json", out / "model.keras", *out.glob("checkpoints/epoch_0002*")]:
        os.remove(path)
    extra, changed = images / "train" / "class_b" / "new.png", images / "train" / "class_c" / "0.png"
    original = changed.read_bytes()
    tf.io.write_file(str(extra), tf.io.encode_png(np.zeros((8, 8, 3), np.uint8)))
    tf.io.write_file(str(changed), tf.io.encode_png(np.ones((8, 8, 3), np.uint8)))
    with pytest.raises(RunError, match=re.escape(
            f"the training data is not what {out} started with: 1 file(s) added (class_b/new.png); 1 file(s) "
            "changed (class_c/0.png); class counts moved: class_b 4 -> 5. The class prior is part of the loss, so "
            "resuming would train another run under this name: restore the data, or start a new --output_dir")):
        experiment.train(config, log=lambda line: None)
    os.remove(extra)
    with pytest.raises(RunError, match=r"started with: 1 file\(s\) changed \(class_c/0.png\)\. The class prior"):
        experiment.train(config, log=lambda line: None)
    changed.write_bytes(original)  # the data restored: the run resumes and ends
    assert experiment.train(config, log=lambda line: None)["accuracy"] >= 0


def test_the_log_names_what_an_image_folder_run_does_not_read(tmp_path):
    _png_folder(tmp_path, [2, 2, 2])
    for name in ("0.png", "1.png"):
        os.remove(tmp_path / "test" / "class_c" / name)  # a class without test images
    (tmp_path / "train" / "class_a" / "._0.png").write_bytes(b"AppleDouble")
    for name in ("a.heic", "b.heic", "c"):
        (tmp_path / "train" / "class_b" / name).write_bytes(b"x")
    notes = experiment._data_notes(lt_data.load_dataset("folder", data_path=str(tmp_path), image_size=8))
    assert notes == [
        f"ignored 1 hidden or AppleDouble (._*) file(s) or folder(s): {tmp_path}/train/class_a/._0.png",
        "skipped 3 file(s) whose name is not an image's (.heic 2, no extension 1; read: "
        + " ".join(lt_data.IMAGE_EXTENSIONS) + f"): {tmp_path}/train/class_b/a.heic, {tmp_path}/train/class_b/b.heic, "
        f"{tmp_path}/train/class_b/c",
        "warning: 1 class(es) have no test images, so their accuracy is not measured: class_c"]
