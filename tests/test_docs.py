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
    for doc, info, block in runnable_doc_blocks():
        if info == "python":
            (tmp_path / "example.py").write_text(block)
            commands = [[sys.executable, "example.py"]]
        else:
            commands = [[sys.executable, *shlex.split(c.replace("/tmp/", f"{tmp_path}/out/"))[1:]]
                        for c in block_commands(block)]
        for args in commands:
            result = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=900)
            assert result.returncode == 0 and "Traceback" not in result.stderr, (doc, args, result.stderr[-3000:])


# A docs code block the tests do not run says so in its first line, with the reason.
NOT_RUN = "# not run by the tests: "


def doc_blocks():
    """(guide, info string, text) of every fenced block of docs/: `text` blocks are no commands
    (diagrams, example output, a synopsis)."""
    return [(path.name, info, block) for path in sorted((REPO / "docs").glob("*.md"))
            for info, block in re.findall(r"```([a-z]*)\n(.*?)```", path.read_text(), re.S)]


def block_commands(block: str) -> list:
    """The commands of a shell block, continuation lines joined."""
    return [" ".join(line.split()) for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def runnable_doc_blocks():
    return [(doc, info, block) for doc, info, block in doc_blocks()
            if info != "text" and not block.startswith(NOT_RUN)]


def test_every_docs_block_is_run_or_says_why_not():
    for doc, info, block in doc_blocks():
        if info == "text":
            continue
        if block.startswith(NOT_RUN):
            assert len(block.splitlines()[0]) > len(NOT_RUN) + 5, (doc, block)  # a reason
        elif info != "python":
            # What the README test runs, run after README's demo in a folder like the project's.
            assert all(c.startswith("python ") for c in block_commands(block)), (doc, block)
    assert len(runnable_doc_blocks()) >= 7  # what the docs had on 2026-12-06: none may fall out unseen


def test_every_guide_opens_with_a_command():
    for path in (REPO / "docs").glob("*.md"):
        block = re.search(r"```[a-z]*\n(.*?)```", path.read_text(), re.S).group(1)
        first = block_commands(block.split("\n", 1)[1] if block.startswith(NOT_RUN) else block)[0]
        assert re.match(r"(python|tensorboard) ", first), path.name


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


def test_nothing_a_user_reads_points_to_our_own_shared_folder():
    # ../shared holds the project's copies of public data and measurements: users have none of it.
    readable = [REPO / "README.md", *REPO.glob("docs/**/*"), *REPO.glob("configs/**/*"), *REPO.glob("benchmarks/**/*")]
    pointing = [str(p.relative_to(REPO)) for p in readable if p.is_file() and "../shared" in p.read_text(errors="ignore")]
    assert pointing == []
