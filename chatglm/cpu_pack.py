"""bfloat16 linears on CPU with their weights prepacked for oneDNN.

Decoding reads every weight once per token. On the 2-core AVX-512 machine this project is measured on, a
16384x4096 bfloat16 GEMV reads 22 GB/s through F.linear but 64 GB/s through oneDNN with the weight reordered into
its blocked layout once, at load time (same results, bit for bit). The packed weight replaces the dense one (no
second copy); state dicts still hold the official dense `weight`, and moving or casting the model unpacks it.
"""
import torch
import torch.nn.functional as F
from torch import nn

BLOCK_LINEARS = ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")


def available() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


class PackedLinear(nn.Module):
    """nn.Linear's interface and state dict, with a oneDNN-packed bfloat16 weight for inference on CPU."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.bias = linear.bias  # stays an ordinary (frozen or trainable) parameter
        self.weight_requires_grad = linear.weight.requires_grad
        self._set_weight(linear.weight.detach())

    def _set_weight(self, dense: torch.Tensor):
        # packed while it is bfloat16 on the CPU; after .to(...)/.float() it is kept dense and used as nn.Linear
        if dense.dtype == torch.bfloat16 and dense.device.type == "cpu":
            self.packed, self.dense = torch.ops.mkldnn._reorder_linear_weight(dense.contiguous(), None), None
        else:
            self.packed, self.dense = None, dense

    @property
    def weight(self) -> torch.Tensor:
        return self.packed.to_dense() if self.packed is not None else self.dense

    def _apply(self, fn, recurse=True):
        self._set_weight(fn(self.weight))
        return super()._apply(fn, recurse)

    def forward(self, x):
        if self.packed is None or (torch.is_grad_enabled() and x.requires_grad):  # e.g. training: plain path
            return F.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed, self.bias, "none", [], "")

    def unpack(self) -> nn.Linear:
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = nn.Parameter(self.weight, requires_grad=self.weight_requires_grad)
        linear.bias = self.bias
        return linear

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.weight
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "weight"
        if key in state_dict:
            self._set_weight(state_dict[key].to(dtype=self.weight.dtype, device=self.weight.device))
        elif strict:
            missing_keys.append(key)
        if self.bias is not None and prefix + "bias" in state_dict:
            with torch.no_grad():
                self.bias.copy_(state_dict[prefix + "bias"])

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, oneDNN-packed bfloat16"


def pack_for_cpu(model: nn.Module) -> nn.Module:
    """Swap the four bfloat16 linears of every GLM block for PackedLinear (where oneDNN has bf16 kernels)."""
    if not available():
        return model
    for block in model.transformer.layers:
        for path in BLOCK_LINEARS:
            parent_path, name = path.split(".")
            parent = getattr(block, parent_path)
            layer = getattr(parent, name)
            if type(layer) is nn.Linear and layer.weight.dtype == torch.bfloat16 and layer.weight.device.type == "cpu":
                setattr(parent, name, PackedLinear(layer))
    return model


def unpack(model: nn.Module) -> nn.Module:
    """Back to plain nn.Linear layers with trainable Parameters (model.train() does this by itself)."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, PackedLinear):
                setattr(module, name, child.unpack())
    return model
