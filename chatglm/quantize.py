"""Model surgery for quantization: swap the block linears (and optionally the shared embedding) of a ChatGLM model
for their quantized layers, either from loaded weights (quantize_model) or empty, ready for a pre-quantized state
dict (replace_with_empty_quantized). It acts on any model by attribute names and imports no model code."""
from typing import Optional

from torch import nn

from .quantization import QUANTIZED_LINEARS, QuantizedLinear, check_bits
from .quantized_embedding import QuantizedEmbedding


def _blocks(model: nn.Module):
    base = getattr(model, "transformer", model)
    if not hasattr(base, "layers"):
        raise TypeError(f"{type(model).__name__} has no transformer.layers: not a ChatGLM model")
    return base.layers


def _linear_slots(model: nn.Module):
    """(parent module, attribute name, current module) for each quantizable linear of every block."""
    for block in _blocks(model):
        for path in QUANTIZED_LINEARS:
            parent_path, _, name = path.rpartition(".")
            parent = block.get_submodule(parent_path)
            yield parent, name, getattr(parent, name)


def _set_bits(model: nn.Module, bits: int):
    config = getattr(model, "config", None)
    if config is not None:
        config.quantization_bit = bits


def _embedding_slots(model: nn.Module):
    """(ChatGLMModel, its word_embeddings, the model's lm_head) for embedding quantization."""
    base = getattr(model, "transformer", model)
    if not hasattr(base, "word_embeddings") or not hasattr(model, "lm_head"):
        raise TypeError(f"{type(model).__name__} has no transformer.word_embeddings and lm_head: quantized embeddings "
                        f"need ChatGLMForConditionalGeneration")
    return base, base.word_embeddings, model.lm_head


def _embedding_needs_quantizing(model: nn.Module, bits: int) -> bool:
    """False if the embedding is quantized already (to these bits; other bits raise ValueError)."""
    embedding = _embedding_slots(model)[1]
    if isinstance(embedding, QuantizedEmbedding):
        if embedding.bits != bits:
            raise ValueError(f"the embeddings are already quantized to {embedding.bits} bits; load the FP16 "
                             f"checkpoint again to quantize them to {bits} bits")
        return False
    return True


def _install_quantized_embedding(model: nn.Module, quantized) -> None:
    """The QuantizedEmbedding replaces the embedding, and its QuantizedLinear the lm_head."""
    base = _embedding_slots(model)[0]
    base.word_embeddings, model.lm_head = quantized, quantized.lm_head
    # save_pretrained writes the shared tensors once, under the embedding's names, as for the tied FP16 model (its
    # own tied-weight check cannot see the sharing once the CPU kernel has repacked them in memory)
    ignored = list(getattr(model, "_keys_to_ignore_on_save", None) or [])
    model._keys_to_ignore_on_save = ignored + [k for k in ("lm_head.weight", "lm_head.weight_scale")
                                               if k not in ignored]
    config = getattr(model, "config", None)
    if config is not None:
        config.quantization_embeddings = True


def quantize_model(model: nn.Module, bits: int, embeddings: bool = False) -> nn.Module:
    """Quantize the four linears of every block in place (one at a time, so memory only shrinks); returns model.
    embeddings=True also quantizes the word embeddings, which lm_head then shares (chatglm-6b-int4-qe's format, see
    quantized_embedding.py). Quantizing again to the same bits does nothing; to other bits raises ValueError."""
    bits = check_bits(bits)
    for parent, name, module in _linear_slots(model):
        if isinstance(module, QuantizedLinear):
            if module.bits != bits:
                raise ValueError(f"the model is already quantized to {module.bits} bits; load the FP16 checkpoint "
                                 f"again to quantize it to {bits} bits")
            continue
        if module.weight.is_meta:
            raise ValueError("the model's weights are not loaded (meta tensors); load the checkpoint first")
    if embeddings and _embedding_needs_quantizing(model, bits):
        _, embedding, head = _embedding_slots(model)
        if getattr(head, "weight", None) is not embedding.weight:
            raise ValueError("lm_head is not tied to transformer.word_embeddings, so they cannot share one quantized "
                             "matrix; quantize without embeddings")
        if embedding.weight.is_meta:
            raise ValueError("the model's weights are not loaded (meta tensors); load the checkpoint first")
        _install_quantized_embedding(model, QuantizedEmbedding.from_embedding(embedding, bits))
    for parent, name, module in _linear_slots(model):
        if not isinstance(module, QuantizedLinear):
            setattr(parent, name, QuantizedLinear.from_linear(module, bits))
    _set_bits(model, bits)
    return model


def replace_with_empty_quantized(model: nn.Module, bits: int, embeddings: Optional[bool] = None) -> nn.Module:
    """Swap in empty QuantizedLinear layers (same device and dtype as the linears they replace), ready for the
    official pre-quantized state dict (config.quantization_bit) to be loaded into them; returns model.
    embeddings (default: config.quantization_embeddings) also swaps in an empty QuantizedEmbedding shared with
    lm_head, for checkpoints like chatglm-6b-int4-qe."""
    bits = check_bits(bits)
    if embeddings is None:
        embeddings = bool(getattr(getattr(model, "config", None), "quantization_embeddings", False))
    embeddings = embeddings and _embedding_needs_quantizing(model, bits)
    for parent, name, module in _linear_slots(model):
        if isinstance(module, QuantizedLinear):
            if module.bits != bits:
                raise ValueError(f"the model already has {module.bits}-bit layers; cannot make them {bits}-bit")
            continue
        setattr(parent, name, QuantizedLinear(module.in_features, module.out_features, bits,
                                              bias=module.bias is not None, device=module.weight.device,
                                              dtype=module.weight.dtype))
    if embeddings:
        e = _embedding_slots(model)[1]
        _install_quantized_embedding(model, QuantizedEmbedding(e.num_embeddings, e.embedding_dim, bits,
                                                               device=e.weight.device, dtype=e.weight.dtype))
    _set_bits(model, bits)
    return model
