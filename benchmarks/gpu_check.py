"""One command that checks this project on a CUDA GPU (<= 8 minutes on one H100, no internet needed).

    python benchmarks/gpu_check.py [--json gpu_check.json]
    python benchmarks/gpu_check.py --dry-run      # every part on the CPU at tiny size: proves the plumbing

Parts, each in its own process (one failing or running out of time does not hide the others):
  cuda_tests   the tests that run on GPUs (tests/test_utils_multigpu.py; its CUDA tests skip without one)
  checkpoint   the random 28-layer checkpoint with the real 6B geometry (benchmarks/bench.py; built once, reused)
  fp16, int8, int4   load it on the GPU, decode ms/token at batch 1 (32-token prompt), batch-8 tokens/s, GPU memory
  ptuning      20 P-Tuning v2 steps of ptuning/main.py on the demo model
  gpus         utils.load_model_on_gpus over every visible GPU, then one chat
Writes one JSON (every part's status, seconds, numbers or error) and prints a table. Without a CUDA device it exits
with status 2 and says so. What it needs installed: benchmarks/README.md.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

import torch  # noqa: E402

CUDA_TESTS = ["tests/test_utils_multigpu.py"]  # the tests that run on CUDA devices when present (they skip otherwise)
PARTS = ("cuda_tests", "checkpoint", "fp16", "int8", "int4", "ptuning", "gpus")
TIMEOUT_S = {"cuda_tests": 120, "checkpoint": 150, "fp16": 60, "int8": 60, "int4": 60, "ptuning": 90, "gpus": 45}
DRY_TIMEOUT_S = 300


def device(args) -> str:
    return "cpu" if args.dry_run else "cuda"


def sync(args):
    if not args.dry_run:
        torch.cuda.synchronize()


def checkpoint_folder(args) -> str:
    import bench
    if args.dry_run:  # the demo checkpoint: same format, tiny geometry
        from chatglm.demo_checkpoint import ensure_demo_checkpoint
        return ensure_demo_checkpoint()
    return bench.build_checkpoint(args.workdir, args.layers)


# ---- the parts (each returns a dict of numbers; an exception marks the part failed) --------------------------------

def part_cuda_tests(args):
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider"] + CUDA_TESTS
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    summary = (proc.stdout.strip().splitlines() or ["no output"])[-1]
    if proc.returncode not in (0, 5):  # 5: nothing collected
        raise RuntimeError(f"pytest exit {proc.returncode}: {summary}")
    return {"summary": summary}


def part_checkpoint(args):
    return {"folder": checkpoint_folder(args)}


def prompt(batch, config, seed):
    """bench.prompt's random ordinary tokens ending in [gMASK] <sop>, kept inside a small demo vocabulary too."""
    high = min(120000, config.vocab_size)
    ids = torch.randint(high // 6, high, (batch, 32), generator=torch.Generator().manual_seed(seed))
    ids[:, -2], ids[:, -1] = config.gmask_token_id, config.bos_token_id
    return ids


def step_times(model, ids, new_tokens, args):
    """Seconds of each decode step after the prefills (greedy, through the engine: bench.decode_run)."""
    import bench
    times, t = [], time.perf_counter()
    for _ in bench.decode_run(model, ids, new_tokens):
        sync(args)
        times.append(time.perf_counter() - t)
        t = time.perf_counter()
    return times[1:]


def part_decode(args, bits):
    from chatglm import load_model
    folder = checkpoint_folder(args)
    dtype = torch.float32 if args.dry_run else torch.float16
    t = time.perf_counter()
    _, model = load_model(folder, device=device(args), dtype=dtype, quantize=bits or None)
    sync(args)
    out = {"load_s": time.perf_counter() - t, "layers": model.config.num_layers}
    if not args.dry_run:
        torch.cuda.reset_peak_memory_stats()
        out["gpu_memory_after_load_gb"] = torch.cuda.memory_allocated() / 1e9
    step_times(model, prompt(1, model.config, 0), 4, args)  # warm-up
    steps = step_times(model, prompt(1, model.config, 1), args.new_tokens, args)
    out["decode_ms_per_token"] = 1e3 * statistics.median(steps)
    batch = step_times(model, prompt(8, model.config, 2), args.new_tokens, args)
    out["batch8_tokens_per_s"] = 8 / statistics.median(batch)
    if not args.dry_run:
        out["gpu_peak_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
    return out


def part_ptuning(args):
    from chatglm.demo_checkpoint import ensure_demo_checkpoint
    data = os.path.join(ROOT, "ptuning", "data", "AdvertiseGen-sample", "train.json")
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, os.path.join(ROOT, "ptuning", "main.py"), "--do_train", "--train_file", data,
               "--prompt_column", "content", "--response_column", "summary", "--model_name_or_path",
               ensure_demo_checkpoint(), "--output_dir", out, "--max_source_length", "48", "--max_target_length",
               "64", "--per_device_train_batch_size", "2", "--max_steps", str(2 if args.dry_run else 20),
               "--logging_steps", "1" if args.dry_run else "5", "--save_steps", "1000", "--learning_rate", "0.02",
               "--pre_seq_len", "8",
               "--disable_tqdm", "true", "--report_to", "none"] + (["--use_cpu", "true"] if args.dry_run else [])
        proc = subprocess.run(cmd, cwd=os.path.join(ROOT, "ptuning"), capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"ptuning/main.py exit {proc.returncode}: "
                               f"{(proc.stderr.strip().splitlines() or ['no output'])[-1]}")
        with open(os.path.join(out, "trainer_state.json")) as f:
            state = json.load(f)
    losses = [e["loss"] for e in state["log_history"] if "loss" in e]
    return {"steps": state["global_step"], "first_loss": losses[0] if losses else None,
            "last_loss": losses[-1] if losses else None}


def part_gpus(args):
    from chatglm import ChatGLMTokenizer
    from chatglm.demo_checkpoint import ensure_demo_checkpoint
    from utils import load_model_on_gpus
    n = 0 if args.dry_run else torch.cuda.device_count()
    folder = ensure_demo_checkpoint()
    model = load_model_on_gpus(folder, num_gpus=n) if n >= 2 else load_model_on_gpus(folder, num_gpus=1,
                                                                                        device=device(args))
    tokenizer = ChatGLMTokenizer.from_pretrained(folder)
    response, _ = model.chat(tokenizer, "你好", max_length=40, temperature=0)
    return {"visible_gpus": n, "devices": sorted({str(p.device) for p in model.parameters()}),
            "reply_chars": len(response)}


RUNNERS = {"cuda_tests": part_cuda_tests, "checkpoint": part_checkpoint, "fp16": lambda a: part_decode(a, 0),
           "int8": lambda a: part_decode(a, 8), "int4": lambda a: part_decode(a, 4), "ptuning": part_ptuning,
           "gpus": part_gpus}


# ---- the driver ----------------------------------------------------------------------------------------------------

def run_part(args, part) -> dict:
    """One part in its own process, with its own time limit."""
    with tempfile.NamedTemporaryFile(suffix=".json") as result:
        cmd = [sys.executable, os.path.abspath(__file__), "--part", part, "--result-file", result.name, "--workdir",
               args.workdir, "--layers", str(args.layers), "--new-tokens", str(args.new_tokens)]
        cmd += ["--dry-run"] if args.dry_run else []
        limit = DRY_TIMEOUT_S if args.dry_run else TIMEOUT_S[part]
        t = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=limit)
        except subprocess.TimeoutExpired:
            return {"status": "timeout", "seconds": limit, "error": f"still running after {limit} s"}
        seconds = time.perf_counter() - t
        try:
            with open(result.name) as f:
                return {**json.load(f), "seconds": seconds}
        except (OSError, ValueError):
            tail = (proc.stderr.strip().splitlines() or proc.stdout.strip().splitlines() or ["no output"])[-1]
            return {"status": "failed", "seconds": seconds, "error": tail}


def in_part(args):
    """Run one part here; write {"status": "ok", "numbers": ...} or {"status": "failed", "error": ...}."""
    try:
        out = {"status": "ok", "numbers": RUNNERS[args.part](args)}
    except Exception as e:  # reported in the table; the other parts still run
        out = {"status": "failed", "error": f"{type(e).__name__}: {e}"[:500]}
    with open(args.result_file, "w") as f:
        json.dump(out, f)


def table(results) -> str:
    lines = ["| part | status | s | result |", "|---|---|---|---|"]
    for part, r in results.items():
        shown = r.get("numbers") or r.get("error", "")
        if isinstance(shown, dict):
            shown = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in shown.items())
        lines.append(f"| {part} | {r['status']} | {r.get('seconds', 0):.0f} | {shown} |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of: {', '.join(PARTS)}")
    p.add_argument("--dry-run", action="store_true", help="run every part on the CPU at tiny size")
    p.add_argument("--json", default="gpu_check.json", help="where to write the results")
    p.add_argument("--layers", type=int, default=28, help="layers of the random 6B-geometry checkpoint")
    p.add_argument("--new-tokens", type=int, default=32, help="decode steps timed per measurement")
    p.add_argument("--workdir", default=os.path.join(os.path.expanduser("~"), ".cache", "chatglm", "bench"))
    p.add_argument("--part", choices=PARTS, help=argparse.SUPPRESS)
    p.add_argument("--result-file", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    unknown = [x for x in args.parts.split(",") if x not in PARTS]
    if unknown:
        p.error(f"unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    if args.dry_run:
        args.new_tokens = min(args.new_tokens, 4)
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.part:
        return in_part(args)
    if not args.dry_run and not torch.cuda.is_available():
        print(f"gpu_check: no CUDA device is visible (torch {torch.__version__}, built with CUDA "
                 f"{torch.version.cuda or 'none'}); run it on a machine with an NVIDIA GPU and a CUDA build of "
                 f"torch, or pass --dry-run to exercise every part on the CPU at tiny size.", file=sys.stderr)
        return 2
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if not args.dry_run else []
    results = {}
    for part in args.parts.split(","):
        results[part] = run_part(args, part)
        print(f"# {part}: {results[part]['status']} ({results[part].get('seconds', 0):.0f} s)", flush=True)
    report = {"dry_run": args.dry_run, "gpus": gpus, "torch": torch.__version__, "cuda": torch.version.cuda,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "parts": results}
    with open(args.json, "w") as f:
        json.dump(report, f, indent=1)
    print(f"{'dry run on the CPU' if args.dry_run else ', '.join(gpus)}; torch {torch.__version__}; "
          f"results in {args.json}")
    print(table(results))
    return 0 if all(r["status"] == "ok" for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
