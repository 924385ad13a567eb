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
  * CPU, few rows (decoding): PyTorch's fused weight-only ops `_weight_int4pack_mm_for_cpu` and
    `_weight_int8pack_mm` (vectorized for bfloat16 activations; plain loops for float32). INT4 weights, and INT8
    weights once a bfloat16 call decodes a single sequence, are repacked once into the layout of the INT4 op (INT8
    as two nibbles per value, which that op reads faster than the INT8 op reads bytes), replacing the official
    bytes, so no second copy is kept (the layout code lives in chatglm/cpu_int4.py); `state_dict()` and everything
    else that shows the weight still give the official layout.
  * CUDA, MPS, and many rows (prompts) on CPU: dequantize the weight on the fly and call F.linear (cuBLAS /
    Metal / oneDNN), which is what the original's CUDA kernels did too.
`gather_rows(ids, dtype)` reads dequantized rows without dequantizing the matrix (embedding lookups over it).
In float32 every path computes the original's numbers (the golden parity tests run both). Gradients reach the
input (P-Tuning on a quantized base) without keeping dequantized weights alive.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu_intdot, cpu_kernels
from .cpu_int4 import (block_values, column_major, cpu_int4_layout, cpu_int8_fused_ok, group_size,
                       int8_pair_scales_and_zeros, pack_blocks, row_major, unit_scales_and_zeros,
                       values_from_nibbles, whole_blocks)

# module paths inside model.transformer.layers[i]; every one is an nn.Linear with weight [out, in] and a bias
QUANTIZED_LINEARS = ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")

# On CPU the fused ops win while the work is close to a matrix-vector product (decoding); for longer prompts,
# dequantizing a tile at a time and running the dense GEMM wins. Fused up to this many rows, per (activation dtype,
# bits), and INT8's layout for the fused op per activation dtype ("nibble": repacked for the INT4 op on a one-row
# call; "int8pack": the official bytes and the INT8 op). chatglm/kernel_choice.py sets both per machine; these are
# its defaults (benchmarks/README.md has the timings). float32's fused ops are plain loops; other dtypes dequantize.
FUSED_MAX_ROWS = {(torch.bfloat16, 8): 24, (torch.bfloat16, 4): 96, (torch.float32, 8): 1, (torch.float32, 4): 1}
INT8_LAYOUT = {torch.bfloat16: "nibble", torch.float32: "int8pack"}
# The dtype the dequantize-then-GEMM path multiplies in, per (activation dtype, bits): a CPU without bfloat16
# arithmetic (AVX2) runs a bfloat16 GEMM several times slower than a float32 one; the integers are exact in either.
DEQUANT_GEMM_DTYPE = {(torch.bfloat16, 8): torch.bfloat16, (torch.bfloat16, 4): torch.bfloat16}
# (activation dtype, bits) whose fused calls run chatglm/cpu_kernels.py's loops on the official bytes (no repacking);
# kernel_choice puts them here only where numba is installed
NUMBA_KERNELS = set()
# (activation dtype, bits) -> the most rows whose fused calls run chatglm/cpu_intdot.py's integer dot products on the
# official bytes (activations rounded to int16 per 8 inputs: ~100x finer than bfloat16's rounding) instead of
# cpu_kernels' float loop; set by kernel_choice (bfloat16 only, where they run); 0: never
INTDOT_MAX_ROWS = {}
INT8_AS_INT4_REPACK_ROWS = 1  # a batched call keeps an official INT8 weight (the INT8 op is faster from 4 rows on)
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


def version_key(t: torch.Tensor):
    """What changes when a tensor's contents are written or replaced (inference tensors have no version)."""
    try:
        return t._version, t.data_ptr()
    except RuntimeError:
        return None, t.data_ptr()


# ---- the layer --------------------------------------------------------------------------------------------------

class _QuantizedMatmul(torch.autograd.Function):
    """x @ W.T with a quantized W; the backward pass dequantizes again instead of saving the fp weight (P-Tuning
    on an INT4 base keeps its memory small). Weights are frozen, so only the input gets a gradient."""

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        return layer._matmul(x, with_bias=False)

    @staticmethod
    def backward(ctx, grad_out):
        w = ctx.layer.dequantized_weight(grad_out.dtype)
        return grad_out @ w, None


class QuantizedLinear(nn.Module):
    """A frozen linear layer with weight-only INT8/INT4 weights in the official format (see module docstring).

    `weight` holds the official bytes, except after a fused CPU forward (INT4; INT8 once a one-row bfloat16 call
    ran): it then holds the same values repacked (uint8) for PyTorch's CPU INT4 op, with zero rows added up to a
    whole number of the op's row blocks where out_features is not one. `state_dict()`, `int_weight()`, `int_values()`,
    `gather_rows()`, `dequantized_weight()` and moving or casting the module always give / restore the official
    layout and shape. `weight_scale` stays float16 in bfloat16 models, so saving such a model writes the original's
    scales."""

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
        self._repacked_as = None  # (Parameter, version_key) of a weight repacked for the CPU INT4 op
        self._operands_cache = None  # see _operands

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

    def load_float_weight(self, weight: torch.Tensor, device, scale_dtype: torch.dtype):
        """Quantize a floating-point [out, in] weight into this layer (a checkpoint loaded with quantize=4|8)."""
        q, scale = quantize_weight(weight, self.bits)
        self.weight = nn.Parameter(q.to(device), requires_grad=False)
        self.weight_scale = nn.Parameter(scale.to(device=device, dtype=scale_dtype), requires_grad=False)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"bias={self.bias is not None}")

    # -- official <-> CPU-kernel layout --
    def _repacked(self) -> bool:
        r, w = self._repacked_as, self.weight
        return r is not None and r[0] is w and r[1] == version_key(w)

    def _nibble_columns(self) -> int:
        return self.in_features if self.bits == 4 else 2 * self.in_features

    def _rows_per_chunk(self, block: int) -> int:
        # conversions work on a few MB at a time, so repacking a big weight (a quantized lm_head) adds little memory
        return max(block, DEQUANT_CHUNK_ELEMENTS // self._nibble_columns() // block * block)

    def _repacked_blocks(self, start: int, stop: int):
        """(block_values of the whole row blocks that hold rows [start, stop) of the repacked weight, offset of
        row `start` in them)."""
        block = cpu_int4_layout()[0]
        first, last = start // block * block, min(whole_blocks(stop, block), self.weight.shape[0])
        return block_values(self.weight.detach()[first:last], self.bits, self.in_features, block), start - first

    def int_weight(self) -> torch.Tensor:
        """The weight in the official layout (int8 [out, in], or packed int8 [out, in/2] for INT4)."""
        if not self._repacked():
            return self.weight.detach()
        cols = self.in_features if self.bits == 8 else self.in_features // 2
        official = torch.empty(self.out_features, cols, dtype=torch.int8, device=self.weight.device)
        step = self._rows_per_chunk(cpu_int4_layout()[0])
        for start in range(0, self.out_features, step):
            stop = min(start + step, self.out_features)
            q = self.int_values(start, stop)
            official[start:stop] = q if self.bits == 8 else pack_int4(q)
        return official

    def _restore_official_layout(self):
        if self._repacked():
            # the swap happens in the weight's own mode (a layer built under inference_mode stays consistent)
            with torch.inference_mode(self.weight.is_inference()), torch.no_grad():
                self.weight.data = self.int_weight()
        self._repacked_as = None

    def repack_for_cpu(self) -> bool:
        """Repack the weight for the CPU INT4 op: once, into a tensor of the same size (plus any padding rows) that
        replaces the official one, so memory does not grow. False where this machine or this shape does not allow
        it."""
        if self._repacked():
            return True
        layout = cpu_int4_layout()
        w = self.weight
        if layout is None or group_size(self.in_features) is None or w.dtype != torch.int8 or w.device.type != "cpu":
            return False
        rows = whole_blocks(self.out_features, layout[0])
        step = self._rows_per_chunk(layout[0])
        with torch.inference_mode(w.is_inference()), torch.no_grad():
            official = w.detach()
            packed = torch.empty(rows, self._nibble_columns() // 2, dtype=torch.uint8)
            for start in range(0, rows, step):
                part = official[start:start + step]
                missing = min(step, rows - start) - part.shape[0]
                if missing:  # padding: zero rows (the zero bytes are zeros in both formats)
                    part = torch.cat([part, part.new_zeros(missing, part.shape[1])])
                pack_blocks(part, self.bits, *layout, out=packed[start:start + part.shape[0]])
            w.data = packed
        self._repacked_as = (w, version_key(w))
        return True

    def _apply(self, fn, recurse=True):
        self._restore_official_layout()  # moves and casts see (and keep) the official format
        self._operands_cache = None
        return super()._apply(fn, recurse)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._repacked():
            destination[prefix + "weight"] = self.int_weight()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self._restore_official_layout()
        self._operands_cache = None
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # -- compute --
    def int_values(self, start: int = 0, stop: Optional[int] = None) -> torch.Tensor:
        """The integers of output rows [start, stop) as int8 [rows, in] (INT4 unpacked), from either layout."""
        start, stop, _ = slice(start, stop).indices(self.out_features)
        stop = max(start, stop)
        if self._repacked():
            values, offset = self._repacked_blocks(start, stop)
            return row_major(*values, cpu_int4_layout()[1])[offset:offset + stop - start]
        w = self.weight.detach()[start:stop]
        return w if self.bits == 8 else unpack_int4(w)

    def dequantized_weight(self, dtype: torch.dtype, start: int = 0, stop: Optional[int] = None) -> torch.Tensor:
        """q * scale for output rows [start, stop), [rows, in] (exact in float32: an integer times an fp16 value)."""
        return self.int_values(start, stop).to(dtype) * self.weight_scale[start:stop].to(dtype)[:, None]

    def gather_rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows `ids` of the dequantized weight, [*ids.shape, in_features] in `dtype`: the values of
        dequantized_weight(dtype)[ids], read from those rows only (in either layout), e.g. for an embedding lookup
        over this weight. Ids outside [0, out_features) raise IndexError."""
        flat = ids.reshape(-1)
        if flat.numel():
            low, high = torch.aminmax(flat)
            if low < 0 or high >= self.out_features:
                raise IndexError(f"row ids must be in [0, {self.out_features}), got {int(low)}..{int(high)}")
        w = self.weight.detach()
        if self._repacked():
            block, style = cpu_int4_layout()
            half = block // 2
            within = flat % block
            if style == "halves":  # row j and block/2 + j share byte j of each column
                byte, shift = within % half, (within // half) * 4
            else:  # rows 2j and 2j + 1 share byte j
                byte, shift = within // 2, (within % 2) * 4
            blocks = w.view(-1, self._nibble_columns(), half)  # [blocks, column, byte]
            u = (blocks[flat // block, :, byte] >> shift.to(torch.uint8)[:, None]) & 0xF
            q = values_from_nibbles(u, self.bits)
        else:
            q = w[flat] if self.bits == 8 else unpack_int4(w[flat])
        rows = q.to(dtype) * self.weight_scale[flat].to(dtype)[:, None]
        return rows.view(*ids.shape, self.in_features)

    def _operands(self, dtype: torch.dtype):
        """(repacked, weight_scale and bias in `dtype`, the INT4 op's table and group size if repacked) for activations
        of `dtype`. Cached, because converting the scales and looking things up on every call cost more than a small
        layer's matrix-vector product; rebuilt when weight, weight_scale or bias are replaced, written or repacked."""
        params = self._parameters
        w, s, b = params["weight"], params["weight_scale"], params["bias"]
        ws, ss, bs = version_key(w), version_key(s), None if b is None else version_key(b)
        c = self._operands_cache
        if (c is not None and c[0] is dtype and c[1] is w and c[2] == ws and c[3] is s and c[4] == ss and c[5] is b
                and c[6] == bs):
            return c[7]
        repacked = self._repacked_as is not None and self._repacked_as[0] is w and self._repacked_as[1] == ws
        table = group = None
        if repacked:
            group = group_size(self.in_features)
            tables = unit_scales_and_zeros if self.bits == 4 else int8_pair_scales_and_zeros
            table = tables(self.in_features, w.shape[0], group, dtype)
        with torch.inference_mode(False), torch.no_grad():
            state = (repacked, s.detach().to(dtype), None if b is None else b.detach().to(dtype), table, group)
        self._operands_cache = (dtype, w, ws, s, ss, b, bs, state)
        return state

    def _fused_cpu(self, x2d: torch.Tensor, with_bias: bool) -> Optional[torch.Tensor]:
        """x @ W.T (+ bias) by PyTorch's fused CPU ops where they serve this call (rows, dtype); else None."""
        dtype, n = x2d.dtype, x2d.shape[0]
        if n > FUSED_MAX_ROWS.get((dtype, self.bits), -1):
            return None
        integer = n <= INTDOT_MAX_ROWS.get((dtype, self.bits), 0)
        if (integer or (dtype, self.bits) in NUMBA_KERNELS) and not self._repacked():
            return self._numba_op(x2d, with_bias, integer)
        state = self._operands(dtype)
        if state[0]:  # repacked for the INT4 op
            return self._int4_op(x2d, with_bias, state)
        # INT4 repacks on its first fused call; INT8 in the "nibble" layout on a one-row call or where the INT8 op is
        # missing (by default never for float32, which keeps its INT8 op and so the original's numbers)
        nibble = INT8_LAYOUT.get(dtype) == "nibble" and (n <= INT8_AS_INT4_REPACK_ROWS or not cpu_int8_fused_ok())
        if self.bits == 4 or nibble:
            if self.repack_for_cpu():
                return self._int4_op(x2d, with_bias, self._operands(dtype))
        if self.bits == 8 and cpu_int8_fused_ok():
            _, scale, bias, _, _ = state
            y = torch.ops.aten._weight_int8pack_mm(x2d.contiguous(), self._parameters["weight"], scale)
            return y.add_(bias) if with_bias and bias is not None else y
        return None

    def _numba_op(self, x2d: torch.Tensor, with_bias: bool, integer: bool = False) -> torch.Tensor:
        """The integer products in float32 (cpu_kernels, or cpu_intdot if `integer` and it takes this shape),
        scaled and biased in float32, rounded once."""
        _, scale, bias, _, _ = self._operands(torch.float32)  # cached: no conversion per call
        weight = self._parameters["weight"]
        y = cpu_intdot.matmul(x2d, weight, self.bits) if integer else None
        if y is None:
            y = cpu_kernels.matmul(x2d, weight, self.bits)
        y.mul_(scale)
        if with_bias and bias is not None:
            y.add_(bias)
        return y.to(x2d.dtype)

    def _int4_op(self, x2d: torch.Tensor, with_bias: bool, state) -> torch.Tensor:
        _, scale, bias, table, group = state
        w = self._parameters["weight"]
        x = x2d.contiguous() if self.bits == 4 else torch.cat([x2d, x2d], dim=1)  # INT8: the hi and lo halves
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, w, group, table)
        padded = w.shape[0] != self.out_features
        if padded:
            y = y[:, :self.out_features]
        if x2d.dtype == torch.float32 or not with_bias or bias is None:  # float32: the numerics it always had
            y = y * scale if padded else y.mul_(scale)
            return y.add_(bias) if with_bias and bias is not None else y
        return torch.addcmul(bias, y, scale)  # one rounding to bfloat16 instead of two

    def _int_columns(self, dtype: torch.dtype, start: int, stop: int,
                     buffer: Optional[torch.Tensor] = None) -> torch.Tensor:
        """int_values(start, stop).T in `dtype` (exact: |q| <= 128), from the repacked weight without the byte-wise
        transpose that row order needs (see column_major)."""
        values, offset = self._repacked_blocks(start, stop)
        return column_major(*values, cpu_int4_layout()[1], dtype, buffer)[:, offset:offset + stop - start]

    def _dequantized_matmul(self, x2d: torch.Tensor) -> torch.Tensor:
        cpu = x2d.device.type == "cpu"
        gemm_dtype = DEQUANT_GEMM_DTYPE.get((x2d.dtype, self.bits), x2d.dtype) if cpu else x2d.dtype
        if gemm_dtype != x2d.dtype:
            return self._dequantized_matmul_in(x2d.to(gemm_dtype), upcast=True).to(x2d.dtype)
        return self._dequantized_matmul_in(x2d, upcast=False)

    def _dequantized_matmul_in(self, x2d: torch.Tensor, upcast: bool) -> torch.Tensor:
        dtype = x2d.dtype
        # From a repacked weight, multiply by the transposed integers and scale the output (no row-major weight is
        # rebuilt). Only for bfloat16 activations (in bfloat16, or in float32 when `upcast`): float32 models keep
        # their dequantized GEMM, and so their exact numbers, and float16 could overflow on the unscaled sums.
        columns = self._repacked() and (dtype == torch.bfloat16 or upcast)
        scales_output = dtype == torch.bfloat16 or upcast
        scale = None
        if scales_output:  # upcast: the scales straight from the weight (the cache keeps the bfloat16 operands)
            scale = self.weight_scale.detach().to(dtype) if upcast else self._operands(dtype)[1]
        rows = DEQUANT_CHUNK_ELEMENTS // self.in_features // 64 * 64
        if x2d.device.type != "cpu" or rows == 0 or rows >= self.out_features:
            if columns:
                return (x2d @ self._int_columns(dtype, 0, self.out_features)).mul_(scale)
            return F.linear(x2d, self.dequantized_weight(dtype))
        # CPU: dequantize a few MB of rows at a time into one buffer that every chunk reuses: a fresh [out, in] tensor,
        # or fresh memory per chunk, is page-faulted in on each call, which costs more than the GEMM itself
        y = torch.empty(x2d.shape[0], self.out_features, dtype=dtype)
        buffer = torch.empty(self.in_features * rows, dtype=dtype)
        for start in range(0, self.out_features, rows):
            stop = min(start + rows, self.out_features)
            if columns:
                torch.mul(x2d @ self._int_columns(dtype, start, stop, buffer), scale[start:stop],
                          out=y[:, start:stop])
                continue
            w = buffer[:(stop - start) * self.in_features].view(stop - start, self.in_features)
            w.copy_(self.int_values(start, stop))
            if scales_output:  # the integers are exact in the GEMM's dtype: scale the output, not the weight
                torch.mul(x2d @ w.T, scale[start:stop], out=y[:, start:stop])
            else:  # the values of dequantized_weight(dtype, start, stop): q.to(dtype) * scale.to(dtype)
                y[:, start:stop] = x2d @ w.mul_(self.weight_scale[start:stop].to(dtype)[:, None]).T
        return y

    def _matmul(self, x2d: torch.Tensor, with_bias: bool) -> torch.Tensor:
        if x2d.device.type == "cpu":
            y = self._fused_cpu(x2d, with_bias)
            if y is not None:
                return y
        y = self._dequantized_matmul(x2d)
        if with_bias and self.bias is not None:
            y = y.add_(self._operands(y.dtype)[2])
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected input with {self.in_features} features, got shape {tuple(x.shape)}")
        x2d = x.reshape(-1, self.in_features)
        if torch.is_grad_enabled() and x.requires_grad:
            y = _QuantizedMatmul.apply(x2d, self)
            if self.bias is not None:
                y = y + self.bias.to(y.dtype)
        else:
            y = self._matmul(x2d, with_bias=True)
        return y.view(*x.shape[:-1], self.out_features)
