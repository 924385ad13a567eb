"""PyTorch's CPU INT4 op (`_weight_int4pack_mm_for_cpu`) and its weight layout, which chatglm.quantization's
QuantizedLinear uses for decoding on CPU, INT8 included.

`_weight_int4pack_mm_for_cpu` wants its weights repacked by `_convert_weight_to_int4pack_for_cpu`, whose layout
depends on the CPU (blocks of 64 output rows with AVX-512, 32 otherwise). We find the layout once by comparing
with that op, so we can convert both ways (the state dict must stay in the official layout) without keeping two
copies. Layout: rows in blocks of `block`; each block is stored input-column-major, block/2 bytes per column;
"halves" puts row j in the low and row block/2 + j in the high nibble of byte j, "pairs" rows 2j and 2j + 1.
A row count that is not a whole number of blocks is padded with zero rows (the op would store a short last block
differently); the padding is sliced off the output and never shown outside.

INT8 goes through the same op, which reads weights faster than `_weight_int8pack_mm` (benchmarks/README.md): an
int8 q is 16 * hi + lo with hi = q >> 4 in [-8, 7] and lo = q & 15 in [0, 15], so an [out, in] INT8 weight is
stored, in the same number of bytes, as the nibbles of an [out, 2 * in] matrix: hi + 8 in the first `in` columns,
lo in the last. Then x @ q.T = cat([x, x]) @ [16 * hi, lo].T, where the op's per-group scale 16 (hi groups) and
zero +8 (lo groups) undo the split: every step is exact in float32, which the op accumulates in.
"""
import functools
from typing import Optional, Tuple

import torch

_CPU_LAYOUTS = [(block, style) for block in (64, 32, 16) for style in ("halves", "pairs")]


def _to_cpu_layout(unsigned: torch.Tensor, block: int, style: str) -> torch.Tensor:
    n, k = unsigned.shape
    if style == "halves":
        v = unsigned.view(n // block, 2, block // 2, k).permute(0, 3, 2, 1)
    else:
        v = unsigned.view(n // block, block // 2, 2, k).permute(0, 3, 1, 2)
    return (v[..., 0] | (v[..., 1] << 4)).contiguous().view(n, k // 2)


def pack_blocks(official: torch.Tensor, bits: int, block: int, style: str,
                 out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Official rows (a whole number of blocks; int8 [rows, in] or INT4 packed [rows, in/2]) -> the CPU op's layout
    (_to_cpu_layout of the unsigned nibbles u that the op reads as u - 8), uint8 [rows, k/2] with k = in (INT4) or
    2 * in (INT8: hi + 8, then lo, see the module docstring), written into `out` if given. Byte-wise work on the official bytes,
    then one transposing copy."""
    b = official.view(torch.uint8)
    rows, cols = b.shape
    half = block // 2
    if style == "halves":
        v = b.view(rows // block, 2, half, cols)
    else:
        v = b.view(rows // block, half, 2, cols).transpose(1, 2)
    low, high = v[:, 0], v[:, 1]  # [blocks, half, cols]: the rows that go to low / high nibbles
    # (x >> 4) ^ 8 is a signed high nibble + 8; INT4's low nibble is signed too (+8), INT8's lo is stored as is
    first = ((low >> 4) | (high & 0xF0)) ^ 0x88  # INT8: the hi columns; INT4: even columns
    second = (low & 0xF) | (high << 4)  # INT8: the lo columns; INT4: odd columns
    if out is None:
        out = torch.empty(rows, cols, dtype=torch.uint8, device=b.device)
    if bits == 4:
        second ^= 0x88
        blocks = out.view(rows // block, cols, 2, half)
        _copy_transposed(blocks[:, :, 0], first)
        _copy_transposed(blocks[:, :, 1], second)
    else:
        blocks = out.view(rows // block, 2, cols, half)
        _copy_transposed(blocks[:, 0], first)
        _copy_transposed(blocks[:, 1], second)
    return out


def _copy_transposed(dst: torch.Tensor, src: torch.Tensor):
    """dst.copy_(src.transpose(1, 2)) for a contiguous src [n, a, b]. Read straight, src's rows lie b bytes apart,
    and with b a power of two every column read lands in the same cache sets, so we read from a copy whose rows are
    padded by 64 bytes."""
    n, a, b = src.shape
    staged = torch.empty(n, a, b + 64, dtype=src.dtype, device=src.device)[..., :b]
    staged.copy_(src)
    dst.copy_(staged.transpose(1, 2))


def values_from_nibbles(u: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned nibbles of rows [rows, k] -> their integers, int8 [rows, in]."""
    if bits == 4:
        return u.view(torch.int8) - 8
    half = u.shape[1] // 2
    return (((u[:, :half] ^ 8) << 4) | u[:, half:]).view(torch.int8)


def block_values(packed: torch.Tensor, bits: int, in_features: int, block: int):
    """Integers of whole row blocks of a repacked weight, in stored order: (the rows kept in low nibbles, the rows
    kept in high nibbles), each int8 [blocks, in, block/2]. Byte-wise work only; no reordering (that is slow)."""
    if bits == 4:
        # u ^ 8 read as a 4-bit two's complement number is u - 8: sign-extend each nibble of the flipped bytes
        x = (packed ^ 0x88).view(torch.int8).view(-1, in_features, block // 2)
        return (x << 4) >> 4, x >> 4
    p = packed.view(-1, 2 * in_features, block // 2)
    hi, lo = p[:, :in_features], p[:, in_features:]
    # the official byte of q is ((u_hi ^ 8) << 4) | u_lo: build it for both rows of every byte at once
    low_rows = ((hi << 4) | (lo & 0xF)) ^ 0x80
    high_rows = ((hi & 0xF0) | (lo >> 4)) ^ 0x80
    return low_rows.view(torch.int8), high_rows.view(torch.int8)


def row_major(low_rows: torch.Tensor, high_rows: torch.Tensor, style: str) -> torch.Tensor:
    """block_values -> int8 [rows, in] in row order."""
    blocks, k, half = low_rows.shape
    out = torch.empty(blocks, 2, half, k, dtype=torch.int8, device=low_rows.device)
    low, high = (out[:, 0], out[:, 1]) if style == "halves" else (out.view(blocks, half, 2, k).unbind(2))
    low.copy_(low_rows.transpose(1, 2))
    high.copy_(high_rows.transpose(1, 2))
    return out.view(-1, k)


def column_major(low_rows: torch.Tensor, high_rows: torch.Tensor, style: str, dtype,
                  buffer: Optional[torch.Tensor] = None) -> torch.Tensor:
    """block_values -> [in, rows] in `dtype` (written into `buffer` if given): the transposed integer matrix. It
    needs no byte-wise transpose (the copy moves runs of block/2 values), so a GEMM on it starts far sooner than on
    the row-major matrix."""
    blocks, k, half = low_rows.shape
    if buffer is None:
        out = torch.empty(k, blocks, 2, half, dtype=dtype, device=low_rows.device)
    else:
        out = buffer.view(-1)[:k * blocks * 2 * half].view(k, blocks, 2, half)
    low, high = (out[:, :, 0], out[:, :, 1]) if style == "halves" else out.view(k, blocks, half, 2).unbind(3)
    low.copy_(low_rows.permute(1, 0, 2))
    high.copy_(high_rows.permute(1, 0, 2))
    return out.view(k, -1)


def whole_blocks(rows: int, block: int) -> int:
    return -(-rows // block) * block



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


def group_size(in_features: int) -> Optional[int]:
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
def unit_scales_and_zeros(in_features: int, out_features: int, group: int, dtype) -> torch.Tensor:
    # Shared by every layer of this shape: the CPU op multiplies by 1 and we apply the row scales to its output,
    # which saves a per-layer table.
    with torch.inference_mode(False):
        return _scales_and_zeros(torch.ones(out_features), in_features, group, dtype)


@functools.lru_cache(maxsize=None)
def int8_pair_scales_and_zeros(in_features: int, out_features: int, group: int, dtype) -> torch.Tensor:
    # INT8 as hi / lo nibbles (see the module docstring), shared like the unit table: (u - 8) * 16 for the `in` hi columns,
    # (u - 8) * 1 + 8 for the `in` lo columns; the row scales again go on the output
    with torch.inference_mode(False):
        hi = _scales_and_zeros(torch.full((out_features,), 16.0), in_features, group, dtype)
        lo = _scales_and_zeros(torch.ones(out_features), in_features, group, dtype)
        lo[..., 1] = 8
        return torch.cat([hi, lo]).contiguous()


@functools.lru_cache(maxsize=None)
def cpu_int8_fused_ok() -> bool:
    try:
        q = torch.randint(-127, 128, (8, 32), dtype=torch.int8)
        x, s = torch.randn(2, 32).bfloat16(), torch.rand(8).bfloat16()
        y = torch.ops.aten._weight_int8pack_mm(x, q, s)
        return torch.allclose(y.float(), x.float() @ (q.float() * s.float()[:, None]).T, rtol=2e-2, atol=2e-2)
    except (AttributeError, RuntimeError, NotImplementedError):
        return False
