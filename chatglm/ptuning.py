"""Loading a P-Tuning v2 prefix encoder (what upstream's trainer saved) into a model built with pre_seq_len."""
import torch

from .loading import ModelLoadError


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
