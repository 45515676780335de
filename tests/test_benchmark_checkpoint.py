"""tools/benchmark_checkpoint.py: a checkpoint's time against a step's, on a small model."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_one_model_one_save(tmp_path):
    output = tmp_path / "checkpoint.json"
    result = subprocess.run([sys.executable, "tools/benchmark_checkpoint.py", "--checkpoint_models=resnet32x1",
                             "--saves=1", f"--json={output}"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (row,) = json.loads(output.read_text())["runs"]
    assert row["model"] == "resnet32x1" and row["step_seconds"] > 0 and row["checkpoint_mib"] > 1
    assert row["checkpoint_over_step"] == row["checkpoint_seconds"] / row["step_seconds"]
    assert row["share_at_minutes"] == row["checkpoint_seconds"] / 600
    assert "| resnet32x1 |" in (tmp_path / "checkpoint.md").read_text()
