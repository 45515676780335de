"""Training and inference throughput on this machine's CPU, for each setting of oneDNN
and XLA.

    python tools/benchmark_throughput.py [--models=resnet32x3,resnet32x1,resnet50x3] [--runs=5]

Each (model, oneDNN, XLA) setting runs in its own process (TensorFlow reads
TF_ENABLE_ONEDNN_OPTS once, at import): after a warm-up, `--runs` timed runs of
`--steps` training steps (forward, backward, update, mixup on; timed between step
ends within one `fit`) and of `--steps` predictions; the median is reported, with
peak resident memory and, for the CIFAR models, the input pipeline alone
(augmentation included). Writes JSON and a Markdown table next to it.
"""

import json
import os
import resource
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

# name -> (backbone, experts, batch, image size, classes)
MODELS = {
    "resnet32x3": ("resnet32", 3, 128, 32, 100),
    "resnet32x1": ("resnet32", 1, 128, 32, 100),
    "resnet50x3": ("resnet50", 3, 32, 224, 1000),
}

flags.DEFINE_list("models", list(MODELS), f"Models to measure: {list(MODELS)}.")
flags.DEFINE_list("onednn", ["1", "0"], "TF_ENABLE_ONEDNN_OPTS values to compare.")
flags.DEFINE_list("xla", ["0", "1"], "jit_compile values to compare (0 off, 1 on).")
flags.DEFINE_integer("runs", 5, "Timed runs; the median is reported.")
flags.DEFINE_integer("steps", 5, "Steps per timed run.")
flags.DEFINE_string("output", "benchmarks/throughput.json", "Where the JSON goes (and .md beside it).")
flags.DEFINE_string("worker", "", "Internal: measure one 'model,xla' setting in this process.")
FLAGS = flags.FLAGS


def _median_rate(fn, images_per_call, runs):
    fn()  # warm-up: tracing and the first execution
    rates = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        rates.append(images_per_call / (time.perf_counter() - start))
    return statistics.median(rates)


def _median_train_rate(model, ds, batch, runs, steps):
    """Training images/s, timed between step ends inside one `fit`: leaving `fit` deletes
    its dataset iterator, which here can stall for ~10 s in tf.data's autotuning thread,
    a cost of the benchmark loop, not of training."""
    import keras

    ends = []
    step_ends = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda batch, logs: ends.append(time.perf_counter()))
    model.fit(ds, steps_per_epoch=1 + runs * steps, epochs=1, verbose=0, callbacks=[step_ends])
    # ends[0] closes the warm-up step (tracing and the first execution).
    return statistics.median(steps * batch / (ends[(r + 1) * steps] - ends[r * steps]) for r in range(runs))


def measure(name, xla, runs, steps):
    import balpoe_tf  # noqa: F401  (after the parent set TF_ENABLE_ONEDNN_OPTS)
    import numpy as np
    import tensorflow as tf

    from balpoe_tf import data as lt_data
    from balpoe_tf import losses, models, training

    backbone, experts, batch, size, classes = MODELS[name]
    rng = np.random.RandomState(0)
    model = models.BalPoEModel(classes, experts, backbone, input_shape=(size, size, 3))
    lambdas = list(np.linspace(1, -1, experts)) if experts > 1 else [0.0]
    model.compile(training.SGDWithL2(0.1), losses.LogitAdjustedLoss(np.arange(classes, 0, -1), lambdas),
                  mixup_alpha=0.4, jit_compile=bool(xla))
    x = rng.rand(batch, size, size, 3).astype("float32")
    y = rng.randint(0, classes, batch)
    ds = tf.data.Dataset.from_tensors((x, y)).repeat().prefetch(2)
    result = {"model": name, "backbone": backbone, "experts": experts, "batch": batch,
              "onednn": os.environ.get("TF_ENABLE_ONEDNN_OPTS"), "xla": bool(xla)}
    result["train_images_per_s"] = _median_train_rate(model, ds, batch, runs, steps)
    forward = tf.function(lambda images: model(images, training=False)["logits"], jit_compile=bool(xla),
                          autograph=False)
    images = tf.constant(x)
    result["predict_images_per_s"] = _median_rate(
        lambda: [forward(images).numpy() for _ in range(steps)], steps * batch, runs)
    if size == 32:
        labels = rng.randint(0, classes, 50000)
        data = lt_data.from_arrays("generated", rng.randint(0, 256, (50000, 32, 32, 3), dtype=np.uint8),
                                   labels, np.zeros((1, 32, 32, 3), np.uint8), labels[:1],
                                   mean=lt_data.CIFAR_MEAN, std=lt_data.CIFAR_STD)
        iterator = iter(lt_data.train_pipeline(data, batch, epochs=1000, augment="cifar"))
        result["pipeline_images_per_s"] = _median_rate(
            lambda: [next(iterator) for _ in range(20)], 20 * batch, runs)
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    return result


def markdown(rows):
    lines = ["| model | batch | oneDNN | XLA | train img/s | predict img/s | pipeline img/s | peak RSS MiB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | | {r['onednn']} | {r['xla']} | failed: {r['error'][:80]} | | | |")
            continue
        pipeline = f"{r['pipeline_images_per_s']:.0f}" if "pipeline_images_per_s" in r else "n/a"
        lines.append(f"| {r['model']} | {r['batch']} | {'on' if r['onednn'] == '1' else 'off'} | "
                     f"{'on' if r['xla'] else 'off'} | {r['train_images_per_s']:.1f} | "
                     f"{r['predict_images_per_s']:.1f} | {pipeline} | {r['peak_rss_mib']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv):
    del argv
    if FLAGS.worker:
        name, xla = FLAGS.worker.split(",")
        print("RESULT " + json.dumps(measure(name, int(xla), FLAGS.runs, FLAGS.steps)))
        return
    rows = []
    for name in FLAGS.models:
        if name not in MODELS:
            sys.exit(f"error: unknown model {name!r}; choose from {list(MODELS)}")
        for onednn in FLAGS.onednn:
            for xla in FLAGS.xla:
                env = dict(os.environ, TF_ENABLE_ONEDNN_OPTS=onednn, TF_CPP_MIN_LOG_LEVEL="3")
                done = subprocess.run([sys.executable, __file__, f"--worker={name},{xla}", f"--runs={FLAGS.runs}",
                                       f"--steps={FLAGS.steps}"], env=env, capture_output=True, text=True)
                found = [line[len("RESULT "):] for line in done.stdout.splitlines() if line.startswith("RESULT ")]
                row = json.loads(found[0]) if found else {
                    "model": name, "onednn": onednn, "xla": xla == "1",
                    "error": (done.stderr.strip().splitlines() or ["no output"])[-1]}
                rows.append(row)
                print(json.dumps(row), flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.output)), exist_ok=True)
    with open(FLAGS.output, "w") as f:
        json.dump({"cpu_count": os.cpu_count(), "results": rows}, f, indent=1)
    table_path = os.path.splitext(FLAGS.output)[0] + ".md"
    with open(table_path, "w") as f:
        f.write(markdown(rows))
    print(markdown(rows))
    print(f"wrote {FLAGS.output} and {table_path}")


if __name__ == "__main__":
    app.run(main)
