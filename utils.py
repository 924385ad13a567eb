"""Helpers the front doors share: splitting the model over several GPUs, and streaming a reply as plain new text.

    from utils import load_model_on_gpus
    model = load_model_on_gpus("/path/to/chatglm-6b", num_gpus=2)

accelerate is imported only when a model is dispatched, so this module imports without it.
"""
from typing import Dict, Optional, Union

Device = Union[int, str]


def auto_configure_device_map(num_gpus: int, num_layers: int = 28) -> Dict[str, Device]:
    """Module name -> GPU index for `num_gpus` GPUs.

    Counts num_layers + 2 units, as upstream did: each GLM block is one, the word embedding is one, and the final
    layer norm with lm_head is one. The embedding, final layer norm and lm_head all live on GPU 0, because chat()
    puts the input ids on model.device and the tied lm_head shares the embedding's weight. The blocks follow in
    order; when the units do not divide evenly, GPU 0 gets the smaller share (it also holds the 600M-parameter
    embedding and the logits) and the last GPUs one more. Unlike upstream's rounding, no GPU is left empty
    while there are enough layers to go round (upstream gave GPU 6 nothing with 7 GPUs).
    """
    if not isinstance(num_gpus, int) or isinstance(num_gpus, bool) or num_gpus < 1:
        raise ValueError(f"num_gpus must be a whole number >= 1, got {num_gpus!r}")
    if not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"num_layers must be a whole number >= 1, got {num_layers!r}")
    device_map: Dict[str, Device] = {"transformer.word_embeddings": 0, "transformer.final_layernorm": 0,
                                     "lm_head": 0}
    if num_gpus == 1:
        layers_per_gpu = [num_layers]
    else:
        first = max(0, min(num_layers, (num_layers + 2) // num_gpus - 2))
        rest, extra = divmod(num_layers - first, num_gpus - 1)
        # the last `extra` GPUs take one layer more than the others
        layers_per_gpu = [first] + [rest + (i >= num_gpus - 1 - extra) for i in range(num_gpus - 1)]
    layer = 0
    for gpu, count in enumerate(layers_per_gpu):
        for _ in range(count):
            device_map[f"transformer.layers.{layer}"] = gpu
            layer += 1
    assert layer == num_layers, (layers_per_gpu, num_layers)
    return device_map


def load_model_on_gpus(checkpoint_path: str, num_gpus: int = 2, device_map: Optional[Dict[str, Device]] = None,
                       **kwargs):
    """ChatGLM-6B split over `num_gpus` GPUs with accelerate (returns the model; load the tokenizer with
    chatglm.ChatGLMTokenizer.from_pretrained(checkpoint_path)).

    device_map: module name -> device (an int is a GPU index, "cpu" runs there); default
    auto_configure_device_map(num_gpus, config.num_layers). kwargs go to chatglm.load_model (dtype, quantize,
    pre_seq_len, ptuning_checkpoint). With num_gpus < 2 and no device_map this is a plain single-device load_model.

    Each weight is read from the checkpoint straight onto its GPU (float16 by default), so CPU memory holds one
    shard at a time; a P-Tuning prefix encoder goes to the embedding's GPU.
    """
    import torch
    from chatglm.loading import load_config, load_model, resolve_model_path

    if device_map is None:
        if num_gpus < 2:
            return load_model(checkpoint_path, **kwargs)[1]
        visible = torch.cuda.device_count()
        if visible < num_gpus:
            raise ValueError(f"num_gpus={num_gpus} but {visible} CUDA GPU(s) are visible (check "
                             f"CUDA_VISIBLE_DEVICES); pass num_gpus={max(visible, 1)} or an explicit device_map")
        config = load_config(resolve_model_path(checkpoint_path))
        device_map = auto_configure_device_map(num_gpus, config.num_layers)
    device_map = dict(device_map)
    if "device" in kwargs:
        raise TypeError("load_model_on_gpus places the model by device_map; do not pass device=")
    if not any(k == "transformer.prefix_encoder" or k.startswith("transformer.prefix_encoder.") for k in device_map):
        device_map["transformer.prefix_encoder"] = device_map.get("transformer.word_embeddings", 0)
    # each weight goes straight from the checkpoint to its device: the model never exists whole in CPU memory
    _, model = load_model(checkpoint_path, device_map=device_map, **kwargs)
    if getattr(model.transformer, "prefix_encoder", None) is None:
        device_map.pop("transformer.prefix_encoder")
    from accelerate import dispatch_model
    # the weights are in place already; dispatch_model adds the hooks that move each block's inputs to its device
    # (force_hooks: even when every block shares one device)
    model = dispatch_model(model, device_map=device_map, force_hooks=True)
    model.hf_device_map = device_map
    return model
