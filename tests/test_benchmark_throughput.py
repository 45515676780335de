"""tools/benchmark_throughput.py: the multiply-add count, the paired protocol and its summary.
The official code's worker needs PyTorch, which tests do not install: a stand-in answers instead."""

import os
import subprocess
import sys
import textwrap

import pytest
import tensorflow as tf

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Imported by name, as benchmark_kernels imports it: one module, so its absl flags are defined once.
sys.path.insert(0, os.path.join(REPO, "tools"))
import benchmark_throughput as benchmark  # noqa: E402


def test_multiply_adds_of_a_convolution_and_a_product_by_hand():
    kernel = tf.ones([3, 3, 2, 4])
    weights = tf.ones([4, 5])

    @tf.function
    def net(x):
        y = tf.nn.conv2d(x, kernel, 1, "SAME")  # 6 x 6 outputs x 4 channels, 3 * 3 * 2 each: 2592
        return tf.matmul(tf.reduce_mean(y, axis=(1, 2)), weights)  # 4 x 5: 20

    # The mean's 144 additions (6 x 6 x 4, counted as flops) are 72 multiply-adds' worth.
    assert benchmark.multiply_adds(net, tf.TensorSpec([1, 6, 6, 2])) == 2592 + 20 + 72


def test_ratio_summary():
    summary = benchmark._ratio_summary([1.2, 1.5, 1.3, 1.1, 1.4])
    assert summary["median"] == pytest.approx(1.3)
    assert (summary["min"], summary["max"]) == (1.1, 1.5)


def test_worker_protocol_with_a_stand_in(tmp_path):
    stand_in = tmp_path / "worker.py"
    stand_in.write_text(textwrap.dedent("""
        import sys
        print("some start-up chatter")
        print("ready stand-in 1.0", flush=True)
        for line in sys.stdin:
            if line.strip() == "quit":
                break
            print("noise")
            print(f"{line.strip()} {len(line.strip())}.5", flush=True)
    """))
    worker = benchmark._Worker([sys.executable, str(stand_in)])
    assert worker.ready == "stand-in 1.0"
    assert worker.ask("train") == 5.5 and worker.ask("predict") == 7.5
    worker.close()
    assert worker.process.returncode == 0


def test_worker_that_dies_names_itself(tmp_path):
    stand_in = tmp_path / "broken.py"
    stand_in.write_text("raise SystemExit(3)\n")
    with pytest.raises(RuntimeError, match=r"broken.py.*ended before answering 'ready' \(exit code 3\)"):
        benchmark._Worker([sys.executable, str(stand_in)])


def test_paired_markdown_row():
    rates = {"ours_train": [130.0, 120.0, 140.0], "official_train": [100.0, 100.0, 100.0],
             "ours_predict": [600.0] * 3, "official_predict": [500.0] * 3, "ours_serve": [600.0] * 3}
    row = {"model": "resnet32x3", "images_per_s": rates,
           "train_ratio": benchmark._ratio_summary([1.3, 1.2, 1.4]),
           "predict_ratio": benchmark._ratio_summary([1.2] * 3),
           "serve_to_keras_ratio": benchmark._ratio_summary([1.0] * 3),
           "train_macs_per_s": {"ours": 60e9, "official": 40e9}, "matmul_peak_macs_per_s": 100e9}
    table = benchmark.paired_markdown([row])
    assert "| resnet32x3 | 3 | 130 / 100 | 1.30 (1.20–1.40) | 600 / 500 | 1.20 (1.20–1.20) |" in table
    assert "60 (60 %) / 40 (40 %)" in table and "100 GMAC/s" in table


def test_reference_must_be_a_checkout(tmp_path):
    done = subprocess.run([sys.executable, "tools/benchmark_throughput.py", f"--reference={tmp_path}"], cwd=REPO,
                          capture_output=True, text=True)
    assert done.returncode != 0 and "not a checkout of emasa/BalPoE-CalibratedLT" in done.stderr


def test_reference_compares_resnet32_only(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model.py").write_text("")
    done = subprocess.run([sys.executable, "tools/benchmark_throughput.py", f"--reference={tmp_path}",
                           "--models=resnet50x3"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode != 0 and "compares the ResNet-32 models only" in done.stderr


def test_settings_markdown_rows():
    measured = {"model": "resnet32x3", "batch": 128, "onednn": "1", "xla": False, "precision": "mixed_bfloat16",
                "cpu_isa": "AVX512_CORE", "train_images_per_s": 140.71, "predict_images_per_s": 600.0,
                "pipeline_images_per_s": 50000.0, "peak_rss_mib": 4000.2}
    failed = {"model": "resnet32x3", "onednn": "1", "xla": False, "precision": "mixed_bfloat16", "cpu_isa": "",
              "error": "could not create a primitive descriptor"}
    table = benchmark.markdown([measured, failed])
    assert "| resnet32x3 | 128 | on | off | mixed_bfloat16 | AVX512_CORE | 140.7 | 600.0 | 50000 | 4000 |" in table
    assert "| resnet32x3 | | on | off | mixed_bfloat16 | none | failed: could not create a primitive" in table


def test_a_failed_worker_reports_the_cause_not_the_node():
    stderr = textwrap.dedent("""
        I0000 oneDNN custom operations are on.
        tensorflow.python.framework.errors_impl.AbortedError: Graph execution error:

        Detected at node StatefulPartitionedCall/conv2d_1/convolution defined at (most recent call last):
        Operation received an exception:Status: 3, message: could not create a primitive descriptor.
        \t [[{{node StatefulPartitionedCall/conv2d_1/convolution}}]] [Op:__inference_multi_step_11685]
    """)
    assert benchmark._last_error_line(stderr) == ("Operation received an exception:Status: 3, message: could not "
                                                  "create a primitive descriptor.")
    assert benchmark._last_error_line("Killed\n") == "Killed"
    assert benchmark._last_error_line("") == "no output"


@pytest.mark.parametrize("args, message", [
    (["--precision=float32,float64"], "--precision: give one or more of"),
    (["--reference=.", "--cpu_isa=AVX2"], "--cpu_isa is for the per-setting benchmark"),
])
def test_bad_flags_are_refused(args, message):
    done = subprocess.run([sys.executable, "tools/benchmark_throughput.py", *args], cwd=REPO,
                          capture_output=True, text=True)
    assert done.returncode != 0 and message in done.stderr
