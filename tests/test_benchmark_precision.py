"""tools/benchmark_precision.py: what auto decides for a new run and what deciding costs, first and
cached, whatever run the flag file's own --output_dir holds."""

import json
import os
import subprocess
import sys

import pytest

from balpoe_tf import precision, run_folder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _started_run(folder, precision_name):
    """A run folder as a run that began in `precision_name` leaves it: a record and a checkpoint."""
    os.makedirs(folder / "checkpoints")
    (folder / "checkpoints" / "epoch_0040.keras").write_bytes(b"")
    record = run_folder.RunRecord({"precision": precision_name}, run_folder.DataRecord(
        "digits", 10, 100, 10, [10] * 10, [str(c) for c in range(10)], [0.5], [0.25], [8, 8, 1]))
    (folder / "config.json").write_text(json.dumps(record.to_dict()))


@pytest.mark.slow
def test_the_demo_decision_is_timed_first_and_cached_after_the_demo_ran(tmp_path):
    # A working folder like the project's after README's demo: the demo's run in runs/demo.
    for name in ("tools", "configs", "balpoe_tf"):
        (tmp_path / name).symlink_to(os.path.join(REPO, name))
    _started_run(tmp_path / "runs" / "demo", "mixed_bfloat16")
    before = sorted(os.listdir(tmp_path / "runs" / "demo"))
    output = tmp_path / "out" / "precision.json"
    result = subprocess.run(
        [sys.executable, "tools/benchmark_precision.py", "--flagfiles=configs/demo.flags", f"--json={output}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(output.read_text())
    (row,) = report["runs"]
    assert row["flagfile"] == "configs/demo.flags" and row["epochs"] == 40
    assert row["choice"]["how"] in ("short run", "no candidate", "measured")  # a new run's, not "resumed"
    assert row["choice"]["precision"] in precision.PRECISIONS and row["cached_choice"] == row["choice"]["precision"]
    if row["choice"]["how"] == "no candidate":  # nothing to measure on this CPU: nothing is timed
        assert row["first_seconds"] < 0.5 and row["cached_seconds"] < 0.5
    else:
        assert 0 <= row["cached_seconds"] < row["first_seconds"]
    assert "| configs/demo.flags |" in (tmp_path / "out" / "precision.md").read_text()
    assert sorted(os.listdir(tmp_path / "runs" / "demo")) == before  # the user's run is left alone
