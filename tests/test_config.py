import os
import subprocess
import sys
from pathlib import Path

import pytest
from absl import flags

from balpoe_tf import cli, config, run_config, settings
from conftest import parse_config

REPO = Path(__file__).resolve().parents[1]


def test_checks_say_their_rule():
    assert config.at_least(1).ok(1) and not config.at_least(1).ok(0)
    assert config.greater_than(0).ok(1e-9) and not config.greater_than(0).ok(0)
    for bad in (float("nan"), float("inf"), True, "1"):
        assert not config.greater_than(0).ok(bad)
    assert config.between(0, 1, open_high=True).ok(0) and not config.between(0, 1, open_high=True).ok(1)
    assert config.between(0, 1).ok(1)
    assert config.either(0, config.at_least(1), "off").ok(0) and not config.either(0, config.at_least(1), "off").ok(0.5)
    assert config.each(config.at_least(0)).ok([]) and not config.each(config.at_least(0)).ok([1, -1])
    assert config.one_of(("a", "b")).rule == "one of a, b"
    assert config.either(0, config.at_least(1), "off").rule == "0 (off) or >= 1"
    assert config.flag_value([1.0, 0.0, -1.0]) == "1,0,-1" and config.flag_value(False) == "false"
    with pytest.raises(config.ConfigError, match=r"^--lr=-1: must be > 0$"):
        config.refuse("lr", -1.0, "> 0")


# (config class, flags, the error line). Every rule of every tool's flags, one bad value each.
BAD_VALUES = [
    (run_config.RunConfig, ["--batch_size=0"], "--batch_size=0: must be >= 1"),
    (run_config.RunConfig, ["--lr=-1"], "--lr=-1: must be > 0"),
    (run_config.RunConfig, ["--lr=nan"], "--lr=nan: must be a finite number > 0"),
    (run_config.RunConfig, ["--lr=inf"], "--lr=inf: must be a finite number > 0"),
    (run_config.RunConfig, ["--mixup_alpha=inf"], "--mixup_alpha=inf: must be a finite number, 0 (no mixup) or > 0"),
    (run_config.RunConfig, ["--mixup_alpha=-0.5"], "--mixup_alpha=-0.5: must be 0 (no mixup) or > 0"),
    (run_config.RunConfig, ["--epochs=0"], "--epochs=0: must be >= 1"),
    (run_config.RunConfig, ["--momentum=1"], "--momentum=1: must be in [0, 1)"),
    (run_config.RunConfig, ["--momentum=0"], "--momentum=0: must be > 0 with --nesterov"),
    (run_config.RunConfig, ["--scale=0"], "--scale=0: must be > 0"),
    (run_config.RunConfig, ["--image_size=4"], "--image_size=4: must be >= 8"),
    (run_config.RunConfig, ["--imbalance_ratio=0.5"],
     "--imbalance_ratio=0.5: must be 0 (the source's own counts) or >= 1"),
    (run_config.RunConfig, ["--warmup_epochs=300"], "--warmup_epochs=300: must be at most --epochs=200"),
    (run_config.RunConfig, ["--warmup_epochs=-1"], "--warmup_epochs=-1: must be >= 0"),
    (run_config.RunConfig, ["--milestones=180,160"],
     "--milestones=180,160: must be strictly increasing epochs below --epochs=200"),
    (run_config.RunConfig, ["--milestones=160,200"],
     "--milestones=160,200: must be strictly increasing epochs below --epochs=200"),
    (run_config.RunConfig, ["--milestones=-1"], "--milestones=-1: must be a list of values each >= 0"),
    (run_config.RunConfig, ["--milestones=1.5"], "--milestones=1.5: must be a comma-separated list of int values"),
    (run_config.RunConfig, ["--gamma=0"], "--gamma=0: must be > 0"),
    (run_config.RunConfig, ["--weight_decay=-1e-4"], "--weight_decay=-0.0001: must be >= 0"),
    (run_config.RunConfig, ["--num_experts=0", "--lambdas="], "--num_experts=0: must be >= 1"),
    (run_config.RunConfig, ["--lambdas=1,0"], "--lambdas=1,0: must be one value per expert: 3 for --num_experts=3"),
    (run_config.RunConfig, ["--lambdas=1,x,0"], "--lambdas=1,x,0: must be a comma-separated list of float values"),
    (run_config.RunConfig, ["--lambdas=1,inf,0"], "--lambdas=1,inf,0: must be a list of values each a finite number"),
    (run_config.RunConfig, ["--target_mean_lambda=nan"], "--target_mean_lambda=nan: must be a finite number"),
    (run_config.RunConfig, ["--dataset=imagenet"], "--dataset=imagenet: must be one of cifar10, cifar100, digits"),
    (run_config.RunConfig, ["--holdout_fraction=0.5"], "--holdout_fraction=0.5: must be in [0, 0.5)"),
    (settings.EvalConfig, ["--run_dir=r", "--prior_estimator=magic"],
     "--prior_estimator=magic: must be one of em, map_em, bbse, ts_em, bcts_em"),
    (settings.EvalConfig, ["--run_dir=r", "--compare_estimators=em,x"],
     "--compare_estimators=em,x: must be empty or a comma-separated list of em, map_em"),
    (settings.EvalConfig, ["--run_dir=r", "--prior_safeguard=1"], "--prior_safeguard=1: must be in [0, 1)"),
    (run_config.RunConfig, ["--augment=mixup"], "--augment=mixup: must be one of cifar, autoaugment"),
    (run_config.RunConfig, ["--backbone=resnet18"], "--backbone=resnet18: must be one of"),
    (run_config.RunConfig, ["--schedule=linear"], "--schedule=linear: must be one of step, cosine"),
    (run_config.RunConfig, ["--precision=float16"], "--precision=float16: must be one of auto, float32"),
    (run_config.RunConfig, ["--strategy=tpu"], "--strategy=tpu: must be one of auto, mirrored"),
    (run_config.RunConfig, ["--bad_images=ignore"], "--bad_images=ignore: must be one of fail, skip"),
    (run_config.RunConfig, ["--compare=ce,xx"], "--compare=ce,xx: must be a list of values each one of ce, bs"),
    (run_config.RunConfig, ["--mean=0.5,2,0.5"], "--mean=0.5,2,0.5: must be a list of values each in [0, 1]"),
    (run_config.RunConfig, ["--std=0,0.2,0.2"], "--std=0,0.2,0.2: must be a list of values each in (0, 1]"),
    (run_config.RunConfig, ["--test_crop=1.5"], "--test_crop=1.5: must be 0 (off) or in (0, 1]"),
    (run_config.RunConfig, ["--eval_every=0"], "--eval_every=0: must be >= 1"),
    (run_config.RunConfig, ["--checkpoint_every=0"], "--checkpoint_every=0: must be >= 1"),
    (run_config.RunConfig, ["--seed=-1"], "--seed=-1: must be >= 0"),
    (run_config.RunConfig, ["--num_classes=-1"], "--num_classes=-1: must be >= 0"),
    (run_config.RunConfig, ["--output_dir="], "--output_dir=: must be a non-empty value"),
    (settings.EvalConfig, [], "--run_dir=: must be one or more run folders"),
    (settings.EvalConfig, ["--run_dir=r", "--distributions=forward50,up"], "--distributions=forward50,up: must be"),
    (settings.EvalConfig, ["--run_dir=r", "--distributions=forward0.5"], "--distributions=forward0.5: must be"),
    (settings.EvalConfig, ["--run_dir=r", "--priors=none,oracle"],
     "--priors=none,oracle: must be a comma-separated list of one of none, known, estimated"),
    (settings.EvalConfig, ["--run_dir=r", "--priors="], "--priors=: must be a comma-separated list"),
    (settings.EvalConfig, ["--run_dir=r", "--batch_size=0"], "--batch_size=0: must be >= 1"),
    (settings.ExportConfig, [], "--run_dir=: must be a non-empty value"),
    (settings.ExportConfig, ["--run_dir=r", "--top_k=0"], "--top_k=0: must be >= 1"),
    (settings.ExportConfig, ["--run_dir=r", "--max_image_megapixels=0"], "--max_image_megapixels=0: must be > 0"),
]


def _parse(config_class, args):
    return parse_config(config_class, *args)


@pytest.mark.parametrize("config_class,args,message", BAD_VALUES,
                         ids=[f"{c.__name__}{' '.join(a)}" for c, a, _ in BAD_VALUES])
def test_every_bad_value_is_refused_naming_flag_value_and_range(config_class, args, message):
    with pytest.raises(config.ConfigError) as error:
        _parse(config_class, args)
    text = str(error.value)
    assert text.startswith(message) and "\n" not in text


def test_good_values_pass():
    assert _parse(run_config.RunConfig, ["--mixup_alpha=0", "--imbalance_ratio=0", "--schedule=cosine",
                                         "--milestones=500", "--momentum=0", "--nonesterov"]).mixup_alpha == 0
    assert _parse(settings.EvalConfig, ["--run_dir=a,b", "--distributions=forward50,uniform"]).priors
    assert _parse(settings.ExportConfig, ["--run_dir=r"]).top_k == 5
    for path in sorted((REPO / "configs").glob("*.flags")):  # every shipped setting is valid
        _parse(run_config.RunConfig, [f"--flagfile={path}"])


def test_every_contradiction_is_reported_at_once_with_a_fix_to_paste():
    refused = []
    for flagfile in sorted((REPO / "configs").glob("*.flags")):
        try:
            _parse(run_config.RunConfig, [f"--flagfile={flagfile}", "--epochs=2"])
            continue  # no warm-up, no LR steps: 2 epochs are fine
        except config.ConfigError as error:
            lines = str(error).splitlines()
        refused.append(flagfile.name)
        fix = lines[-1].removeprefix("fix: add ") if len(lines) > 1 else lines[0].split("; fix: ")[1]
        # The fix, pasted after the same flags, gives valid settings.
        fixed = _parse(run_config.RunConfig, [f"--flagfile={flagfile}", "--epochs=2", *fix.split()])
        assert fixed.epochs == 2, flagfile
    assert "cifar100_ir100.flags" in refused and "demo.flags" in refused
    with pytest.raises(config.ConfigError) as error:
        _parse(run_config.RunConfig, ["--flagfile=configs/cifar100_ir100.flags", "--epochs=2", "--lr=0",
                                      "--momentum=0"])
    assert str(error.value).splitlines() == [
        "4 settings must change:",
        "  --lr=0: must be > 0",
        "  --warmup_epochs=5: must be at most --epochs=2",
        "  --milestones=160,180: must be strictly increasing epochs below --epochs=2",
        "  --momentum=0: must be > 0 with --nesterov (or pass --nonesterov)",
        "fix: add --warmup_epochs=1 --milestones= --nonesterov"]
    # A quick run drops the warm-up and the LR steps, so they do not contradict it.
    quick = _parse(run_config.RunConfig, ["--flagfile=configs/cifar100_ir100.flags", "--epochs=2", "--quick"])
    trained = run_config.quick_config(quick)
    assert (trained.epochs, trained.warmup_epochs, trained.milestones, trained.compare) == (2, 0, [], [])
    assert run_config.quick_config(trained) == trained
    full = _parse(run_config.RunConfig, ["--flagfile=configs/imagenet_lt.flags"])
    assert run_config.quick_config(full) is full


def test_library_users_get_the_same_checks():
    with pytest.raises(config.ConfigError, match="--batch_size=0: must be >= 1"):
        run_config.RunConfig(batch_size=0)
    base = run_config.RunConfig(epochs=10, milestones=[5, 8], warmup_epochs=1)
    with pytest.raises(config.ConfigError, match="--warmup_epochs=20: must be at most --epochs=10"):
        run_config.RunConfig(**{**base.__dict__, "warmup_epochs": 20})


def test_absl_parse_errors_are_one_line_and_exit_2(capsys):
    values = flags.FlagValues()
    cli.define_flags(run_config.RunConfig, values)
    for args in (["--batch_size=abc"], ["--learning_rate=0.1"], ["positional"]):
        with pytest.raises(SystemExit) as exit_:
            cli.parse_flags(["train.py", *args], values)
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err


def _tool(name, *args):
    return subprocess.run([sys.executable, f"tools/{name}.py", *args], cwd=REPO, capture_output=True, text=True,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"), timeout=600)


def _our_lines(stderr):
    # TensorFlow's C++ start-up lines are not ours.
    return [line for line in stderr.splitlines()
            if not line.startswith(("I0000", "W0000", "E0000", "WARNING: All log messages"))]


@pytest.mark.slow
def test_tools_refuse_bad_values_with_exit_2_and_no_traceback():
    for name, args, message in [
        ("train", ["--flagfile=configs/demo.flags", "--batch_size=0"], "error: --batch_size=0: must be >= 1"),
        ("evaluate", ["--run_dir=x", "--priors=oracle"], "error: --priors=oracle: must be"),
        ("export", ["--run_dir=x", "--top_k=0"], "error: --top_k=0: must be >= 1"),
    ]:
        result = _tool(name, *args)
        assert result.returncode == 2, result.stderr[-2000:]
        assert _our_lines(result.stderr) == [_our_lines(result.stderr)[0]]
        assert _our_lines(result.stderr)[0].startswith(message) and "Traceback" not in result.stderr


@pytest.mark.slow
def test_lambda_mean_warning_is_one_clean_line():
    result = _tool("train", "--flagfile=configs/demo.flags", "--lambdas=1,0,0", "--dry_run", "--compare=")
    assert result.returncode == 0, result.stderr[-2000:]
    lines = _our_lines(result.stderr)
    warning = [i for i, line in enumerate(lines) if "mean lambda is 0.333333" in line]
    assert len(warning) == 1 and lines[warning[0]].startswith("warning: mean lambda")
    assert not any("warnings.warn" in line or "stacklevel" in line for line in lines)


@pytest.mark.slow
@pytest.mark.parametrize("tool", ["train", "evaluate", "predict", "export", "reproduce"])
def test_ctrl_c_while_a_tool_starts_is_one_line_and_exit_130(tool):
    import signal
    import time

    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}  # as a user runs it
    for delay in (0.5, 2.0):  # TensorFlow is still loading: it takes seconds
        proc = subprocess.Popen([sys.executable, f"tools/{tool}.py", "--help"], cwd=REPO, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        if proc.returncode == 0 and "--" in out:
            continue  # this machine loaded TensorFlow and printed the help before the signal: nothing to stop
        assert proc.returncode == 130, (delay, err[-2000:])
        assert err == "stopped by SIGINT (Ctrl-C) while starting: nothing was done\n", (delay, err[-2000:])


def test_an_error_is_one_line_with_its_type():
    assert config.error_line(ValueError("first\nsecond")) == "ValueError: first"
    assert config.error_line(OSError()) == "OSError: no details"
    assert config.error_line(KeyError("x" * 300), limit=5) == "KeyError: 'xxxx"
    assert config.error_line(RuntimeError("y" * 300), limit=None) == "RuntimeError: " + "y" * 300
