"""INT4 / INT8 decode products as integer dot products: the official weight bytes times activations quantized to
int16, on AVX2's 16-bit multiply-add (vpmaddwd: 16 products and 8 pairwise sums in one instruction).

chatglm/cpu_kernels.py widens every weight to float32 before its multiply-add: 8 vector instructions per 16 INT4
weights, which keeps an AVX2 core compute-bound at ~15 GB/s of packed weights. Here a group of 64 INT4 weights takes
17 (two 16-byte loads widened to 16-bit lanes, nibbles split by xor/shift/and, four vpmaddwd, adds, one conversion
and one fused multiply-add with the activations' scales), and the loop reads the weights about as fast as the
memory gives them (benchmarks/README.md).

Activations: each group of 8 inputs (the 8 that one 32-bit lane of vpmaddwd sums) gets its own scale, absmax/32767,
and is rounded to int16. The error that adds is ~100x smaller than bfloat16's rounding of the same activations
(relative 1.5e-5 against 1.6e-3 on a random [16384, 4096] product), so the results are what a bfloat16 model's
other paths give. INT4 nibbles are read as unsigned (u = q + 8: one xor, no sign extension); the 8 * sum(x) that
adds is subtracted per input row.

The loops are LLVM IR, compiled for this CPU at first use by llvmlite (numba's LLVM: no compiler is needed on the
user's machine); numba's parallel loop hands each thread a block of weight rows. Needs an x86 CPU with AVX2 and an
llvmlite whose LLVM reads opaque pointers (numba >= 0.61); elsewhere `available()` is False and the candidate does
not exist. Input sizes must be multiples of 64 (ChatGLM-6B's 4096 and 16384 are).
"""
import threading

import torch

from . import cpu_kernels

try:
    import numpy as np
    import llvmlite.binding as llvm
    from llvmlite import ir
    from numba import njit, prange, types
    from numba.extending import intrinsic
except ImportError:
    llvm = None

GROUP = 64  # inputs per group: 32 bytes of INT4 or 64 of INT8 weights, one vpmaddwd sum per 32-bit lane of 8 inputs
X_ROWS = 4  # input rows that share one widening of the weights (a batch); fewer go through the one-row loop
CHUNK = 32  # weight rows per parallel task
ARGS = 11
PREFETCH_BYTES = 1024  # how far ahead of the group being read (in the same row, or the next) the loop prefetches


def _splat(kind: str, value: int, n: int) -> str:
    return "<" + ", ".join([f"{kind} {value}"] * n) + ">"


def _loop_ir(bits: int, x_rows: int) -> str:
    """LLVM IR of `int{bits}_x{x_rows}`: for each weight row n < rows and input row m < x_rows,
    out[m, n] = sum_g sum_lane d[m, 8g + lane] * (sum of the lane's 8 products in int32) - corr[m],
    with w [rows, groups * 64 * bits / 8] bytes, x int16 [x_rows, groups * 64] in the slot order of slot_order(),
    d float32 [x_rows, groups * 8], corr float32 [x_rows], out float32 (strides in bytes)."""
    name = f"int{bits}_x{x_rows}"
    lines = [f"define void @{name}(i64 %wa, i64 %wstride, i64 %rows, i64 %xa, i64 %xstride, i64 %da, i64 %dstride, "
             f"i64 %ca, i64 %oa, i64 %ostride, i64 %groups) {{", "entry:",
             "  %wbase = inttoptr i64 %wa to ptr", "  %xbase = inttoptr i64 %xa to ptr",
             "  %dbase = inttoptr i64 %da to ptr", "  %cbase = inttoptr i64 %ca to ptr", "  %obase = inttoptr i64 %oa to ptr"]
    add = lines.append
    for m in range(x_rows):
        for v, base, stride in (("x", "xbase", "xstride"), ("d", "dbase", "dstride"), ("o", "obase", "ostride")):
            add(f"  %{v}off{m} = mul i64 %{stride}, {m}")
            add(f"  %{v}{m} = getelementptr i8, ptr %{base}, i64 %{v}off{m}")
        add(f"  %cp{m} = getelementptr float, ptr %cbase, i64 {m}")
        add(f"  %corr{m} = load float, ptr %cp{m}, align 4")
    add("  %empty = icmp eq i64 %rows, 0")
    add("  br i1 %empty, label %done, label %row")
    add("row:")
    add("  %n = phi i64 [0, %entry], [%n1, %rowend]")
    add("  %woff = mul i64 %n, %wstride")
    add("  %w = getelementptr i8, ptr %wbase, i64 %woff")
    add("  br label %group")
    add("group:")
    add("  %g = phi i64 [0, %row], [%g1, %group]")
    for m in range(x_rows):
        add(f"  %acc{m} = phi <8 x float> [zeroinitializer, %row], [%next{m}, %group]")
    add(f"  %gw = mul i64 %g, {GROUP * bits // 8}")
    add(f"  %gx = mul i64 %g, {GROUP * 2}")
    add("  %gd = mul i64 %g, 32")
    # the weights of the group as four <16 x i16> vectors, in the order of the activations' slots
    if bits == 4:
        vectors = []
        for h in range(2):  # 16 bytes each: their high nibbles (even columns), then their low ones (odd columns)
            add(f"  %wp{h} = getelementptr i8, ptr %w, i64 %gw")
            add(f"  %wq{h} = getelementptr i8, ptr %wp{h}, i64 {16 * h}")
            add(f"  %b{h} = load <16 x i8>, ptr %wq{h}, align 1")
            add(f"  %z{h} = zext <16 x i8> %b{h} to <16 x i16>")
            add(f"  %u{h} = xor <16 x i16> %z{h}, {_splat('i16', 0x88, 16)}")  # both nibbles + 8: unsigned
            add(f"  %hi{h} = lshr <16 x i16> %u{h}, {_splat('i16', 4, 16)}")
            add(f"  %lo{h} = and <16 x i16> %u{h}, {_splat('i16', 15, 16)}")
            vectors += [f"%hi{h}", f"%lo{h}"]
    else:
        vectors = []
        for h in range(4):
            add(f"  %wp{h} = getelementptr i8, ptr %w, i64 %gw")
            add(f"  %wq{h} = getelementptr i8, ptr %wp{h}, i64 {16 * h}")
            add(f"  %b{h} = load <16 x i8>, ptr %wq{h}, align 1")
            add(f"  %s{h} = sext <16 x i8> %b{h} to <16 x i16>")
            vectors.append(f"%s{h}")
    for m in range(x_rows):
        add(f"  %xg{m} = getelementptr i8, ptr %x{m}, i64 %gx")
        for j, vec in enumerate(vectors):
            add(f"  %xp{m}_{j} = getelementptr i8, ptr %xg{m}, i64 {32 * j}")
            add(f"  %xv{m}_{j} = load <16 x i16>, ptr %xp{m}_{j}, align 2")
            add(f"  %p{m}_{j} = call <8 x i32> @llvm.x86.avx2.pmadd.wd(<16 x i16> {vec}, <16 x i16> %xv{m}_{j})")
        add(f"  %q{m}_a = add <8 x i32> %p{m}_0, %p{m}_1")
        add(f"  %q{m}_b = add <8 x i32> %p{m}_2, %p{m}_3")
        add(f"  %q{m} = add <8 x i32> %q{m}_a, %q{m}_b")
        add(f"  %f{m} = sitofp <8 x i32> %q{m} to <8 x float>")
        add(f"  %dp{m} = getelementptr i8, ptr %d{m}, i64 %gd")
        add(f"  %dv{m} = load <8 x float>, ptr %dp{m}, align 4")
        add(f"  %next{m} = call <8 x float> @llvm.fma.v8f32(<8 x float> %f{m}, <8 x float> %dv{m}, "
            f"<8 x float> %acc{m})")
    # the hardware prefetcher alone left ~10% of the bandwidth unused (benchmarks/README.md)
    add(f"  %ahead = add i64 %gw, {PREFETCH_BYTES}")
    add("  %future = getelementptr i8, ptr %w, i64 %ahead")
    add("  call void @llvm.prefetch.p0(ptr %future, i32 0, i32 0, i32 1)")
    add("  %g1 = add i64 %g, 1")
    add("  %last = icmp eq i64 %g1, %groups")
    add("  br i1 %last, label %rowend, label %group")
    add("rowend:")
    for m in range(x_rows):
        add(f"  %sum{m} = call reassoc float @llvm.vector.reduce.fadd.v8f32(float 0.0, <8 x float> %next{m})")
        add(f"  %res{m} = fsub float %sum{m}, %corr{m}")
        add(f"  %op{m} = getelementptr float, ptr %o{m}, i64 %n")
        add(f"  store float %res{m}, ptr %op{m}, align 4")
    add("  %n1 = add i64 %n, 1")
    add("  %end = icmp eq i64 %n1, %rows")
    add("  br i1 %end, label %done, label %row")
    add("done:")
    add("  ret void")
    add("}")
    return "\n".join(lines)


_DECLARATIONS = """
declare <8 x i32> @llvm.x86.avx2.pmadd.wd(<16 x i16>, <16 x i16>)
declare <8 x float> @llvm.fma.v8f32(<8 x float>, <8 x float>, <8 x float>)
declare float @llvm.vector.reduce.fadd.v8f32(float, <8 x float>)
declare void @llvm.prefetch.p0(ptr, i32, i32, i32)
"""


def slot_order(bits: int) -> "torch.Tensor":
    """Which input of a group of 64 each of the group's 64 int16 slots holds (the order the loop multiplies them
    in): INT8 in order; INT4 the even inputs of the first 16 bytes (high nibbles), their odd inputs, then the same
    for the next 16 bytes."""
    if bits == 8:
        return torch.arange(GROUP)
    j = torch.arange(16)
    return torch.cat([2 * j, 2 * j + 1, 32 + 2 * j, 33 + 2 * j])


_compiled = {}  # "engine", {name: address}; or "error"
_compile_lock = threading.Lock()


def _addresses() -> dict:
    """{(bits, x_rows): address} of the compiled loops; compiled once per process (~0.1 s). Raises RuntimeError
    where this CPU or LLVM cannot run them."""
    with _compile_lock:
        if "error" in _compiled:
            raise RuntimeError(_compiled["error"])
        if "addresses" not in _compiled:
            try:
                features = llvm.get_host_cpu_features()
                if not (features.get("avx2") and features.get("fma")):
                    raise RuntimeError("this CPU has no AVX2 and FMA")
                llvm.initialize_native_target()
                llvm.initialize_native_asmprinter()
                kinds = [(bits, rows) for bits in (4, 8) for rows in (1, X_ROWS)]
                module = llvm.parse_assembly(_DECLARATIONS + "\n".join(_loop_ir(b, r) for b, r in kinds))
                module.verify()
                machine = llvm.Target.from_default_triple().create_target_machine(
                    cpu=llvm.get_host_cpu_name(), features=features.flatten(), opt=3)
                engine = llvm.create_mcjit_compiler(module, machine)
                engine.finalize_object()
                _compiled["engine"] = engine  # keeps the code alive
                _compiled["addresses"] = {k: engine.get_function_address(f"int{k[0]}_x{k[1]}") for k in kinds}
            except Exception as e:  # an LLVM too old for this IR, a non-x86 CPU: not a candidate here
                _compiled["error"] = f"integer-dot loops unavailable: {type(e).__name__}: {e}"[:300]
                raise RuntimeError(_compiled["error"]) from None
        return _compiled["addresses"]


def available() -> bool:
    if llvm is None or not cpu_kernels.available():
        return False
    try:
        _addresses()
        return True
    except RuntimeError:
        return False


if llvm is not None:
    _I64 = ir.IntType(64)

    @intrinsic
    def _call(typingctx, address, a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10):
        """Calls the compiled loop at `address` with 11 int64 arguments (pointers and sizes)."""
        def codegen(context, builder, signature, args):
            loop = ir.FunctionType(ir.VoidType(), [_I64] * ARGS)
            builder.call(builder.inttoptr(args[0], loop.as_pointer()), args[1:])
            return context.get_dummy_value()
        return types.void(*[types.int64] * (ARGS + 1)), codegen

    @njit(parallel=True, nogil=True, cache=True)
    def _run(one_row, x_rows, w, xq, d, corr, out):
        """out[m, n] for every weight row n (blocks of CHUNK per task) and input row m (X_ROWS at a time, then one
        at a time)."""
        rows, row_bytes = w.shape
        m_rows, k = xq.shape
        groups = k // 64
        for task in prange((rows + CHUNK - 1) // CHUNK):
            start = task * CHUNK
            n = min(CHUNK, rows - start)
            wa = w.ctypes.data + start * row_bytes
            m = 0
            while m < m_rows:
                address, step = (x_rows, X_ROWS) if m + X_ROWS <= m_rows else (one_row, 1)
                _call(address, wa, row_bytes, n, xq.ctypes.data + m * 2 * k, 2 * k, d.ctypes.data + m * 4 * (k // 8),
                      4 * (k // 8), corr.ctypes.data + 4 * m, out.ctypes.data + 4 * (m * rows + start), 4 * rows,
                      groups)
                m += step

    @njit(nogil=True, cache=True)
    def _quantize(x, order, offset, xq, d, corr):
        """x float32 [M, K] -> xq int16 [M, K] in slot order, d [M, K / 8] (a scale per 8 slots: the 8 that one
        32-bit lane sums: slots 16j + 2i and 16j + 2i + 1 of a group, j < 4, for lane i), corr[m] =
        offset * sum(d * q) (what unsigned INT4 nibbles add). A non-finite input makes its group's scale NaN, so
        that it shows in the output as it would in any other path."""
        m_rows, k = x.shape
        for m in range(m_rows):
            total = 0.0
            for g in range(k // 64):
                base = 64 * g
                for lane in range(8):
                    top = 0.0
                    for j in range(4):
                        for t in range(2):
                            top = max(top, abs(np.float64(x[m, base + order[16 * j + 2 * lane + t]])))
                    if not np.isfinite(top):
                        scale, inverse = np.nan, 0.0
                    elif top > 0:
                        scale, inverse = top / 32767.0, 32767.0 / top
                    else:
                        scale, inverse = 0.0, 0.0
                    d[m, 8 * g + lane] = scale
                    lane_sum = 0.0
                    for j in range(4):
                        for t in range(2):
                            slot = 16 * j + 2 * lane + t
                            q = np.round(np.float64(x[m, base + order[slot]]) * inverse)
                            xq[m, base + slot] = np.int16(q)
                            lane_sum += q
                    total += lane_sum * np.float64(np.float32(scale))
            corr[m] = offset * total


_orders = {}


def matmul(x2d: torch.Tensor, weight: torch.Tensor, bits: int):
    """x2d @ Q.T in float32 for an official INT8 [out, in] / INT4 [out, in/2] weight's integers Q (the caller applies
    the scales), as cpu_kernels.matmul; None where the loops are unavailable or `in` is not a multiple of 64."""
    k = x2d.shape[1]
    if k % GROUP or not available():
        return None
    addresses = _compiled["addresses"]  # available() compiled them
    if bits not in _orders:
        _orders[bits] = slot_order(bits).numpy()
    x = x2d.detach().float().contiguous().numpy()
    rows = x.shape[0]
    xq = np.empty((rows, k), np.int16)
    d = np.empty((rows, k // 8), np.float32)
    corr = np.empty(rows, np.float32)
    out = torch.empty(rows, weight.shape[0], dtype=torch.float32)
    w = weight.detach().contiguous().numpy()
    with cpu_kernels._launch:
        cpu_kernels._threads()
        _quantize(x, _orders[bits], 8.0 if bits == 4 else 0.0, xq, d, corr)
        _run(addresses[bits, 1], addresses[bits, X_ROWS], w, xq, d, corr, out.numpy())
    return out
