"""Generation speed of this package on a random checkpoint with the real ChatGLM-6B geometry.

    python benchmarks/bench.py --json bench.json          # fp32, bf16, int8, int4 on CPU; 2 layers, extrapolated
    python benchmarks/bench.py --layers 28 --precisions int4   # all 28 layers where memory allows

Per precision it measures load seconds, peak RSS, prefill tokens/s, decode ms/token at batch 1 and tokens/s at
batch 8, and the achieved bandwidth (bytes of weights read per token x tokens/s) next to this machine's copy
bandwidth, measured in the same run (at its start and end). Each precision runs in its own subprocess, so peak RSS
is its own. Threads are pinned (torch.set_num_threads, OMP/MKL_NUM_THREADS); every figure is a median over
repeated runs with min and max. With fewer than 28 layers the 28-layer row is extrapolated from the time measured
inside each GLM block (forward hooks): step(28) = step(L) + (28 - L) x block time, per step; bytes, peak RSS and
load time add 28 - L layers' worth. Decoding goes through chatglm.engine (what chat() and the model service run),
greedy, one sequence per batch row.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

# ChatGLM-6B (THUDM/chatglm-6b config.json): 28 layers, the ids of its real tokenizer
GEOMETRY = dict(hidden_size=4096, inner_hidden_size=16384, num_attention_heads=32, vocab_size=130528,
                max_sequence_length=2048, bos_token_id=130004, eos_token_id=130005, mask_token_id=130000,
                gmask_token_id=130001, pad_token_id=3, position_encoding_2d=True, layernorm_epsilon=1e-5,
                use_cache=True, torch_dtype="float16")
FULL_LAYERS = 28
PRECISIONS = {"fp32": (torch.float32, None), "bf16": (torch.bfloat16, None), "int8": (None, 8),
              "int4": (None, 4)}


# ---- the machine ---------------------------------------------------------------------------------------------------

def memory_bandwidth(n_bytes=1 << 30, repeats=7):
    """(copy GB/s counting read + write bytes, as STREAM does; read-only GB/s of a sum), best of `repeats`."""
    a = torch.ones(n_bytes // 4)
    b = torch.empty_like(a)
    copy, read = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        b.copy_(a)
        copy.append(time.perf_counter() - t)
        t = time.perf_counter()
        a.sum()
        read.append(time.perf_counter() - t)
    return 2 * n_bytes / min(copy) / 1e9, n_bytes / min(read) / 1e9


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


# ---- the random checkpoint -----------------------------------------------------------------------------------------

def build_checkpoint(workdir: str, layers: int) -> str:
    """A folder with `layers` random fp16 GLM blocks in the official layout (reused when already built)."""
    from safetensors.torch import save_file

    from chatglm.configuration import ChatGLMConfig
    from chatglm.demo_checkpoint import ensure_demo_checkpoint
    from chatglm.modeling import ChatGLMForConditionalGeneration
    folder = os.path.join(workdir, f"glm6b-random-{layers}l")
    if os.path.isfile(os.path.join(folder, "done")):
        return folder
    os.makedirs(folder, exist_ok=True)
    config = ChatGLMConfig(num_layers=layers, **GEOMETRY)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in ChatGLMForConditionalGeneration(config).state_dict().items()
                  if not k.endswith("inv_freq") and k != "lm_head.weight"}
    gen = torch.Generator().manual_seed(0)
    state = {}
    for k, shape in shapes.items():
        if k.endswith("layernorm.weight"):
            state[k] = torch.ones(shape, dtype=torch.float16)
        elif k.endswith("bias"):
            state[k] = torch.zeros(shape, dtype=torch.float16)
        else:
            state[k] = (torch.randn(shape, generator=gen) * 0.02).half()
    save_file(state, os.path.join(folder, "model.safetensors"))
    config.save_pretrained(folder)
    demo = ensure_demo_checkpoint()  # only its tokenizer files: load_model wants them, the benchmark never tokenizes
    for name in ("ice_text.model", "tokenizer_config.json"):
        with open(os.path.join(demo, name), "rb") as src, open(os.path.join(folder, name), "wb") as dst:
            dst.write(src.read())
    open(os.path.join(folder, "done"), "w").close()
    return folder


# ---- one (precision, layers) run, in its own process ---------------------------------------------------------------

def prompt(batch, length, config, seed=0):
    """Random ordinary tokens ending in [gMASK] <sop>, as the tokenizer ends every ChatGLM prompt."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(20000, 120000, (batch, length), generator=g)
    ids[:, -2], ids[:, -1] = config.gmask_token_id, config.bos_token_id
    return ids


def weight_bytes(model):
    """Bytes one decode step reads: every parameter and buffer once (the tied embedding is read by lm_head)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    for m in model.modules():  # oneDNN-packed bf16 weights (chatglm/cpu_pack.py) are not parameters
        packed = getattr(m, "packed", None)
        if isinstance(packed, torch.Tensor):
            total += packed.numel() * packed.element_size()
        for chunk, _ in getattr(m, "chunks", ()):  # the packed embedding that lm_head shares
            total += chunk.numel() * chunk.element_size()
    return total


class BlockClock:
    """Wall time spent inside the GLM blocks per forward, via forward hooks, so the per-layer cost comes from every
    block of every step of one run (robust to other processes on the machine) instead of a difference of runs."""

    def __init__(self, model):
        self.block_s, self._t = [], None
        self.hooks = []
        for layer in model.transformer.layers:
            self.hooks.append(layer.register_forward_pre_hook(self._start))
            self.hooks.append(layer.register_forward_hook(self._stop))

    def _start(self, *_):
        self._t = time.perf_counter()

    def _stop(self, *_):
        self.block_s.append(time.perf_counter() - self._t)

    def close(self):
        for h in self.hooks:
            h.remove()


def timed_forwards(model, clock, run):
    """[(step seconds, seconds inside blocks)] for each forward `run` makes (a generator of steps)."""
    out, t = [], time.perf_counter()
    for _ in run:
        now = time.perf_counter()
        blocks = sum(clock.block_s)
        clock.block_s.clear()
        out.append((now - t, blocks))
        t = time.perf_counter()
    return out


def decode_run(model, ids, new_tokens):
    """The engine (chatglm/engine.py, what chat() and the service run), greedy: one sequence per row of ids. Yields
    once after the prefills (one per step, the others decoding meanwhile), then once per decode step of all rows."""
    from chatglm.engine import Engine, Sequence
    from chatglm.validation import GenerationOptions
    engine = Engine(model, kv_budget=1 << 62)
    options = GenerationOptions(do_sample=False, max_new_tokens=new_tokens + len(ids) + 1, max_length=2048)
    seqs = [Sequence(row, options, None, model.config) for row in ids.tolist()]  # random ids: no text
    for seq in seqs:
        engine.add(seq)
        engine.step()
    yield
    for _ in range(new_tokens):
        engine.step()
        assert len(engine.running) == len(seqs)  # no row left early: every step decodes the whole batch
        yield


def summary(values):
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def peak_rss():
    """This process's high-water RSS (VmHWM; ru_maxrss would carry over the parent's peak across exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def per_layer_fit(samples, layers, full=FULL_LAYERS):
    """Step seconds at `layers` and extrapolated to `full` layers, from [(step s, block s)]: the step minus its
    blocks is the fixed part (embedding, lm_head, sampling); the blocks scale with the layer count."""
    steps = [s for s, _ in samples]
    full_steps = [s + (full - layers) * b / layers for s, b in samples]
    return summary(steps), summary(full_steps)


def worker(args):
    torch.set_num_threads(args.threads)
    from chatglm import load_model
    dtype, bits = PRECISIONS[args.precision]
    folder = build_checkpoint(args.workdir, args.layers)
    t = time.perf_counter()
    _, model = load_model(folder, device="cpu", dtype=dtype, quantize=bits)
    load_s = time.perf_counter() - t
    L = args.layers
    out = {"precision": args.precision, "layers": L, "threads": torch.get_num_threads(), "batch": args.batch,
           "dtype": str(model.transformer.final_layernorm.weight.dtype).replace("torch.", ""), "load_s": load_s}
    cfg = model.config
    with torch.inference_mode():
        model(input_ids=prompt(1, 32, cfg), use_cache=True, logits_to_keep=1)  # warm-up (kernels may repack)
    total, layer = weight_bytes(model), weight_bytes(model.transformer.layers[0])
    out["weight_bytes"] = {"measured": total, "per_layer": layer, "full": total + (FULL_LAYERS - L) * layer}
    clock = BlockClock(model)
    out["prefill_s"], out["prefill_s_full"] = {}, {}
    for n in args.prompts:
        reps = args.repeats if n <= 512 else 1
        samples = []
        for r in range(reps):
            ids = prompt(1, n, cfg, seed=r)
            with torch.inference_mode():
                run = (model(input_ids=ids, use_cache=True, logits_to_keep=1) for _ in range(1))
                samples += timed_forwards(model, clock, run)
        out["prefill_s"][str(n)], out["prefill_s_full"][str(n)] = per_layer_fit(samples, L)
    for batch, key in ((1, "decode_b1_s"), (args.batch, "decode_batch_s")):
        samples = []
        for r in range(args.repeats):
            samples += timed_forwards(model, clock, decode_run(model, prompt(batch, 32, cfg, seed=r),
                                                                args.new_tokens))[1:]  # [0]: the prefills
        out[key], out[key + "_full"] = per_layer_fit(samples, L)
    clock.close()
    out["peak_rss_bytes"] = peak_rss()
    # a full-size model holds (28 - L) more layers; loading time scales with the bytes loaded
    out["peak_rss_bytes_full"] = out["peak_rss_bytes"] + (FULL_LAYERS - L) * layer
    out["load_s_full"] = load_s * out["weight_bytes"]["full"] / total
    print("RESULT " + json.dumps(out), flush=True)


# ---- the driver ----------------------------------------------------------------------------------------------------

def run_one(args, precision, layers):
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--precision", precision, "--layers", str(layers),
           "--threads", str(args.threads), "--workdir", args.workdir, "--repeats", str(args.repeats),
           "--new-tokens", str(args.new_tokens), "--batch", str(args.batch),
           "--prompts", ",".join(map(str, args.prompts))]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"precision": precision, "layers": layers, "error": err}


def rows_of(r):
    """The measured row and the 28-layer row of one worker result, in the table's terms."""
    if "error" in r:
        return [r]
    measured = {"precision": r["precision"], "layers": str(r["layers"]), "load_s": r["load_s"],
                "peak_rss_bytes": r["peak_rss_bytes"], "weight_bytes": r["weight_bytes"]["measured"],
                "prefill_s": r["prefill_s"], "decode_b1_s": r["decode_b1_s"], "decode_batch_s": r["decode_batch_s"],
                "batch": r["batch"]}
    full = {"precision": r["precision"], "layers": f"{FULL_LAYERS} (extrap.)", "load_s": r["load_s_full"],
            "peak_rss_bytes": r["peak_rss_bytes_full"], "weight_bytes": r["weight_bytes"]["full"],
            "prefill_s": r["prefill_s_full"], "decode_b1_s": r["decode_b1_s_full"],
            "decode_batch_s": r["decode_batch_s_full"], "batch": r["batch"]}
    return [measured, full]


def table(rows, copy_gbs, prompts):
    head = (["precision", "layers", "load s", "peak RSS GB"] + [f"prefill {n} tok/s" for n in prompts]
            + ["decode b1 ms/tok median (min-max)", "b8 tok/s", "weights GB/tok", "achieved GB/s (best)",
               "floor ms/tok", "% of floor (best)"])
    lines = []
    for r in rows:
        if "error" in r:
            lines.append([r["precision"], str(r["layers"]), "error: " + r["error"][:100]] + [""] * (len(head) - 3))
            continue
        d = r["decode_b1_s"]
        gb = r["weight_bytes"] / 1e9
        floor = gb / copy_gbs
        lines.append([r["precision"], r["layers"], f"{r['load_s']:.1f}", f"{r['peak_rss_bytes'] / 1e9:.2f}"]
                     + [f"{int(n) / r['prefill_s'][str(n)]['median']:.1f}" for n in prompts]
                     + [f"{1e3 * d['median']:.0f} ({1e3 * d['min']:.0f}-{1e3 * d['max']:.0f})",
                        f"{r['batch'] / r['decode_batch_s']['median']:.2f}", f"{gb:.2f}",
                        f"{gb / d['median']:.1f} ({gb / d['min']:.1f})", f"{1e3 * floor:.0f}",
                        f"{100 * floor / d['median']:.0f}% ({100 * floor / d['min']:.0f}%)"])
    widths = [max(len(h), *(len(x[i]) for x in lines)) for i, h in enumerate(head)]
    fmt = " | ".join("{:<%d}" % w for w in widths)
    return "\n".join([fmt.format(*head), "-+-".join("-" * w for w in widths)] + [fmt.format(*x) for x in lines])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--precisions", default="fp32,bf16,int8,int4")
    p.add_argument("--layers", type=int, default=2, help="GLM blocks to build (28 = the whole model, if it fits)")
    p.add_argument("--prompts", default="32,512,2048", help="prefill prompt lengths")
    p.add_argument("--new-tokens", type=int, default=16, help="decode steps per run")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3, help="runs per measurement (prompts > 512: one)")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--workdir", default=os.path.join(os.path.expanduser("~"), ".cache", "chatglm", "bench"))
    p.add_argument("--json", help="also write all rows and the machine to this file")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--precision", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.prompts = [int(x) for x in str(args.prompts).split(",") if x]
    if args.worker:
        return worker(args)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    copy_gbs, read_gbs = memory_bandwidth()
    build_checkpoint(args.workdir, args.layers)  # built once, outside any timed process
    results, rows = [], []
    for prec in args.precisions.split(","):
        r = run_one(args, prec, args.layers)
        print(json.dumps(r), file=sys.stderr, flush=True)
        results.append(r)
        rows += rows_of(r)
    copy_end, read_end = memory_bandwidth()
    machine = {"cpu": cpu_name(), "cores": os.cpu_count(), "threads": args.threads, "torch": torch.__version__,
               "copy_bandwidth_gbs": [copy_gbs, copy_end], "read_bandwidth_gbs": [read_gbs, read_end],
               "load_average_start_end": [load_before, os.getloadavg()[0]]}
    copy = max(copy_gbs, copy_end)
    print(f"{machine['cpu']}, {machine['cores']} cores, {args.threads} threads, torch {torch.__version__}. Copy "
          f"bandwidth {copy_gbs:.1f} / {copy_end:.1f} GB/s (read+write, start / end of run), read {read_gbs:.1f} / "
          f"{read_end:.1f} GB/s; floor = weight bytes / {copy:.1f} GB/s. 1-min load average {load_before:.1f} at "
          f"start, {os.getloadavg()[0]:.1f} at end (other processes share the cores). {args.layers} layers built; "
          f"the {FULL_LAYERS}-layer rows add {FULL_LAYERS - args.layers} x the time measured inside each block. Decode: "
          f"{args.new_tokens} greedy steps after a 32-token prompt x {args.repeats} runs, per-step median (min-max).")
    print(table(rows, copy, args.prompts))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "args": vars(args), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
