"""Per-machine CPU kernel choice (chatglm/kernel_choice.py): whichever candidate wins the timing, the model's
results stay within the golden tolerances; the choice is timed once and cached; tiny models are never timed."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import GOLDEN, load_golden, replay_cached_steps
from test_quantization import assert_bf16_product, bf16_layer

from chatglm import cpu_intdot, cpu_kernels, cpu_pack, kernel_choice, load_model
from chatglm.cpu_pack import PackedLinear
from chatglm.quantization import QuantizedLinear

LOGIT_TOL = 1e-3  # the golden README's bar for fp32 on CPU
BF16_LOGIT_TOL = 0.1  # its "compare loosely" bar for bf16 (here: bf16 paths against each other)

CASES = [("tiny", "fp32=onednn"), ("tiny", "fp32=mkl"),
         ("tiny-int8", "int8=int8pack"), ("tiny-int8", "int8=nibble"), ("tiny-int8", "int8=fused"),
         ("tiny-int8", "int8=dequant"), ("tiny-int8", "int8=nibble,int8.fused_max_rows=3"),
         ("tiny-int8", "int8=numba"), ("tiny-int8", "int8=numba,int8.fused_max_rows=3"),
         ("tiny-int8", "int8=dequant,int8.dequant_gemm=fp32"),
         ("tiny-int8", "int8=nibble,int8.fused_max_rows=3,int8.dequant_gemm=fp32"),
         ("tiny-int4", "int4=fused"), ("tiny-int4", "int4=dequant"), ("tiny-int4", "int4.fused_max_rows=3"),
         ("tiny-int4", "int4=numba"), ("tiny-int4", "int4=numba,int4.fused_max_rows=3"),
         ("tiny-int4", "int4=dequant,int4.dequant_gemm=fp32"), ("tiny-int4", "int4.fused_max_rows=3,"
                                                                             "int4.dequant_gemm=fp32")]
# integer dot products (chatglm/cpu_intdot.py) run bfloat16 activations only
BF16_ONLY_CASES = [("tiny-int8", "int8=intdot"), ("tiny-int8", "int8=intdot,int8.fused_max_rows=3"),
                   ("tiny-int4", "int4=intdot"), ("tiny-int4", "int4=intdot,int4.fused_max_rows=3"),
                   ("tiny-int8", "int8=numba,int8.intdot_max_rows=4"), ("tiny-int4", "int4=numba,int4.intdot_max_rows=4")]


@pytest.fixture(autouse=True)
def fresh_plan(monkeypatch, tmp_path):
    """Each test starts and ends with the defaults in force, and a cache folder of its own."""
    monkeypatch.setenv("CHATGLM_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("CHATGLM_KERNELS", raising=False)
    monkeypatch.delenv("CHATGLM_KERNEL_TIMING", raising=False)
    yield
    monkeypatch.delenv("CHATGLM_KERNELS", raising=False)
    kernel_choice.reset()


def forced_model(monkeypatch, name, forced, dtype):
    if not (GOLDEN / name).is_dir():
        pytest.skip(f"golden folder {GOLDEN / name} not found")
    monkeypatch.setenv("CHATGLM_KERNELS", forced)
    torch.set_num_threads(2)
    return load_model(str(GOLDEN / name), device="cpu", dtype=dtype)


def inputs(case, arrays, forward_cases=()):
    """A golden case's model inputs; a padded batch generate case takes its mask and positions from the forward
    case with the same ids (the golden stores them there)."""
    kw = {"input_ids": torch.tensor(case["input_ids"])}
    if "attention_mask" in case["inputs_given"]:
        if "attention_mask_key" not in case:
            case = next(c for c in forward_cases if c["input_ids"] == case["input_ids"] and "attention_mask_key" in c)
        kw["attention_mask"] = torch.from_numpy(arrays[case["attention_mask_key"]])
        kw["position_ids"] = torch.tensor(case["position_ids"])
    return kw


def max_logit_diff(model, g, arrays):
    """Largest |logit - golden| over the forward cases (whole prompts: many rows per call) and the cached
    step-by-step cases (one row per call: the decode kernels)."""
    worst = 0.0
    with torch.no_grad():
        for c in g["forward"]:
            logits = model(**inputs(c, arrays)).logits.float()
            worst = max(worst, np.abs(logits.numpy() - arrays[c["logits_key"]]).max())
        for c in g["cache"]:
            worst = max(worst, np.abs(replay_cached_steps(model, c) - arrays[c["step_logits_key"]]).max())
    return worst


def assert_candidate_in_force(model, forced):
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    if forced.startswith("fp32="):
        assert any(isinstance(m, PackedLinear) for m in model.modules()) == (forced == "fp32=onednn")
    elif "int8=nibble" in forced:  # a one-row call repacks the INT8 weights for the INT4 op
        assert all(m.weight.dtype == torch.uint8 for m in layers)
    elif "int8=int8pack" in forced or "=numba" in forced or "=intdot" in forced:  # official bytes, never repacked
        assert all(m.weight.dtype == torch.int8 for m in layers)


@pytest.mark.parametrize("name,forced", CASES)
def test_every_forced_candidate_keeps_float32_logits_and_greedy_tokens_of_the_original(monkeypatch, name, forced):
    g, arrays = load_golden(name)
    _, model = forced_model(monkeypatch, name, forced, "float32")
    assert max_logit_diff(model, g, arrays) <= LOGIT_TOL, forced
    for c in g["generate"]:
        if c["name"].startswith("greedy"):
            out = model.generate(**inputs(c, arrays, g["forward"]), **c["generate_kwargs"])
            assert out.tolist() == c["output_ids"], f"{forced}: {c['name']}"
    assert_candidate_in_force(model, forced)


def test_bfloat16_dense_candidates_agree(monkeypatch):
    """bfloat16 is far from the fp32 golden on the tiny model (its weights are large); the dense paths must agree
    with each other (oneDNN runs the same arithmetic either way; the float32 GEMM rounds once, at the end)."""
    g, arrays = load_golden("tiny")
    logits = []
    for forced in ("bf16=onednn", "bf16=mkl", "bf16=mkl,bf16.fp32_from_rows=1", "bf16=numba",
                   "bf16=numba,bf16.fp32_from_rows=3"):
        _, model = forced_model(monkeypatch, "tiny", forced, "bfloat16")
        # without oneDNN bfloat16 kernels (AVX2 CPUs) a forced "onednn" runs as F.linear: nothing packed
        packed = forced == "bf16=onednn" and cpu_pack.available(torch.bfloat16)
        assert any(isinstance(m, PackedLinear) for m in model.modules()) == packed
        assert any(isinstance(m, cpu_pack.CpuBf16Linear) for m in model.modules()) == (not packed)
        from_rows = forced.partition("fp32_from_rows=")[2]
        assert cpu_pack.FLOAT32_FROM_ROWS == (int(from_rows) if from_rows else kernel_choice.ALWAYS)
        assert cpu_pack.NUMBA_ROWS == ("numba" in forced)
        with torch.no_grad():
            logits.append([model(**inputs(c, arrays)).logits.float() for c in g["forward"]])
    for other in logits[1:]:
        for a, b in zip(logits[0], other):
            torch.testing.assert_close(a, b, rtol=0, atol=BF16_LOGIT_TOL)


def test_bfloat16_decode_attention_by_numba_follows_the_bf16_plan_and_is_as_close_to_the_original(monkeypatch):
    """With the bf16 plan on numba, decode steps of a bfloat16 model attend through cpu_kernels.decode_attention
    (float32 inside, where PyTorch's bmm rounds the scores and probabilities to bfloat16). bfloat16 is far from the
    fp32 golden on the tiny model (mean |logit error| ~0.1), so the bar: per golden cached case, its step logits are
    on average no further from the original's fp32 logits than PyTorch's path is."""
    if not cpu_kernels.available():
        pytest.skip("numba is not installed")
    g, arrays = load_golden("tiny")
    calls = []
    real = cpu_kernels.decode_attention
    monkeypatch.setattr(cpu_kernels, "decode_attention", lambda *a: calls.append(1) or real(*a))
    errors = {}
    for forced in ("bf16=mkl", "bf16=numba"):
        _, model = forced_model(monkeypatch, "tiny", forced, "bfloat16")
        assert cpu_kernels.DECODE_ATTENTION == (forced == "bf16=numba")
        calls.clear()
        errors[forced] = [np.abs(replay_cached_steps(model, c) - arrays[c["step_logits_key"]]).mean()
                          for c in g["cache"]]
        assert bool(calls) == (forced == "bf16=numba")
    for torch_path, numba_path in zip(errors["bf16=mkl"], errors["bf16=numba"]):
        assert numba_path <= 1.05 * torch_path, errors


@pytest.mark.parametrize("name", ["tiny-int4", "tiny-int8"])
def test_integer_dot_products_run_bfloat16_models_as_close_to_the_original_and_leave_float32_alone(monkeypatch,
                                                                                                    name):
    """Forced "intdot", a bfloat16 INT4/INT8 model's decode steps and prompts go through cpu_intdot. bfloat16 is far
    from the fp32 golden on the tiny model, and any two bfloat16 paths round differently from the first layer on,
    so the bar is relative to cpu_kernels' float loop (exact float32 products of the bfloat16 activations): per
    golden cached case, step logits on average within 10% of its distance from the original's fp32 logits (measured:
    0-7%; PyTorch's INT4 op is 10-60% further), and as many greedy generations equal to the original's. A float32
    model never takes it (rounding its activations to int16 would move logits ~7e-3; the bar is 1e-3)."""
    if not cpu_intdot.available():
        pytest.skip("cpu_intdot's loops need numba, llvmlite and an AVX2 CPU")
    g, arrays = load_golden(name)
    fmt = name[5:]
    calls = []
    real = cpu_intdot.matmul
    monkeypatch.setattr(cpu_intdot, "matmul", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    greedy = [c for c in g["generate"] if c["name"].startswith("greedy")]
    errors, equal = {}, {}
    for forced in (f"{fmt}=numba", f"{fmt}=intdot"):
        _, model = forced_model(monkeypatch, name, forced, "bfloat16")
        calls.clear()
        errors[forced] = [np.abs(replay_cached_steps(model, c) - arrays[c["step_logits_key"]]).mean()
                          for c in g["cache"]]
        with torch.no_grad():
            equal[forced] = sum(model.generate(**inputs(c, arrays, g["forward"]), **c["generate_kwargs"]).tolist()
                                == c["output_ids"] for c in greedy)
        assert (1 in calls and max(calls) > 1) == forced.endswith("intdot"), calls  # decode steps and prompts
    for float_loop, integer in zip(errors[f"{fmt}=numba"], errors[f"{fmt}=intdot"]):
        assert integer <= 1.1 * float_loop, errors
    assert equal[f"{fmt}=intdot"] >= equal[f"{fmt}=numba"] >= 1, equal
    _, model = forced_model(monkeypatch, name, f"{fmt}=intdot", "float32")
    calls.clear()
    assert max_logit_diff(model, g, arrays) <= LOGIT_TOL and not calls


@pytest.mark.parametrize("bits", [8, 4])
def test_a_mixed_plan_sends_few_rows_to_the_integer_dot_products_and_more_to_the_float_loop(monkeypatch, bits):
    if not cpu_intdot.available():
        pytest.skip("cpu_intdot's loops need numba, llvmlite and an AVX2 CPU")
    monkeypatch.setenv("CHATGLM_KERNELS", f"int{bits}=numba,int{bits}.intdot_max_rows=4")
    kernel_choice.reset()
    routes = []
    for module in (cpu_intdot, cpu_kernels):
        real = module.matmul
        monkeypatch.setattr(module, "matmul", lambda *a, m=module, f=real: routes.append((m, a[0].shape[0])) or f(*a))
    layer, _, exact = bf16_layer(bits, 192)
    with torch.no_grad():
        for rows in (1, 4, 5, 9):
            x = torch.randn(rows, 256).bfloat16()
            assert_bf16_product(layer(x), x, exact, layer.bias)
    assert routes == [(cpu_intdot, 1), (cpu_intdot, 4), (cpu_kernels, 5), (cpu_kernels, 9)]


@pytest.mark.parametrize("bias", [True, False])
def test_a_bfloat16_prompt_in_float32_is_the_exact_product_rounded_once(monkeypatch, bias):
    """CpuBf16Linear at and above FLOAT32_FROM_ROWS: x @ W.T + b computed in float32 over chunks of the
    weight, rounded to bfloat16 once; below it, and when gradients are wanted, plain F.linear."""
    monkeypatch.setattr(cpu_pack, "FLOAT32_FROM_ROWS", 4)
    monkeypatch.setattr(cpu_pack, "UPCAST_CHUNK_ELEMENTS", 64 * 48)  # several chunks, a short last one
    g = torch.Generator().manual_seed(0)
    layer = torch.nn.Linear(64, 200, bias=bias).bfloat16()
    layer.__class__ = cpu_pack.CpuBf16Linear
    x = torch.randn(2, 3, 64, generator=g).bfloat16()
    exact = F.linear(x.double(), layer.weight.double(), None if layer.bias is None else layer.bias.double())
    with torch.no_grad():
        y = layer(x)
        assert y.dtype == torch.bfloat16 and y.shape == (2, 3, 200)
        # within one bfloat16 step of the exact value: one rounding (a bf16 GEMM rounds the same way at best)
        torch.testing.assert_close(y.double(), exact, rtol=2 ** -8, atol=1e-3)
        short = layer(x[:1, :1])  # 1 row: below the threshold
        assert torch.equal(short, F.linear(x[:1, :1], layer.weight, layer.bias))
    grad_x = x.clone().requires_grad_()
    layer(grad_x).float().sum().backward()
    assert grad_x.grad is not None and layer.weight.grad is not None


@pytest.mark.parametrize("bits,forced", [(int(n[-1]), f) for n, f in CASES + BF16_ONLY_CASES if n != "tiny"])
@pytest.mark.parametrize("rows", [1, 4, 40])
def test_every_quantized_candidate_gives_the_exact_product_in_bfloat16(monkeypatch, bits, forced, rows):
    """Per layer, at a decode row, a small batch and a prompt: x @ (q * scale).T + bias to bfloat16 accuracy."""
    monkeypatch.setenv("CHATGLM_KERNELS", forced)
    kernel_choice.reset()
    layer, _, exact = bf16_layer(bits, 192)
    g = torch.Generator().manual_seed(rows)
    with torch.no_grad():
        for n in (1, rows):  # a one-row call first: it repacks INT8 for the nibble layout
            x = torch.randn(n, 256, generator=g).bfloat16()
            assert_bf16_product(layer(x), x, exact, layer.bias)


def test_tiny_models_take_the_defaults_without_timing(tmp_path):
    if not (GOLDEN / "tiny-int4").is_dir():
        pytest.skip("golden data absent")
    load_model(str(GOLDEN / "tiny-int4"), device="cpu")
    assert kernel_choice.report()["int4"] == {**kernel_choice.DEFAULTS["int4"], "source": "default"}
    assert not (tmp_path / "kernels.json").exists()


@pytest.mark.parametrize("dtype,bits,fmt", [(torch.bfloat16, 0, "bf16"), (torch.float32, 0, "fp32"),
                                            (torch.bfloat16, 8, "int8"), (torch.bfloat16, 4, "int4")])
def test_timing_picks_a_candidate_once_and_caches_it_per_machine(monkeypatch, tmp_path, dtype, bits, fmt):
    monkeypatch.setenv("CHATGLM_KERNEL_TIMING", "1")  # asked for: time even this small shape
    chosen = kernel_choice.choose(dtype, bits, 256, 1024)[fmt]
    assert chosen["source"] == "timed"
    assert fmt == "int4" or chosen["layout"] in kernel_choice.CANDIDATES[fmt]
    assert chosen.get("fused_max_rows", 0) >= 0
    cache = json.loads((tmp_path / "kernels.json").read_text())
    key = next(k for k in cache if k.endswith(f"{fmt} 1024x256 v{kernel_choice.PLAN_VERSION}"))
    assert key.startswith(kernel_choice.machine_id())
    again = kernel_choice.choose(dtype, bits, 256, 1024)[fmt]
    assert again["source"] == "cached"
    assert {k: again[k] for k in cache[key]["plan"]} == cache[key]["plan"]
    monkeypatch.setenv("CHATGLM_KERNELS", f"{fmt}={kernel_choice.CANDIDATES[fmt][-1]}")  # forcing beats the cache
    forced = kernel_choice.choose(dtype, bits, 256, 1024)[fmt]
    assert forced["forced"] and forced != again


def test_candidates_are_timed_in_turns_so_a_slow_spell_slows_them_all(monkeypatch):
    """At each row count the candidates take turns, each call after its own setup; a slow spell of the machine (here
    a fake clock that runs 3x slower for a while) lands on all of them, and the medians keep their order."""
    clock, log = [0.0], []
    slow = range(6, 14)  # the 6th..13th calls run 3x slower

    def call(name, ms):
        def run(x):
            log.append(name)
            clock[0] += ms * (3 if len(log) in slow else 1) / 1e3
        return run
    monkeypatch.setattr(kernel_choice.time, "perf_counter", lambda: clock[0])
    setups = []
    candidates = {"a": (lambda: setups.append("a"), [call("a", 2.0)] * 2, (1, 16)),
                  "b": (lambda: setups.append("b"), [call("b", 1.0)] * 2, (1,))}
    timings = kernel_choice._time_interleaved(candidates, torch.float32, 8, budget_s=1e9)
    assert log[:2] == ["a", "b"] and setups[:2] == ["a", "b"]  # one untimed call each first
    assert log[2:16] == ["a", "b"] * 7  # then turns: 2 copies -> 7 timed calls each
    assert log[16:] == ["a"] * 5  # 16 rows: only "a" is timed there, on its first copy (2 * 1 + 3 calls)
    # the spell took 4 of each one's 7 timed calls at 1 row: both medians tripled, "b" still twice as fast
    assert {n: {r: round(ms, 6) for r, ms in t.items()} for n, t in timings.items()} == {"a": {1: 6.0, 16: 2.0},
                                                                                          "b": {1: 3.0}}


def test_the_fastest_candidate_wins_and_the_crossover_follows_the_timings():
    dense = {"mkl": {1: 10.0, 8: 12.0, 16: 14.0, 128: 50.0}, "onednn": {1: 6.0, 8: 8.0, 16: 9.0, 128: 60.0},
             "mkl/fp32": {1: 30.0, 8: 14.0, 16: 12.0, 128: 20.0}}
    assert kernel_choice._decide("bf16", dense) == {"layout": "onednn", "fp32_from_rows": kernel_choice.ALWAYS}
    assert kernel_choice._decide("fp32", dense) == {"layout": "onednn"}
    # unpacked bf16 without bfloat16 arithmetic: from 12 rows (where the two lines cross between 8 and 16) a call
    # converts to float32
    dense["onednn"] = {1: 60.0, 8: 80.0, 16: 90.0, 128: 900.0}
    assert kernel_choice._decide("bf16", dense) == {"layout": "mkl", "fp32_from_rows": 12}
    dense["mkl/fp32"] = {1: 9.0, 8: 14.0, 16: 15.0, 128: 60.0}  # faster everywhere / nowhere
    assert kernel_choice._decide("bf16", dense)["fp32_from_rows"] == 1
    dense["mkl/fp32"] = {1: 11.0, 8: 14.0, 16: 15.0, 128: 60.0}
    assert kernel_choice._decide("bf16", dense)["fp32_from_rows"] == kernel_choice.ALWAYS
    # numba's loop wins decode and small batches; float32 wins from 9 rows (the lines cross between 8 and 16)
    dense["numba"] = {1: 5.0, 4: 8.0, 8: 12.0, 16: 30.0, 128: 400.0}
    assert kernel_choice._decide("bf16", dense) == {"layout": "numba", "fp32_from_rows": 9}
    # numba still ahead at 128 rows (noise can decide that): the lines through 16 and 128 rows cross at 150 (numba
    # +0.625 ms a row, float32 +0.25), so longer prompts still convert
    dense["mkl/fp32"] = {1: 30.0, 4: 30.0, 8: 30.0, 16: 60.0, 128: 88.0}
    dense["numba"] = {1: 5.0, 4: 8.0, 8: 12.0, 16: 10.0, 128: 80.0}
    assert kernel_choice._decide("bf16", dense) == {"layout": "numba", "fp32_from_rows": 150}
    dense["mkl/fp32"][128] = 140.0  # float32 grows faster: never
    assert kernel_choice._decide("bf16", dense)["fp32_from_rows"] == kernel_choice.ALWAYS
    # a noisy 128-row timing no longer decides alone: the 512-row timings (numba 560, float32 380) cross at 224
    dense["numba"][512], dense["mkl/fp32"][512] = 560.0, 380.0
    assert kernel_choice._decide("bf16", dense)["fp32_from_rows"] == 224
    # fused 1 ms per row from 16 rows on, dequantize-then-GEMM 64 ms: fused up to 64 rows
    int4 = {"nibble/fused": {1: 2.0, 8: 8.0, 16: 16.0, 128: 128.0}, "nibble/dequant": {128: 64.0}}
    assert kernel_choice._decide("int4", int4) == {"layout": "nibble", "fused_max_rows": 64, "dequant_gemm": "bf16"}
    # no bfloat16 arithmetic (AVX2): the float32 GEMM is faster, wins, and moves the crossover
    int4["nibble/dequant-fp32"] = {128: 32.0}
    assert kernel_choice._decide("int4", int4) == {"layout": "nibble", "fused_max_rows": 32, "dequant_gemm": "fp32"}
    # numba's loop decodes 3x faster; its prompts (official bytes) dequantize a little slower: still the turn's winner
    int4.update({"numba/fused": {1: 0.7, 8: 5.0, 16: 10.0, 128: 80.0}, "numba/dequant-fp32": {128: 40.0}})
    assert kernel_choice._decide("int4", int4) == {"layout": "numba", "fused_max_rows": 64, "dequant_gemm": "fp32"}
    int8 = {"nibble/fused": {1: 3.0, 8: 9.0, 16: 16.0, 128: 128.0}, "nibble/dequant": {128: 64.0},
            "int8pack/fused": {1: 2.0, 8: 8.0, 16: 20.0, 128: 20.0}, "int8pack/dequant": {128: 64.0}}
    assert kernel_choice._decide("int8", int8) == {"layout": "int8pack", "fused_max_rows": kernel_choice.ALWAYS,
                                                   "dequant_gemm": "bf16"}
    # nibble decodes 1 ms faster per step but its prompt path is 1 s slower: a chat turn is faster on int8pack
    slow_prompts = {"nibble/fused": {1: 9.0, 8: 20.0, 16: 40.0, 128: 1300.0}, "nibble/dequant": {128: 1200.0},
                    "int8pack/fused": {1: 10.0, 8: 21.0, 16: 40.0, 128: 300.0}, "int8pack/dequant": {128: 200.0}}
    assert kernel_choice._decide("int8", slow_prompts)["layout"] == "int8pack"
    # the measured INT8 timings of one run (2-core AVX2 EPYC): the integer dot products decode faster (1 and 8 rows),
    # the float loop takes 128 rows faster; both read the official bytes, so the plan takes each where it wins
    official = {"numba/fused": {1: 3.4, 8: 8.34, 16: 15.12, 128: 123.66}, "numba/dequant-fp32": {128: 151.98},
                "intdot/fused": {1: 2.82, 8: 8.21, 16: 14.95, 128: 145.99}, "intdot/dequant-fp32": {128: 150.35}}
    assert kernel_choice._decide("int8", official) == {"layout": "numba", "intdot_max_rows": 16,
                                                       "fused_max_rows": 157, "dequant_gemm": "fp32"}
    # faster at every row count: the integer dot products alone
    official["intdot/fused"][128] = 120.0
    assert kernel_choice._decide("int8", official)["layout"] == "intdot"
    # slower at one row: not mixed in, whatever the larger row counts say
    official["intdot/fused"].update({1: 3.5, 128: 145.99})
    assert kernel_choice._decide("int8", official) == {"layout": "numba", "fused_max_rows": 157,
                                                       "dequant_gemm": "fp32"}


@pytest.mark.parametrize("bad", ["int8=fast", "int5=fused", "bf16.fused_max_rows=3", "int4.fused_max_rows=x",
                                 "int4.dequant_gemm=fp16", "bf16.dequant_gemm=fp32"])
def test_a_bad_kernels_setting_is_refused_with_the_choices(monkeypatch, bad):
    monkeypatch.setenv("CHATGLM_KERNELS", bad)
    with pytest.raises(ValueError, match="CHATGLM_KERNELS entry .* int8=nibble\\|int8pack"):
        kernel_choice.choose(torch.bfloat16, 4, 64, 256)
