"""tools/benchmark_image_check.py: a tiny run times the first check and the recorded one."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_tiny_run_times_the_first_and_the_recorded_check(tmp_path):
    output = tmp_path / "check.json"
    result = subprocess.run([sys.executable, "tools/benchmark_image_check.py", "--images=60", "--sizes=16x12",
                             f"--json={output}"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (row,) = json.loads(output.read_text())["runs"]
    assert row["size"] == "16x12" and row["images"] == 60 and row["mean_bytes"] > 0
    assert row["first_seconds"] > 0 and row["recorded_seconds"] > 0
    assert row["first_seconds_per_10000"] == row["first_seconds"] * 10000 / 60
    assert "| 16x12 |" in (tmp_path / "check.md").read_text()
