"""Training and inference throughput on this machine's CPU: for each setting of oneDNN,
XLA, precision and oneDNN instruction set, or paired with the official PyTorch code.

    python tools/benchmark_throughput.py [--models=resnet32x3,resnet32x1,resnet50x3] [--runs=5] \\
        [--precision=float32,mixed_bfloat16] [--cpu_isa=,AVX512_CORE]
    python tools/benchmark_throughput.py --reference=CHECKOUT --reference_python=TORCH_PYTHON \\
        [--models=resnet32x3,resnet32x1] [--pairs=5] [--steps=5]

Each (model, oneDNN, XLA, precision, instruction set) setting runs in its own process
(TensorFlow reads TF_ENABLE_ONEDNN_OPTS once, at import; `--cpu_isa` sets oneDNN's
ONEDNN_MAX_CPU_ISA, which caps the instructions it uses, to see how a precision runs on a
CPU without this one's newer extensions; empty: the environment's, by default no cap):
after a warm-up, `--runs` timed runs of `--steps` training steps (forward, backward,
update, mixup on; timed between step ends within one `fit`) and of `--steps` predictions;
the median is reported, with peak resident memory and, for the CIFAR models, the input
pipeline alone (augmentation included). Writes JSON and a Markdown table next to it.

With `--reference` (a checkout of emasa/BalPoE-CalibratedLT, run by a Python that has
PyTorch; PyTorch is not a dependency of balpoe_tf), this implementation and the official
code run side by side: one long-lived worker process each
(`benchmarks/official/throughput_official.py` on the official side), both warmed up, then
`--pairs` pairs in alternating order (ours first in even pairs, the official code first in
odd ones) of `--steps` training steps and `--steps` predictions each, and the exported
SavedModel's `predict_tensor` signature next to ours. Reported: each pair's ratio, their
median and range, for training and prediction; and the SavedModel's ratio to the Keras
model. Machine speed drifts; ratios of neighbouring measurements are what hold.
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

from balpoe_tf import reporting  # noqa: E402

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
flags.DEFINE_string("output", "benchmarks/settings.json", "Where the JSON goes (and .md beside it); with "
                    "--reference, default benchmarks/vs_official_<precision>.json.")
flags.DEFINE_string("worker", "", "Internal: measure one 'model,xla' setting in this process.")
flags.DEFINE_bool("interactive", False, "Internal: the worker answers train/predict/serve requests on stdin.")
flags.DEFINE_string("reference", "", "Checkout of the official code: measure it and ours in pairs.")
flags.DEFINE_string("reference_python", "python", "Python interpreter with PyTorch, for --reference.")
flags.DEFINE_integer("pairs", 5, "Alternating pairs with --reference.")
# balpoe_tf.run_config.PRECISIONS, not imported: this parent process stays free of TensorFlow.
PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")
flags.DEFINE_list("precision", ["float32"], f"Keras precision policies to measure, of {PRECISIONS}; with "
                  "--reference, of our side (the official code runs float32).")
flags.register_validator("precision", lambda values: bool(values) and set(values) <= set(PRECISIONS),
                         f"--precision: give one or more of {PRECISIONS}, comma-separated")
flags.DEFINE_list("cpu_isa", [""], "ONEDNN_MAX_CPU_ISA values to compare, e.g. AVX512_CORE, AVX2 (empty: "
                  "the environment's, by default none); not with --reference.")
FLAGS = flags.FLAGS

OFFICIAL_WORKER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               "benchmarks", "official", "throughput_official.py")


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


def _build(name, xla, precision="float32"):
    """The model of `name` in the Keras precision policy `precision`, compiled as training
    compiles it, and one random batch."""
    import balpoe_tf  # noqa: F401  (after the parent set TF_ENABLE_ONEDNN_OPTS)
    import numpy as np

    import keras

    from balpoe_tf import losses, task, training

    keras.mixed_precision.set_global_policy(precision)
    backbone, experts, batch, size, classes = MODELS[name]
    rng = np.random.RandomState(0)
    model = task.BalPoEModel(classes, experts, backbone, input_shape=(size, size, 3))
    lambdas = list(np.linspace(1, -1, experts)) if experts > 1 else [0.0]
    model.compile(training.SGDWithL2(0.1), losses.LogitAdjustedLoss(np.arange(classes, 0, -1), lambdas),
                  mixup_alpha=0.4, jit_compile=bool(xla))
    return model, rng.rand(batch, size, size, 3).astype("float32"), rng.randint(0, classes, batch)


def measure(name, xla, runs, steps, precision="float32"):
    import numpy as np
    import tensorflow as tf

    from balpoe_tf import data as lt_data
    from balpoe_tf import models

    model, x, y = _build(name, xla, precision)
    backbone, experts, batch, size, classes = MODELS[name]
    ds = tf.data.Dataset.from_tensors((x, y)).repeat().prefetch(2)
    result = {"model": name, "backbone": backbone, "experts": experts, "batch": batch,
              "onednn": os.environ.get("TF_ENABLE_ONEDNN_OPTS"), "xla": bool(xla), "precision": precision,
              "cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA", "")}
    result["train_images_per_s"] = _median_train_rate(model, ds, batch, runs, steps)
    forward = models.forward_function(model, jit_compile=bool(xla))
    images = tf.constant(x)
    result["predict_images_per_s"] = _median_rate(
        lambda: [forward(images)["logits"].numpy() for _ in range(steps)], steps * batch, runs)
    if size == 32:
        rng = np.random.RandomState(0)
        labels = rng.randint(0, classes, 50000)
        data = lt_data.from_arrays("generated", rng.randint(0, 256, (50000, 32, 32, 3), dtype=np.uint8),
                                   labels, np.zeros((1, 32, 32, 3), np.uint8), labels[:1],
                                   mean=lt_data.CIFAR_MEAN, std=lt_data.CIFAR_STD)
        iterator = iter(lt_data.train_pipeline(data, batch, epochs=1000, augment="cifar"))
        result["pipeline_images_per_s"] = _median_rate(
            lambda: [next(iterator) for _ in range(20)], 20 * batch, runs)
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    return result


def multiply_adds(function, *specs):
    """Multiply-adds of one call of a `tf.function`, as TensorFlow's profiler counts its graph's
    floating-point operations (convolutions and their gradients, matrix products; the few
    elementwise ops count as half a multiply-add each)."""
    import tensorflow as tf

    graph = function.get_concrete_function(*specs).graph
    options = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
    options["output"] = "none"
    return tf.compat.v1.profiler.profile(graph, options=options).total_float_ops / 2


def matmul_peak(size=2048, runs=5):
    """Multiply-adds per second of a large float32 matrix product: the practical peak of this
    CPU for TensorFlow (median of `runs`)."""
    import tensorflow as tf

    a, b = tf.random.normal([size, size]), tf.random.normal([size, size])
    product = tf.function(tf.matmul)
    return _median_rate(lambda: product(a, b).numpy(), size ** 3, runs)


def serve_requests(name, xla, steps, precision="float32"):
    """Worker of the paired benchmark: answers `train`, `predict` and `serve` lines on stdin
    with the images/s of `steps` training steps (the train function `fit` runs), `steps`
    forward passes of the Keras model, or `steps` calls of the exported SavedModel's
    `predict_tensor` signature; `peak` with `matmul_peak`. Its `ready` line gives the
    multiply-adds per image of a training step and of a prediction."""
    import tempfile

    import tensorflow as tf

    from balpoe_tf import export, models

    model, x, y = _build(name, xla, precision)
    batch, classes = MODELS[name][2], MODELS[name][4]
    model.make_train_function()
    iterator = iter(tf.data.Dataset.from_tensors((x, y)).repeat())
    forward = models.forward_function(model, jit_compile=bool(xla))
    images = tf.constant(x)
    with tempfile.TemporaryDirectory() as folder:
        path = export.export_saved_model(model, folder, [0.0] * 3, [1.0] * 3, range(classes), [1] * classes, 0.0)
        signature = tf.saved_model.load(path).signatures["predict_tensor"]

    def train():
        for _ in range(steps):
            logs = model.train_function(iterator)
        float(logs["loss"])

    jobs = {"train": train,
            "predict": lambda: [forward(images)["logits"].numpy() for _ in range(steps)],
            "serve": lambda: [signature(images=images)["logits"].numpy() for _ in range(steps)]}
    for job in jobs.values():  # warm-up: tracing and first executions
        job()
    image_spec, label_spec = tf.TensorSpec(x.shape, tf.float32), tf.TensorSpec(y.shape, tf.int32)
    facts = {"version": f"tensorflow {tf.__version__}",
             "train_macs_per_image": multiply_adds(tf.function(lambda i, l: model.train_step((i, l))),
                                                   image_spec, label_spec) / batch,
             "predict_macs_per_image": multiply_adds(forward, image_spec) / batch}
    print("ready " + json.dumps(facts), flush=True)
    for line in sys.stdin:
        job = line.strip()
        if job == "quit":
            break
        if job == "peak":
            print(f"peak {matmul_peak()}", flush=True)
            continue
        start = time.perf_counter()
        jobs[job]()
        print(f"{job} {steps * batch / (time.perf_counter() - start)}", flush=True)


class _Worker:
    """A long-lived measuring process spoken to line by line."""

    def __init__(self, command, env=None):
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.ready = self._read("ready")

    def _read(self, prefix):
        for line in self.process.stdout:
            if line.startswith(prefix + " ") or line.strip() == prefix:
                return line[len(prefix):].strip()
        raise RuntimeError(f"{self.process.args[:2]} ended before answering {prefix!r} "
                           f"(exit code {self.process.wait()}); its error output is above")

    def ask(self, job):
        self.process.stdin.write(job + "\n")
        self.process.stdin.flush()
        return float(self._read(job))

    def close(self):
        self.process.stdin.write("quit\n")
        self.process.stdin.close()
        self.process.wait()


def _ratio_summary(ratios):
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios),
            "pairs": [round(r, 4) for r in ratios]}


def paired(name, reference, reference_python, pairs, steps, precision="float32"):
    """Ours and the official code in alternating pairs (module docstring); returns a JSON row."""
    experts, batch, classes = MODELS[name][1], MODELS[name][2], MODELS[name][4]
    env = dict(os.environ, TF_ENABLE_ONEDNN_OPTS="1", TF_CPP_MIN_LOG_LEVEL="3")
    ours = _Worker([sys.executable, __file__, f"--worker={name},0", "--interactive", f"--steps={steps}",
                    f"--precision={precision}"], env)
    official = _Worker([reference_python, OFFICIAL_WORKER, f"--official={reference}", f"--experts={experts}",
                        f"--batch={batch}", f"--classes={classes}", f"--steps={steps}"])
    rates = {"ours_train": [], "official_train": [], "ours_predict": [], "official_predict": [], "ours_serve": []}
    peaks = []
    for i in range(pairs):
        order = [("ours", ours), ("official", official)]
        for job in ("train", "predict"):
            for side, worker in order if i % 2 == 0 else order[::-1]:
                rates[f"{side}_{job}"].append(worker.ask(job))
        rates["ours_serve"].append(ours.ask("serve"))
        peaks.append(ours.ask("peak"))
    ours.close()
    official.close()
    ratio = lambda a, b: _ratio_summary([p / q for p, q in zip(rates[a], rates[b])])  # noqa: E731
    facts = json.loads(ours.ready)
    # Both sides compute the same model, so the official code's rate uses our count too.
    macs = {side: statistics.median(rates[f"{side}_train"]) * facts["train_macs_per_image"]
            for side in ("ours", "official")}
    return {"model": name, "experts": experts, "batch": batch, "steps": steps, "precision": precision,
            "ours": facts["version"],
            "official": official.ready, "images_per_s": rates,
            "train_macs_per_image": facts["train_macs_per_image"],
            "predict_macs_per_image": facts["predict_macs_per_image"],
            "matmul_peak_macs_per_s": statistics.median(peaks),
            "train_macs_per_s": macs,
            "train_ratio": ratio("ours_train", "official_train"),
            "predict_ratio": ratio("ours_predict", "official_predict"),
            "serve_to_keras_ratio": ratio("ours_serve", "ours_predict")}


def paired_markdown(rows):
    span = lambda r: f"{r['median']:.2f} ({r['min']:.2f}–{r['max']:.2f})"  # noqa: E731
    med = lambda values: f"{statistics.median(values):.0f}"  # noqa: E731
    table = []
    for r in rows:
        v = r["images_per_s"]
        model = r["model"] if r.get("precision", "float32") == "float32" else f"{r['model']}, {r['precision']}"
        table.append([model, len(v["ours_train"]), f"{med(v['ours_train'])} / {med(v['official_train'])}",
                      span(r["train_ratio"]), f"{med(v['ours_predict'])} / {med(v['official_predict'])}",
                      span(r["predict_ratio"]), span(r["serve_to_keras_ratio"]),
                      " / ".join(f"{r['train_macs_per_s'][side] / 1e9:.0f} "
                                 f"({100 * r['train_macs_per_s'][side] / r['matmul_peak_macs_per_s']:.0f} %)"
                                 for side in ("ours", "official"))])
    peak = statistics.median(r["matmul_peak_macs_per_s"] for r in rows)
    return "\n".join(reporting.markdown_table(
        ["model", "pairs", "train img/s ours / official", "train ratio (range)", "predict img/s ours / official",
         "predict ratio (range)", "SavedModel / Keras (range)", "training GMAC/s ours / official (% of matmul peak)"],
        table) + ["", f"float32 matmul peak (2048 x 2048, TensorFlow): {peak / 1e9:.0f} GMAC/s"]) + "\n"


def _last_error_line(stderr):
    """The line of a failed worker's stderr that says what failed: TensorFlow's graph errors end
    with node names, after the line that gives the cause."""
    lines = stderr.strip().splitlines() or ["no output"]
    causes = [line.strip() for line in lines if "error" in line.lower() or "exception" in line]
    return (causes or lines)[-1]


def markdown(rows):
    table = []
    for r in rows:
        setting = ["on" if r["onednn"] == "1" else "off", "on" if r["xla"] else "off", r["precision"],
                   r["cpu_isa"] or "none"]
        if "error" in r:
            table.append([r["model"], "", *setting, f"failed: {r['error'][:160]}", "", "", ""])
            continue
        pipeline = f"{r['pipeline_images_per_s']:.0f}" if "pipeline_images_per_s" in r else "n/a"
        table.append([r["model"], r["batch"], *setting, f"{r['train_images_per_s']:.1f}",
                      f"{r['predict_images_per_s']:.1f}", pipeline, f"{r['peak_rss_mib']:.0f}"])
    return "\n".join(reporting.markdown_table(["model", "batch", "oneDNN", "XLA", "precision", "oneDNN ISA cap",
                                               "train img/s", "predict img/s", "pipeline img/s", "peak RSS MiB"],
                                              table)) + "\n"


def main(argv):
    del argv
    for name in FLAGS.models:
        if name not in MODELS:
            sys.exit(f"error: unknown model {name!r}; choose from {list(MODELS)}")
    if FLAGS.worker:
        name, xla = FLAGS.worker.split(",")
        if FLAGS.interactive:
            serve_requests(name, int(xla), FLAGS.steps, FLAGS.precision[0])
        else:
            print("RESULT " + json.dumps(measure(name, int(xla), FLAGS.runs, FLAGS.steps, FLAGS.precision[0])))
        return
    if FLAGS.reference:
        if FLAGS["cpu_isa"].present:
            sys.exit("error: --cpu_isa is for the per-setting benchmark, not with --reference")
        if not os.path.isfile(os.path.join(FLAGS.reference, "model", "model.py")):
            sys.exit(f"error: --reference={FLAGS.reference}: not a checkout of emasa/BalPoE-CalibratedLT "
                     "(no model/model.py); clone it and pass its folder")
        if not FLAGS["output"].present:
            FLAGS.output = f"benchmarks/vs_official_{FLAGS.precision[0].replace('mixed_', '')}.json"
        rows = []
        names = FLAGS.models if FLAGS["models"].present else [n for n in MODELS if MODELS[n][0] == "resnet32"]
        if any(MODELS[n][0] != "resnet32" for n in names):
            sys.exit(f"error: --models={','.join(names)}: --reference compares the ResNet-32 models only "
                     "(the official worker builds its ResNet32Model)")
        for name in names:
            for precision in FLAGS.precision:
                rows.append(paired(name, FLAGS.reference, FLAGS.reference_python, FLAGS.pairs, FLAGS.steps,
                                   precision))
                print(json.dumps(rows[-1]), flush=True)
        _write(rows, paired_markdown(rows))
        return
    rows = []
    settings = [(name, onednn, xla, precision, isa) for name in FLAGS.models for onednn in FLAGS.onednn
                for xla in FLAGS.xla for precision in FLAGS.precision for isa in FLAGS.cpu_isa]
    for name, onednn, xla, precision, isa in settings:
        env = dict(os.environ, TF_ENABLE_ONEDNN_OPTS=onednn, TF_CPP_MIN_LOG_LEVEL="3")
        if isa:
            env["ONEDNN_MAX_CPU_ISA"] = isa
        done = subprocess.run([sys.executable, __file__, f"--worker={name},{xla}", f"--runs={FLAGS.runs}",
                               f"--steps={FLAGS.steps}", f"--precision={precision}"],
                              env=env, capture_output=True, text=True)
        found = [line[len("RESULT "):] for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        row = json.loads(found[0]) if found else {
            "model": name, "onednn": onednn, "xla": xla == "1", "precision": precision,
            "cpu_isa": env.get("ONEDNN_MAX_CPU_ISA", ""),
            "error": _last_error_line(done.stderr)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    _write(rows, markdown(rows))


def _write(rows, table: str):
    reporting.write_benchmark(FLAGS.output, {"cpu_count": os.cpu_count(), "date": time.strftime("%Y-%m-%d"),
                                             "results": rows}, table.splitlines())


if __name__ == "__main__":
    app.run(main)
