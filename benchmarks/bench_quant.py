"""FP32 / BF16 / INT8 / INT4 (/ INT4-QE) on this CPU, with the real ChatGLM-6B geometry (a benchmark, not a test).

    python benchmarks/bench_quant.py [--layers 2] [--full INT8,INT4] [--prompt 128] [--decode 16]

Builds (once) a random FP16 checkpoint in the official layout with the 6B shapes (hidden 4096, inner 16384,
32 heads, vocab 130528) but only --layers blocks, sharded like the official one (~1.7 GB files), then loads it in
a fresh process per configuration with chatglm.load_model and measures:
  load s       load_model() wall time (INT8/INT4: quantizing the FP16 shards while they stream in)
  peak RSS     the process's high-water mark, loading included
  resident     RSS after loading
  prefill      tokens/s for one --prompt token forward
  decode       ms per generated token (KV cache, greedy), best step of all runs
  weight GB/s  bytes of weights one decode step reads x tokens/s, next to the machine's read bandwidth
Configurations named in --full load a real-depth (28-layer) checkpoint and need no extrapolation. The others are
extrapolated to 28 layers: decode = the measured step + (28 - layers) x the time spent inside each block during
that step (forward hooks; a difference against a separately timed lm_head was unstable where lm_head dominates
the step, as in packed fp32); resident =
measured + (28 - layers) x (exact bytes of one layer in that format); peak = that resident + the transient seen
while loading (one shard's pages); load seconds scale with the bytes of the checkpoint. INT4-QE (not run unless
named in --configs) is INT4 with the embedding that lm_head shares quantized too (--quantize-embeddings). The
tokenizer is the demo checkpoint's (it does not affect any number here).
"""
import argparse
import gc
import json
import os
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

GEOMETRY = dict(hidden_size=4096, inner_hidden_size=16384, num_attention_heads=32, vocab_size=130528,
                max_sequence_length=2048)
FULL_LAYERS = 28
SHARD_BYTES = 1.7e9
CONFIGS = {  # name: (load_model dtype, quantize bits)
    "FP32": ("float32", None),
    "BF16": ("bfloat16", None),
    "INT8": ("bfloat16", 8),
    "INT4": ("bfloat16", 4),
    "INT8 fp32-act": ("float32", 8),
    "INT4 fp32-act": ("float32", 4),
    "INT4-QE": ("bfloat16", 4),  # INT4 plus the embedding that lm_head shares (--quantize-embeddings)
}
QUANTIZED_EMBEDDINGS = {"INT4-QE"}
DEFAULT_CONFIGS = ["FP32", "BF16", "INT8", "INT4"]


# ---- the checkpoint -----------------------------------------------------------------------------------------------

def build_checkpoint(folder: str, layers: int) -> str:
    """Random FP16 weights with official key names, sharded with a pytorch_model.bin.index.json."""
    if os.path.isfile(os.path.join(folder, "pytorch_model.bin.index.json")):
        return folder
    from chatglm.demo_checkpoint import ensure_demo_checkpoint
    demo = ensure_demo_checkpoint()
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(demo, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    config.update(GEOMETRY, num_layers=layers, torch_dtype="float16", quantization_bit=0)
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    for name in ("ice_text.model", "tokenizer_config.json"):
        with open(os.path.join(demo, name), "rb") as src, open(os.path.join(folder, name), "wb") as dst:
            dst.write(src.read())
    H, I, V = GEOMETRY["hidden_size"], GEOMETRY["inner_hidden_size"], GEOMETRY["vocab_size"]
    g = torch.Generator().manual_seed(0)

    def rand(*shape, std=0.02):
        return (torch.randn(*shape, generator=g) * std).half()

    def layer_tensors(i):
        p = f"transformer.layers.{i}."
        return {p + "input_layernorm.weight": torch.ones(H, dtype=torch.half),
                p + "input_layernorm.bias": torch.zeros(H, dtype=torch.half),
                p + "attention.query_key_value.weight": rand(3 * H, H),
                p + "attention.query_key_value.bias": rand(3 * H),
                p + "attention.dense.weight": rand(H, H), p + "attention.dense.bias": rand(H),
                p + "post_attention_layernorm.weight": torch.ones(H, dtype=torch.half),
                p + "post_attention_layernorm.bias": torch.zeros(H, dtype=torch.half),
                p + "mlp.dense_h_to_4h.weight": rand(I, H), p + "mlp.dense_h_to_4h.bias": rand(I),
                p + "mlp.dense_4h_to_h.weight": rand(H, I), p + "mlp.dense_4h_to_h.bias": rand(H)}

    groups = [lambda: {"transformer.word_embeddings.weight": rand(V, H)}]
    groups += [lambda i=i: layer_tensors(i) for i in range(layers)]
    groups += [lambda: {"transformer.final_layernorm.weight": torch.ones(H, dtype=torch.half),
                        "transformer.final_layernorm.bias": torch.zeros(H, dtype=torch.half)}]
    # (lm_head.weight, a copy of the embedding in the official files, is left out: loading ignores it)
    shards, current, size = [], {}, 0
    for make in groups:
        tensors = make()
        current.update(tensors)
        size += sum(t.numel() * 2 for t in tensors.values())
        if size >= SHARD_BYTES:
            shards.append(current)
            current, size = {}, 0
    if current:
        shards.append(current)
    weight_map = {}
    for n, shard in enumerate(shards, 1):
        name = f"pytorch_model-{n:05d}-of-{len(shards):05d}.bin"
        torch.save(shard, os.path.join(folder, name))
        weight_map.update({k: name for k in shard})
    with open(os.path.join(folder, "pytorch_model.bin.index.json"), "w", encoding="utf-8") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return folder


# ---- measurements in a worker process ---------------------------------------------------------------------------

def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    # VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over from the parent through fork/exec
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def module_tensors(module):
    """Its parameters, plus the oneDNN-packed bf16 weights of chatglm/cpu_pack.py (not parameters)."""
    packed = [m.packed for m in module.modules() if isinstance(getattr(m, "packed", None), torch.Tensor)]
    return [*module.parameters(), *packed]


def tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        key = id(t) if t is not None and t.is_mkldnn else (t.data_ptr() if t is not None else None)
        if t is None or key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


def layer_read_bytes(layer) -> int:
    """Bytes one decode step reads from a block's weights."""
    return tensor_bytes(module_tensors(layer))


def best_of(fn, repeat):
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def worker(args):
    torch.set_num_threads(args.threads)
    from transformers.cache_utils import DynamicCache
    from chatglm import load_model
    dtype, bits = CONFIGS[args.worker]
    rss0 = rss_bytes()
    t = time.perf_counter()
    tokenizer, model = load_model(args.dir, device="cpu", dtype=dtype, quantize=bits,
                                  quantize_embeddings=args.worker in QUANTIZED_EMBEDDINGS)
    load_s = time.perf_counter() - t
    gc.collect()
    peak_load = peak_rss_bytes()
    resident = rss_bytes()
    L = model.config.num_layers
    H = model.config.hidden_size
    gen = torch.Generator().manual_seed(0)
    body = torch.randint(10, tokenizer.vocab_size - 400, (1, args.prompt - 2), generator=gen)
    cfg = model.config
    ids = torch.cat([body, torch.tensor([[cfg.gmask_token_id, cfg.bos_token_id]])], dim=1)

    def prefill():
        cache = DynamicCache(config=model.config)
        kwargs = {"cache": cache}
        inputs = model.prepare_inputs_for_generation(ids, **kwargs)
        out = model(**inputs)
        return out, model._update_model_kwargs_for_generation(out, kwargs)

    with torch.inference_mode():
        prefill()  # warm-up (INT4 repacks its weights for the CPU kernel here)
        prefill_s = best_of(prefill, args.repeat)

        clock = {"start": 0.0, "inside": 0.0}  # seconds inside the GLM blocks during the current step

        def block_start(*_):
            clock["start"] = time.perf_counter()

        def block_end(*_):
            clock["inside"] += time.perf_counter() - clock["start"]

        for layer in model.transformer.layers:
            layer.register_forward_pre_hook(block_start)
            layer.register_forward_hook(block_end)

        def decode_steps():
            out, kwargs = prefill()
            seq, steps = ids, []
            for _ in range(args.decode):
                t0 = time.perf_counter()
                clock["inside"] = 0.0
                nxt = out.logits[:, -1:].argmax(-1)
                seq = torch.cat([seq, nxt], dim=1)
                inputs = model.prepare_inputs_for_generation(seq, **kwargs)
                out = model(**inputs)
                kwargs = model._update_model_kwargs_for_generation(out, kwargs)
                steps.append((time.perf_counter() - t0, clock["inside"]))
            return steps

        steps = sorted(step for _ in range(args.repeat) for step in decode_steps())
        (decode_s, blocks_s), decode_median_s = steps[0], steps[len(steps) // 2][0]
        # the part that does not scale with depth: embedding, final layer norm, lm_head (one token)
        h = torch.randn(1, 1, H, generator=gen).to(model.transformer.final_layernorm.weight.dtype)
        one = ids[:, :1]
        head_s = best_of(lambda: model.lm_head(model.transformer.final_layernorm(h))
                         + model.transformer.word_embeddings(one).sum(), 5 * args.repeat)
    layer_bytes_mem = tensor_bytes(module_tensors(model.transformer.layers[0]))
    layer_bytes_read = layer_read_bytes(model.transformer.layers[0])
    head_bytes = tensor_bytes([model.lm_head.weight, getattr(model.lm_head, "weight_scale", None),
                               *model.transformer.final_layernorm.parameters()])
    result = dict(config=args.worker, layers=L, load_s=load_s, rss_before_load=rss0, peak_rss=peak_load,
                  peak_rss_after_run=peak_rss_bytes(), resident=resident, prefill_s=prefill_s,
                  prompt=int(ids.shape[1]), decode_s=decode_s, decode_median_s=decode_median_s, head_s=head_s,
                  decode_blocks_s=blocks_s,
                  layer_bytes_mem=layer_bytes_mem, layer_bytes_read=layer_bytes_read, head_bytes=head_bytes,
                  weight_dtype=str(model.transformer.layers[0].attention.dense.weight.dtype))
    print("RESULT " + json.dumps(result), flush=True)


# ---- the machine and the table ----------------------------------------------------------------------------------

def read_bandwidth(threads: int) -> dict:
    torch.set_num_threads(threads)
    a = torch.ones(512 * 1024 * 1024 // 4)
    b = torch.empty_like(a)
    b.copy_(a)
    copy_s = best_of(lambda: b.copy_(a), 10)
    read_s = best_of(lambda: a.sum(), 10)
    nbytes = a.numel() * 4
    return {"copy": 2 * nbytes / copy_s, "read": nbytes / read_s}


def extrapolate(r: dict, layers: int = FULL_LAYERS) -> dict:
    extra_layers = layers - r["layers"]
    decode = r["decode_s"] + extra_layers * r["decode_blocks_s"] / r["layers"]
    read_bytes = layers * r["layer_bytes_read"] + r["head_bytes"]
    # loading does work in proportion to the bytes it reads: the embedding plus one share per layer
    H, I, V = GEOMETRY["hidden_size"], GEOMETRY["inner_hidden_size"], GEOMETRY["vocab_size"]
    layer_file, embedding_file = 2 * (4 * H * H + 2 * H * I + 7 * H + I), 2 * V * H
    load_scale = (embedding_file + layers * layer_file) / (embedding_file + r["layers"] * layer_file)
    return dict(load_s=r["load_s"] * load_scale,
                peak_rss=r["peak_rss"] if extra_layers == 0 else
                r["resident"] + extra_layers * r["layer_bytes_mem"] + max(r["peak_rss"] - r["resident"], 0),
                resident=r["resident"] + extra_layers * r["layer_bytes_mem"],
                prefill_tps=r["prompt"] / (r["prefill_s"] * (layers / r["layers"])),
                decode_ms=decode * 1e3, weight_gbps=read_bytes / decode / 1e9, read_gb=read_bytes / 1e9)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=2, help="blocks in the random checkpoint (28 = the real depth)")
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens for the prefill measurement")
    p.add_argument("--decode", type=int, default=16, help="tokens generated per decode measurement")
    p.add_argument("--repeat", type=int, default=3, help="repetitions (the best is kept)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--full", default="", help="configs to measure on a 28-layer checkpoint (about 12 GB on disk)")
    p.add_argument("--dir", default=None, help="checkpoint folder (default /tmp/chatglm-bench-6b-L<layers>)")
    p.add_argument("--configs", default=",".join(DEFAULT_CONFIGS),
                   help=f"comma-separated subset of {', '.join(CONFIGS)}")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)

    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    full = {c.strip() for c in args.full.split(",") if c.strip()}
    unknown = [c for c in configs + sorted(full) if c not in CONFIGS]
    if unknown:
        p.error(f"unknown config(s) {unknown}; choose from {list(CONFIGS)}")
    folders = {}
    for layers in sorted({FULL_LAYERS if c in full else args.layers for c in configs}):
        folder = args.dir if args.dir and layers == args.layers else f"/tmp/chatglm-bench-6b-L{layers}"
        t = time.perf_counter()
        folders[layers] = build_checkpoint(folder, layers)
        print(f"checkpoint: {folder} ({layers} layers, built/reused in {time.perf_counter() - t:.0f} s)", flush=True)
    bw = read_bandwidth(args.threads)
    with open("/proc/loadavg") as f:
        load_avg = f.read().split()[:3]
    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, {args.threads} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, load average {' '.join(load_avg)}; read bandwidth "
          f"{bw['read'] / 1e9:.1f} GB/s, copy {bw['copy'] / 1e9:.1f} GB/s (read+write)", flush=True)
    results = []
    for name in configs:
        layers = FULL_LAYERS if name in full else args.layers
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, "--dir", folders[layers],
               "--prompt", str(args.prompt), "--decode", str(args.decode), "--repeat", str(args.repeat),
               "--threads", str(args.threads), "--layers", str(layers)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not lines:
            print(f"{name}: failed (exit {proc.returncode})\n{proc.stderr[-2000:]}", flush=True)
            continue
        r = json.loads(lines[-1][len("RESULT "):])
        results.append(r)
        again = read_bandwidth(args.threads)  # keep the best seen: the cores and the memory bus may be shared
        bw = {k: max(v, again[k]) for k, v in bw.items()}
        print(f"  {name}: measured on {r['layers']} layers: load {r['load_s']:.1f} s, peak RSS "
              f"{r['peak_rss'] / 1e9:.2f} GB, resident {r['resident'] / 1e9:.2f} GB, prefill "
              f"{r['prefill_s']:.2f} s, decode {r['decode_s'] * 1e3:.0f} ms/token (median "
              f"{r['decode_median_s'] * 1e3:.0f}; lm_head part {r['head_s'] * 1e3:.0f} ms)", flush=True)
    if not results:
        return 1
    fp32 = next((extrapolate(r) for r in results if r["config"] == "FP32"), None)
    print(f"\nmachine read bandwidth, best of {len(results) + 1} measurements: {bw['read'] / 1e9:.1f} GB/s "
          f"(copy {bw['copy'] / 1e9:.1f} GB/s, read+write)")
    print(f"\n28-layer figures (prompt {results[0]['prompt']} tokens, {args.threads} threads; times are the best of "
          f"{args.repeat} runs / {args.repeat * args.decode} decode steps, since the cores may be shared; GB = 10^9 "
          f"bytes; process baseline before loading {results[0]['rss_before_load'] / 1e9:.2f} GB):\n")
    print("| config | layers measured | load s | peak RSS GB | resident GB | prefill tok/s | decode ms/token "
          "| vs FP32 decode | weights read GB/token | weight GB/s (machine read GB/s) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        e = extrapolate(r)
        speedup = f"{fp32['decode_ms'] / e['decode_ms']:.1f}x" if fp32 else "-"
        print(f"| {r['config']} | {r['layers']} | {e['load_s']:.0f} | {e['peak_rss'] / 1e9:.2f} | {e['resident'] / 1e9:.2f} | "
              f"{e['prefill_tps']:.1f} | {e['decode_ms']:.0f} | {speedup} | {e['read_gb']:.2f} | "
              f"{e['weight_gbps']:.1f} ({bw['read'] / 1e9:.1f}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
