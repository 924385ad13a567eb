"""P-Tuning v2 checkpoints (what upstream's trainer saved): read one, and load its prefix encoder into a model built
with pre_seq_len. (The ptuning/ folder trains them; this module only reads them.)"""
import json
import os

import torch

from .checkpoint import ModelLoadError, read_state_dict, weight_files


def read_ptuning_checkpoint(folder: str):
    """(pre_seq_len, prefix_projection, tensors) of a P-Tuning v2 checkpoint folder."""
    if not os.path.isdir(folder):
        raise ModelLoadError(f"P-Tuning checkpoint {folder!r} does not exist (expected a folder with config.json and "
                             f"pytorch_model.bin or model.safetensors, e.g. output/adgen-chatglm-6b-pt-128-2e-2/"
                             f"checkpoint-3000)")
    cfg, cfg_path = {}, os.path.join(folder, "config.json")
    if os.path.isfile(cfg_path):
        try:
            with open(cfg_path, encoding="utf-8") as f:
                cfg = json.load(f)
        except (ValueError, OSError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            raise ModelLoadError(f"{cfg_path} is not a valid P-Tuning config ({e}); it should be the config.json "
                                 f"saved with the checkpoint") from None
        if not isinstance(cfg, dict):
            raise ModelLoadError(f"{cfg_path} must hold a JSON object, got {type(cfg).__name__}")
    tensors = {}
    for f in weight_files(folder):
        for k, v in read_state_dict(f).items():
            if k.startswith("transformer.prefix_encoder."):
                tensors[k[len("transformer.prefix_encoder."):]] = v
    if not tensors:
        raise ModelLoadError(f"{folder} holds no transformer.prefix_encoder.* weights: it is not a P-Tuning v2 "
                             f"checkpoint")
    return cfg.get("pre_seq_len"), cfg.get("prefix_projection", False), tensors


def load_prefix_encoder(model, tensors: dict, source: str = "the P-Tuning checkpoint"):
    """tensors: prefix-encoder state dict with the `transformer.prefix_encoder.` prefix already stripped."""
    encoder = model.transformer.prefix_encoder
    expected = encoder.state_dict()
    cfg = model.config
    problems = []
    if set(tensors) != set(expected):
        problems.append(f"it holds {sorted(tensors)} but a model with prefix_projection={cfg.prefix_projection} "
                        f"expects {sorted(expected)} (prefix_projection differs)")
    else:
        for k, t in tensors.items():
            if tuple(t.shape) != tuple(expected[k].shape):
                problems.append(f"{k} has shape {tuple(t.shape)}, expected {tuple(expected[k].shape)}")
    if problems:
        raise ModelLoadError(
            f"{source} does not fit this base model (pre_seq_len={cfg.pre_seq_len}, "
            f"prefix_projection={cfg.prefix_projection}, num_layers={cfg.num_layers}, hidden_size={cfg.hidden_size}): "
            + "; ".join(problems) + ". Use the same --pre-seq-len / prefix_projection as in training (they are in "
            "the checkpoint's config.json) and the base model it was trained on.")
    device = next(encoder.parameters()).device
    encoder.load_state_dict({k: v.to(device=device, dtype=torch.float32) for k, v in tensors.items()})
    return model
