"""tools/benchmark_kernels.py: multiply-adds from oneDNN's shape descriptors, the sum of its
verbose lines per primitive kind, and the measurements on tiny shapes."""

import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools"))  # the tool imports benchmark_throughput beside it
import benchmark_kernels as kernels  # noqa: E402

VERBOSE = """\
onednn_verbose,v1,info,oneDNN v3.7.1
onednn_verbose,v1,primitive,create:cache_miss,cpu,convolution,brg_conv_fwd:avx512_core,forward_training,x,,,mb2_ic4oc8_ih6oh6kh3sh1dh0ph1_iw6ow6kw3sw1dw0pw1,0.5
onednn_verbose,v1,primitive,exec,cpu,convolution,brg_conv_fwd:avx512_core,forward_training,src:f32::blocked:acdb::f0,attr-scratchpad:user,alg:convolution_direct,mb2_ic4oc8_ih6oh6kh3sh1dh0ph1_iw6ow6kw3sw1dw0pw1,1.5
onednn_verbose,v1,primitive,exec,cpu,convolution,jit:avx512_core,backward_weights,src:f32::blocked:acdb::f0,,alg:convolution_direct,mb2_ic4oc8_ih6oh6kh3sh1dh0ph1_iw6ow6kw3sw1dw0pw1,2.25
onednn_verbose,v1,primitive,exec,cpu,convolution,brg_conv_fwd:avx512_core,forward_training,src:f32::blocked:acdb::f0,,alg:convolution_direct,mb2_ic8oc8_ih6oh3kh3sh2dh0ph0_iw6ow3kw3sw2dw0pw0,0.5
onednn_verbose,v1,primitive,exec,cpu,batch_normalization,bnorm_tbb_jit:avx512_core,forward_training,data:f32::blocked:acdb::f0,,flags:CHR,mb2ic8ih6iw6,0.25
onednn_verbose,v1,primitive,exec,cpu,reorder,jit:uni,undef,src:f32::blocked:cdba::f0 dst:f32::blocked:Acdb16a::f0,,,8x4x3x3,0.125
onednn_verbose,v1,primitive,exec,cpu,gemm_api,,undef,src:f32::blocked:ab::f0,,,2x8:8x5,0.0625
step_ms 12.0
"""


def test_conv_multiply_adds_by_hand():
    # batch x out channels x out height x out width x (in channels / groups) x kernel height x width
    assert kernels.conv_multiply_adds("mb128_ic16oc16_ih32oh32kh3sh1dh0ph1_iw32ow32kw3sw1dw0pw1") == \
        128 * 16 * 32 * 32 * 16 * 9
    assert kernels.conv_multiply_adds("mb128_ic16oc32_ih34oh16kh3sh2dh0ph0_iw34ow16kw3sw2dw0pw0") == \
        128 * 32 * 16 * 16 * 16 * 9
    assert kernels.conv_multiply_adds("mb2_g3ic48oc96_ih8oh8kh3sh1dh0ph1_iw8ow8kw3sw1dw0pw1") == 2 * 96 * 8 * 8 * 16 * 9
    assert kernels.conv_multiply_adds("128x100:100x64") == 0


def test_onednn_times_sums_execution_lines_per_kind():
    times = kernels.onednn_times(VERBOSE.splitlines())
    assert times["convolution forward"] == {"ms": 2.0, "calls": 2,
                                            "multiply_adds": 2 * 8 * 36 * 4 * 9 + 2 * 8 * 9 * 8 * 9}
    assert times["convolution weight gradient"] == {"ms": 2.25, "calls": 1, "multiply_adds": 2 * 8 * 36 * 4 * 9}
    assert times["batch norm forward"] == {"ms": 0.25, "calls": 1, "multiply_adds": 0}
    assert times["reorders (kernels between TensorFlow's and oneDNN's layouts)"]["ms"] == 0.125
    assert times["other oneDNN (gemm_api)"]["calls"] == 1
    assert sum(v["calls"] for v in times.values()) == 6  # the create and info lines are not executions


def test_convolution_rates_on_a_tiny_shape():
    row = kernels.convolution_rates(batch=2, size=4, channels=8, reps=1)
    assert row["shape"] == "4x4x8" and row["multiply_adds"] == 2 * 4 * 4 * 9 * 8 * 8
    for name in ("forward", "input gradient", "weight gradient"):
        assert row[name]["ms"] > 0
        assert row[name]["macs_per_s"] == pytest.approx(row["multiply_adds"] / (row[name]["ms"] / 1e3))


def test_grouped_against_apart_on_a_tiny_shape():
    row = kernels.grouped_against_apart(batch=2, size=4, channels=4, experts=3, reps=1, pairs=2)
    assert row["shape"] == "4x4x4" and row["experts"] == 3
    if "grouped_unavailable" in row:  # TensorFlow's own kernels: TF_ENABLE_ONEDNN_OPTS=0, some CPUs
        pytest.skip(f"no grouped-convolution gradient kernel in this process ({row['grouped_unavailable']})")
    assert row["apart_ms"] > 0 and row["grouped_ms"] > 0
    assert row["loss_relative_difference"] < 1e-5  # one grouped convolution computes the three


def test_markdown_names_every_part_and_the_rest():
    conv = {"ms": 1.0, "macs_per_s": 5e10}
    result = {"matmul_peak_macs_per_s": 1e11,
              "convolutions": [{"shape": "4x4x8", "batch": 2, "forward": conv, "input gradient": conv,
                                "weight gradient": conv}],
              "grouped": [{"shape": "4x4x4", "experts": 3, "apart_ms": 3.0, "grouped_ms": 4.0},
                          {"shape": "8x8x8", "experts": 3, "grouped_unavailable": "InvalidArgumentError: filter"}],
              "step": {"step_ms": 10.0, "step_ms_with_verbose": 11.0, "rest_ms": 2.0,
                       "onednn": {"convolution forward": {"ms": 8.0, "calls": 2, "multiply_adds": 4e8}}}}
    table = kernels.markdown(result)
    assert "| 4x4x8 | 1.00 ms, 50 (50 %) |" in table
    assert "| 4x4x4 x 3 | 3.0 | 4.0 | 0.75 |" in table
    assert "| 8x8x8 x 3 | | no kernel: InvalidArgumentError: filter | |" in table
    assert "| convolution forward | 8.0 | 80 % | 2 | 50 |" in table
    assert "| the rest (TensorFlow's own ops, executor) | 2.0 | 20 % |" in table


@pytest.mark.slow
def test_step_breakdown_runs_the_model_and_reads_onednn_verbose():
    step = kernels.step_breakdown(1)
    convs = [v for name, v in step["onednn"].items() if name.startswith("convolution")]
    # ResNet-32 with 3 experts: 1 + 10 trunk convolutions, 10 per expert stage, 2 stages, 3 experts.
    assert sum(v["calls"] for v in convs) == 3 * (11 + 3 * 20) - 1  # the stem needs no input gradient
    assert step["step_ms"] > 0 and step["rest_ms"] < step["step_ms"]
