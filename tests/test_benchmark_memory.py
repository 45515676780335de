"""tools/benchmark_memory.py: a tiny run writes its peak-memory phases in the precision asked for."""

import json
import os
import subprocess
import sys

import pytest

from conftest import skip_without_kernels

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["float32", "mixed_bfloat16"])
def test_tiny_run_reports_every_phase_in_its_precision(tmp_path, precision):
    skip_without_kernels(precision)
    output = tmp_path / "memory.json"
    result = subprocess.run(
        [sys.executable, "tools/benchmark_memory.py", "--backbone=resnet8", "--num_experts=2", "--batch_size=4",
         "--steps=1", "--image_size=32", "--num_classes=3", f"--precision={precision}", f"--output={output}"],
        cwd=REPO, capture_output=True, text=True, timeout=600, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(output.read_text())
    assert report["precision"] == precision and report["backbone"] == "resnet8"
    phases = [report[k] for k in ("start_mib", "after_pipeline_mib", "after_model_mib", "after_training_mib")]
    assert phases == sorted(phases) and phases[0] > 0  # a high-water mark only grows
    assert report["train_images_per_s"] > 0 and report["pipeline_images_per_s"] > 0
