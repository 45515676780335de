"""What a checkpoint inside an epoch costs, against a training step.

    python tools/benchmark_checkpoint.py [--checkpoint_models=resnet32x3,resnet50x3] [--saves=5] \\
        [--json=benchmarks/checkpoint.json]

For each model of `tools/benchmark_throughput.py` (its batch and image size, float32): the
median of `--saves` training steps and of `--saves` checkpoints as training writes them
(`run_folder.save_atomic`: the model, its optimizer state and schedule, to a temporary file
renamed into place), alternating, and their ratio; with it what `--checkpoint_every_minutes`
costs (a checkpoint's time over the minutes between two). Writes JSON and a Markdown table.
"""

import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import balpoe_tf  # noqa: E402  (TensorFlow defaults before TF loads)

balpoe_tf.import_tensorflow_quietly()

from absl import app, flags  # noqa: E402

import benchmark_throughput  # noqa: E402  (this folder: the models and how they are built)
from balpoe_tf import reporting, run_folder  # noqa: E402

flags.DEFINE_list("checkpoint_models", ["resnet32x3", "resnet50x3"], "Models of benchmark_throughput.MODELS.")
flags.DEFINE_integer("saves", 5, "Timed steps and checkpoints each; medians are reported.")
flags.DEFINE_float("minutes", 10.0, "The --checkpoint_every_minutes whose cost is reported.")
flags.DEFINE_string("json", "benchmarks/checkpoint.json", "Where the JSON goes (and .md beside it).")
FLAGS = flags.FLAGS


def measure(name: str) -> dict:
    import tensorflow as tf

    model, x, y = benchmark_throughput._build(name, 0)
    batch = benchmark_throughput.MODELS[name][2]
    iterator = iter(tf.data.Dataset.from_tensors((x, y)).repeat())
    model.make_train_function()

    def step():
        float(model.train_function(iterator)["loss"])

    steps, saves = [], []
    with tempfile.TemporaryDirectory() as folder:
        path = run_folder.checkpoint_path(folder, 1, 7)
        step()  # tracing and the first execution
        run_folder.save_atomic(model, path)  # the first save builds what saving needs
        for _ in range(FLAGS.saves):
            start = time.perf_counter()
            step()
            steps.append(time.perf_counter() - start)
            start = time.perf_counter()
            run_folder.save_atomic(model, path)
            saves.append(time.perf_counter() - start)
        size = os.path.getsize(path)
    step_s, save_s = statistics.median(steps), statistics.median(saves)
    row = {"model": name, "batch": batch, "step_seconds": step_s, "checkpoint_seconds": save_s,
           "checkpoint_mib": size / 2 ** 20, "checkpoint_over_step": save_s / step_s,
           "share_at_minutes": save_s / (60 * FLAGS.minutes), "minutes": FLAGS.minutes}
    print(json.dumps(row), flush=True)
    return row


def main(argv):
    del argv
    rows = [measure(name) for name in FLAGS.checkpoint_models]
    result = {"date": time.strftime("%Y-%m-%d"), "cores": len(os.sched_getaffinity(0)), "runs": rows}
    table = reporting.markdown_table(
        ["model", "batch", "step", "checkpoint", "size", "checkpoint / step", f"cost every {FLAGS.minutes:g} min"],
        [[r["model"], r["batch"], f"{r['step_seconds']:.2f} s", f"{r['checkpoint_seconds']:.2f} s",
          f"{r['checkpoint_mib']:.0f} MiB", f"{r['checkpoint_over_step']:.2f}", f"{100 * r['share_at_minutes']:.2f} %"]
         for r in rows])
    reporting.write_benchmark(FLAGS.json, result, [
        f"A checkpoint against a training step ({result['date']}, {result['cores']} cores, float32, median of "
        f"{FLAGS.saves})", "", *table])


if __name__ == "__main__":
    app.run(main)
