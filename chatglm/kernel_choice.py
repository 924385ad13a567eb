"""Which CPU kernel runs each weight format, chosen by timing the candidates on this machine.

Once per (CPU, torch version, thread count, format, shape), at load, the candidates run on random weights of the
model's biggest block linear ([inner, hidden]) for a decode step (1 row), a batched step (8 rows) and prompt rows
(16, 128); the plan is cached in ~/.cache/chatglm/kernels.json ($CHATGLM_CACHE_DIR overrides the folder).
  fp32 / bf16: layout "onednn" (weights prepacked, chatglm/cpu_pack.py) or "mkl" (plain F.linear); bf16 also
        "numba" (chatglm/cpu_kernels.py's loop for decode rows) and fp32_from_rows, the rows from which an unpacked
        bf16 linear converts its weight and multiplies in float32 (cpu_pack.CpuBf16Linear: wins for prompts and
        batches on CPUs without bfloat16 arithmetic).
  int8: layout "nibble" (repacked for the INT4 op, chatglm/cpu_int4.py), "int8pack" (official bytes,
        `_weight_int8pack_mm`), "numba" (official bytes, chatglm/cpu_kernels.py) or "intdot" (official bytes,
        integer dot products with int16 activations, chatglm/cpu_intdot.py); int4: layout "nibble" (the INT4
        op), "numba" or "intdot"; with "numba", intdot_max_rows: the most rows that take the integer dot products
        instead (both read the official bytes; chosen where cpu_intdot wins decode steps and the float loop
        prompts); int8 / int4: fused_max_rows, the most rows the fused weight-only op takes before
        a call dequantizes a tile at a time and runs the dense GEMM ("dequant"), and dequant_gemm, the dtype of that
        GEMM ("bf16", or "fp32" where the CPU has no bfloat16 arithmetic and a float32 GEMM is faster).
CHATGLM_KERNELS forces candidates, e.g. "bf16=mkl,int8=int8pack,int4=numba,int4=dequant,int8.fused_max_rows=32,
int4.dequant_gemm=fp32" (int8/int4 also take "fused" and "dequant"); forced int8/int4 entries apply to float32
activations too. CHATGLM_KERNEL_TIMING=0
takes the defaults without timing; =1 times even tiny models and under pytest (which otherwise take the defaults).
Timings and why each candidate can win: benchmarks/README.md.
"""
import datetime
import hashlib
import json
import math
import os
import statistics
import time

import torch
import torch.nn.functional as F

from . import cpu_intdot, cpu_kernels, cpu_pack, quantization
from .cpu_int4 import cpu_int8_fused_ok
from .cpu_pack import available as onednn_available
from .quantization import QuantizedLinear

FORMATS = ("fp32", "bf16", "int8", "int4")
CANDIDATES = {"fp32": ("onednn", "mkl"), "bf16": ("onednn", "mkl", "numba"),
              "int8": ("nibble", "int8pack", "numba", "intdot", "fused", "dequant"),
              "int4": ("nibble", "numba", "intdot", "fused", "dequant")}
ALWAYS = 1 << 30  # fused_max_rows that means "always fused"
DEFAULTS = {"fp32": {"layout": "onednn"}, "bf16": {"layout": "onednn", "fp32_from_rows": 1 << 30},
            "int8": {"layout": "nibble", "fused_max_rows": 24, "dequant_gemm": "bf16"},
            "int4": {"layout": "nibble", "fused_max_rows": 96, "dequant_gemm": "bf16"}}
GEMM_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
PLAN_VERSION = 9  # in the cache key: plans cached by older rules are timed again
# float32 activations: the fused ops are plain loops there, and INT8 keeps its own op (the original's numbers)
FLOAT32_QUANTIZED = {"int8": {"layout": "int8pack", "fused_max_rows": 1}, "int4": {"fused_max_rows": 1}}
TINY_ELEMENTS = 1 << 24  # weights smaller than this take the defaults (timing them says nothing about a 6B model)
PROMPT_ROWS = (1, 16, 128)  # decode, then two prompt sizes for the fused / dequant crossover
# bf16's weight-streaming loop and its float32 GEMM can be level at 128 rows, where timing noise then decides; a
# 512-row prompt, which the GEMM takes ~1.5x faster, settles where the lines cross (timed for those two only)
LONG_PROMPT_ROWS = 512
_plans = {fmt: dict(plan) for fmt, plan in DEFAULTS.items()}  # in force: set by the last load_model
_sources = {}  # format -> {"source": "default" | "timed" | "cached", "timings_ms": ...}


def _forced() -> dict:
    """CHATGLM_KERNELS as {format: {key: value}}; raises ValueError naming a bad entry."""
    out = {}
    for item in filter(None, (s.strip() for s in os.environ.get("CHATGLM_KERNELS", "").split(","))):
        key, _, value = item.partition("=")
        fmt, _, field = key.strip().partition(".")
        value = value.strip()
        quantized_field = fmt in ("int8", "int4") and (field in ("fused_max_rows", "intdot_max_rows") and value.isdigit()
                                                       or field == "dequant_gemm" and value in GEMM_DTYPES)
        bf16_field = fmt == "bf16" and field == "fp32_from_rows" and value.isdigit()
        ok = fmt in FORMATS and (value in CANDIDATES[fmt] if not field else quantized_field or bf16_field)
        if not ok:
            choices = "; ".join(f"{f}={'|'.join(c)}" for f, c in CANDIDATES.items())
            raise ValueError(f"CHATGLM_KERNELS entry {item!r} is not one of: {choices}; int8.fused_max_rows=N; "
                             f"int4.fused_max_rows=N; int8.intdot_max_rows=N; int4.intdot_max_rows=N; "
                             f"int8.dequant_gemm=bf16|fp32; int4.dequant_gemm=bf16|fp32; bf16.fp32_from_rows=N")
        plan = out.setdefault(fmt, {})
        if field:
            plan[field] = value if field == "dequant_gemm" else int(value)
        elif value in ("fused", "dequant"):
            plan["fused_max_rows"] = ALWAYS if value == "fused" else 0
        else:
            plan["layout"] = value
    return out


def _install(fmt: str, plan: dict, forced: dict):
    """Put `plan` (with the forced entries over it) in force; quantized formats also for float32 activations."""
    _plans[fmt] = {**plan, **forced.get(fmt, {})}
    if fmt == "bf16":
        cpu_pack.FLOAT32_FROM_ROWS = _plans[fmt].get("fp32_from_rows", ALWAYS)
        cpu_pack.NUMBA_ROWS = _plans[fmt]["layout"] == "numba" and cpu_kernels.available()
        cpu_kernels.DECODE_ATTENTION = cpu_pack.NUMBA_ROWS  # bf16 products by numba: decode attention's too
    if fmt in FLOAT32_QUANTIZED:
        bits = int(fmt[3:])
        fp32 = {**FLOAT32_QUANTIZED[fmt], **forced.get(fmt, {})}
        for dtype, p in ((torch.bfloat16, _plans[fmt]), (torch.float32, fp32)):
            quantization.FUSED_MAX_ROWS[dtype, bits] = p["fused_max_rows"]
            if bits == 8:
                quantization.INT8_LAYOUT[dtype] = p["layout"]
            numba = p.get("layout") == "numba" and cpu_kernels.available()  # a forced "numba" without numba: torch
            (quantization.NUMBA_KERNELS.add if numba else quantization.NUMBA_KERNELS.discard)((dtype, bits))
            # integer dot products: for every fused call ("intdot"), or for up to intdot_max_rows rows with the
            # float loop above them ("numba"); bfloat16 only: rounding activations to int16 moves float32 logits
            # ~7e-3 from the original's (the bar is 1e-3)
            intdot = {"intdot": ALWAYS, "numba": p.get("intdot_max_rows", 0)}.get(p.get("layout"), 0)
            runs = dtype == torch.bfloat16 and cpu_intdot.available()
            quantization.INTDOT_MAX_ROWS[dtype, bits] = intdot if runs else 0
        quantization.DEQUANT_GEMM_DTYPE[torch.bfloat16, bits] = GEMM_DTYPES[_plans[fmt].get("dequant_gemm", "bf16")]


def reset():
    """The defaults back in force (and CHATGLM_KERNELS over them)."""
    forced = _forced()
    _sources.clear()
    for fmt in FORMATS:
        _install(fmt, DEFAULTS[fmt], forced)


def dense_layout(dtype: torch.dtype) -> str:
    """"onednn" (pack the dense weights, chatglm/cpu_pack.py), "numba" (bf16 decode rows by chatglm/cpu_kernels.py)
    or "mkl" (leave them to F.linear): the plan's layout where this machine can run it."""
    fmt = {torch.float32: "fp32", torch.bfloat16: "bf16"}.get(dtype)
    layout = _plans[fmt]["layout"] if fmt else "mkl"
    runs = {"onednn": onednn_available(dtype), "numba": cpu_kernels.available(), "mkl": True}
    return layout if runs.get(layout) else "mkl"


def formats_of(dtype: torch.dtype, bits) -> list:
    """The formats a CPU model of `dtype` (quantized to `bits`, or 0) runs: its dense layers', then its quantized."""
    dense = {torch.float32: ["fp32"], torch.bfloat16: ["bf16"]}.get(dtype, [])
    return dense + ([f"int{bits}"] if bits and dtype == torch.bfloat16 else [])


def report() -> dict:
    """{format: plan in force, with where it came from and the timings behind it} (for benchmarks)."""
    return {fmt: {**_plans[fmt], **_sources.get(fmt, {"source": "default"})} for fmt in FORMATS}


# ---- timing -------------------------------------------------------------------------------------------------------

def _copies(weight: torch.Tensor) -> list:
    """`weight` and clones of it, ~256 MB in all (at most 8): a decode step reads its weights from memory, not
    from the caches that one weight called again and again would sit in."""
    n = max(1, min(8, (256 << 20) // (weight.numel() * weight.element_size())))
    return [weight] + [weight.clone() for _ in range(n - 1)]


def _time_interleaved(candidates: dict, dtype, in_features: int, budget_s: float = 0.25) -> dict:
    """{name: {rows: ms}}, the median of each candidate's calls, for candidates {name: (setup, calls, rows timed)}.
    At each row count the candidates take turns, one call each (setup() first, which puts the candidate's globals
    in force), so that a slow spell of a shared machine slows all of them alike instead of deciding between them
    (timed one after the other, a noisy spell had cached bf16's plan "convert from 757 rows" where the quiet
    machine gives ~200). Up to 8 rows (memory bound) a candidate cycles through its calls (one per weight copy),
    more rows (compute bound) use its first. Each takes 2 * copies + 3 turns, fewer (at least one) once
    `budget_s` per candidate is spent; one untimed call each before the first row count (compiling, repacking)."""
    g = torch.Generator().manual_seed(0)
    out = {name: {} for name in candidates}
    all_rows = sorted({rows for _, _, timed in candidates.values() for rows in timed})
    for rows in all_rows:
        x = torch.randn(rows, in_features, generator=g).to(dtype)
        turn = {name: (setup, calls if rows <= 8 else calls[:1])
                for name, (setup, calls, timed) in candidates.items() if rows in timed}
        if rows == all_rows[0]:
            for setup, calls in turn.values():
                setup()
                calls[0](x)
        times = {name: [] for name in turn}
        start = time.perf_counter()
        for i in range(max(2 * len(calls) + 3 for _, calls in turn.values())):
            for name, (setup, calls) in turn.items():
                if i >= 2 * len(calls) + 3:
                    continue
                setup()
                t = time.perf_counter()
                calls[i % len(calls)](x)
                times[name].append(time.perf_counter() - t)
            if time.perf_counter() - start > budget_s * len(turn):
                break
        for name in turn:
            out[name][rows] = 1e3 * statistics.median(times[name])
    return out


def _nothing():
    pass


def _time_dense(fmt, out_features, in_features) -> dict:
    dtype = torch.float32 if fmt == "fp32" else torch.bfloat16
    weight = torch.empty(out_features, in_features, dtype=dtype).uniform_(-0.05, 0.05)
    weights = _copies(weight)
    rows = (1, 4, 8) + PROMPT_ROWS[1:]
    candidates = {"mkl": (_nothing, [lambda x, w=w: F.linear(x, w) for w in weights], rows)}
    if onednn_available(dtype):
        packed = [torch.ops.mkldnn._reorder_linear_weight(w, None) for w in weights]
        calls = [lambda x, p=p: torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], "") for p in packed]
        candidates["onednn"] = (_nothing, calls, rows)
    saved = cpu_pack.FLOAT32_FROM_ROWS, cpu_pack.NUMBA_ROWS
    if fmt == "bf16":  # unpacked, several rows can multiply in float32 instead (cpu_pack.CpuBf16Linear)
        def routes(from_rows, numba):
            def setup():
                cpu_pack.FLOAT32_FROM_ROWS, cpu_pack.NUMBA_ROWS = from_rows, numba
            return setup
        layers = _upcast_copies(weights)
        candidates["mkl/fp32"] = (routes(1, False), layers, rows + (LONG_PROMPT_ROWS,))
        if cpu_kernels.available():
            candidates["numba"] = (routes(ALWAYS, True), layers, rows + (LONG_PROMPT_ROWS,))
    try:
        return _time_interleaved(candidates, dtype, in_features)
    finally:
        cpu_pack.FLOAT32_FROM_ROWS, cpu_pack.NUMBA_ROWS = saved


def _upcast_copies(weights) -> list:
    layers = []
    for w in weights:
        layer = cpu_pack.CpuBf16Linear(w.shape[1], w.shape[0], bias=False, device="meta")
        layer.weight = torch.nn.Parameter(w, requires_grad=False)
        layers.append(layer)
    return layers


def _quantized_layers(bits, out_features, in_features, nibble):
    """QuantizedLinear copies (see _copies) with random weights, repacked for the INT4 op if `nibble`; None where
    that op is missing."""
    layer = QuantizedLinear(in_features, out_features, bits, device="cpu", dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        layer.weight.copy_(torch.randint(-127, 128, layer.weight.shape, generator=g, dtype=torch.int8))
        layer.weight_scale.copy_(torch.rand(out_features, generator=g) * 0.01 + 1e-3)
        layer.bias.zero_()
    if nibble and not layer.repack_for_cpu():
        return None
    layers = []
    for w in _copies(layer.weight.detach()):  # copies share scale and bias; the weight's layout comes along
        q = QuantizedLinear(in_features, out_features, bits, device="meta", dtype=torch.bfloat16)
        q.weight = torch.nn.Parameter(w, requires_grad=False)
        q.weight_scale, q.bias = layer.weight_scale, layer.bias
        if nibble:
            q._repacked_as = (q.weight, quantization.version_key(q.weight))
        layers.append(q)
    return layers


def _time_quantized(fmt, out_features, in_features) -> dict:
    """{"<layout>/<fused|dequant|dequant-fp32>": {rows: ms}} for the INT8 / INT4 candidates, interleaved: fused at 1,
    8 and PROMPT_ROWS, dequant at the last (it never wins a decode step: it reads the weight and writes it
    dequantized)."""
    bits = int(fmt[3:])
    layouts = (["nibble"] + (["int8pack"] if bits == 8 and cpu_int8_fused_ok() else [])
               + (["numba"] if cpu_kernels.available() else []) + (["intdot"] if cpu_intdot.available() else []))
    candidates = {}
    for layout in layouts:
        layers = _quantized_layers(bits, out_features, in_features, layout == "nibble")
        if layers is None:
            continue
        for path, rows_max, rows, gemm in (("fused", ALWAYS, (1, 8) + PROMPT_ROWS[1:], "bf16"),
                                           ("dequant", 0, PROMPT_ROWS[-1:], "bf16"),
                                           ("dequant-fp32", 0, PROMPT_ROWS[-1:], "fp32")):
            if gemm == "bf16" and path == "dequant" and not onednn_available(torch.bfloat16):
                continue  # no bfloat16 arithmetic: 0.8-25 s at 128 rows on an AVX2 EPYC, float32 0.15 s
            plan = {"layout": layout, "fused_max_rows": rows_max, "dequant_gemm": gemm}
            candidates[f"{layout}/{path}"] = (lambda plan=plan: _install(fmt, plan, {}), layers, rows)
    return _time_interleaved(candidates, torch.bfloat16, in_features)


def _crossover(fused: dict, dequant: dict) -> int:
    """The most rows for which the fused op is still faster: fused time is linear in rows (through its times at
    PROMPT_ROWS[1:]), dequantize-then-GEMM's is taken as flat (its dequantizing dominates; a little conservative)."""
    (r0, r1), d = PROMPT_ROWS[1:], dequant[PROMPT_ROWS[-1]]
    f0, f1 = fused[r0], fused[r1]
    if f1 <= f0:
        return ALWAYS if f1 < d else 0
    return max(0, min(4096, int(r0 + (d - f0) * (r1 - r0) / (f1 - f0))))


def _first_win(slow: dict, fast: dict) -> int:
    """The fewest rows from which `fast` beats `slow` ({rows: ms} each, linear between the rows timed); ALWAYS if
    it never does."""
    previous = None
    for rows in sorted(set(slow) & set(fast), key=int):
        gain = slow[rows] - fast[rows]
        if gain > 0:
            if previous is None:
                return int(rows)
            r0, g0 = previous
            return max(int(r0) + 1, math.ceil(int(r0) + (int(rows) - int(r0)) * -g0 / (gain - g0)))
        previous = (rows, gain)
    return ALWAYS


def _extrapolated_win(slow: dict, fast: dict) -> int:
    """Where `fast` would overtake `slow` past the rows timed, both taken as lines through their two largest row
    counts timed (a weight-streaming loop grows with every row; a converted-weight GEMM hardly does); ALWAYS if it
    never would."""
    (r0, r1) = sorted(set(slow) & set(fast), key=int)[-2:]
    slow_slope, fast_slope = [(t[r1] - t[r0]) / (r1 - r0) for t in (slow, fast)]
    if fast_slope >= slow_slope:
        return ALWAYS
    return min(4096, max(r1 + 1, math.ceil(r1 + (fast[r1] - slow[r1]) / (slow_slope - fast_slope))))


def _dequant_ms(timings, layout) -> tuple:
    """(dequantize-then-GEMM {rows: ms} of the faster GEMM dtype, that dtype's name) on `layout`; a dtype not
    timed (bf16 where oneDNN has no bf16 kernels) does not compete."""
    timed = {gemm: timings[layout + key] for gemm, key in (("bf16", "/dequant"), ("fp32", "/dequant-fp32"))
             if layout + key in timings}
    gemm = min(timed, key=lambda g: timed[g][PROMPT_ROWS[-1]])
    return timed[gemm], gemm


def _turn_ms(timings, layout) -> float:
    """A chat turn's time on `layout`: a 128-token prompt by its faster path, then 32 decode steps (half of them
    batched by 8: the engine decodes 1..16 rows at once)."""
    fused, (dequant, _) = timings[layout + "/fused"], _dequant_ms(timings, layout)
    return min(fused[PROMPT_ROWS[-1]], dequant[PROMPT_ROWS[-1]]) + 16 * (fused[1] + fused[8])


def _decide(fmt, timings) -> dict:
    """The plan from timings: dense formats, the layout fastest on a decode step plus a batched one; quantized, the
    layout fastest over a chat turn (_turn_ms), then its fused / dequantize crossover."""
    if fmt in ("fp32", "bf16"):
        layout = min((k for k in timings if "/" not in k), key=lambda k: timings[k][1] + timings[k][8])
        if fmt == "fp32":
            return {"layout": layout}
        upcast = timings.get("mkl/fp32") if layout != "onednn" else None  # packed layers never convert
        if upcast is None:
            return {"layout": layout, "fp32_from_rows": ALWAYS}
        # level at 128 rows (noise decides) must not mean "never": longer prompts then take the GEMM that scales
        from_rows = _first_win(timings[layout], upcast)
        from_rows = from_rows if from_rows != ALWAYS else _extrapolated_win(timings[layout], upcast)
        return {"layout": layout, "fp32_from_rows": from_rows}
    timings, intdot_rows = _with_mixed_official(timings)
    layouts = {k.split("/")[0] for k in timings}
    if not layouts:
        return dict(DEFAULTS[fmt])
    layout = min(layouts, key=lambda k: _turn_ms(timings, k))
    dequant, gemm = _dequant_ms(timings, layout)
    plan = {"fused_max_rows": _crossover(timings[layout + "/fused"], dequant), "dequant_gemm": gemm}
    if layout == MIXED:
        return {"layout": "numba", "intdot_max_rows": intdot_rows, **plan}
    return {"layout": layout, **plan}


MIXED = "numba+intdot"


def _with_mixed_official(timings) -> tuple:
    """(timings plus a "numba+intdot" layout where the integer dot products are faster for the fewest rows but not
    for all rows timed: both read the official bytes, so a call can take either by its rows; the most rows that
    take cpu_intdot). Its fused times are each row count's faster one; its dequantize times numba's."""
    integer, floats = timings.get("intdot/fused"), timings.get("numba/fused")
    if not integer or not floats:
        return timings, 0
    rows = sorted(set(integer) & set(floats), key=int)
    faster = [r for r in rows if integer[r] < floats[r]]
    leading = 0
    for r in rows:
        if r not in faster:
            break
        leading = int(r)
    if leading == 0 or len(faster) == len(rows):
        return timings, 0
    mixed = {k.replace("numba/", MIXED + "/"): v for k, v in timings.items() if k.startswith("numba/")}
    mixed[MIXED + "/fused"] = {r: min(integer[r], floats[r]) if int(r) <= leading else floats[r] for r in rows}
    return {**timings, **mixed}, leading


# ---- per machine, cached -------------------------------------------------------------------------------------------

def machine_id() -> str:
    """CPU model and a hash of its flags, torch version, threads: what a cached choice is valid for."""
    name, flags = "unknown CPU", ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and name == "unknown CPU":
                    name = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = value.strip()
    except OSError:
        pass
    digest = hashlib.sha1(flags.encode()).hexdigest()[:8]
    return f"{name} flags:{digest} torch:{torch.__version__} threads:{torch.get_num_threads()}"


def cache_path() -> str:
    folder = os.environ.get("CHATGLM_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "chatglm")
    return os.path.join(folder, "kernels.json")


def _read_cache() -> dict:
    try:
        with open(cache_path(), encoding="utf-8") as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_cache(key: str, entry: dict):
    data = _read_cache()
    data[key] = entry
    path = cache_path()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)  # atomic: processes loading side by side never read half a file
    except OSError:
        pass  # a read-only home: time again next load


def _timed(fmt: str, out_features: int, in_features: int) -> tuple:
    """(plan, source, timings) for one format at one shape, from the cache or by timing now."""
    key = f"{machine_id()} {fmt} {out_features}x{in_features} v{PLAN_VERSION}"
    entry = _read_cache().get(key)
    if isinstance(entry, dict) and isinstance(entry.get("plan"), dict):
        return entry["plan"], "cached", entry.get("timings_ms")
    t = time.perf_counter()
    with torch.no_grad():
        timings = (_time_dense if fmt in ("fp32", "bf16") else _time_quantized)(fmt, out_features, in_features)
    plan = _decide(fmt, timings)
    _write_cache(key, {"plan": plan, "timings_ms": timings, "timing_s": round(time.perf_counter() - t, 2),
                       "date": datetime.date.today().isoformat()})
    return plan, "timed", timings


def choose(dtype: torch.dtype, bits, hidden_size: int, inner_size: int) -> dict:
    """Put in force, for a CPU model of `dtype` quantized to `bits` (or 0/None), the fastest kernels of its formats
    at its [inner, hidden] shape (timed once per machine and cached), the defaults for the other formats, and any
    CHATGLM_KERNELS entries over both. Returns report()."""
    forced = _forced()
    switch = os.environ.get("CHATGLM_KERNEL_TIMING", "").strip()
    under_pytest = "PYTEST_CURRENT_TEST" in os.environ  # tests get the defaults: the same kernels on every machine
    timing = switch == "1" or (switch != "0" and not under_pytest and hidden_size * inner_size >= TINY_ELEMENTS)
    mine = formats_of(dtype, bits) if timing else []
    for fmt in FORMATS:
        if fmt in mine:
            try:
                plan, source, timings = _timed(fmt, inner_size, hidden_size)
            except (RuntimeError, NotImplementedError) as e:  # a candidate this torch build cannot run
                plan, source, timings = DEFAULTS[fmt], f"default (timing failed: {e})"[:200], None
            _sources[fmt] = {"source": source, "timings_ms": timings}
        else:
            plan = DEFAULTS[fmt]
            _sources.pop(fmt, None)
        _install(fmt, plan, forced)
        if fmt in forced:
            _sources.setdefault(fmt, {"source": "default"})["forced"] = forced[fmt]
    _warm_up(dtype, bits)
    return report()


def _warm_up(dtype: torch.dtype, bits):
    """Compile (or load from numba's cache) the loops this model will run, now, so that the first request does not
    wait for it (seconds, once per install)."""
    if dtype != torch.bfloat16 or not cpu_kernels.available():
        return
    x = torch.zeros(1, 8)
    if cpu_pack.NUMBA_ROWS:
        cpu_kernels.matmul(x, torch.zeros(2, 8, dtype=torch.bfloat16))
    if cpu_kernels.DECODE_ATTENTION:
        kv = torch.zeros(1, 1, 2, 8, dtype=torch.bfloat16)
        cpu_kernels.decode_attention(kv[:, :, :1], kv, kv, 1.0)
    if bits and (torch.bfloat16, bits) in quantization.NUMBA_KERNELS:
        cpu_kernels.matmul(x, torch.zeros(2, 8 if bits == 8 else 4, dtype=torch.int8), bits)
    if bits and quantization.INTDOT_MAX_ROWS.get((torch.bfloat16, bits)):
        for rows in (1, cpu_intdot.X_ROWS):
            cpu_intdot.matmul(torch.zeros(rows, 64), torch.zeros(2, 64 * bits // 8, dtype=torch.int8), bits)
