"""Decode ms/token of the ORIGINAL ChatGLM-6B hub code (THUDM/chatglm-6b v1.1 modeling_chatglm.py) on the same random
6B-geometry checkpoint as benchmarks/bench.py, measured the way that bench measures ours.

    python original_bench.py --workdir DIR --precisions fp32,bf16,int8,int4 [--json out.json]

Run it with the original's venv (transformers 4.27.1; see README.md) after original_setup.py made DIR/orig-<L>l and
DIR/orig-<L>l-cpuq. Per precision, in its own subprocess (threads pinned: torch.set_num_threads + OMP/MKL_NUM_THREADS):
  * load: AutoModel.from_pretrained(folder, trust_remote_code=True) -> .float() (fp32) / .bfloat16() (bf16) /
    .float().quantize(bits) (int8/int4: the chatglm-6b-int4 hub repo's quantization.py, whose CPU kernels gcc
    compiles with -fopenmp at load time into the modules cache and which dequantize each weight to fp32 before an
    fp32 matmul; the chatglm-6b repo's own quantization.py is CUDA-only);
  * warm-up: one short decode (TorchScript functions compile on first calls);
  * `--repeats` runs: random `--prompt-len`-token prompt ending [gMASK]=130001 <sop>=130004 (bench.py's prompt, seed =
    repeat index), `--new-tokens` greedy steps through the original's own loop: stream_generate (what stream_chat
    drives; default) or generate (--loop generate), warpers off (top_k=0, top_p=1, temperature=1), min_new_tokens
    so EOS cannot stop it early (no InvalidScoreLogitsProcessor: it would react to min_new_tokens' -inf on EOS).
  * step time = wall time between successive forwards of the top-level model (the loop's own overhead included:
    the original rebuilds masks / position ids from input_ids.tolist() each step, torch.cat KV cache, ...), the
    first step (prefill) dropped; block time from forward hooks on model.transformer.layers;
    step(28) = step(L) + (28 - L) * block time, as bench.py does.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

# our benchmark's prompt(), so both implementations decode after the very same tokens (benchmarks/bench.py imports
# nothing of our package at module level, so it loads in the original's venv too)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from bench import prompt  # noqa: E402

FULL_LAYERS = 28


def summary(values):
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}



class StepClock:
    """Timestamps every forward of the top-level model and the time spent inside each GLM block."""

    def __init__(self, model):
        self.starts, self.block_s, self._t = [], [], None
        self.hooks = [model.register_forward_pre_hook(self._step)]
        for layer in model.transformer.layers:
            self.hooks.append(layer.register_forward_pre_hook(self._start))
            self.hooks.append(layer.register_forward_hook(self._stop))
        self._cur = None

    def _step(self, *_):
        self.starts.append(time.perf_counter())
        self._cur = []
        self.block_s.append(self._cur)

    def _start(self, *_):
        self._t = time.perf_counter()

    def _stop(self, *_):
        self._cur.append(time.perf_counter() - self._t)

    def reset(self):
        self.starts, self.block_s = [], []

    def samples(self, end):
        """[(step seconds, seconds inside blocks)] per forward; the last step ends at `end`."""
        bounds = self.starts + [end]
        return [(bounds[i + 1] - bounds[i], sum(self.block_s[i])) for i in range(len(self.starts))]

    def close(self):
        for h in self.hooks:
            h.remove()


def run_decode(model, ids, new_tokens, loop):
    import torch
    # No InvalidScoreLogitsProcessor (stream_chat adds it): min_new_tokens puts -inf on EOS, which that processor
    # treats as invalid scores (zeroes them, forces token 5); its own cost is ~0.1 ms/step (isnan/isinf on 130528).
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, top_k=0, top_p=1.0,
              temperature=1.0)
    with torch.no_grad():
        if loop == "stream":
            out = None
            for out in model.stream_generate(ids, **kw):
                pass
        else:
            out = model.generate(ids, num_beams=1, **kw)
    return out


def worker(a):
    import torch
    torch.set_num_threads(a.threads)
    from transformers import AutoModel
    L = a.layers
    quant_bits = {"int8": 8, "int4": 4}.get(a.precision)
    folder = os.path.join(a.workdir, f"orig-{L}l" + ("-cpuq" if quant_bits else ""))
    t = time.perf_counter()
    model = AutoModel.from_pretrained(folder, trust_remote_code=True)
    if a.precision == "bf16":
        model = model.bfloat16()
    else:
        model = model.float()
    if quant_bits:
        kernel_kw = {}
        if a.cpu_kernel == "parallel":
            kernel_kw = dict(compile_parallel_kernel=True, parallel_num=a.threads)
        elif a.cpu_kernel == "single":
            kernel_kw = dict(compile_parallel_kernel=False)
        model = model.quantize(quant_bits, **kernel_kw)
    model = model.eval()
    load_s = time.perf_counter() - t
    qkv = model.transformer.layers[0].attention.query_key_value
    out = {"precision": a.precision, "layers": L, "threads": torch.get_num_threads(), "loop": a.loop,
           "folder": folder, "load_s": load_s,
           "qkv": f"{type(qkv).__name__} {qkv.weight.dtype}" + (f" ({qkv.weight_bit_width}-bit)" if quant_bits else ""),
           "act_dtype": str(model.transformer.final_layernorm.weight.dtype)}
    run_decode(model, prompt(1, 32, model.config, seed=1000), 2, a.loop)  # warm-up: prefill + 1 decode step
    clock = StepClock(model)
    samples, per_repeat, gen = [], [], None
    for r in range(a.repeats):
        clock.reset()
        gen = run_decode(model, prompt(1, a.prompt_len, model.config, seed=r), a.new_tokens, a.loop)
        s = clock.samples(time.perf_counter())[1:]  # [0] is the prefill
        samples += s
        per_repeat.append(statistics.median(x for x, _ in s))
    clock.close()
    out["new_ids"] = gen[0, a.prompt_len:].tolist()
    steps = [s for s, _ in samples]
    blocks = [b / L for _, b in samples]
    full = [s + (FULL_LAYERS - L) * b / L for s, b in samples]
    out.update(decode_s=summary(steps), block_s=summary(blocks), decode_s_full=summary(full),
               per_repeat_median_s=per_repeat)
    print("RESULT " + json.dumps(out), flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True,
                   help="folder holding orig-<L>l and orig-<L>l-cpuq (original_setup.py --workdir)")
    p.add_argument("--hf-modules-cache",
                   help="HF_MODULES_CACHE for the original's remote code (and the int8/int4 CPU kernels gcc builds "
                        "there); default WORKDIR/hf_modules")
    p.add_argument("--precisions", default="fp32,bf16,int8,int4", help="comma-separated: fp32,bf16,int8,int4")
    p.add_argument("--layers", type=int, default=2, help="checkpoint with this many blocks (original_setup.py)")
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--loop", choices=["stream", "generate"], default="stream",
                   help="stream = the original stream_generate (stream_chat's loop); generate = HF model.generate")
    p.add_argument("--cpu-kernel", choices=["parallel", "single", "auto"], default="parallel",
                   help="int8/int4 CPU dequant kernel: parallel = OpenMP kernel with --threads threads; single = "
                        "the 1-thread kernel; auto = the original's default (parallel only if os.cpu_count() >= 4)")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--precision", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return worker(a)
    workdir = os.path.abspath(a.workdir)
    modules_cache = os.path.abspath(a.hf_modules_cache or os.path.join(workdir, "hf_modules"))
    # offline: the remote code comes from the local folders, never from the hub
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads),
               HF_MODULES_CACHE=modules_cache, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    results = []
    for prec in [x for x in a.precisions.split(",") if x]:
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--precision", prec, "--layers", str(a.layers),
               "--new-tokens", str(a.new_tokens), "--prompt-len", str(a.prompt_len), "--repeats", str(a.repeats),
               "--threads", str(a.threads), "--loop", a.loop, "--cpu-kernel", a.cpu_kernel, "--workdir", workdir]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        res = None
        for line in proc.stdout.splitlines():
            if line.startswith("RESULT "):
                res = json.loads(line[7:])
        if res is None:
            tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
            res = {"precision": prec, "error": "\n".join(tail)}
        results.append(res)
        print(f"# {prec}: {'error' if 'error' in res else 'ok'}", file=sys.stderr, flush=True)
    L = a.layers
    head = ["precision", "weights", f"ms/tok ({L} layers) median (min-max)", "per-block ms median (min)",
            f"ms/tok {FULL_LAYERS} layers extrap. median (min)", "per-repeat medians (ms)", "load s"]
    lines = []
    for r in results:
        if "error" in r:
            lines.append([r["precision"], "ERROR", r["error"].splitlines()[-1][:120], "", "", "", ""])
            continue
        d, b, f = r["decode_s"], r["block_s"], r["decode_s_full"]
        lines.append([r["precision"], r["qkv"], f"{1e3 * d['median']:.1f} ({1e3 * d['min']:.1f}-{1e3 * d['max']:.1f})",
                      f"{1e3 * b['median']:.1f} ({1e3 * b['min']:.1f})",
                      f"{1e3 * f['median']:.0f} ({1e3 * f['min']:.0f})",
                      " ".join(f"{1e3 * x:.1f}" for x in r["per_repeat_median_s"]), f"{r['load_s']:.1f}"])
    widths = [max(len(h), *(len(x[i]) for x in lines)) for i, h in enumerate(head)]
    fmt = " | ".join("{:<%d}" % w for w in widths)
    print(f"ORIGINAL ChatGLM-6B (hub v1.1 code, transformers 4.27.1), loop={a.loop}, threads={a.threads}, "
          f"prompt {a.prompt_len}, {a.new_tokens} new tokens x {a.repeats} repeats, batch 1, steps pooled")
    print("\n".join([fmt.format(*head), "-+-".join("-" * w for w in widths)] + [fmt.format(*x) for x in lines]))
    for r in results:
        if "error" in r:
            print(f"\n[{r['precision']} error]\n{r['error']}")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
