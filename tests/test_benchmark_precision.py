"""tools/benchmark_precision.py: what auto decides for a run and what deciding costs, first and cached."""

import json
import os
import subprocess
import sys

import pytest

from balpoe_tf import precision

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_the_demo_decision_is_timed_first_and_cached(tmp_path):
    output = tmp_path / "precision.json"
    result = subprocess.run(
        [sys.executable, "tools/benchmark_precision.py", "--flagfiles=configs/demo.flags", f"--json={output}"],
        cwd=REPO, capture_output=True, text=True, timeout=600, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(output.read_text())
    (row,) = report["runs"]
    assert row["flagfile"] == "configs/demo.flags" and row["epochs"] == 40
    assert row["choice"]["how"] in ("short run", "no candidate", "measured")  # the first decision
    assert row["choice"]["precision"] in precision.PRECISIONS and row["cached_choice"] == row["choice"]["precision"]
    if row["choice"]["how"] == "no candidate":  # nothing to measure on this CPU: nothing is timed
        assert row["first_seconds"] < 0.5 and row["cached_seconds"] < 0.5
    else:
        assert 0 <= row["cached_seconds"] < row["first_seconds"]
    assert "| configs/demo.flags |" in (tmp_path / "precision.md").read_text()
