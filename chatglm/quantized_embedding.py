"""Quantized word embeddings shared with lm_head, as upstream's chatglm-6b-int4-qe (opt-in: quantize_embeddings).

The [vocab, hidden] matrix that the embedding and lm_head share is quantized with the routine the block linears use
(quantization.quantize_weight: per row scale = fp16(max|row| / 7 or / 127), INT4 packed two per byte), and lm_head
becomes a QuantizedLinear over the very same `weight` / `weight_scale` Parameters, so one copy serves both uses.
For ChatGLM-6B in INT4 this saves ~0.8 GB (1.07 GB bfloat16 -> 0.27 GB); the price is outputs that differ slightly
from the official chatglm-6b-int4, whose embedding is not quantized.

State dict (the official int4-qe keys): `weight` int8 [vocab, hidden/2] (INT4) or [vocab, hidden] (INT8) and
`weight_scale` float16 [vocab]; a model's state dict lists the same two tensors again under `lm_head.`.
"""
import torch
from torch import nn

from .quantization import QuantizedLinear


class QuantizedEmbedding(nn.Module):
    """A frozen embedding whose rows are the dequantized rows (q * scale) of its lm_head's weight.

    Lookups return the model's compute dtype. The quantized weight carries no such dtype (int8 values, float16
    scales even in bfloat16 models), so an empty buffer records it: casting the model (.float(), .bfloat16(),
    .to(dtype)) casts that buffer too, and the loader sets it to the dtype it loads the rest of the model in."""

    def __init__(self, num_embeddings: int, embedding_dim: int, bits: int, device=None, dtype=None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        dtype = dtype or torch.get_default_dtype()
        self._share(QuantizedLinear(embedding_dim, num_embeddings, bits, bias=False, device=device, dtype=dtype))
        self.register_buffer("compute_dtype_marker", torch.empty(0, dtype=dtype, device=device), persistent=False)

    @classmethod
    def from_embedding(cls, embedding: nn.Module, bits: int) -> "QuantizedEmbedding":
        """Quantize a (tied) embedding: its [vocab, hidden] matrix is exactly lm_head's weight."""
        w = embedding.weight.detach()
        as_linear = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
        as_linear.weight = nn.Parameter(w, requires_grad=False)
        module = cls(w.shape[0], w.shape[1], bits, device="meta", dtype=w.dtype)
        module._share(QuantizedLinear.from_linear(as_linear, bits))  # the block linears' routine: same integers
        module.compute_dtype_marker = torch.empty(0, dtype=w.dtype, device=w.device)
        return module

    def _share(self, head: QuantizedLinear):
        self._head = [head]  # in a list: the model registers it as lm_head; here it would be a second copy of the keys
        self.weight, self.weight_scale = head.weight, head.weight_scale  # the same Parameter objects

    @property
    def lm_head(self) -> QuantizedLinear:
        """The output layer over this embedding's weights (the model's lm_head)."""
        return self._head[0]

    @property
    def bits(self) -> int:
        return self.lm_head.bits

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.compute_dtype_marker.dtype

    def load_float_weight(self, weight: torch.Tensor, device, scale_dtype: torch.dtype):
        """Quantize a floating-point [vocab, hidden] embedding into this module (and so into lm_head)."""
        self.lm_head.load_float_weight(weight, device, scale_dtype)
        self.weight, self.weight_scale = self.lm_head.weight, self.lm_head.weight_scale

    def rebind(self, dtype: torch.dtype, device) -> "QuantizedEmbedding":
        """After the loader put fresh `weight` / `weight_scale` Parameters here: lm_head shares them again, and
        lookups produce `dtype` on `device`."""
        self.lm_head.weight, self.lm_head.weight_scale = self.weight, self.weight_scale
        self.compute_dtype_marker = torch.empty(0, dtype=dtype, device=device)
        return self

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head.gather_rows(input_ids, self.compute_dtype)

    # the weights belong to lm_head's QuantizedLinear as much as to us: it keeps them in the official layout for
    # moves, casts and state dicts (INT4 weights may be repacked in place for the CPU kernel)
    def _apply(self, fn, recurse=True):
        self.lm_head._apply(fn, recurse)  # official layout first, then moved / cast
        super()._apply(fn, recurse)  # the same Parameters (already done: no change) and the dtype marker
        if self.lm_head.weight is not self.weight or self.lm_head.weight_scale is not self.weight_scale:
            self.rebind(self.compute_dtype, self.compute_dtype_marker.device)  # a conversion made new Parameters
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        self.lm_head._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self.lm_head._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}, shared with lm_head"
