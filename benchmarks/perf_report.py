"""The README's performance section, measured on the machine it runs on, as one Markdown report.

    python benchmarks/perf_report.py --quick                  # ~2 minutes: 1 layer, 1 repeat, 4 decode steps
    python benchmarks/perf_report.py                          # 2 layers, 3 repeats (measured rows only)
    python benchmarks/perf_report.py --extrapolate            # ... plus 28-layer rows estimated from block times
    python benchmarks/perf_report.py --full-28-layers         # the whole 6B geometry, nothing extrapolated
    python benchmarks/perf_report.py --full-28-layers --fp32-layers 8   # ... but fp32 (27 GB at 28) from 8 layers
    python benchmarks/perf_report.py --fresh-kernel-timing    # re-time the kernel candidates (else: cached choice)
    python benchmarks/perf_report.py --original-python WORK/orig-venv/bin/python --original-workdir WORK/ckpt \
        --cpp-main WORK/chatglm_cpp-0.4.2/build/bin/main --cpp-models WORK/models   # side by side, same run

In one run: the CPU's model and its vector flags, read and copy bandwidth at the start and at the end, and for
fp32, bf16, int8 and int4 (and int8-qe / int4-qe: embedding and lm_head quantized too, as chatglm.cpp's files
store them; each in its own process, random weights with the real ChatGLM-6B geometry from bench.py):
load seconds, peak and resident memory, prefill of 32 and 512 tokens, decode ms/token at 32- and 512-token contexts
(batch 1), batch-8 tokens/s, the share of the read-bandwidth floor, and the kernels chatglm/kernel_choice.py chose.
With --original-python / --cpp-main (benchmarks/side_by_side/README.md) the original code and chatglm.cpp run in
the same run (each right after the same width of ours). Extrapolated rows add (28 - L) x the time measured inside
each GLM block and say so.
"""
import argparse
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import torch  # noqa: E402

import bench  # noqa: E402

FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx512_fp16", "amx_bf16", "amx_int8", "fma", "f16c")
CPP_TYPES = {"bf16": "f16", "int8": "q8_0", "int4": "q4_0"}
# "int4-qe" / "int8-qe": the embedding and lm_head quantized too (chatglm-6b-int4-qe; chatglm.cpp's q4_0 / q8_0 files
# store them that way), where the official INT4 / INT8 checkpoints keep them in 16 bits


def base_width(precision: str) -> str:
    return precision.removesuffix("-qe")


def cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        flags = []
    return [x for x in FLAGS if x in flags]


def status_bytes(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def reset_peak_rss():
    """Restart VmHWM from the current resident size (Linux: clear_refs 5), so that a bandwidth test's buffers,
    freed before the model loads, do not count as the model's peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


# ---- one precision, in its own process -----------------------------------------------------------------------------

def decode_samples(model, clock, batch, context, new_tokens, seed):
    """(prefill (step s, block s), [(step s, block s)] of each decode step) for one greedy run."""
    ids = bench.prompt(batch, context, model.config, seed=seed)
    samples = bench.timed_forwards(model, clock, bench.decode_run(model, ids, new_tokens))
    return samples[0], samples[1:]


def worker(args):
    torch.set_num_threads(args.threads)
    from chatglm import kernel_choice, load_model
    from chatglm.configuration import ChatGLMConfig
    dtype, bits = bench.PRECISIONS[base_width(args.precision)]
    folder = bench.build_checkpoint(args.workdir, args.layers)
    cfg = ChatGLMConfig.from_pretrained(folder)
    # this width's own read bandwidth, before and after its timings: a shared VM's changes by 30% within one run
    read_before = bench.memory_bandwidth(repeats=5)[1]
    reset_peak_rss()
    t = time.perf_counter()
    kernel_choice.choose(dtype or torch.bfloat16, bits, cfg.hidden_size, cfg.inner_hidden_size)  # timed or cached
    choice_s = time.perf_counter() - t
    t = time.perf_counter()
    _, model = load_model(folder, device="cpu", dtype=dtype, quantize=bits,
                          quantize_embeddings=args.precision.endswith("-qe"))
    out = {"precision": args.precision, "layers": args.layers, "load_s": time.perf_counter() - t,
           "kernel_choice_s": choice_s, "kernels": {k: {f: v for f, v in p.items() if f != "timings_ms"}
                                                    for k, p in kernel_choice.report().items()}}
    with torch.inference_mode():
        model(input_ids=bench.prompt(1, 32, cfg), use_cache=True, logits_to_keep=1)  # warm-up
    out["weight_bytes"] = bench.weight_bytes(model)
    out["layer_bytes"] = bench.weight_bytes(model.transformer.layers[0])
    clock = bench.BlockClock(model)
    runs = {"ctx32": (1, 32), "ctx512": (1, 512), "batch8": (args.batch, 32)}
    for key, (batch, context) in runs.items():
        prefill, steps = [], []
        for r in range(args.repeats):
            p, s = decode_samples(model, clock, batch, context, args.new_tokens, seed=r)
            prefill.append(p)
            steps += s
        out[key] = {"prefill": [list(x) for x in prefill], "steps": [list(x) for x in steps]}
    clock.close()
    out["peak_rss_bytes"], out["resident_bytes"] = status_bytes("VmHWM"), status_bytes("VmRSS")
    out["read_gbs"] = [read_before, bench.memory_bandwidth(repeats=5)[1]]  # after the memory figures: it allocates
    print("RESULT " + json.dumps(out), flush=True)


def layers_for(args, precision):
    """Blocks built for `precision`: --fp32-layers for fp32 (28 fp32 blocks need ~27 GB of RAM), else --layers."""
    return args.fp32_layers if precision == "fp32" and args.fp32_layers else args.layers


def run_precision(args, precision):
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--precision", precision, "--layers",
           str(layers_for(args, precision)), "--threads", str(args.threads), "--workdir", args.workdir, "--repeats",
           str(args.repeats), "--new-tokens", str(args.new_tokens), "--batch", str(args.batch)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    if args.kernel_cache:
        env["CHATGLM_CACHE_DIR"] = args.kernel_cache
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return {"precision": precision, "error": ((proc.stderr or proc.stdout).strip().splitlines() or ["no output"])[-1]}


# ---- the other implementations, when their environments are there -------------------------------------------------

def run_original(args, precisions):
    """{precision: decode ms/token at 28 layers (extrapolated from its own --layers run, as its script does)}."""
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        cmd = [args.original_python, os.path.join(HERE, "side_by_side", "original_bench.py"), "--workdir",
               args.original_workdir, "--layers", str(args.original_layers), "--precisions", ",".join(precisions),
               "--threads", str(args.threads), "--repeats", str(args.repeats), "--new-tokens", str(args.new_tokens),
               "--json", out.name]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            error = (proc.stderr.strip().splitlines() or ["failed"])[-1]
            print(f"# original {','.join(precisions)}: {error}", file=sys.stderr, flush=True)
            return {p: None for p in precisions}
        results = json.load(open(out.name))
    return {r["precision"]: (1e3 * r["decode_s_full"]["median"] if "error" not in r else None) for r in results}


CPP_LINE = re.compile(r"^(\S+) layers=\d+ prompt_len=(\d+) new=\d+: prefill ([\d.]+) ms .*decode ([\d.]+) ms/step")


def run_cpp(args, context, precisions):
    """{ggml type: (prefill s, decode ms/step)} of chatglm.cpp's main at a `context`-token prompt (28 layers)."""
    types = dict.fromkeys(CPP_TYPES[base_width(p)] for p in precisions if base_width(p) in CPP_TYPES)
    cmd = [sys.executable, os.path.join(HERE, "side_by_side", "chatglm_cpp_bench.py"), "--main-binary", args.cpp_main,
           "--models-dir", args.cpp_models, "--types", ",".join(types), "--layers", "28",
           "--prompt-len", str(context), "--new-tokens", str(max(args.new_tokens, 2)), "--repeats", str(args.repeats)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = {}
    for line in proc.stdout.splitlines():
        m = CPP_LINE.match(line)
        if m:
            found[m[1]] = (float(m[3]) / 1e3, float(m[4]))
    return found or {"error": (proc.stderr.strip().splitlines() or proc.stdout.strip().splitlines() or ["?"])[-1]}


# ---- the report ----------------------------------------------------------------------------------------------------

def median_s(samples, layers, to_layers):
    """Median step seconds of [(step s, block s)], at `to_layers` blocks (extrapolated when it is not `layers`)."""
    return statistics.median(s + (to_layers - layers) * b / layers for s, b in samples)


def kernels_text(r):
    fmts = {"fp32": ["fp32"], "bf16": ["bf16"], "int8": ["bf16", "int8"], "int4": ["bf16", "int4"]}[base_width(r["precision"])]
    parts = []
    for fmt in fmts:
        p = r["kernels"][fmt]
        rows = p.get("fused_max_rows")
        what = " ".join(x for x in (p.get("layout"), p.get("intdot_max_rows") and f"(intdot<={p['intdot_max_rows']})",
                                    None if rows is None else
                                    f"fused<={'all' if rows >= 1 << 30 else rows}",
                                    "dequant GEMM fp32" if p.get("dequant_gemm") == "fp32" else None,
                                    None if p.get("fp32_from_rows", 1 << 30) >= 1 << 30 else
                                    f"fp32 GEMM from {p['fp32_from_rows']} rows") if x)
        parts.append(f"{fmt}: {what} ({p['source']}{', forced' if p.get('forced') else ''})")
    timed = any(r["kernels"][f]["source"] == "timed" for f in fmts)
    return "; ".join(parts) + (f"; timing took {r.get('kernel_choice_s', 0):.1f} s" if timed else "")


def width_read_gbs(r, run_read_gbs):
    """The best read bandwidth measured around this width's timings (the run's, for results without it)."""
    return max(r.get("read_gbs") or [run_read_gbs])


def weight_gb(r, to_layers):
    """Weight GB read per token at `to_layers` blocks (r measured r["layers"])."""
    return (r["weight_bytes"] + (to_layers - r["layers"]) * r["layer_bytes"]) / 1e9


def row_cells(r, to_layers, read_gbs):
    L = r["layers"]
    read_gbs = width_read_gbs(r, read_gbs)
    scale = lambda x: x + (to_layers - L) * r["layer_bytes"]  # noqa: E731
    gb = weight_gb(r, to_layers)
    d32 = median_s(r["ctx32"]["steps"], L, to_layers)
    b8 = median_s(r["batch8"]["steps"], L, to_layers)
    label = str(L) if to_layers == L else f"{to_layers} (extrapolated from {L})"
    return [r["precision"], label, f"{r['load_s'] * gb * 1e9 / r['weight_bytes']:.1f}",
            f"{scale(r['peak_rss_bytes']) / 1e9:.2f}", f"{scale(r['resident_bytes']) / 1e9:.2f}",
            f"{median_s(r['ctx32']['prefill'], L, to_layers):.2f}",
            f"{median_s(r['ctx512']['prefill'], L, to_layers):.2f}",
            f"{1e3 * d32:.0f}", f"{1e3 * median_s(r['ctx512']['steps'], L, to_layers):.0f}", f"{8 / b8:.2f}",
            f"{gb:.2f}", f"{read_gbs:.1f}", f"{100 * gb / read_gbs / d32:.0f}%", kernels_text(r)]


def markdown(head, rows):
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(map(str, x)) + " |" for x in rows])


def ours_table(results, args, read_gbs):
    head = ["width", "layers", "load s", "peak GB", "resident GB", "prefill 32 tok s", "prefill 512 tok s",
            "decode ms/tok @32", "decode ms/tok @512", f"batch {args.batch} tok/s", "weights GB/tok",
            "read GB/s (this width)", "% of read floor @32", "kernels chosen"]
    rows = []
    for r in results:
        if "error" in r:
            rows.append([r["precision"], "", "error: " + r["error"][:120]] + [""] * 11)
            continue
        rows.append(row_cells(r, r["layers"], read_gbs))
        if (args.extrapolate or r["layers"] != args.layers) and r["layers"] < bench.FULL_LAYERS:
            rows.append(row_cells(r, bench.FULL_LAYERS, read_gbs))
    return markdown(head, rows)


def side_by_side_table(results, original, cpp, read_gbs):
    """Decode ms/token at 28 layers, 32-token prompt, and prefill seconds: ours, the original, chatglm.cpp; and the
    read floor of our weights (no implementation that reads those bytes per token can decode faster)."""
    head = ["width", "this project ms/tok", "original ms/tok", "chatglm.cpp ms/tok", "read floor ms/tok (ours)",
            "prefill 32 / 512 s: this project", "prefill 32 / 512 s: chatglm.cpp"]
    rows = []
    for r in results:
        if "error" in r:
            continue
        L, p = r["layers"], r["precision"]
        ours = 1e3 * median_s(r["ctx32"]["steps"], L, bench.FULL_LAYERS)
        orig = original.get(p)
        c32, c512 = (cpp.get(32, {}).get(CPP_TYPES.get(base_width(p))),
                    cpp.get(512, {}).get(CPP_TYPES.get(base_width(p))))
        floor = 1e3 * weight_gb(r, bench.FULL_LAYERS) / width_read_gbs(r, read_gbs)
        rows.append([p, f"{ours:.0f}", f"{orig:.0f} ({orig / ours:.2f}x ours)" if orig else "-",
                     f"{c32[1]:.0f} ({c32[1] / ours:.2f}x ours)" if c32 else "-", f"{floor:.0f}",
                     " / ".join(f"{median_s(r[k]['prefill'], L, bench.FULL_LAYERS):.2f}" for k in ("ctx32", "ctx512")),
                     f"{c32[0]:.2f} / {c512[0]:.2f}" if c32 and c512 else "-"])
    return markdown(head, rows)


def header(args, bw_start, bw_end, load_avg):
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    mode = ("--quick: " if args.quick else "") + (f"{args.layers} layers built" + (
        "; the 28-layer rows are extrapolated from the time inside each block" if args.extrapolate else "") + (
        f"; fp32: {args.fp32_layers} layers built, its 28-layer row extrapolated"
        if args.fp32_layers and "fp32" in args.precisions.split(",") else ""))
    return "\n".join([
        f"Measured {now} on {bench.cpu_name()} ({os.cpu_count()} CPUs, {args.threads} threads; flags: "
        f"{' '.join(cpu_flags()) or 'none of ' + ' '.join(FLAGS)}), {platform.system()} {platform.release()}, "
        f"torch {torch.__version__}.",
        f"Memory bandwidth, start / end of this run: read {bw_start[1]:.1f} / {bw_end[1]:.1f} GB/s, copy (read + "
        f"write) {bw_start[0]:.1f} / {bw_end[0]:.1f} GB/s. 1-minute load average {load_avg[0]:.1f} / "
        f"{load_avg[1]:.1f} (other processes share the cores when it is above 0).",
        f"{mode}. Random weights with the real ChatGLM-6B geometry; each width in its own process; greedy decoding "
        f"through the decode engine (chatglm/engine.py), {args.new_tokens} steps x {args.repeats} repeats, medians. Read floor = weight "
        f"bytes per token / the best read bandwidth measured right before and after that width's timings."])


def positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--precisions", default="fp32,bf16,int8,int4", help="of fp32, bf16, int8, int4, int8-qe, int4-qe")
    p.add_argument("--layers", type=positive_int, default=2, help="GLM blocks to build (default 2)")
    p.add_argument("--full-28-layers", action="store_true", help="build all 28 layers: nothing extrapolated")
    p.add_argument("--extrapolate", action="store_true", help="add 28-layer rows estimated from the block times")
    p.add_argument("--quick", action="store_true", help="~2 minutes: 1 layer, 1 repeat, 4 decode steps")
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--workdir", default=os.path.join(os.path.expanduser("~"), ".cache", "chatglm", "bench"))
    p.add_argument("--original-python", help="the original's venv python (side_by_side/README.md section 2)")
    p.add_argument("--original-workdir", help="the folder original_setup.py filled")
    p.add_argument("--original-layers", type=positive_int, default=2)
    p.add_argument("--original-precisions", default="fp32,bf16,int8,int4",
                   help="the widths to time the original at (int8/int4 need chatglm-6b-int4's quantization.py and gcc)")
    p.add_argument("--fp32-layers", type=positive_int,
                   help="build fp32 with this many layers and extrapolate it to 28 (28 fp32 layers need ~27 GB)")
    p.add_argument("--cpp-main", help="chatglm.cpp's built main (side_by_side/README.md section 3)")
    p.add_argument("--cpp-models", help="the folder with glm6b-random-28l-<type>.bin")
    p.add_argument("--fresh-kernel-timing", action="store_true",
                   help="time the kernel candidates in this run instead of reading ~/.cache/chatglm/kernels.json")
    p.add_argument("--out", help="also write the Markdown report here")
    p.add_argument("--json", help="also write every measurement here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--precision", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.layers, args.repeats, args.new_tokens = 1, 1, 4
    args.kernel_cache = tempfile.mkdtemp(prefix="chatglm-kernels-") if args.fresh_kernel_timing else None
    if args.full_28_layers:
        args.layers, args.extrapolate = bench.FULL_LAYERS, False
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()[0]
    bw_start = bench.memory_bandwidth()
    precisions = [x for x in args.precisions.split(",") if x]
    for layers in sorted({layers_for(args, p) for p in precisions}):
        bench.build_checkpoint(args.workdir, layers)  # built once, outside any timed process
    results = []
    # chatglm.cpp runs right after each of our widths, so that a slow spell of a shared machine (seen to last many
    # minutes) lands on both sides of a ratio rather than on one (one run measured our bf16 at 508 ms, its f16,
    # measured 15 minutes later, at 444; the run before, 395 against 499)
    cpp = {32: {}, 512: {}} if args.cpp_main and args.cpp_models else None
    original = {} if args.original_python and args.original_workdir else None
    for prec in precisions:
        results.append(run_precision(args, prec))
        print(f"# {prec}: {'error: ' + results[-1]['error'] if 'error' in results[-1] else 'done'}", file=sys.stderr,
              flush=True)
        kind = CPP_TYPES.get(base_width(prec))
        if cpp is not None and kind and kind not in cpp[32]:  # int4-qe is set beside the q4_0 that int4 measured
            for n in (32, 512):
                cpp[n].update(run_cpp(args, n, [prec]))
            print(f"# chatglm.cpp {kind}: done", file=sys.stderr, flush=True)
        if original is not None and prec in args.original_precisions.split(","):
            original.update(run_original(args, [prec]))
            print(f"# original {prec}: done", file=sys.stderr, flush=True)
    bw_end = bench.memory_bandwidth()
    read_gbs = max(bw_start[1], bw_end[1])  # for results that did not measure their own
    report = [header(args, bw_start, bw_end, (load_start, os.getloadavg()[0])), "",
              ours_table(results, args, read_gbs)]
    if original is not None or cpp is not None:
        report += ["", "Side by side, same run, 28 layers (ours extrapolated unless --full-28-layers), 32-token "
                   "prompt:", "", side_by_side_table(results, original or {}, cpp or {}, read_gbs)]
    else:
        report += ["", "The original and chatglm.cpp were not run (pass --original-python/--original-workdir and "
                   "--cpp-main/--cpp-models; see benchmarks/side_by_side/README.md)."]
    text = "\n".join(report)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "bandwidth": [bw_start, bw_end], "results": results,
                       "original": original, "chatglm_cpp": cpp}, f, indent=1)


if __name__ == "__main__":
    main()
