"""The precision a run computes in: what the hardware computes natively, and for
`--precision=auto` a short timed comparison of the candidates on the run's own model and
batch, made once per machine, software and model shape and cached.

CPU flags alone do not tell which precision trains faster: bfloat16 trained 1.57x as fast as
float32 on an AMD EPYC with AVX512-BF16 and 0.65x on an Intel Xeon with the same flag
(docs/performance.md, "Precision"), so auto measures.
"""

import dataclasses
import functools
import hashlib
import json
import math
import os
import platform
import re
import statistics
import time
from typing import Callable, Dict, Optional, Sequence

from balpoe_tf.config import RunError

# Keras precision policies a run can compute in.
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")

# A mixed precision is chosen only when it trains at least this much faster than float32:
# below it, the difference is within the noise of a short measurement and float32 (the
# official code's maths) is kept.
MIN_SPEEDUP = 1.05

# x86 CPU features (/proc/cpuinfo flags) with which a CPU computes a mixed precision in its own
# arithmetic. Without them TensorFlow emulates it (in oneDNN on AVX-512, through Eigen otherwise),
# which trains slower than float32 (docs/performance.md, "Precision").
NATIVE_CPU_FEATURES = {"mixed_bfloat16": ("avx512_bf16", "amx_bf16", "avx_ne_convert"),
                       "mixed_float16": ("avx512_fp16", "amx_fp16", "avx_ne_convert")}

# The CPU features with which bfloat16 can train faster than float32, so auto measures it:
# AVX512-BF16 computes bfloat16 dot products, AMX-BF16 adds matrix units. AVX-NE-CONVERT only
# converts to and from bfloat16. float16 is not measured on CPUs: TensorFlow trains it there
# through conversions (0.12x float32 measured) and no run here has shown its accuracy.
AUTO_CPU_FEATURES = {"mixed_bfloat16": ("avx512_bf16", "amx_bf16")}

# GPUs compute bfloat16 from compute capability 8.0 (Ampere) and float16 from 7.0 (Volta).
AUTO_GPU_CAPABILITY = {"mixed_bfloat16": (8, 0), "mixed_float16": (7, 0)}


def _cpuinfo_value(key: str, cpuinfo: str) -> Optional[str]:
    """The value of `key` for the first processor listed in `cpuinfo`, or None where it is absent
    or the file cannot be read (not Linux)."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith(key):
                    return line.split(":", 1)[1]
    except OSError:
        pass
    return None


def cpu_flags(cpuinfo: str = "/proc/cpuinfo"):
    """This CPU's x86 feature flags, or None where they cannot be read (not Linux, not x86).

    Args:
        cpuinfo: the file to read them from.

    Returns:
        The set of flags of the first processor listed, or None.
    """
    flags = _cpuinfo_value("flags", cpuinfo)
    return None if flags is None else set(flags.split())


def cpu_model(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The CPU's model name (Linux), or the platform's description of the processor."""
    name = _cpuinfo_value("model name", cpuinfo)
    return name.strip() if name is not None else platform.processor() or platform.machine()


def gpu_capabilities() -> list:
    """The CUDA compute capability `(major, minor)` of each GPU TensorFlow sees (None where
    a GPU does not report one); [] without a GPU."""
    import tensorflow as tf

    return [tf.config.experimental.get_device_details(gpu).get("compute_capability")
            for gpu in tf.config.list_physical_devices("GPU")]


def emulated_precision_warning(precision: str, has_gpu: bool, flags) -> str:
    """A warning line when `precision` would run emulated on this machine's CPU, else "".

    Args:
        precision: the Keras precision policy of the run.
        has_gpu: whether TensorFlow sees a GPU (then the CPU does not compute the model).
        flags: the CPU's feature flags from `cpu_flags` (None: unknown, no warning).
    """
    features = NATIVE_CPU_FEATURES.get(precision)
    if not features or has_gpu or flags is None or flags & set(features):
        return ""
    return (f"warning: --precision={precision} on a CPU without {', '.join(features[:-1])} or {features[-1]}: "
            "TensorFlow emulates it, which trains slower than float32, not faster (docs/performance.md, "
            "\"Precision\"); use --precision=float32")


@functools.lru_cache(maxsize=None)
def kernel_problem(precision: str) -> str:
    """Why TensorFlow cannot compute `precision` in this process, or "" where it can: one tiny
    convolution, forward and both gradients, in the policy's compute dtype.

    TensorFlow sends a mixed precision's convolutions to oneDNN when the CPU's own feature
    flags allow it; a process that caps oneDNN below them (ONEDNN_MAX_CPU_ISA=AVX2 on an
    AVX-512 CPU) then has no kernel for them, while a CPU that really lacks AVX-512 runs them
    through TensorFlow's own (emulated) kernels. Trying is the only sure way to know.
    """
    if precision == "float32":
        return ""
    import tensorflow as tf

    dtype = tf.bfloat16 if "bfloat16" in precision else tf.float16
    images, kernel = tf.ones((1, 4, 4, 2), dtype), tf.ones((3, 3, 2, 2), dtype)
    try:
        with tf.GradientTape() as tape:
            tape.watch([images, kernel])
            loss = tf.reduce_sum(tf.nn.conv2d(images, kernel, 1, "SAME"))
        tape.gradient(loss, [images, kernel])
    except tf.errors.OpError as e:
        return op_error_text(e)
    return ""


def op_error_text(error) -> str:
    """A TensorFlow op error in one short line: its type and what the kernel said, without the
    graph function's name or oneDNN's advice to rerun verbosely."""
    detail = re.sub(r"\{\{.*?\}\}|Operation received an exception:", "", error.message).strip().splitlines()[0]
    return f"{type(error).__name__}: {detail.split('. Run workload')[0].strip()[:200]}"


def require_kernels(precision: str) -> None:
    """Raise `RunError`, naming the cause and the fix, where TensorFlow cannot compute
    `precision` in this process (`kernel_problem`)."""
    problem = kernel_problem(precision)
    if not problem:
        return
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA")
    cause = (f"ONEDNN_MAX_CPU_ISA={cap} caps oneDNN below the instructions TensorFlow sends "
             f"{precision.replace('mixed_', '')} convolutions to on this CPU; unset it, or use "
             if cap else "use ")
    raise RunError(f"precision {precision}: TensorFlow has no convolution kernel for it in this process "
                   f"({problem}); {cause}--precision=float32")


def auto_candidates(gpus: list, flags) -> tuple:
    """The mixed precisions `auto` measures against float32 on this machine: those its
    hardware computes natively (on GPUs, every GPU must). Elsewhere they are emulated and
    slower, so nothing is measured and auto is float32.

    Args:
        gpus: `gpu_capabilities()`.
        flags: the CPU's feature flags from `cpu_flags` (None: unknown).
    """
    if gpus:
        if any(capability is None for capability in gpus):
            return ()
        return tuple(p for p, least in AUTO_GPU_CAPABILITY.items()
                     if all(tuple(capability) >= least for capability in gpus))
    if flags is None:
        return ()
    return tuple(p for p, features in AUTO_CPU_FEATURES.items() if flags & set(features))


def runnable_candidates(gpus: list, flags) -> tuple:
    """`auto_candidates` that TensorFlow has kernels for in this process (`kernel_problem`): one
    it has none for (a capped oneDNN) could not even be measured."""
    return tuple(p for p in auto_candidates(gpus, flags) if not kernel_problem(p))


@dataclasses.dataclass
class PrecisionChoice:
    """The precision a run computes in and why.

    Attributes:
        precision: a Keras precision policy name.
        how: "given" (--precision named it), "measured", "cached" (measured earlier on this
            machine for this model shape), "short run" (training too short for measuring the
            candidates to pay), "no candidate" (the hardware computes no mixed precision
            natively), "resumed" (the precision the run started with), "compared" (the
            precision of the run a baseline is compared with) or "agreed" (a multi-worker
            run's precision, from every worker's measurement).
        rates: training images/s of each precision measured (empty when none was).
        speedups: each candidate's training speed relative to float32, the median of
            side-by-side rounds.
        cache: the cache file the measurement was read from or written to.
        run_seconds: for a short run, its estimated training time in float32.
        measuring_cost: for a short run, the estimated seconds measuring the candidates takes.
        task: what was measured: "training" or "prediction".
    """

    precision: str
    how: str
    rates: Dict[str, float] = dataclasses.field(default_factory=dict)
    speedups: Dict[str, float] = dataclasses.field(default_factory=dict)
    cache: str = ""
    run_seconds: float = 0.0
    measuring_cost: float = 0.0
    task: str = "training"

    def summary(self) -> str:
        """One line for the run's log."""
        reasons = {
            "given": f"--precision={self.precision}",
            "no candidate": "--precision=auto: this hardware computes no mixed precision natively, nothing to measure",
            "resumed": "--precision=auto: the precision this run started with",
            "compared": "--precision=auto: the precision of the run this baseline is compared with",
            "agreed": "--precision=auto: the precision every worker measured fastest (mixed only where "
                      f"every worker measured it {MIN_SPEEDUP:.2f}x float32's speed)",
            "short run": f"--precision=auto: training takes about {self.run_seconds:.0f} s in float32, too short "
                         f"to repay measuring a mixed precision (about {self.measuring_cost:.1f} s)",
        }
        if self.how in reasons:
            return f"precision {self.precision} ({reasons[self.how]})"
        measured = ", ".join(f"{p} {self.rates[p]:.0f}" for p in sorted(self.rates, key=self.rates.get,
                                                                        reverse=True))
        ratios = ", ".join(f"{p} {s:.2f}x float32" for p, s in self.speedups.items())
        where = "measured now" if self.how == "measured" else "measured earlier"
        return (f"precision {self.precision} (--precision=auto, {where} on this machine and model: "
                f"{self.task} images/s {measured}; {ratios}; a mixed precision needs {MIN_SPEEDUP:.2f}x"
                + (f"; cache {self.cache}" if self.cache else "") + ")")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def decide(speedups: Dict[str, float], rates: Dict[str, float]) -> str:
    """The fastest candidate if it beats float32 by `MIN_SPEEDUP` both in the median of the
    side-by-side ratios and in the median rates (a short measurement of a small model is
    noisy enough for the two to disagree); otherwise float32."""
    fast = [p for p, s in speedups.items() if s >= MIN_SPEEDUP and rates[p] >= MIN_SPEEDUP * rates["float32"]]
    return max(fast, key=speedups.get) if fast else "float32"


# Candidates are measured only when the run's training, at float32's measured speed, would take
# this many times what measuring them costs: the measurement then costs at most 1/20 of the run.
WORTH_MEASURING = 20


def measure_speeds(make_step: Callable[[str], Callable[[], None]], candidates: Sequence[str],
                     images_per_step: int, total_steps: int, rounds: int = 5, round_seconds: float = 0.1,
                     clock: Callable[[], float] = time.perf_counter) -> dict:
    """The speed of float32 and each candidate at one step (training or prediction), side by side.

    float32's step is made, run once (tracing) and timed. If the whole run (`total_steps`) would
    take less than `WORTH_MEASURING` times what measuring the candidates costs (a tracing
    like float32's and the rounds), they are not measured. Otherwise each candidate's step is
    made and run once, and `rounds` rounds time each precision in turn (the order reversed every
    other round), so that a drift of the machine's speed falls on all of them alike.

    Args:
        make_step: `precision -> step`, where `step()` runs one step to its end.
        candidates: the mixed precisions to compare with float32.
        images_per_step: the batch of one step.
        total_steps: the steps of the run (math.inf: always measure the candidates).
        rounds: side-by-side rounds; medians are kept.
        round_seconds: at least how long each precision runs per round (one step or more).
        clock: the timer.

    Returns:
        `{"rates": median images/s per precision, "speedups": per candidate the median over
        rounds of its rate divided by float32's in the same round (empty when not measured),
        "float32_step": seconds, "measuring_cost": estimated seconds to measure the candidates}`.
    """
    steps = {"float32": make_step("float32")}
    start = clock()
    steps["float32"]()  # tracing and the first execution
    tracing = clock() - start
    start = clock()
    steps["float32"]()
    step_seconds = max(clock() - start, 1e-6)
    repeats = {"float32": max(1, math.ceil(round_seconds / step_seconds))}
    cost = len(candidates) * (tracing + 2 * rounds * repeats["float32"] * step_seconds)
    result = {"rates": {"float32": images_per_step / step_seconds}, "speedups": {}, "float32_step": step_seconds,
              "measuring_cost": cost}
    if total_steps * step_seconds < WORTH_MEASURING * cost:
        return result
    for p in candidates:
        steps[p] = make_step(p)
        steps[p]()
        start = clock()
        steps[p]()
        repeats[p] = max(1, math.ceil(round_seconds / max(clock() - start, 1e-6)))
    precisions = list(steps)
    samples = {p: [] for p in precisions}
    for r in range(rounds):
        for p in (precisions if r % 2 == 0 else precisions[::-1]):
            start = clock()
            for _ in range(repeats[p]):
                steps[p]()
            samples[p].append(repeats[p] * images_per_step / max(clock() - start, 1e-9))
    result["rates"] = {p: statistics.median(v) for p, v in samples.items()}
    result["speedups"] = {p: statistics.median(a / b for a, b in zip(samples[p], samples["float32"]))
                          for p in candidates}
    return result


def cache_file() -> str:
    """Where measured choices are kept: $BALPOE_TF_CACHE_DIR, else the user's cache folder."""
    folder = os.environ.get("BALPOE_TF_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "balpoe_tf")
    return os.path.join(folder, "precision.json")


def _read_cache(path: str) -> dict:
    try:
        with open(path) as f:
            entries = json.load(f)
        return entries if isinstance(entries, dict) else {}
    except (OSError, ValueError):
        return {}  # no cache yet, or a damaged one: measure again


def _write_cache(path: str, key: str, entry: dict) -> bool:
    """Add `entry` under `key` (atomically); False if the folder is not writable."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        entries = {**_read_cache(path), key: entry}
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(entries, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
        return True
    except OSError:
        return False


def machine_key(gpus: list, flags) -> dict:
    """What a measurement holds for: the CPU (model, features, cores this process may use), the
    GPUs, and the software and settings that change the kernels TensorFlow runs."""
    import keras
    import tensorflow as tf

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu_model(), "cpu_flags": hashlib.sha1(" ".join(sorted(flags or ())).encode()).hexdigest()[:12],
            "cores": cores, "gpus": [list(c) if c else None for c in gpus], "tensorflow": tf.__version__,
            "keras": keras.__version__, "onednn": os.environ.get("TF_ENABLE_ONEDNN_OPTS", ""),
            "onednn_isa": os.environ.get("ONEDNN_MAX_CPU_ISA", "")}


def choose_auto(model_key: dict, candidates: Sequence[str], make_step: Callable[[str], Callable[[], None]],
                images_per_step: int, total_steps: int, gpus: list, flags, use_cache: bool = True,
                measure: Optional[Callable] = None) -> PrecisionChoice:
    """What `--precision=auto` computes in for one model shape on this machine.

    Without a candidate (`runnable_candidates`) it is float32 and nothing is measured. Otherwise
    the cache answers if it holds this machine and model shape; else float32 and the
    candidates are measured (`measure_speeds`), the fastest kept if it beats float32 by
    `MIN_SPEEDUP` (`decide`), and the measurement cached. A run too short for measuring the
    candidates to pay stays float32; its float32 timing is cached, so that a later, longer
    run of the same model measures the candidates.

    Args:
        model_key: what identifies the model shape (backbone, experts, classes, image shape,
            per-replica batch, ...) and, as "task", what a step does ("training" if absent).
        candidates: `runnable_candidates(gpus, flags)`.
        make_step: see `measure_speeds`.
        images_per_step: the batch of one measured step.
        total_steps: the run's steps (math.inf: always measure the candidates).
        gpus, flags: `gpu_capabilities()`, `cpu_flags()`.
        use_cache: read and write the cache.
        measure: the measurement (default `measure_speeds`).
    """
    task = model_key.get("task", "training")
    if not candidates:
        return PrecisionChoice("float32", "no candidate", task=task)
    path = cache_file()
    key = json.dumps({"machine": machine_key(gpus, flags), "model": model_key, "candidates": list(candidates)},
                     sort_keys=True)
    entry = _read_cache(path).get(key) if use_cache else None
    how = "cached"
    if not _valid_entry(entry, candidates) or (
            not entry["speedups"] and total_steps * entry["float32_step"] >= WORTH_MEASURING * entry["measuring_cost"]):
        entry = (measure or measure_speeds)(make_step, candidates, images_per_step, total_steps)
        how = "measured"
        if not (use_cache and _write_cache(path, key, {**entry, "measured": time.strftime("%Y-%m-%d %H:%M:%S")})):
            path = ""
    if not entry["speedups"]:
        return PrecisionChoice("float32", "short run", entry["rates"], {}, path,
                               total_steps * entry["float32_step"], entry["measuring_cost"], task)
    return PrecisionChoice(decide(entry["speedups"], entry["rates"]), how, entry["rates"], entry["speedups"], path,
                           task=task)


# The mixed precisions, in the order of a worker's row (`worker_row`).
MIXED = tuple(p for p in PRECISIONS if p != "float32")


def worker_row(choice: PrecisionChoice) -> list:
    """One worker's measurement as numbers to gather across workers: each mixed precision's
    speedup, then its rate relative to float32 (0 where it was not measured)."""
    float32 = choice.rates.get("float32") or 1.0
    return [choice.speedups.get(p, 0.0) for p in MIXED] + [choice.rates.get(p, 0.0) / float32 for p in MIXED]


def slowest_worker(choice: PrecisionChoice, rows) -> PrecisionChoice:
    """`choice` decided again from every worker's `worker_row`: each number becomes the
    smallest of any worker, so a mixed precision is chosen only if every worker measured it
    faster (one that did not measure it counts as 0, so float32)."""
    least = [min(float(row[i]) for row in rows) for i in range(2 * len(MIXED))]
    speedups = {p: s for p, s in zip(MIXED, least) if s > 0}
    relative = {"float32": 1.0, **{p: r for p, r in zip(MIXED, least[len(MIXED):]) if r > 0}}
    agreed = decide(speedups, relative)
    if speedups == choice.speedups and agreed == choice.precision:
        return choice
    return dataclasses.replace(choice, precision=agreed, speedups=speedups, how="agreed")


def _valid_entry(entry, candidates) -> bool:
    return (isinstance(entry, dict) and isinstance(entry.get("speedups"), dict)
            and set(entry["speedups"]) in (set(), set(candidates)) and isinstance(entry.get("rates"), dict)
            and all(isinstance(entry.get(k), (int, float)) for k in ("float32_step", "measuring_cost")))
