"""Largest |Δlogit| against the original implementation, per golden folder and case (a report, not a test).

    python benchmarks/parity_report.py [--golden tests/golden]
"""
import argparse
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from chatglm import load_model  # noqa: E402
from transformers.cache_utils import DynamicCache  # noqa: E402


def forward_diffs(model, g, arrays):
    for c in g["forward"]:
        kw = {"input_ids": torch.tensor(c["input_ids"])}
        if "attention_mask" in c["inputs_given"]:
            kw["attention_mask"] = torch.from_numpy(arrays[c["attention_mask_key"]])
            kw["position_ids"] = torch.tensor(c["position_ids"])
        with torch.no_grad():
            logits = model(**kw).logits.numpy()
        yield f"forward.{c['name']}", float(np.abs(logits - arrays[c["logits_key"]]).max())


def cache_diffs(model, g, arrays):
    for c in g["cache"]:
        ids = torch.tensor(c["prompt_input_ids"])
        kwargs = {"cache": DynamicCache(config=model.config)}
        first = c["steps"][0]
        if first["model_built_position_ids"] is None:
            kwargs["glm_attention_mask"] = torch.tensor(first["attention_mask"]).bool()
            kwargs["glm_position_ids"] = torch.tensor(first["position_ids"])
        cont = torch.tensor(c["continuation_ids"])
        cont = cont.expand(ids.shape[0], -1) if cont.dim() == 1 else cont
        steps = []
        for k in range(len(c["steps"])):
            inputs = model.prepare_inputs_for_generation(ids, **kwargs)
            with torch.no_grad():
                out = model(**inputs)
            kwargs = model._update_model_kwargs_for_generation(out, kwargs)
            steps.append(out.logits[:, -1])
            if k < cont.shape[1]:
                ids = torch.cat([ids, cont[:, k:k + 1]], dim=1)
        got = torch.stack(steps, dim=1).numpy()
        yield f"cache.{c['name']}", float(np.abs(got - arrays[c["step_logits_key"]]).max())


def training_diff(model, g, arrays):
    t = g["training"]
    ids = torch.tensor([e["input_ids"] for e in t["examples"]])
    labels = torch.tensor([e["labels"] for e in t["examples"]])
    with torch.no_grad():
        out = model(input_ids=ids, labels=labels)
    yield "training.logits", float(np.abs(out.logits.numpy() - arrays[t["logits_key"]]).max())
    yield "training.loss", abs(out.loss.item() - t["loss_eval_no_grad"])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--golden", default=os.path.join(os.path.dirname(__file__), "..", "tests", "golden"))
    args = p.parse_args()
    torch.set_num_threads(2)
    print(f"{'folder':<18} {'case':<36} {'max |Δ|':>10}")
    for name in ("tiny", "tiny-ptuning", "tiny-ptuning-proj", "tiny-int8", "tiny-int4"):
        folder = os.path.join(args.golden, name)
        if not os.path.isdir(folder):
            continue
        g = json.load(open(os.path.join(folder, "golden.json"), encoding="utf-8"))
        arrays = np.load(os.path.join(folder, "golden_arrays.npz"))
        if name.startswith("tiny-ptuning"):
            _, model = load_model(os.path.join(args.golden, "tiny"), ptuning_checkpoint=folder, device="cpu")
        else:
            _, model = load_model(folder, device="cpu", dtype="float32")
        worst = 0.0
        for case, d in [*forward_diffs(model, g, arrays), *cache_diffs(model, g, arrays),
                        *training_diff(model, g, arrays)]:
            print(f"{name:<18} {case:<36} {d:>10.2e}")
            if not case.endswith("loss"):
                worst = max(worst, d)
        print(f"{name:<18} {'(largest logit difference)':<36} {worst:>10.2e}")


if __name__ == "__main__":
    main()
