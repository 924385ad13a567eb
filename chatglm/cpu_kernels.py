"""Weight-streaming kernels for CPU decode steps, compiled on first use by numba (LLVM comes inside numba's wheel:
no compiler is needed on the user's machine).

A decode step multiplies a few rows (1 per sequence in the batch) by every weight of the model, so its speed is the
speed at which the weights stream from memory. Where the CPU has no bfloat16 arithmetic (AVX2), PyTorch's ops leave
much of that unused: on a 2-core AVX2 EPYC with ~38 GB/s of read bandwidth, F.linear read bfloat16 weights at
~20 GB/s and the INT4 op its packed weights at ~7 GB/s; these loops read them at ~28-34 and ~15-21 GB/s
(benchmarks/README.md). Each weight value is widened to float32 in registers and multiplied with up to 4 input rows
at once (2 weight rows x 4 input rows per pass, 4 x 1 for leftover rows); sums are float32 and rounded once, by
the caller.
They read the official layouts as they are (no repacking): bfloat16 [out, in], INT8 [out, in], INT4 [out, in/2] with
the even column in the high nibble. chatglm/kernel_choice.py times them against PyTorch's ops on each machine;
without numba they are simply not candidates.
"""
import threading

import torch

try:
    import numba
    import numpy as np
    from llvmlite import ir
    from numba import njit, prange, types
    from numba.extending import intrinsic
except ImportError:  # an install without numba: PyTorch's kernels only
    numba = None


def available() -> bool:
    return numba is not None


# Decode attention of bfloat16 models by _decode_attention: set by chatglm/kernel_choice.py together with the bf16
# linears' plan (where numba's loops beat PyTorch's bfloat16 ops, the CPU has no bfloat16 arithmetic for its bmm).
DECODE_ATTENTION = False


if numba is not None:
    _I32 = ir.IntType(32)

    @intrinsic
    def _float32(typingctx, v):
        """A weight element as float32: bfloat16 bits (stored as uint16) shifted into a float32's high half, or an
        INT8 value. Written as LLVM IR because numba widens small integers to 64 bits, which AVX2 cannot convert
        to floats in vectors."""
        def bf16(context, builder, signature, args):
            return builder.bitcast(builder.shl(builder.zext(args[0], _I32), ir.Constant(_I32, 16)), ir.FloatType())

        def int8(context, builder, signature, args):
            return builder.sitofp(args[0], ir.FloatType())
        codegen = {types.uint16: bf16, types.int8: int8}.get(v)
        return (types.float32(v), codegen) if codegen else None

    def _nibble_intrinsic(shift_left: int):
        """An intrinsic giving one signed 4-bit value of a packed int8 as float32: the byte sign-extended, shifted
        left by `shift_left` and arithmetically back right by 28 (24: the high nibble, the even column; 28: low)."""
        @intrinsic
        def nibble(typingctx, v):
            def codegen(context, builder, signature, args):
                wide = builder.shl(builder.sext(args[0], _I32), ir.Constant(_I32, shift_left))
                return builder.sitofp(builder.ashr(wide, ir.Constant(_I32, 28)), ir.FloatType())
            return (types.float32(v), codegen) if v == types.int8 else None
        return nibble

    _high, _low = _nibble_intrinsic(24), _nibble_intrinsic(28)

    # Both kernels take the input four rows at a time and the weight two output rows at a time (n and n + 1; the
    # last row twice at the end of an odd count): every widened weight value and every loaded input value serves
    # several multiply-adds, which is what makes a batch of 8 cost ~2x one row instead of ~3x (loads bound them).
    # Rows left over (all of them at batch 1) take four weight rows each in _rows_times_weight: four independent
    # sums keep the loads in flight (1.1-1.25x two rows on one [16384, 4096] matrix; benchmarks/README.md).
    @njit(parallel=True, fastmath=True, nogil=True, cache=True)
    def _rows_times_weight(x, w, out):
        """out[m, n] = sum_k x[m, k] * w[n, k] for bfloat16-bit (uint16) or int8 `w`, float32 x and out."""
        rows, k_size = x.shape
        last = w.shape[0] - 1
        for quad in prange((last + 4) // 4):
            q = 4 * quad
            m = 0
            while m + 4 <= rows:
                for n in (q, q + 2):
                    n, n1 = min(n, last), min(n + 1, last)
                    a0 = a1 = a2 = a3 = b0 = b1 = b2 = b3 = np.float32(0.0)
                    for k in range(k_size):
                        v, u = _float32(w[n, k]), _float32(w[n1, k])
                        x0, x1, x2, x3 = x[m, k], x[m + 1, k], x[m + 2, k], x[m + 3, k]
                        a0 += v * x0
                        a1 += v * x1
                        a2 += v * x2
                        a3 += v * x3
                        b0 += u * x0
                        b1 += u * x1
                        b2 += u * x2
                        b3 += u * x3
                    out[m, n], out[m + 1, n], out[m + 2, n], out[m + 3, n] = a0, a1, a2, a3
                    out[m, n1], out[m + 1, n1], out[m + 2, n1], out[m + 3, n1] = b0, b1, b2, b3
                m += 4
            n0, n1, n2, n3 = q, min(q + 1, last), min(q + 2, last), min(q + 3, last)
            for r in range(m, rows):
                a = b = c = d = np.float32(0.0)
                for k in range(k_size):
                    xk = x[r, k]
                    a += _float32(w[n0, k]) * xk
                    b += _float32(w[n1, k]) * xk
                    c += _float32(w[n2, k]) * xk
                    d += _float32(w[n3, k]) * xk
                out[r, n0], out[r, n1], out[r, n2], out[r, n3] = a, b, c, d

    @njit(parallel=True, fastmath=True, nogil=True, cache=True)
    def _rows_times_int4(xe, xo, w, out):  # two weight rows at a time, one at a time for leftover rows
        """out[m, n] = sum_j xe[m, j] * high(w[n, j]) + xo[m, j] * low(w[n, j]): x split into its even (xe) and odd
        (xo) columns so that both stream contiguously."""
        rows, half = xe.shape
        last = w.shape[0] - 1
        for pair in prange((last + 2) // 2):
            n, n1 = 2 * pair, min(2 * pair + 1, last)
            m = 0
            while m + 4 <= rows:
                a0 = a1 = a2 = a3 = b0 = b1 = b2 = b3 = np.float32(0.0)
                for j in range(half):
                    hv, lv, hu, lu = _high(w[n, j]), _low(w[n, j]), _high(w[n1, j]), _low(w[n1, j])
                    e0, e1, e2, e3 = xe[m, j], xe[m + 1, j], xe[m + 2, j], xe[m + 3, j]
                    o0, o1, o2, o3 = xo[m, j], xo[m + 1, j], xo[m + 2, j], xo[m + 3, j]
                    a0 += hv * e0 + lv * o0
                    a1 += hv * e1 + lv * o1
                    a2 += hv * e2 + lv * o2
                    a3 += hv * e3 + lv * o3
                    b0 += hu * e0 + lu * o0
                    b1 += hu * e1 + lu * o1
                    b2 += hu * e2 + lu * o2
                    b3 += hu * e3 + lu * o3
                out[m, n], out[m + 1, n], out[m + 2, n], out[m + 3, n] = a0, a1, a2, a3
                out[m, n1], out[m + 1, n1], out[m + 2, n1], out[m + 3, n1] = b0, b1, b2, b3
                m += 4
            for r in range(m, rows):  # one weight row at a time here: two unpacked at once ran ~1.4x slower
                for o in (n, n1):
                    a = np.float32(0.0)
                    for j in range(half):
                        a += _high(w[o, j]) * xe[r, j] + _low(w[o, j]) * xo[r, j]
                    out[r, o] = a

    @njit(parallel=True, fastmath=True, nogil=True, cache=True)
    def _decode_attention(q, k, v, n, scale, out):
        """One query per (row, head) over the first n keys/values of bfloat16-bit (uint16) caches, in float32:
        out[b, h] = softmax(scale * k[b, h, :n] . q[b, h]) @ v[b, h, :n] (q [B, H, D], k/v [B, H, capacity, D])."""
        rows, heads, dim = q.shape
        for job in prange(rows * heads):
            b, h = job // heads, job % heads
            scores = np.empty(n, np.float32)
            top = np.float32(-np.inf)
            for t in range(n):
                s = np.float32(0.0)
                for d in range(dim):
                    s += _float32(k[b, h, t, d]) * q[b, h, d]
                scores[t] = s * scale
                top = max(top, scores[t])
            total = np.float32(0.0)
            for t in range(n):
                scores[t] = np.exp(scores[t] - top)
                total += scores[t]
            acc = np.zeros(dim, np.float32)
            for t in range(n):
                p = scores[t] / total
                for d in range(dim):
                    acc[d] += p * _float32(v[b, h, t, d])
            for d in range(dim):
                out[b, h, d] = acc[d]


# One kernel at a time: each already uses every thread, and numba's fallback threading layer (workqueue, where no
# OpenMP is found) aborts on concurrent launches from two Python threads.
_launch = threading.Lock()


def _threads():
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))


def _array(t: torch.Tensor):
    return t.detach().contiguous().numpy()


def matmul(x2d: torch.Tensor, weight: torch.Tensor, bits: int = 0) -> torch.Tensor:
    """float32 x2d @ W.T for a CPU weight: bfloat16 [out, in] (bits 0), or the integers of an official INT8
    [out, in] / INT4 [out, in/2] weight (bits 8 / 4; the caller applies the scales)."""
    x = x2d.detach().float().contiguous()
    out = torch.empty(x.shape[0], weight.shape[0], dtype=torch.float32)
    w = _array(weight.view(torch.int16)).view(np.uint16) if bits == 0 else _array(weight)
    with _launch:
        _threads()
        if bits == 4:
            pairs = x.view(x.shape[0], -1, 2)  # [rows, in/2, (even, odd)]
            _rows_times_int4(_array(pairs[:, :, 0]), _array(pairs[:, :, 1]), w, out.numpy())
        else:
            _rows_times_weight(x.numpy(), w, out.numpy())
    return out


def _whole_buffer(t: torch.Tensor):
    """The contiguous [B, H, capacity, D] buffer of which `t` [B, H, n, D] is the first n positions (a KV cache's
    keys or values), as uint16 bits; None when `t` is not laid out that way."""
    B, H, n, D = t.shape
    if t.stride(3) != 1 or t.stride(2) != D or t.stride(1) % D or t.stride(0) != H * t.stride(1):
        return None
    whole = t.as_strided((B, H, t.stride(1) // D, D), t.stride(), t.storage_offset())
    return _array(whole.view(torch.int16)).view(np.uint16)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
    """softmax(scale * q k^T) v for one bfloat16 query per row and head (q [B, H, 1, D], k/v [B, H, n, D] views of
    a KV cache), unmasked, computed in float32 -> [B, H, 1, D] bfloat16; None where the layout does not allow it.
    One launch per layer instead of PyTorch's bfloat16 bmm, which has no bfloat16 arithmetic to use on AVX2 CPUs."""
    keys, values = _whole_buffer(k), _whole_buffer(v)
    if keys is None or values is None:
        return None
    B, H, n, D = k.shape
    query = q.detach().reshape(B, H, D).float().contiguous()
    out = torch.empty(B, H, D, dtype=torch.float32)
    with _launch:
        _threads()
        _decode_attention(query.numpy(), keys, values, n, np.float32(scale), out.numpy())
    return out.view(B, H, 1, D).to(q.dtype)
