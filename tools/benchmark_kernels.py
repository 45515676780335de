"""Where the training step of the 3-expert ResNet-32 spends its time on this CPU.

    python tools/benchmark_kernels.py [--batch=128] [--reps=20] [--train_steps=4] \\
        [--json=benchmarks/kernels.json]

Writes JSON and a Markdown table beside it. Three parts:
- convolutions: each stride-1 3x3 convolution shape of ResNet-32 (32x32x16, 16x16x32, 8x8x64)
  alone: forward, input gradient and weight gradient, each as its own op whose result is
  returned (an unused forward would be pruned from the graph); median of 7 runs of `--reps`
  calls, in multiply-adds/s beside a 2048 x 2048 float32 matrix product.
- grouped: the three experts' convolutions of stages 2 and 3 run apart against one grouped
  convolution over their stacked channels, forward and both gradients, alternating.
- step: `--train_steps` training steps of the model as `fit` runs them, with one inter-op thread
  so that ops run one at a time and their times add up, in two child processes: one with
  `ONEDNN_VERBOSE=1` (oneDNN's own time of each primitive, grouped by kind) and one without
  (the step's wall time). The difference is TensorFlow's own ops (ReLU gradients, additions,
  pads, slices, the optimizer's arithmetic, mixup) and its executor.
"""

import os
import re
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from balpoe_tf import precision, reporting  # noqa: E402  (sets TF_ENABLE_ONEDNN_OPTS before TensorFlow loads)

flags.DEFINE_integer("batch", 128, "Batch size of the convolutions alone.")
flags.DEFINE_integer("reps", 20, "Calls per timed run of a convolution alone.")
flags.DEFINE_integer("train_steps", 4, "Timed training steps of the step breakdown (0 skips it).")
flags.DEFINE_string("json", "benchmarks/kernels.json", "Where the JSON goes (and .md beside it).")
flags.DEFINE_bool("step_worker", False, "Internal: run the timed training steps in this process.")
FLAGS = flags.FLAGS

STAGE_SHAPES = ((32, 16), (16, 32), (8, 64))  # (height = width, channels) of ResNet-32's stages
STEP_MARK = "timed steps start"
# oneDNN primitive (kind, propagation) -> the name reported.
PRIMITIVES = {("convolution", "forward_training"): "convolution forward",
              ("convolution", "forward_inference"): "convolution forward",
              ("convolution", "backward_data"): "convolution input gradient",
              ("convolution", "backward_weights"): "convolution weight gradient",
              ("batch_normalization", "forward_training"): "batch norm forward",
              ("batch_normalization", "backward"): "batch norm backward",
              ("reorder", "undef"): "reorders (kernels between TensorFlow's and oneDNN's layouts)"}
_CONV_SHAPE = re.compile(r"mb(\d+)_(?:g(\d+))?ic(\d+)oc(\d+)_ih\d+oh(\d+)kh(\d+)\S*?_iw\d+ow(\d+)kw(\d+)")


def conv_multiply_adds(descriptor):
    """Multiply-adds of one convolution (any of its three directions) from oneDNN's shape
    descriptor, e.g. `mb128_ic16oc16_ih32oh32kh3sh1dh0ph1_iw32ow32kw3sw1dw0pw1`; 0 if none."""
    found = _CONV_SHAPE.search(descriptor)
    if not found:
        return 0
    batch, groups, ic, oc, oh, kh, ow, kw = (int(v) if v else 1 for v in found.groups())
    return batch * oc * oh * ow * (ic // groups) * kh * kw


def onednn_times(lines):
    """oneDNN's time (ms) and convolution multiply-adds per primitive kind, summed over the
    `onednn_verbose` execution lines in `lines`."""
    times = {}
    for line in lines:
        fields = line.strip().split(",")
        if not fields[0].endswith("onednn_verbose") or "exec" not in fields:
            continue
        at = fields.index("exec")
        kind, propagation = fields[at + 2], fields[at + 4]
        name = PRIMITIVES.get((kind, propagation), f"other oneDNN ({kind})")
        entry = times.setdefault(name, {"ms": 0.0, "calls": 0, "multiply_adds": 0})
        entry["ms"] += float(fields[-1])
        entry["calls"] += 1
        entry["multiply_adds"] += conv_multiply_adds(fields[-2]) if kind == "convolution" else 0
    return times


def _median_seconds(function, reps, runs=7):
    """Median seconds per call of `function`, over `runs` timed runs of `reps` calls after a
    warm-up run (tracing, oneDNN's primitive creation): benchmark_throughput's timing loop."""
    import benchmark_throughput

    def calls():
        for _ in range(reps):
            out = function()
        [t.numpy() for t in out]

    return 1 / benchmark_throughput._median_rate(calls, reps, runs)


def convolution_rates(batch, size, channels, reps):
    """Seconds and multiply-adds/s of a stride-1 3x3 convolution's forward, input gradient and
    weight gradient alone (NHWC, float32)."""
    import numpy as np
    import tensorflow as tf

    rng = np.random.RandomState(0)
    x = tf.constant(rng.rand(batch, size, size, channels).astype("float32"))
    dy = tf.constant(rng.rand(batch, size, size, channels).astype("float32"))
    kernel = tf.constant(rng.randn(3, 3, channels, channels).astype("float32") * 0.1)
    args = dict(strides=[1, 1, 1, 1], padding="SAME")
    ops = {"forward": lambda: [tf.raw_ops.Conv2D(input=x, filter=kernel, **args)],
           "input gradient": lambda: [tf.raw_ops.Conv2DBackpropInput(
               input_sizes=tf.shape(x), filter=kernel, out_backprop=dy, **args)],
           "weight gradient": lambda: [tf.raw_ops.Conv2DBackpropFilter(
               input=x, filter_sizes=tf.shape(kernel), out_backprop=dy, **args)]}
    macs = batch * size * size * 9 * channels * channels
    row = {"shape": f"{size}x{size}x{channels}", "batch": batch, "multiply_adds": macs}
    for name, op in ops.items():
        seconds = _median_seconds(tf.function(op, autograph=False), reps)
        row[name] = {"ms": 1e3 * seconds, "macs_per_s": macs / seconds}
    return row


def grouped_against_apart(batch, size, channels, experts, reps, pairs=4):
    """Forward and both gradients of `experts` convolutions run apart against one grouped
    convolution over their stacked channels; median ms of alternating runs, and how far apart the
    two computations' losses are (the same maths: float rounding only). Where TensorFlow has no
    kernel for a grouped convolution's gradients (its own kernels have none: TF_ENABLE_ONEDNN_OPTS=0,
    and CPUs on which it does not use oneDNN's), the row says so in "grouped_unavailable"."""
    import numpy as np
    import tensorflow as tf

    rng = np.random.RandomState(0)
    xs = [tf.constant(rng.rand(batch, size, size, channels).astype("float32")) for _ in range(experts)]
    kernels = [tf.Variable(rng.randn(3, 3, channels, channels).astype("float32") * 0.1) for _ in range(experts)]
    stacked_x = tf.concat(xs, -1)
    grouped_kernel = tf.Variable(tf.concat([k.read_value() for k in kernels], -1))

    def forward_and_gradients(inputs, weights):
        with tf.GradientTape() as tape:
            tape.watch(inputs)
            loss = tf.add_n([tf.reduce_sum(tf.square(tf.nn.conv2d(x, k, 1, "SAME"))) for x, k in zip(inputs, weights)])
        return [loss] + tape.gradient(loss, inputs + weights)

    # Nothing for AutoGraph to convert; it would only warn that it cannot read the lambdas.
    apart = tf.function(lambda: forward_and_gradients(xs, kernels), autograph=False)
    grouped = tf.function(lambda: forward_and_gradients([stacked_x], [grouped_kernel]), autograph=False)
    row = {"shape": f"{size}x{size}x{channels}", "experts": experts, "batch": batch}
    try:
        grouped()
    except tf.errors.OpError as e:
        return {**row, "grouped_unavailable": precision.op_error_text(e)}
    ms = {"apart": [], "grouped": []}
    for i in range(pairs):
        for name, fn in (("apart", apart), ("grouped", grouped)) if i % 2 == 0 else (("grouped", grouped),
                                                                                      ("apart", apart)):
            ms[name].append(1e3 * _median_seconds(fn, reps, runs=3))
    apart_loss, grouped_loss = float(apart()[0]), float(grouped()[0])
    return {**row, "apart_ms": statistics.median(ms["apart"]), "grouped_ms": statistics.median(ms["grouped"]),
            "loss_relative_difference": abs(apart_loss - grouped_loss) / abs(apart_loss)}


def run_training_steps(steps):
    """The step worker: warm up, print STEP_MARK, time `steps` training steps, print their ms."""
    import tensorflow as tf

    tf.config.threading.set_inter_op_parallelism_threads(1)
    import benchmark_throughput

    model, x, y = benchmark_throughput._build("resnet32x3", 0)
    iterator = iter(tf.data.Dataset.from_tensors((x, y)).repeat())
    model.make_train_function()
    for _ in range(3):
        float(model.train_function(iterator)["loss"])
    print(STEP_MARK, flush=True)
    start = time.perf_counter()
    for _ in range(steps):
        logs = model.train_function(iterator)
    float(logs["loss"])
    print(f"step_ms {1e3 * (time.perf_counter() - start) / steps}", flush=True)


def step_breakdown(steps):
    """oneDNN's time per primitive kind in one training step against the step's wall time
    (module docstring)."""
    def child(verbose):
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", TF_ENABLE_ONEDNN_OPTS="1")
        env["ONEDNN_VERBOSE"] = "1" if verbose else "0"
        done = subprocess.run([sys.executable, os.path.abspath(__file__), "--step_worker",
                               f"--train_steps={steps}"], env=env, capture_output=True, text=True)
        lines = done.stdout.splitlines()
        if done.returncode or STEP_MARK not in lines:
            raise RuntimeError(f"the step worker failed (exit code {done.returncode}): {done.stderr[-2000:]}")
        lines = lines[lines.index(STEP_MARK) + 1:]
        return lines, float(next(line.split()[1] for line in lines if line.startswith("step_ms ")))

    verbose_lines, verbose_ms = child(verbose=True)
    _, wall_ms = child(verbose=False)
    kinds = {name: {"ms": v["ms"] / steps, "calls": v["calls"] // steps,
                    "multiply_adds": v["multiply_adds"] // steps}
             for name, v in onednn_times(verbose_lines).items()}
    return {"steps": steps, "step_ms": wall_ms, "step_ms_with_verbose": verbose_ms,
            "onednn": kinds,
            "rest_ms": wall_ms - sum(v["ms"] for v in kinds.values())}


def markdown(result):
    peak = result["matmul_peak_macs_per_s"]

    def rate(r):
        return f"{r['ms']:.2f} ms, {r['macs_per_s'] / 1e9:.0f} ({100 * r['macs_per_s'] / peak:.0f} %)"

    lines = [f"float32 matmul peak (2048 x 2048): {peak / 1e9:.0f} GMAC/s", "",
             f"Convolutions alone, batch {result['convolutions'][0]['batch']}: ms, GMAC/s (% of the matmul peak)",
             "", *reporting.markdown_table(["shape", "forward", "input gradient", "weight gradient"], [
                 [r["shape"], rate(r["forward"]), rate(r["input gradient"]), rate(r["weight gradient"])]
                 for r in result["convolutions"]]),
             "", *reporting.markdown_table(
                 ["shape", "experts apart, ms", "one grouped convolution, ms", "apart / grouped"], [
                     [f"{r['shape']} x {r['experts']}", "", f"no kernel: {r['grouped_unavailable']}", ""]
                     if "grouped_unavailable" in r else
                     [f"{r['shape']} x {r['experts']}", f"{r['apart_ms']:.1f}", f"{r['grouped_ms']:.1f}",
                      f"{r['apart_ms'] / r['grouped_ms']:.2f}"] for r in result["grouped"]])]
    step = result.get("step")
    if step:
        parts = sorted(step["onednn"].items(), key=lambda kv: -kv[1]["ms"])
        rows = []
        for name, v in parts + [("the rest (TensorFlow's own ops, executor)", {"ms": step["rest_ms"]})]:
            gmacs = f"{v['multiply_adds'] / v['ms'] / 1e6:.0f}" if v.get("multiply_adds") else ""
            rows.append([name, f"{v['ms']:.1f}", f"{100 * v['ms'] / step['step_ms']:.0f} %", v.get("calls", ""),
                         gmacs])
        lines += ["", f"Training step, 3 experts, batch 128, one inter-op thread: {step['step_ms']:.0f} ms "
                  f"({step['step_ms_with_verbose']:.0f} ms with ONEDNN_VERBOSE)", "",
                  *reporting.markdown_table(["part", "ms per step", "share", "calls", "GMAC/s"], rows)]
    return "\n".join(lines) + "\n"


def main(argv):
    del argv
    if FLAGS.step_worker:
        run_training_steps(FLAGS.train_steps)
        return
    import benchmark_throughput

    result = {"date": time.strftime("%Y-%m-%d"), "cpu_count": os.cpu_count(),
              "matmul_peak_macs_per_s": benchmark_throughput.matmul_peak(),
              "convolutions": [convolution_rates(FLAGS.batch, s, c, FLAGS.reps) for s, c in STAGE_SHAPES],
              "grouped": [grouped_against_apart(FLAGS.batch, s, c, 3, FLAGS.reps // 2 or 1)
                          for s, c in STAGE_SHAPES[1:]]}
    if FLAGS.train_steps:
        result["step"] = step_breakdown(FLAGS.train_steps)
    reporting.write_benchmark(FLAGS.json, result, markdown(result).splitlines())


if __name__ == "__main__":
    app.run(main)
