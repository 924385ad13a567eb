"""Decode cost per GLM block at a long context: this package's in-place KVCache vs transformers' DynamicCache
(which concatenates, copying the whole cache every step), on bench.py's random 6B-geometry checkpoint.

    python benchmarks/bench_kv_cache.py [--context 1900] [--dtype float32] [--layers 2]
"""
import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import ROOT, BlockClock, build_checkpoint, prompt  # noqa: E402  (bench also puts the repo on sys.path)

import torch  # noqa: E402
from transformers.cache_utils import DynamicCache  # noqa: E402


def block_ms(model, clock, ids, cache, steps):
    """Median and min milliseconds per block over `steps` greedy decode steps after prefilling ids."""
    kwargs, per = {"cache": cache}, []
    with torch.inference_mode():
        for k in range(steps + 1):
            inputs = model.prepare_inputs_for_generation(ids, **kwargs)
            clock.block_s.clear()
            out = model(**inputs)
            if k:
                per.append(1e3 * sum(clock.block_s) / len(clock.block_s))
            kwargs = model._update_model_kwargs_for_generation(out, kwargs)
            ids = torch.cat([ids, out.logits[:, -1].argmax(-1, keepdim=True)], 1)
    return statistics.median(per), min(per)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--context", type=int, default=1900)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--workdir", default=os.path.join(os.path.expanduser("~"), ".cache", "chatglm", "bench"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from chatglm import load_model
    from chatglm.kv_cache import KVCache
    _, model = load_model(build_checkpoint(args.workdir, args.layers), device="cpu", dtype=args.dtype)
    clock = BlockClock(model)
    ids = prompt(1, args.context, model.config)
    print(f"decode ms per GLM block, {args.dtype}, context {args.context}, {args.threads} threads ({ROOT})")
    for _ in range(2):  # alternated twice so drift on a shared machine shows
        for name, cache in (("DynamicCache (concatenating)", DynamicCache(config=model.config)),
                            ("KVCache (in place)", KVCache(model.config, max_length=args.context + args.steps))):
            med, best = block_ms(model, clock, ids, cache, args.steps)
            print(f"  {name:<30} median {med:6.1f}  min {best:6.1f}", flush=True)


if __name__ == "__main__":
    main()
