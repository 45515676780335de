"""README's commands run as written (those that can run offline in seconds), and every relative
link of the docs resolves, anchors included."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO

DOCS = [REPO / "README.md", REPO / "benchmarks" / "README.md", *sorted((REPO / "docs").glob("*.md"))]

# What the test does with each command of README's code blocks: run it (with these extra flags,
# placeholders replaced), or why not. A command missing here fails the test: classify it.
TINY = ["--epochs=1", "--warmup_epochs=0", "--milestones="]
COMMANDS = {
    "pip install -e . && python tools/train.py --flagfile=configs/demo.flags": ("run", TINY),
    'pip install -e ".[test]" && python -m pytest -q -n 2 tests': ("skip", "this is the test suite itself"),
    "python tools/train.py --flagfile=configs/cifar100_ir100.flags --data_dir=TFDS_DIR":
        ("skip", "needs CIFAR-100 prepared by TFDS (no download in tests)"),
    "python tools/train.py --help": ("run", []),
    "python tools/train.py --dataset=folder --data_path=MY_IMAGES --image_size=64 --imbalance_ratio=0 "
    "--augment=imagenet --output_dir=runs/mine": ("run", ["--quick", "--backbone=resnet8", "--batch_size=4"]),
    "python tools/evaluate.py --run_dir=runs/demo,runs/demo/baseline_ce,runs/demo/baseline_bs": ("run", []),
    "python tools/predict.py --model=runs/demo --inputs=MY_PHOTOS/ --top_k=3": ("run", []),
    'docker run -p 8501:8501 -v "$PWD/runs/demo/export:/models/balpoe" -e MODEL_NAME=balpoe tensorflow/serving':
        ("skip", "no Docker engine here; the SavedModel's signatures are tested in test_export.py"),
    **{"TF_CONFIG='{\"cluster\": {\"worker\": [\"host1:12345\", \"host2:12345\"]}, \"task\": {\"type\": \"worker\", "
       f"\"index\": {index}}}}}' python tools/train.py --flagfile=configs/imagenet_lt.flags --strategy=multi_worker "
       "--output_dir=/shared/run": ("skip", "needs ImageNet-LT and two machines; test_experiment.py runs two workers")
       for index in (0, 1)},
    "tensorboard --logdir runs": ("skip", "a server; what it reads is tested in test_experiment.py"),
}


def readme_commands():
    """Each command of README's fenced code blocks (continuation lines joined)."""
    text = (REPO / "README.md").read_text()
    commands = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, re.S):
        for command in block.replace("\\\n", " ").splitlines():
            if command.strip():
                commands.append(" ".join(command.split()))
    return commands


def test_every_readme_command_is_classified():
    assert set(readme_commands()) == set(COMMANDS), set(readme_commands()) ^ set(COMMANDS)


def _images(folder, count, seed):
    rng = np.random.RandomState(seed)
    folder.mkdir(parents=True)
    for i in range(count):
        Image.fromarray(rng.randint(0, 256, (16, 16, 3)).astype(np.uint8)).save(folder / f"{i}.png")


@pytest.mark.slow
def test_readme_commands_run_as_written(tmp_path):
    # A working folder like the project's root: tools/ and configs/ as they are, runs/ made here.
    for name in ("tools", "configs", "balpoe_tf"):
        (tmp_path / name).symlink_to(REPO / name)
    for split in ("train", "test"):
        for cls in ("cats", "dogs"):
            _images(tmp_path / "my_images" / split / cls, 6 if split == "train" else 2, len(cls))
    _images(tmp_path / "my_photos", 3, 7)
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    for command in readme_commands():
        action, extra = COMMANDS[command]
        if action == "skip":
            continue
        command = command.split(" && ")[-1].replace("MY_IMAGES", "my_images").replace("MY_PHOTOS", "my_photos")
        args = shlex.split(command)
        args = [sys.executable if args[0] == "python" else args[0], *args[1:], *extra]
        result = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=900)
        assert result.returncode == 0, (command, result.stderr[-3000:])
        assert "Traceback" not in result.stderr and "E0000" not in result.stderr, (command, result.stderr[-3000:])
        if "--help" in args:
            assert "Data:" in result.stdout and "--dataset=digits" in result.stdout
        if "predict.py" in command:
            assert result.stdout.startswith("3 image(s), 0 skipped")
        if "evaluate.py" in command:
            assert "| demo | no prior |" in result.stdout and "| baseline_ce |" in result.stdout
            assert "retracing" not in result.stderr  # one trace per model, whatever the batch
    for name, action in GUIDES.items():
        if action != "run":
            continue
        command = guide_command(REPO / "docs" / name).replace("/tmp/", f"{tmp_path}/out/")
        args = shlex.split(command)
        result = subprocess.run([sys.executable, *args[1:]], cwd=tmp_path, capture_output=True, text=True, env=env,
                                timeout=900)
        assert result.returncode == 0 and "Traceback" not in result.stderr, (name, command, result.stderr[-3000:])


# The command each guide opens with, run after README's (whose demo run some of them use), or why not.
GUIDES = {"training.md": "run", "data.md": "run", "evaluation.md": "run", "serving.md": "run",
          "reproducing.md": "run", "architecture.md": "run",
          "performance.md": "skip: a benchmark of about a minute; test_benchmark_throughput.py runs the tool"}


def guide_command(path: Path) -> str:
    """The first command of a guide: its first code block, continuation lines joined."""
    block = re.search(r"```[a-z]*\n(.*?)```", path.read_text(), re.S).group(1)
    return " ".join(block.replace("\\\n", " ").split())


def test_every_guide_opens_with_a_command():
    assert {p.name for p in (REPO / "docs").glob("*.md")} == set(GUIDES)
    for name in GUIDES:
        assert re.match(r"(python|tensorboard) ", guide_command(REPO / "docs" / name)), name


def _slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: Path) -> set:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return {_slug(m) for m in re.findall(r"^#+ (.+)$", text, re.M)}


@pytest.mark.parametrize("doc", DOCS, ids=[str(d.relative_to(REPO)) for d in DOCS])
def test_every_relative_link_resolves(doc):
    text = re.sub(r"```.*?```", "", doc.read_text(), flags=re.S)
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    assert links or doc.name == "architecture.md", f"{doc} links nowhere"
    for link in links:
        if re.match(r"[a-z]+://|mailto:", link):
            continue
        target, _, anchor = link.partition("#")
        path = (doc.parent / target).resolve() if target else doc
        assert path.exists(), f"{doc.relative_to(REPO)}: {link} does not exist"
        if anchor:
            assert path.suffix == ".md" and anchor in _anchors(path), f"{doc.relative_to(REPO)}: no #{anchor} in {path}"
