"""What is loaded, in one place: every front door shows it (web banner, CLI greeting, api.py's start-up line and
/v1/models), so a user can tell the demo model from the real one, and see the precision, quantization and P-Tuning
prefix actually in use."""
import os

import torch


def _short_dtype(dtype) -> str:
    return str(dtype).replace("torch.", "") if isinstance(dtype, torch.dtype) else str(dtype)


def model_info(model) -> dict:
    """The loaded model's facts as plain values (JSON-ready): name (the folder or hub id it came from), demo,
    device, dtype (compute), quantization_bit (4, 8 or None), quantized_embeddings, ptuning_checkpoint (folder or
    None) and pre_seq_len."""
    config = model.config
    demo = bool(getattr(model, "is_demo", False))
    return {
        "name": str(getattr(model, "name_or_path", "") or config._name_or_path),
        "demo": demo,
        "device": str(model.device),
        "dtype": _short_dtype(model.dtype),
        "quantization_bit": getattr(config, "quantization_bit", 0) or None,
        "quantized_embeddings": bool(getattr(config, "quantization_embeddings", False)),
        "ptuning_checkpoint": getattr(model, "ptuning_checkpoint", None),
        "pre_seq_len": getattr(config, "pre_seq_len", None),
    }


def describe_model(model) -> str:
    """One line, e.g. "Model: THUDM/chatglm-6b · cpu · bfloat16 · INT4 weights · P-Tuning: out/checkpoint-20
    (prefix 128)"."""
    info = model_info(model)
    name = f"demo model, NOT ChatGLM-6B ({info['name']})" if info["demo"] else info["name"]
    parts = [f"Model: {name}", info["device"], info["dtype"]]
    if info["quantization_bit"]:
        embeddings = " and embeddings" if info["quantized_embeddings"] else ""
        parts.append(f"INT{info['quantization_bit']} weights{embeddings}")
    else:
        parts.append("not quantized")
    if info["ptuning_checkpoint"]:
        parts.append(f"P-Tuning: {info['ptuning_checkpoint']} (prefix {info['pre_seq_len']})")
    elif info["pre_seq_len"]:
        parts.append(f"P-Tuning prefix {info['pre_seq_len']} (untrained)")
    return " · ".join(parts)


def public_model_info(model) -> dict:
    """model_info for a server's clients: folders cut to their last parts, so a served API does not tell the world
    the operator's directory layout."""
    info = dict(model_info(model))
    if info["demo"]:
        info["name"] = "demo"
    elif os.path.isdir(info["name"]):  # a local folder; a hub id stays as it is
        info["name"] = os.path.basename(info["name"].rstrip("/\\"))
    if info["ptuning_checkpoint"]:
        parts = os.path.normpath(info["ptuning_checkpoint"]).split(os.sep)
        info["ptuning_checkpoint"] = "/".join(parts[-2:])
    return info
