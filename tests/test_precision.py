"""precision: hardware probing, the side-by-side measurement, auto's decision and its cache."""

import json
import os

import pytest

from balpoe_tf import precision, run_data
from balpoe_tf.precision import PrecisionChoice


def test_cpu_flags_read_from_cpuinfo(tmp_path):
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx2 avx512f avx512_bf16\n\n"
                   "processor\t: 1\nflags\t\t: fpu\n")
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd bf16\n")
    assert precision.cpu_flags(str(x86)) == {"fpu", "avx2", "avx512f", "avx512_bf16"}
    assert precision.cpu_model(str(x86)) == "AMD EPYC"
    assert precision.cpu_flags(str(arm)) is None
    assert precision.cpu_flags(str(tmp_path / "missing")) is None


@pytest.mark.parametrize("name, has_gpu, flags, warned", [
    ("mixed_bfloat16", False, {"avx2", "avx512f"}, True),
    ("mixed_bfloat16", False, {"avx512f", "avx512_bf16"}, False),
    ("mixed_bfloat16", False, {"amx_bf16"}, False),
    ("mixed_float16", False, {"avx512f", "avx512_bf16"}, True),
    ("mixed_float16", False, {"avx512_fp16"}, False),
    ("mixed_float16", False, {"avx2", "avx_ne_convert"}, False),
    ("mixed_bfloat16", True, {"avx2"}, False),  # a GPU computes the model
    ("mixed_bfloat16", False, None, False),  # flags unknown
    ("float32", False, {"avx2"}, False),
])
def test_emulated_precision_warning(name, has_gpu, flags, warned):
    warning = precision.emulated_precision_warning(name, has_gpu, flags)
    assert bool(warning) == warned
    if warned:
        assert f"--precision={name} on a CPU without" in warning and "use --precision=float32" in warning


@pytest.mark.parametrize("gpus, flags, candidates", [
    ([], {"avx2", "avx512f", "avx512_bf16"}, ("mixed_bfloat16",)),  # Zen 4/5, Cooper Lake and later Xeons
    ([], {"avx512f", "amx_bf16"}, ("mixed_bfloat16",)),
    ([], {"avx512_bf16", "avx512_fp16"}, ("mixed_bfloat16",)),  # float16 is not measured on CPUs
    ([], {"avx2", "avx512f"}, ()),  # bfloat16 emulated: 0.42x float32 (docs/performance.md)
    ([], {"avx2", "avx_ne_convert"}, ()),  # converts bfloat16 but does not compute it
    ([], None, ()),  # flags unknown (not Linux, not x86)
    ([(8, 0), (9, 0)], {"avx2"}, ("mixed_bfloat16", "mixed_float16")),  # the GPUs compute the model
    ([(7, 5)], {"avx512_bf16"}, ("mixed_float16",)),  # Turing: float16 tensor cores, no bfloat16
    ([(8, 0), (7, 5)], {"avx512_bf16"}, ("mixed_float16",)),  # every replica must be native
    ([(6, 1)], {"avx512_bf16"}, ()),
    ([None], {"avx512_bf16"}, ()),  # a GPU that reports no compute capability
])
def test_auto_measures_only_what_the_hardware_computes_natively(gpus, flags, candidates):
    assert precision.auto_candidates(gpus, flags) == candidates


class FakeClock:
    """A clock that each fake step advances by its precision's step time."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def _fake_steps(clock, seconds, made):
    def make_step(name):
        made.append(name)

        def step():
            clock.now += seconds[name]
        return step
    return make_step


def test_measure_speeds_times_each_precision_side_by_side():
    clock, made = FakeClock(), []
    seconds = {"float32": 0.04, "mixed_bfloat16": 0.03}
    result = precision.measure_speeds(_fake_steps(clock, seconds, made), ["mixed_bfloat16"], images_per_step=100,
                                      total_steps=10 ** 6, rounds=3, round_seconds=0.1, clock=clock)
    assert made == ["float32", "mixed_bfloat16"]
    assert result["rates"] == pytest.approx({"float32": 2500.0, "mixed_bfloat16": 100 / 0.03})
    assert result["speedups"] == pytest.approx({"mixed_bfloat16": 4 / 3})
    assert result["float32_step"] == pytest.approx(0.04)
    # Three steps of float32 make a round of 0.1 s; the tracing call took one step (0.04 s).
    assert result["measuring_cost"] == pytest.approx(0.04 + 2 * 3 * 3 * 0.04)
    # 2 calls each to warm up and size the rounds, then 3 rounds of 3 (float32) and 4 steps.
    assert clock.now == pytest.approx(2 * 0.04 + 2 * 0.03 + 3 * (3 * 0.04 + 4 * 0.03))


def test_a_run_too_short_to_repay_the_measurement_does_not_measure_the_candidates():
    clock, made = FakeClock(), []
    seconds = {"float32": 0.01, "mixed_bfloat16": 0.005}
    result = precision.measure_speeds(_fake_steps(clock, seconds, made), ["mixed_bfloat16"], images_per_step=10,
                                      total_steps=100, rounds=5, round_seconds=0.1, clock=clock)
    # Measuring bfloat16 would cost 0.01 + 2 * 5 * 0.1 = 1.01 s; training takes 100 x 0.01 = 1 s.
    assert made == ["float32"] and result["speedups"] == {}
    assert result["measuring_cost"] == pytest.approx(1.01)


@pytest.mark.parametrize("speedups, rates, chosen", [
    ({"mixed_bfloat16": 1.38}, {"float32": 300, "mixed_bfloat16": 415}, "mixed_bfloat16"),  # this project's EPYC
    ({"mixed_bfloat16": 0.65}, {"float32": 218, "mixed_bfloat16": 142}, "float32"),  # the Xeon of issue 38
    ({"mixed_bfloat16": 1.04}, {"float32": 100, "mixed_bfloat16": 104}, "float32"),  # within noise
    ({"mixed_bfloat16": 1.07}, {"float32": 6157, "mixed_bfloat16": 5511}, "float32"),  # the medians disagree
    ({"mixed_bfloat16": 1.3, "mixed_float16": 1.9}, {"float32": 1, "mixed_bfloat16": 1.3, "mixed_float16": 1.9},
     "mixed_float16"),
    ({}, {"float32": 100}, "float32"),
])
def test_decide_keeps_float32_unless_a_mixed_precision_is_clearly_faster(speedups, rates, chosen):
    assert precision.decide(speedups, rates) == chosen


def _measurement(speedup, calls):
    def measure(make_step, candidates, images_per_step, total_steps):
        calls.append(total_steps)
        if total_steps < 1000:
            return {"rates": {"float32": 100.0}, "speedups": {}, "float32_step": 0.01, "measuring_cost": 2.0}
        return {"rates": {"float32": 100.0, **{c: 100.0 * speedup for c in candidates}},
                "speedups": {c: speedup for c in candidates}, "float32_step": 0.01, "measuring_cost": 2.0}
    return measure


BF16_CPU = {"avx512f", "avx512_bf16"}
MODEL = {"backbone": "resnet8", "experts": 3, "batch": 64}


def _choose(measure, total_steps=10 ** 5, gpus=(), flags=BF16_CPU, model=MODEL):
    gpus = list(gpus)
    return precision.choose_auto(model, precision.auto_candidates(gpus, flags), None, 64, total_steps, gpus,
                                 flags, measure=measure)


@pytest.mark.parametrize("speedup, chosen", [(1.5, "mixed_bfloat16"), (0.65, "float32"), (1.03, "float32")])
def test_auto_picks_what_measured_faster_and_caches_it(speedup, chosen, tmp_path, monkeypatch):
    monkeypatch.setenv("BALPOE_TF_CACHE_DIR", str(tmp_path))
    calls = []
    first = _choose(_measurement(speedup, calls))
    assert (first.precision, first.how, first.speedups) == (chosen, "measured", {"mixed_bfloat16": speedup})
    assert first.cache == str(tmp_path / "precision.json")
    assert f"mixed_bfloat16 {speedup:.2f}x float32" in first.summary()
    again = _choose(_measurement(2.0, calls))  # a cache hit measures nothing
    assert (again.precision, again.how, again.speedups) == (chosen, "cached", {"mixed_bfloat16": speedup})
    assert calls == [10 ** 5]
    other = _choose(_measurement(2.0, calls), model={**MODEL, "batch": 128})  # another model shape
    assert (other.precision, other.how) == ("mixed_bfloat16", "measured") and len(calls) == 2


def test_auto_measures_nothing_without_a_native_mixed_precision(tmp_path, monkeypatch):
    monkeypatch.setenv("BALPOE_TF_CACHE_DIR", str(tmp_path))
    calls = []
    choice = _choose(_measurement(2.0, calls), flags={"avx2", "avx512f"})
    assert (choice.precision, choice.how, calls) == ("float32", "no candidate", [])
    assert "computes no mixed precision natively" in choice.summary()
    assert not os.listdir(tmp_path)


def test_auto_on_gpus_measures_bfloat16_and_float16(tmp_path, monkeypatch):
    monkeypatch.setenv("BALPOE_TF_CACHE_DIR", str(tmp_path))

    def measure(make_step, candidates, images_per_step, total_steps):
        assert candidates == ("mixed_bfloat16", "mixed_float16")
        speedups = {"mixed_bfloat16": 2.1, "mixed_float16": 2.3}
        return {"rates": {"float32": 1.0, **speedups}, "speedups": speedups, "float32_step": 0.1,
                "measuring_cost": 1.0}

    choice = _choose(measure, gpus=[(8, 0), (8, 6)], flags={"avx2"})
    assert (choice.precision, choice.how) == ("mixed_float16", "measured")


def test_a_short_run_stays_float32_and_a_longer_one_then_measures(tmp_path, monkeypatch):
    monkeypatch.setenv("BALPOE_TF_CACHE_DIR", str(tmp_path))
    calls = []
    short = _choose(_measurement(1.5, calls), total_steps=100)
    assert (short.precision, short.how, short.speedups) == ("float32", "short run", {})
    assert short.summary() == ("precision float32 (--precision=auto: training takes about 1 s in float32, too "
                               "short to repay measuring a mixed precision (about 2.0 s))")
    again = _choose(_measurement(1.5, calls), total_steps=200)  # from the cache: 2 s, still too short
    assert (again.how, calls) == ("short run", [100])
    longer = _choose(_measurement(1.5, calls), total_steps=10 ** 4)  # 100 s >= 20 x 2 s: now worth it
    assert (longer.precision, longer.how, calls) == ("mixed_bfloat16", "measured", [100, 10 ** 4])


def test_a_damaged_or_unwritable_cache_only_means_measuring_again(tmp_path, monkeypatch):
    monkeypatch.setenv("BALPOE_TF_CACHE_DIR", str(tmp_path))
    (tmp_path / "precision.json").write_text("{not json")
    calls = []
    assert _choose(_measurement(1.5, calls)).how == "measured"
    entries = json.loads((tmp_path / "precision.json").read_text())
    key, = entries
    entries[key]["speedups"] = "garbage"
    (tmp_path / "precision.json").write_text(json.dumps(entries))
    assert _choose(_measurement(1.5, calls)).how == "measured" and len(calls) == 2
    blocked = tmp_path / "file"
    blocked.write_text("")
    monkeypatch.setenv("BALPOE_TF_CACHE_DIR", str(blocked / "sub"))  # a folder that cannot be made
    choice = _choose(_measurement(1.5, calls))
    assert (choice.precision, choice.how, choice.cache) == ("mixed_bfloat16", "measured", "")


def test_the_cache_key_names_the_machine_and_software(monkeypatch):
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)  # CI runs the suite with it set too
    key = precision.machine_key([], BF16_CPU)
    assert set(key) == {"cpu", "cpu_flags", "cores", "gpus", "tensorflow", "keras", "onednn", "onednn_isa"}
    assert precision.machine_key([], {"avx2"})["cpu_flags"] != key["cpu_flags"]
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert precision.machine_key([], BF16_CPU) != key


@pytest.mark.parametrize("rows, chosen", [
    ([[0.0, 1.4, 0.0, 1.4], [0.0, 1.3, 0.0, 1.3]], "mixed_bfloat16"),  # both workers measured it faster
    ([[0.0, 1.4, 0.0, 1.4], [0.0, 0.9, 0.0, 0.9]], "float32"),  # one did not
    ([[0.0, 1.4, 0.0, 1.4], [0.0, 0.0, 0.0, 0.0]], "float32"),  # one had nothing to measure
])
def test_workers_agree_on_the_precision_the_slowest_measured(rows, chosen):
    mine = PrecisionChoice("mixed_bfloat16", "measured", {"float32": 100.0, "mixed_bfloat16": 140.0},
                           {"mixed_bfloat16": 1.4})
    # (float16, bfloat16) speedups, then their rates relative to float32's.
    assert precision.MIXED == ("mixed_float16", "mixed_bfloat16")
    assert precision.worker_row(mine) == pytest.approx([0.0, 1.4, 0.0, 1.4])
    agreed = precision.slowest_worker(mine, rows)
    least = min(row[1] for row in rows)
    assert (agreed.precision, agreed.how) == (chosen, "agreed")
    assert agreed.speedups == ({"mixed_bfloat16": least} if least else {})
    assert precision.slowest_worker(mine, [precision.worker_row(mine)] * 2) is mine  # nothing to agree on


@pytest.mark.slow
def test_the_real_measurement_on_a_tiny_model():
    from balpoe_tf import run_config, run_precision
    from conftest import parse_config, skip_without_kernels

    skip_without_kernels("mixed_bfloat16")
    config = parse_config(run_config.RunConfig, "--flagfile=configs/demo.flags", "--batch_size=16")
    data = run_data.load_data(config)
    # Measured even where bfloat16 is emulated: the measurement itself is what is tested.
    result = precision.measure_speeds(run_precision.measured_step(config, data, 16), ["mixed_bfloat16"], 16,
                                      total_steps=10 ** 9, rounds=2, round_seconds=0.02)
    assert set(result["rates"]) == {"float32", "mixed_bfloat16"} and all(r > 0 for r in result["rates"].values())
    assert result["speedups"]["mixed_bfloat16"] > 0 and 0 < result["float32_step"] < 10
    assert precision.decide(result["speedups"], result["rates"]) in ("float32", "mixed_bfloat16")
    import keras
    assert keras.mixed_precision.global_policy().name == "float32"  # the measurement leaves no policy behind
