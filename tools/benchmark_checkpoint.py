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
from balpoe_tf import run_folder  # noqa: E402

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
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.json)), exist_ok=True)
    with open(FLAGS.json, "w") as f:
        json.dump(result, f, indent=1)
    lines = [f"A checkpoint against a training step ({result['date']}, {result['cores']} cores, float32, median of "
             f"{FLAGS.saves})", "", "| model | batch | step | checkpoint | size | checkpoint / step | "
             f"cost every {FLAGS.minutes:g} min |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['model']} | {row['batch']} | {row['step_seconds']:.2f} s | "
                     f"{row['checkpoint_seconds']:.2f} s | {row['checkpoint_mib']:.0f} MiB | "
                     f"{row['checkpoint_over_step']:.2f} | {100 * row['share_at_minutes']:.2f} % |")
    markdown = os.path.splitext(FLAGS.json)[0] + ".md"
    with open(markdown, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {FLAGS.json} and {markdown}")


if __name__ == "__main__":
    app.run(main)
