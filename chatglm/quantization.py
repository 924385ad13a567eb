"""Weight-only INT8 / INT4 quantization in the official ChatGLM-6B format, and the kernels that run it.

Format (the same integers and scales as the original, see ../shared/golden/NOTES.md §9):
  * the four linears of every block (QUANTIZED_LINEARS) are quantized; embeddings, lm_head, layer norms and biases
    are not;
  * per output row: scale = fp16(max|W[row]| / (2^(bits-1) - 1)), q = round(W / scale) with the division done in
    fp32 (round half to even);
  * INT4 packs two values per byte along the input dimension, even index in the high nibble:
    byte[j] = (q[2j] << 4) | (q[2j+1] & 0xF);
  * state-dict keys `weight` (int8 [out, in] or packed [out, in/2]), `weight_scale` [out], `bias` [out].

Kernels (a layer computes x @ (q * scale).T + bias; which one runs depends on device, dtype and rows):
  * CPU, few rows (decoding): PyTorch's fused weight-only ops `_weight_int8pack_mm` and
    `_weight_int4pack_mm_for_cpu` (vectorized for bfloat16 activations; plain loops for float32). INT4 weights are
    repacked once, in place, into the layout of the CPU op, so no second copy is kept; `state_dict()` still
    returns the official layout.
  * CUDA, MPS, and many rows (prompts) on CPU: dequantize the weight on the fly and call F.linear (cuBLAS /
    Metal / oneDNN), which is what the original's CUDA kernels did too.
In float32 every path computes the original's numbers (the golden parity tests run both). Gradients reach the
input (P-Tuning on a quantized base) without keeping dequantized weights alive.
"""
import functools
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

# module paths inside model.transformer.layers[i]; every one is an nn.Linear with weight [out, in] and a bias
QUANTIZED_LINEARS = ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")

# On CPU the fused ops win while the work is close to a matrix-vector product (decoding); for longer prompts,
# dequantizing a few rows at a time and running the dense GEMM wins. Fused up to this many rows, per (activation
# dtype, bits); crossovers measured on a 2-core AVX-512 machine with 16384 x 4096 and 4096 x 16384 weights
# (bfloat16: INT8 ~24 rows, INT4 ~200 rows; float32, whose fused ops are plain loops: 1-2 rows). Other
# activation dtypes always dequantize.
FUSED_MAX_ROWS = {(torch.bfloat16, 8): 24, (torch.bfloat16, 4): 192, (torch.float32, 8): 1, (torch.float32, 4): 1}
DEQUANT_CHUNK_ELEMENTS = 1 << 22  # weight elements dequantized at a time on CPU (8 MB in bfloat16)


def check_bits(bits) -> int:
    if isinstance(bits, bool) or bits not in (4, 8):
        raise ValueError(f"quantization bits must be 4 or 8 (weight-only INT4 / INT8, as in ChatGLM-6B), got "
                         f"{bits!r}")
    return int(bits)


# ---- the format -------------------------------------------------------------------------------------------------

def quantize_weight(weight: torch.Tensor, bits: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(qweight, scale) of a [out, in] weight: qweight int8 [out, in] (bits 8) or packed int8 [out, in/2] (bits 4),
    scale float16 [out]. Reproduces the original's integers exactly for fp16 weights. Works in chunks of rows
    (~4 MB of fp32 temporaries), so quantizing a 6B checkpoint while it loads adds almost nothing to its memory."""
    bits = check_bits(bits)
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D [out, in] weight, got shape {tuple(weight.shape)}")
    if bits == 4 and weight.shape[1] % 2:
        raise ValueError(f"INT4 packs two input columns per byte; in_features {weight.shape[1]} is odd")
    max_q = 2 ** (bits - 1) - 1
    out_features, in_features = weight.shape
    qweight = torch.empty(out_features, in_features if bits == 8 else in_features // 2, dtype=torch.int8,
                          device=weight.device)
    scale = torch.empty(out_features, dtype=torch.float16, device=weight.device)
    rows = max(1, (1 << 20) // max(in_features, 1))
    with torch.no_grad():
        for start in range(0, out_features, rows):
            w = weight[start:start + rows].float()
            # fp16 division as torch does it (exact quotient of the fp16 values, rounded once to fp16)
            s = (w.abs().amax(dim=1) / max_q).half()
            divisor = torch.where(s == 0, torch.ones_like(s), s).float()  # an all-zero row quantizes to zeros
            q = w.div_(divisor[:, None]).round_().clamp_(-max_q, max_q).to(torch.int8)
            qweight[start:start + rows] = q if bits == 8 else pack_int4(q)
            scale[start:start + rows] = s
    return qweight, scale


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 values in [-8, 7], [out, in] -> official packed int8 [out, in/2] (even column in the high nibble)."""
    return (q[:, 0::2] << 4) | (q[:, 1::2] & 0xF)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Official packed int8 [out, in/2] -> int8 [out, in], each nibble sign-extended."""
    high = packed >> 4  # arithmetic shift of int8: sign-extends the high nibble
    low = (packed << 4) >> 4
    return torch.stack([high, low], dim=-1).view(packed.shape[0], -1)


# ---- PyTorch's CPU INT4 layout -----------------------------------------------------------------------------------
# `_weight_int4pack_mm_for_cpu` wants its weights repacked by `_convert_weight_to_int4pack_for_cpu`, whose layout
# depends on the CPU (blocks of 64 output rows with AVX-512, 32 otherwise). We find the layout once by comparing
# with that op, so we can convert both ways (the state dict must stay in the official layout) without keeping two
# copies. Layout: rows in blocks of `block`; each block is stored input-column-major, block/2 bytes per column;
# "halves" puts row j in the low and row block/2 + j in the high nibble of byte j, "pairs" rows 2j and 2j + 1.
_CPU_LAYOUTS = [(block, style) for block in (64, 32, 16) for style in ("halves", "pairs")]


def _to_cpu_layout(unsigned: torch.Tensor, block: int, style: str) -> torch.Tensor:
    n, k = unsigned.shape
    if style == "halves":
        v = unsigned.view(n // block, 2, block // 2, k).permute(0, 3, 2, 1)
    else:
        v = unsigned.view(n // block, block // 2, 2, k).permute(0, 3, 1, 2)
    return (v[..., 0] | (v[..., 1] << 4)).contiguous().view(n, k // 2)


def _from_cpu_layout(packed: torch.Tensor, k: int, block: int, style: str) -> torch.Tensor:
    n = packed.shape[0]
    p = packed.view(n // block, k, block // 2)
    v = torch.stack([p & 0xF, p >> 4], dim=-1)  # [nb, k, block/2, 2]
    v = v.permute(0, 3, 2, 1) if style == "halves" else v.permute(0, 2, 3, 1)
    return v.reshape(n, k)


@functools.lru_cache(maxsize=None)
def cpu_int4_layout() -> Optional[Tuple[int, str]]:
    """(block, style) of this machine's CPU INT4 op, checked against the op on a probe; None if unavailable."""
    try:
        g = torch.Generator().manual_seed(0)
        probe = torch.randint(0, 16, (128, 64), generator=g, dtype=torch.int32)
        reference = torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe, 1)
        for block, style in _CPU_LAYOUTS:
            if torch.equal(_to_cpu_layout(probe.to(torch.uint8), block, style), reference):
                # and the op computes (u - 8) * scale + zero as we assume
                x = torch.randn(3, 64, generator=g).bfloat16()
                scale = torch.rand(128, generator=g) * 0.1 + 0.01
                scales_zeros = _scales_and_zeros(scale, 64, 64, torch.bfloat16)
                y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, reference, 64, scales_zeros)
                w = (probe.float() - 8) * scale.bfloat16().float()[:, None]
                if torch.allclose(y.float(), x.float() @ w.T, rtol=2e-2, atol=2e-2):
                    return block, style
                break
    except (AttributeError, RuntimeError, NotImplementedError):
        pass
    return None


def _group_size(in_features: int) -> Optional[int]:
    # the CPU op takes groups of 32..256 columns; our one scale per row is repeated for every group
    for g in (256, 128, 64, 32):
        if in_features % g == 0:
            return g
    return None


def _scales_and_zeros(scale: torch.Tensor, in_features: int, group: int, dtype) -> torch.Tensor:
    n = scale.shape[0]
    s = scale.to(dtype)[None, :, None].expand(in_features // group, n, 1)
    return torch.cat([s, torch.zeros_like(s)], dim=-1).contiguous()  # [groups, out, (scale, zero)]


@functools.lru_cache(maxsize=None)
def _unit_scales_and_zeros(in_features: int, out_features: int, group: int, dtype) -> torch.Tensor:
    # Shared by every layer of this shape: the CPU op multiplies by 1 and we apply the row scales to its output,
    # which costs nothing measurable and saves a per-layer table (~3 MB per 6B block, 86 MB in all).
    return _scales_and_zeros(torch.ones(out_features), in_features, group, dtype)


@functools.lru_cache(maxsize=None)
def cpu_int8_fused_ok() -> bool:
    try:
        q = torch.randint(-127, 128, (8, 32), dtype=torch.int8)
        x, s = torch.randn(2, 32).bfloat16(), torch.rand(8).bfloat16()
        y = torch.ops.aten._weight_int8pack_mm(x, q, s)
        return torch.allclose(y.float(), x.float() @ (q.float() * s.float()[:, None]).T, rtol=2e-2, atol=2e-2)
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


# ---- the layer --------------------------------------------------------------------------------------------------

class _QuantizedMatmul(torch.autograd.Function):
    """x @ W.T with a quantized W; the backward pass dequantizes again instead of saving the fp weight (P-Tuning
    on an INT4 base keeps its memory small). Weights are frozen, so only the input gets a gradient."""

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        return layer._matmul(x)

    @staticmethod
    def backward(ctx, grad_out):
        w = ctx.layer.dequantized_weight(grad_out.dtype)
        return grad_out @ w, None


class QuantizedLinear(nn.Module):
    """A frozen linear layer with weight-only INT8/INT4 weights in the official format (see module docstring).

    `weight` holds the official bytes, except for INT4 after a fused CPU forward: it then holds the same values
    repacked (uint8) for PyTorch's CPU op. `state_dict()`, `int_weight()` and moving or casting the module always
    give / restore the official layout. `weight_scale` stays float16 in bfloat16 models, so saving such a model
    writes the original's scales."""

    def __init__(self, in_features: int, out_features: int, bits: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        self.bits = check_bits(bits)
        if self.bits == 4 and in_features % 2:
            raise ValueError(f"INT4 packs two input columns per byte; in_features {in_features} is odd")
        self.in_features, self.out_features = in_features, out_features
        dtype = dtype or torch.float16
        scale_dtype = dtype if dtype in (torch.float16, torch.float32) else torch.float16  # bf16 would round it
        # key order as in the official checkpoints: bias, weight, weight_scale
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        cols = in_features if self.bits == 8 else in_features // 2
        self.weight = nn.Parameter(torch.empty(out_features, cols, device=device, dtype=torch.int8),
                                   requires_grad=False)
        self.weight_scale = nn.Parameter(torch.empty(out_features, device=device, dtype=scale_dtype),
                                         requires_grad=False)
        self._repacked_as = None  # (Parameter, version) of a weight repacked for the CPU INT4 op

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int) -> "QuantizedLinear":
        w = linear.weight.detach()
        layer = cls(linear.in_features, linear.out_features, bits, bias=linear.bias is not None, device="meta",
                    dtype=w.dtype)
        q, scale = quantize_weight(w, bits)
        layer.weight = nn.Parameter(q, requires_grad=False)
        layer.weight_scale = nn.Parameter(scale.to(layer.weight_scale.dtype), requires_grad=False)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
        return layer

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"bias={self.bias is not None}")

    # -- official <-> CPU-kernel layout (INT4 on CPU only) --
    def _repacked(self) -> bool:
        r = self._repacked_as
        return r is not None and r[0] is self.weight and r[1] == self.weight._version

    def int_weight(self) -> torch.Tensor:
        """The weight in the official layout (int8 [out, in], or packed int8 [out, in/2] for INT4)."""
        if not self._repacked():
            return self.weight.detach()
        return pack_int4(self.int_values())

    def _restore_official_layout(self):
        if self._repacked():
            with torch.inference_mode(False), torch.no_grad():
                self.weight.data = self.int_weight()
        self._repacked_as = None

    def _prepare_cpu_int4(self) -> bool:
        """Repack INT4 weights for the CPU op (once; in place, so memory does not grow). False if not possible."""
        if self._repacked():
            return True
        layout = cpu_int4_layout()
        if layout is None or _group_size(self.in_features) is None or self.out_features % layout[0]:
            return False
        with torch.inference_mode(False), torch.no_grad():
            unsigned = (unpack_int4(self.weight.detach()) + 8).to(torch.uint8)
            self.weight.data = _to_cpu_layout(unsigned, *layout)
        self._repacked_as = (self.weight, self.weight._version)
        return True

    def _apply(self, fn, recurse=True):
        self._restore_official_layout()  # moves and casts see (and keep) the official format
        return super()._apply(fn, recurse)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._repacked():
            destination[prefix + "weight"] = self.int_weight()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self._restore_official_layout()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # -- compute --
    def int_values(self, start: int = 0, stop: Optional[int] = None) -> torch.Tensor:
        """The integers of output rows [start, stop) as int8 [rows, in] (INT4 unpacked). When the weight is repacked
        for the CPU op, start and stop must be multiples of its row block (64 with AVX-512)."""
        w = self.weight.detach()[start:stop]
        if self.bits == 8:
            return w
        if self._repacked():
            block, style = cpu_int4_layout()
            return _from_cpu_layout(w, self.in_features, block, style).view(torch.int8) - 8
        return unpack_int4(w)

    def dequantized_weight(self, dtype: torch.dtype, start: int = 0, stop: Optional[int] = None) -> torch.Tensor:
        """q * scale for output rows [start, stop), [rows, in] (exact in float32: an integer times an fp16 value)."""
        return self.int_values(start, stop).to(dtype) * self.weight_scale[start:stop].to(dtype)[:, None]

    def _matmul(self, x2d: torch.Tensor) -> torch.Tensor:
        on_cpu = x2d.device.type == "cpu"
        if on_cpu and x2d.shape[0] <= FUSED_MAX_ROWS.get((x2d.dtype, self.bits), -1):
            if self.bits == 8 and cpu_int8_fused_ok():
                return torch.ops.aten._weight_int8pack_mm(x2d.contiguous(), self.weight,
                                                          self.weight_scale.to(x2d.dtype))
            if self.bits == 4 and self._prepare_cpu_int4():
                group = _group_size(self.in_features)
                unit = _unit_scales_and_zeros(self.in_features, self.out_features, group, x2d.dtype)
                y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2d.contiguous(), self.weight, group, unit)
                return y.mul_(self.weight_scale.to(y.dtype))
        rows = DEQUANT_CHUNK_ELEMENTS // self.in_features // 64 * 64
        if not on_cpu or rows == 0 or rows >= self.out_features:
            return F.linear(x2d, self.dequantized_weight(x2d.dtype))
        # CPU: dequantize a few MB of rows at a time; the allocator then reuses one small buffer instead of
        # page-faulting in a fresh [out, in] tensor per call (which costs more than the GEMM itself)
        y = torch.empty(x2d.shape[0], self.out_features, dtype=x2d.dtype)
        for start in range(0, self.out_features, rows):
            y[:, start:start + rows] = x2d @ self.dequantized_weight(x2d.dtype, start, start + rows).T
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected input with {self.in_features} features, got shape {tuple(x.shape)}")
        x2d = x.reshape(-1, self.in_features)
        if torch.is_grad_enabled() and x.requires_grad:
            y = _QuantizedMatmul.apply(x2d, self)
        else:
            y = self._matmul(x2d)
        y = y.view(*x.shape[:-1], self.out_features)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y


# ---- whole models -----------------------------------------------------------------------------------------------

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


def quantize_model(model: nn.Module, bits: int) -> nn.Module:
    """Quantize the four linears of every block in place (one at a time, so memory only shrinks); returns model.
    Quantizing again to the same bits does nothing; to other bits raises ValueError."""
    bits = check_bits(bits)
    for parent, name, module in _linear_slots(model):
        if isinstance(module, QuantizedLinear):
            if module.bits != bits:
                raise ValueError(f"the model is already quantized to {module.bits} bits; load the FP16 checkpoint "
                                 f"again to quantize it to {bits} bits")
            continue
        if module.weight.is_meta:
            raise ValueError("the model's weights are not loaded (meta tensors); load the checkpoint first")
        setattr(parent, name, QuantizedLinear.from_linear(module, bits))
    _set_bits(model, bits)
    return model


def replace_with_empty_quantized(model: nn.Module, bits: int) -> nn.Module:
    """Swap in empty QuantizedLinear layers (same device and dtype as the linears they replace), ready for the
    official pre-quantized state dict (config.quantization_bit) to be loaded into them; returns model."""
    bits = check_bits(bits)
    if getattr(getattr(model, "config", None), "quantization_embeddings", False):
        raise NotImplementedError("checkpoints with quantized embeddings (quantization_embeddings: true, e.g. "
                                  "chatglm-6b-int4-qe) are not supported; use chatglm-6b-int4 or quantize the FP16 "
                                  "checkpoint with --quantize 4")
    for parent, name, module in _linear_slots(model):
        if isinstance(module, QuantizedLinear):
            if module.bits != bits:
                raise ValueError(f"the model already has {module.bits}-bit layers; cannot make them {bits}-bit")
            continue
        setattr(parent, name, QuantizedLinear(module.in_features, module.out_features, bits,
                                              bias=module.bias is not None, device=module.weight.device,
                                              dtype=module.weight.dtype))
    _set_bits(model, bits)
    return model

