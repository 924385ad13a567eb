"""The one-command benchmark scripts run as their users run them: benchmarks/gpu_check.py (its no-GPU message, its
argument checks, its parts on the CPU with --dry-run), benchmarks/perf_report.py (its modes and its report) and
bench_serving.py's argument checks."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))

import perf_report  # noqa: E402


def gpu_check(*args, timeout=600):
    return subprocess.run([sys.executable, "benchmarks/gpu_check.py", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_gpu_check_without_a_gpu_says_so_and_exits_2(tmp_path):
    out = gpu_check("--json", str(tmp_path / "r.json"))
    assert out.returncode == 2
    assert "no CUDA device is visible" in out.stderr and "--dry-run" in out.stderr
    assert not (tmp_path / "r.json").exists()


def test_gpu_check_refuses_an_unknown_part():
    out = gpu_check("--parts", "fp16,fp64")
    assert out.returncode == 2 and "unknown part(s) fp64" in out.stderr


@pytest.mark.parametrize("flag,value", [("--prompt-chars", "40,abc"), ("--clients", "0")])
def test_bench_serving_refuses_a_bad_list_in_one_line_before_building_anything(flag, value):
    out = subprocess.run([sys.executable, "benchmarks/bench_serving.py", flag, value, "--workdir", "/nonexistent"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert f"argument {flag}: expected positive integers separated by commas" in out.stderr


def test_gpu_check_dry_run_runs_each_part_on_the_cpu_and_writes_one_json(tmp_path, demo_model_path):
    report = tmp_path / "r.json"
    out = gpu_check("--dry-run", "--parts", "int4,gpus", "--json", str(report))
    assert out.returncode == 0, out.stdout + out.stderr
    parts = json.loads(report.read_text())["parts"]
    assert parts["int4"]["status"] == "ok" and parts["int4"]["numbers"]["decode_ms_per_token"] > 0
    assert parts["int4"]["numbers"]["batch8_tokens_per_s"] > 0
    assert parts["gpus"]["numbers"]["devices"] == ["cpu"] and parts["gpus"]["numbers"]["reply_chars"] > 0
    assert "| int4 | ok |" in out.stdout and "| gpus | ok |" in out.stdout


def test_perf_report_modes():
    quick = perf_report.parse_args(["--quick"])
    assert (quick.layers, quick.repeats, quick.new_tokens) == (1, 1, 4)
    full = perf_report.parse_args(["--full-28-layers", "--extrapolate"])
    assert full.layers == 28 and not full.extrapolate  # nothing to extrapolate at full depth


def test_perf_report_builds_fp32_shallower_and_extrapolates_only_that_row():
    """28 fp32 blocks need ~27 GB: --fp32-layers builds fewer for fp32 alone, and its row says it is extrapolated."""
    args = perf_report.parse_args(["--full-28-layers", "--fp32-layers", "8"])
    assert [perf_report.layers_for(args, p) for p in ("fp32", "bf16", "int4")] == [8, 28, 28]
    rows = perf_report.ours_table([fake_result("fp32", layers=8), fake_result("bf16", layers=28)], args,
                                  20.0).splitlines()[2:]
    assert [r.split(" | ")[:2] for r in rows] == [["| fp32", "8"], ["| fp32", "28 (extrapolated from 8)"],
                                                  ["| bf16", "28"]]
    assert "fp32: 8 layers built, its 28-layer row extrapolated" in perf_report.header(args, (1, 2), (3, 4), (0, 0))


@pytest.mark.parametrize("flag", ["--fp32-layers", "--layers", "--original-layers"])
def test_perf_report_refuses_a_layer_count_below_one_in_one_line(flag):
    out = subprocess.run([sys.executable, "benchmarks/perf_report.py", flag, "0"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert f"argument {flag}: expected a positive integer, got 0" in out.stderr


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="Linux only")
def test_perf_report_peak_memory_leaves_out_the_bandwidth_buffers_freed_before_loading():
    buffer = torch.ones(1 << 27)  # 512 MB, as memory_bandwidth's arrays, touched and freed
    del buffer
    before = perf_report.status_bytes("VmHWM")
    perf_report.reset_peak_rss()
    assert perf_report.status_bytes("VmHWM") < before - 400e6


def fake_result(precision, layers=2):
    """A worker result: 100 ms steps of which 40 ms per block; prefill 1 s with 0.4 s per block."""
    step, prefill = [0.1, 0.08 * layers / 2], [1.0, 0.8 * layers / 2]
    kernels = {f: {"layout": "onednn", "source": "timed"} for f in ("fp32", "bf16")}
    kernels.update(int8={"layout": "int8pack", "fused_max_rows": 111, "source": "cached"},
                   int4={"fused_max_rows": 1 << 30, "source": "default"})
    runs = {k: {"prefill": [prefill], "steps": [step, step]} for k in ("ctx32", "ctx512", "batch8")}
    return {"precision": precision, "layers": layers, "load_s": 2.0, "weight_bytes": int(2e9),
            "layer_bytes": int(4e8), "peak_rss_bytes": int(3e9), "resident_bytes": int(2.5e9), "kernels": kernels,
            **runs}


def test_perf_report_labels_extrapolated_rows_and_quotes_ratios_from_the_same_run():
    args = perf_report.parse_args(["--extrapolate"])
    table = perf_report.ours_table([fake_result("int8"), {"precision": "int4", "error": "boom"}], args, 20.0)
    rows = table.splitlines()[2:]
    assert rows[0].startswith("| int8 | 2 |") and "| 100 |" in rows[0]  # measured: 100 ms/token
    # 28 layers: 100 ms + 26 x 40 ms per block
    assert rows[1].startswith("| int8 | 28 (extrapolated from 2) |") and "| 1140 |" in rows[1]
    assert "int8: int8pack fused<=111 (cached)" in rows[0] and "error: boom" in rows[2]
    side = perf_report.side_by_side_table([fake_result("int4")], {"int4": 2280.0},
                                          {32: {"q4_0": (4.0, 570.0)}, 512: {"q4_0": (60.0, 600.0)}}, 20.0)
    # read floor: (2 GB + 26 x 0.4 GB per block) / 20 GB/s
    assert "| int4 | 1140 | 2280 (2.00x ours) | 570 (0.50x ours) | 620 |" in side
    # a width that measured its own bandwidth (a shared VM's moves within one run) is held to that one
    own = dict(fake_result("int4"), read_gbs=[10.0, 12.4])
    assert "| int4 | 1140 | - | - | 1000 |" in perf_report.side_by_side_table([own], {}, {}, 20.0)
    assert "| 12.4 | 88% |" in perf_report.ours_table([own], perf_report.parse_args(["--extrapolate"]), 20.0)
    # with the embedding quantized too, a width is set beside chatglm.cpp's file of the same width (whose embedding
    # is quantized as well)
    side = perf_report.side_by_side_table([fake_result("int4-qe")], {}, {32: {"q4_0": (4.0, 570.0)},
                                                                         512: {"q4_0": (60.0, 600.0)}}, 20.0)
    assert "| int4-qe | 1140 | - | 570 (0.50x ours) |" in side
