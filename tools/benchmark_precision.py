"""What `--precision=auto` decides on this machine, and what deciding costs.

    python tools/benchmark_precision.py [--flagfiles=configs/demo.flags,configs/cifar100_ir100.flags] \\
        [--json=benchmarks/precision_auto.json] [--output_dir=RUN]

For each flag file: its run's data (CIFAR, which tests and this tool do not download, is
replaced by generated images of CIFAR's shape with the run's long-tailed class counts), then
`run_precision.choose_precision` as `tools/train.py` calls it for a new run, timed twice: with an
empty cache (the first run of this model on this machine: measuring) and again (cached). The run
folder is a new temporary one unless `--output_dir` names one: a run the flag file's own
`--output_dir` holds (README's finished demo, say) is neither read nor written. Writes JSON and a
Markdown table beside it.
"""

import dataclasses
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import balpoe_tf  # noqa: E402  (TensorFlow defaults before TF loads)

balpoe_tf.import_tensorflow_quietly()
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

from balpoe_tf import cli, precision, reporting, run_config, run_data, run_precision  # noqa: E402
from balpoe_tf import data as lt_data  # noqa: E402

flags.DEFINE_list("flagfiles", ["configs/demo.flags", "configs/cifar100_ir100.flags"], "Runs to decide for.")
flags.DEFINE_string("json", "benchmarks/precision_auto.json", "Where the JSON goes (and .md beside it).")
flags.DEFINE_string("output_dir", "", "The run folder to decide for (a run there resumes in its own precision); "
                                      "default: a new temporary one, whatever the flag files say.")
FLAGS = flags.FLAGS

# Sources not on this machine: (classes, training images per class, image shape).
GENERATED = {"cifar10": (10, 5000, (32, 32, 3)), "cifar100": (100, 500, (32, 32, 3))}


def load(config: run_config.RunConfig) -> lt_data.LabeledData:
    if config.dataset not in GENERATED:
        return run_data.load_data(config)
    classes, per_class, shape = GENERATED[config.dataset]
    rng = np.random.RandomState(0)
    labels = np.repeat(np.arange(classes), per_class)
    data = lt_data.from_arrays(f"generated {config.dataset}", rng.randint(0, 256, (len(labels), *shape), np.uint8),
                               labels, np.zeros((classes, *shape), np.uint8), np.arange(classes),
                               mean=lt_data.CIFAR_MEAN, std=lt_data.CIFAR_STD)
    return lt_data.make_long_tailed(data, config.imbalance_ratio)


def decide(flagfile: str) -> dict:
    values = flags.FlagValues()
    cli.define_flags(run_config.RunConfig, values)
    values(["tool", f"--flagfile={flagfile}"])
    config = cli.config_from_flags(run_config.RunConfig, values)
    data = load(config)
    strategy, gpus, cpu = tf.distribute.get_strategy(), precision.gpu_capabilities(), precision.cpu_flags()
    row = {"flagfile": flagfile, "data": data.name, "training_images": len(data.train), "epochs": config.epochs}
    with tempfile.TemporaryDirectory() as cache, tempfile.TemporaryDirectory() as run:
        config = dataclasses.replace(config, output_dir=FLAGS.output_dir or run)
        os.environ["BALPOE_TF_CACHE_DIR"] = cache
        for when in ("first", "cached"):
            start = time.perf_counter()
            choice = run_precision.choose_precision(config, data, strategy, gpus, cpu)
            row[f"{when}_seconds"] = time.perf_counter() - start
            row.setdefault("choice", dataclasses.replace(choice, cache="").to_dict())
        row["cached_choice"] = choice.precision
    print(json.dumps(row), flush=True)
    return row


def main(argv):
    del argv
    rows = [decide(f) for f in FLAGS.flagfiles]
    result = {"date": time.strftime("%Y-%m-%d"), "cpu": precision.cpu_model(),
              "candidates": list(precision.runnable_candidates(precision.gpu_capabilities(), precision.cpu_flags())),
              "tensorflow": tf.__version__, "runs": rows}
    table = []
    for row in rows:
        choice = row["choice"]
        rates = ", ".join(f"{p} {r:.0f}" for p, r in choice["rates"].items()) or "-"
        table.append([row["flagfile"], choice["precision"], choice["how"], rates,
                      f"{row['first_seconds']:.2f} s", f"{row['cached_seconds']:.3f} s"])
    reporting.write_benchmark(FLAGS.json, result, [
        f"`--precision=auto` on {result['cpu']} ({result['date']}, TensorFlow {result['tensorflow']}; "
        f"candidates: {', '.join(result['candidates']) or 'none'})", ""] + reporting.markdown_table(
        ["flag file", "chosen", "how", "training images/s", "deciding, first run", "deciding, cached"], table))


if __name__ == "__main__":
    app.run(main)
