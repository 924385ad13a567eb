"""Decode-step attention on CPU: chatglm.modeling.attention (the path the model runs) vs PyTorch's fused SDPA.

    python benchmarks/bench_attention.py                      # bf16, 32 heads x 128, keys 64 .. 2048

One query (a decoding step) against T cached keys (views of a larger buffer, as the KV cache gives them), ChatGLM-6B's
32 heads of 128. For 16-bit activations on CPU the
model computes scores and softmax with two matmuls and an fp32 softmax instead of calling SDPA, whose fused kernel
is slow for a single query; this prints both, with the largest difference from an fp32 reference, so the choice
can be re-checked on another CPU or PyTorch. Median of --repeats timings, threads pinned.
"""
import argparse
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from chatglm.modeling import attention  # noqa: E402


def median_us(fn, repeats):
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e6


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--keys", default="64,256,600,1024,2048")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--repeats", type=int, default=50)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)
    print(f"{args.dtype}, {args.threads} threads, 1 query x 32 heads x 128")
    print(f"{'keys':>6} | {'model path us':>13} | {'SDPA us':>8} | {'ratio':>5} | {'max err model':>13} | {'max err SDPA':>12}")
    for T in map(int, args.keys.split(",")):
        # keys and values are views of a bigger buffer, as the KV cache (chatglm/kv_cache.py) hands them out
        q, k, v = (torch.randn(1, 32, n, 128, generator=g).to(dtype)[:, :, :m] for n, m in ((1, 1), (T + 256, T),
                                                                                           (T + 256, T)))
        scale = 1 / math.sqrt(128)
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), scale=scale)
        with torch.inference_mode():
            ours = median_us(lambda: attention(q, k, v, None, 1), args.repeats)
            fused = median_us(lambda: F.scaled_dot_product_attention(q, k, v, scale=scale), args.repeats)
            e_ours = (attention(q, k, v, None, 1).float() - ref).abs().max().item()
            e_fused = (F.scaled_dot_product_attention(q, k, v, scale=scale).float() - ref).abs().max().item()
        print(f"{T:>6} | {ours:>13.0f} | {fused:>8.0f} | {fused / ours:>5.1f} | {e_ours:>13.1e} | {e_fused:>12.1e}")


if __name__ == "__main__":
    main()
