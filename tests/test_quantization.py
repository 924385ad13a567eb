"""INT8 / INT4 weight-only quantization: the original's integers and scales, its logits and generations
(tests/golden/tiny-int8, tiny-int4), the official file format, the CPU kernels, gradients, and memory."""
import copy
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch import nn

from conftest import GOLDEN, ROOT, load_golden, replay_cached_steps

from chatglm.quantization import QUANTIZED_LINEARS, QuantizedLinear, cpu_int4_layout, quantize_weight, unpack_int4
from chatglm.quantize import quantize_model, replace_with_empty_quantized

LOGIT_TOL = 1e-3  # the golden README's bar for fp32 on CPU
QUANT_KEYS = ("weight", "weight_scale")

_loaded = {}


def golden_state_dict(name):
    path = GOLDEN / name / "pytorch_model.bin"
    if not path.is_file():
        pytest.skip(f"golden checkpoint {path} not found (only present beside the repo in CI)")
    return torch.load(path, map_location="cpu", weights_only=True)


def load(how, bits):
    """(tokenizer, model) for tiny-int<bits>, reached in one of the three ways users reach it; cached."""
    from chatglm import load_model
    key = (how, bits)
    if key not in _loaded:
        if not GOLDEN.is_dir():
            pytest.skip(f"golden data not found at {GOLDEN}")
        torch.set_num_threads(2)
        if how == "pre-quantized file":
            # float32: the original's CPU numerics (quantized models default to bfloat16 on CPU, for speed)
            _loaded[key] = load_model(str(GOLDEN / f"tiny-int{bits}"), device="cpu", dtype="float32")
        elif how == "quantize while loading":
            _loaded[key] = load_model(str(GOLDEN / "tiny"), device="cpu", dtype="float32", quantize=bits)
        else:  # model.quantize(bits) after loading FP16
            tok, model = load_model(str(GOLDEN / "tiny"), device="cpu")
            _loaded[key] = (tok, model.quantize(bits))
    return _loaded[key]


def glm_inputs(case, arrays, forward_cases=()):
    """Model inputs of a golden case; a batch generate case takes the tokenizer's mask/positions from the forward
    case with the same padded ids (the golden stores them there)."""
    kw = {"input_ids": torch.tensor(case["input_ids"])}
    if "attention_mask" in case["inputs_given"]:
        if "attention_mask_key" not in case:
            case = next(c for c in forward_cases
                        if c["input_ids"] == case["input_ids"] and "attention_mask_key" in c)
        kw["attention_mask"] = torch.from_numpy(arrays[case["attention_mask_key"]])
        kw["position_ids"] = torch.tensor(case["position_ids"])
    return kw


def random_layer(bits, out_features=192, in_features=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    linear = nn.Linear(in_features, out_features)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(out_features, in_features, generator=g) * 0.5)
        linear.bias.copy_(torch.randn(out_features, generator=g) * 0.05)
    return linear.half(), QuantizedLinear.from_linear(linear.half(), bits)


# ---- the format: same integers, same scales, same files ---------------------------------------------------------

@pytest.mark.parametrize("bits", [8, 4])
def test_quantizing_fp16_weights_reproduces_the_original_integers_and_scales_exactly(bits):
    base, golden = golden_state_dict("tiny"), golden_state_dict(f"tiny-int{bits}")
    checked = 0
    for key, want in golden.items():
        if key.endswith(".weight_scale"):
            weight_key = key[: -len("_scale")]
            q, scale = quantize_weight(base[weight_key], bits)
            assert q.dtype == torch.int8 and q.shape == golden[weight_key].shape, weight_key
            assert torch.equal(q, golden[weight_key]), weight_key
            assert torch.equal(scale, want), key
            # an fp32 copy of the same fp16 weights quantizes identically (users who loaded in float32)
            q32, scale32 = quantize_weight(base[weight_key].float(), bits)
            assert torch.equal(q32, q) and torch.equal(scale32, scale), weight_key
            checked += 1
    assert checked == 4 * 2  # four linears in each of the tiny model's two blocks


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_model_state_dict_is_the_official_pre_quantized_checkpoint(bits):
    _, model = load("model.quantize", bits)
    golden = golden_state_dict(f"tiny-int{bits}")
    ours = model.state_dict()
    for key, want in golden.items():
        if key.endswith("rotary_emb.inv_freq"):
            continue
        got = ours[key]
        if key.rsplit(".", 1)[-1] in QUANT_KEYS and "word_embeddings" not in key and got.dtype == torch.int8:
            assert torch.equal(got, want), key
        else:
            assert torch.equal(got.to(want.dtype), want), key
    assert model.config.quantization_bit == bits


def test_empty_quantized_layers_take_the_official_files_without_missing_or_unexpected_keys():
    from chatglm import ChatGLMConfig, ChatGLMForConditionalGeneration
    for bits in (8, 4):
        golden = golden_state_dict(f"tiny-int{bits}")  # skips when the golden data is absent
        config = ChatGLMConfig.from_pretrained(str(GOLDEN / "tiny"))
        model = ChatGLMForConditionalGeneration(config)
        replace_with_empty_quantized(model, bits)
        result = model.load_state_dict(golden, strict=False)
        assert result.missing_keys == [] and result.unexpected_keys == []
        layer = model.transformer.layers[1]
        for path in QUANTIZED_LINEARS:
            assert isinstance(layer.get_submodule(path), QuantizedLinear), path
        assert isinstance(model.lm_head, nn.Linear) and not isinstance(model.lm_head, QuantizedLinear)


def test_saved_quantized_model_is_in_the_official_layout_and_reloads_identically(tmp_path):
    """Quantize, run the CPU bf16 kernel (which repacks INT4 weights in memory), save, reload: the file holds the
    original's integers in the official packing, and the reloaded model gives the same logits."""
    from chatglm import load_model
    if not GOLDEN.is_dir():
        pytest.skip("golden data absent")
    tok, model = load_model(str(GOLDEN / "tiny"), device="cpu", dtype="bfloat16", quantize=4)
    ids = tok(["你好，请介绍一下你自己"], return_tensors="pt")
    with torch.no_grad():
        before = model(**ids).logits
    assert model.transformer.layers[0].mlp.dense_h_to_4h.weight.dtype == torch.uint8  # repacked for the kernel
    model.save_pretrained(str(tmp_path))
    tok.save_pretrained(str(tmp_path))
    import safetensors.torch
    saved = safetensors.torch.load_file(str(tmp_path / "model.safetensors"))
    golden = golden_state_dict("tiny-int4")
    for key, want in golden.items():
        if key.endswith(".weight") and want.dtype == torch.int8:
            assert saved[key].dtype == torch.int8 and torch.equal(saved[key], want), key
    _, reloaded = load_model(str(tmp_path), device="cpu", dtype="bfloat16")
    assert reloaded.config.quantization_bit == 4
    with torch.no_grad():
        after = reloaded(**ids).logits
    assert torch.equal(before, after)


# ---- parity with the original: logits, greedy generations, chats ------------------------------------------------

HOW = ["pre-quantized file", "quantize while loading", "model.quantize"]


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("how", HOW)
def test_quantized_logits_match_original(how, bits):
    g, arrays = load_golden(f"tiny-int{bits}")
    _, model = load(how, bits)
    for c in g["forward"]:
        with torch.no_grad():
            logits = model(**glm_inputs(c, arrays)).logits
        diff = np.abs(logits.numpy() - arrays[c["logits_key"]]).max()
        assert diff <= LOGIT_TOL, f"{how}/int{bits}/{c['name']}: max |Δlogit| {diff}"
        assert logits.argmax(-1).tolist() == c["argmax"], c["name"]


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("how", HOW)
def test_quantized_greedy_generations_and_chats_match_original(how, bits):
    g, arrays = load_golden(f"tiny-int{bits}")
    tok, model = load(how, bits)
    for c in g["generate"]:
        out = model.generate(**glm_inputs(c, arrays, g["forward"]), **c["generate_kwargs"])
        assert out.tolist() == c["output_ids"], f"{how}/int{bits}/{c['name']}"
    history = []
    for turn in g["chat"]["conversation"]["turns"]:
        response, history = model.chat(tok, turn["query"], history, **turn["chat_kwargs"])
        assert response == turn["response"], f"{how}/int{bits}: {turn['query']}"


@pytest.mark.parametrize("bits", [8, 4])
def test_cached_decoding_with_quantized_weights_matches_original(bits):
    """Teacher-forced KV-cache decoding (one-row inputs: the CPU fused kernels) against the original."""
    g, arrays = load_golden(f"tiny-int{bits}")
    _, model = load("pre-quantized file", bits)
    for c in g["cache"]:
        diff = np.abs(replay_cached_steps(model, c) - arrays[c["step_logits_key"]]).max()
        assert diff <= LOGIT_TOL, f"int{bits}/{c['name']}: max |Δlogit| {diff}"


# ---- the interface ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [0, 2, 3, 16, "4", None, True])
def test_bits_other_than_4_and_8_are_refused_with_a_clear_error(bad):
    _, model = load("model.quantize", 8)
    with pytest.raises(ValueError, match="4 or 8"):
        quantize_model(copy.deepcopy(model), bad)
    with pytest.raises(ValueError, match="4 or 8"):
        quantize_weight(torch.randn(4, 4), bad)


def test_quantizing_again_is_a_no_op_and_other_bits_are_refused():
    from chatglm import load_model
    if not GOLDEN.is_dir():
        pytest.skip("golden data absent")
    _, model = load_model(str(GOLDEN / "tiny"), device="cpu")
    assert model.quantize(8) is model
    layer = model.transformer.layers[0].attention.query_key_value
    weight = layer.weight
    assert model.quantize(8) is model
    assert model.transformer.layers[0].attention.query_key_value is layer and layer.weight is weight
    with pytest.raises(ValueError, match="already quantized to 8 bits"):
        model.quantize(4)
    with pytest.raises(ValueError, match="4 or 8"):
        from chatglm import load_model as lm
        lm(str(GOLDEN / "tiny"), device="cpu", quantize=3)


def test_quantized_layers_are_frozen_and_the_rest_is_untouched():
    _, model = load("model.quantize", 4)
    quantized = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert len(quantized) == 4 * model.config.num_layers
    assert all(not p.requires_grad for m in quantized for p in m.parameters())
    assert type(model.lm_head) is nn.Linear and type(model.transformer.word_embeddings) is nn.Embedding
    assert model.lm_head.weight is model.transformer.word_embeddings.weight  # still tied


# ---- kernels ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("rows", [1, 3, 40, 300])
@pytest.mark.parametrize("chunked", [False, True])
def test_cpu_kernels_agree_with_the_exact_dequantized_product(bits, rows, chunked, monkeypatch):
    """bfloat16 and float32 activations, matrix-vector (decoding: fused ops) and matrix-matrix (prompts:
    dequantize + GEMM, in row chunks for big weights) sizes, from the official and the repacked INT4 layout."""
    import chatglm.quantization as Q
    if chunked:
        monkeypatch.setattr(Q, "DEQUANT_CHUNK_ELEMENTS", 64 * 256)  # 64-row chunks of the 192-row weight
    _, layer = random_layer(bits)
    exact_w = layer.dequantized_weight(torch.float32)
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(2, rows, 256, generator=g)
    with torch.no_grad():
        y32 = layer.float()(x)
        ref32 = x @ exact_w.T + layer.bias.float()
        torch.testing.assert_close(y32, ref32, rtol=1e-5, atol=1e-4)
        layer.bfloat16()
        for warm_up in (False, True):  # the second pass reads INT4 weights repacked by a one-row forward
            if warm_up:
                layer(torch.randn(1, 256).bfloat16())
            xb = x.bfloat16()
            yb = layer(xb)
            ref = xb.float() @ exact_w.T + layer.bias.float()
            bound = (xb.float().abs() @ exact_w.abs().T) * 2 ** -7 + 1e-3  # a few bf16 roundings of the terms
            assert yb.dtype == torch.bfloat16
            assert ((yb.float() - ref).abs() <= bound).all(), (yb.float() - ref).abs().max()
        layer.float()  # back to float32 (bias and scales now carry the bf16 rounding of the cast)
        assert layer.weight.dtype == torch.int8
        want = x @ layer.dequantized_weight(torch.float32).T + layer.bias
        torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-4)


def test_int4_cpu_repacking_keeps_one_copy_and_the_official_layout_outside():
    linear, layer = random_layer(4, out_features=128, in_features=512)
    official = layer.weight.detach().clone()
    nbytes = official.numel()
    with torch.no_grad():
        layer.bfloat16()(torch.randn(1, 512).bfloat16())
    assert layer.weight.dtype == torch.uint8, "the CPU INT4 kernel did not run"
    assert layer.weight.untyped_storage().nbytes() == nbytes  # repacked in place, not duplicated
    assert torch.equal(layer.state_dict()["weight"], official)
    assert torch.equal(layer.int_weight(), official)
    layer.float()  # moving/casting the module restores the official layout
    assert layer.weight.dtype == torch.int8 and torch.equal(layer.weight, official)
    fresh = QuantizedLinear(512, 128, 4, dtype=torch.float16)
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(fresh.weight, official)


def test_input_gradients_flow_through_quantized_layers_without_weight_gradients():
    for bits in (8, 4):
        _, layer = random_layer(bits)
        layer = layer.float()
        x = torch.randn(3, 256, requires_grad=True)
        (layer(x) * torch.arange(192.0)).sum().backward()
        want = torch.arange(192.0) @ layer.dequantized_weight(torch.float32)
        torch.testing.assert_close(x.grad, want.expand(3, -1), rtol=1e-5, atol=1e-4)
        assert all(p.grad is None for p in layer.parameters())


def test_p_tuning_on_a_quantized_base_gets_the_same_prefix_gradients_as_dense_weights(dequantized_copy,
                                                                                     assert_same_prefix_grads):
    from chatglm import load_model
    if not GOLDEN.is_dir():
        pytest.skip("golden data absent")
    tok, model = load_model(str(GOLDEN / "tiny"), device="cpu", pre_seq_len=8)
    model.quantize(4).eval()
    dense = dequantized_copy(model)
    ids = torch.tensor([tok.encode("你好") + tok.encode("Hello world", add_special_tokens=False)])
    assert_same_prefix_grads(model, dense, ids)


# ---- memory ----------------------------------------------------------------------------------------------------

MEMORY_PROBE = textwrap.dedent("""
    import json, os, sys, threading, time
    import torch
    sys.path.insert(0, sys.argv[1])
    from chatglm import load_model
    folder, mode, warm_up = sys.argv[2], sys.argv[3], sys.argv[4]
    load_model(warm_up, device="cpu", dtype="bfloat16", quantize=4)  # imports and first-use caches are not the point

    def rss_anon():
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith("RssAnon:"))

    peak, done = [rss_anon()], threading.Event()
    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss_anon())
            time.sleep(0.001)
    base = rss_anon()
    t = threading.Thread(target=sample); t.start()
    if mode == "quantize while loading":
        tok, model = load_model(folder, device="cpu", dtype="bfloat16", quantize=4)
    else:
        tok, model = load_model(folder, device="cpu", dtype="bfloat16")
        model.quantize(4)
    done.set(); t.join()
    print(json.dumps({"peak_growth": max(peak[0], rss_anon()) - base}))
""")


def test_quantizing_while_loading_never_holds_the_fp16_model(tmp_path, demo_model_path):
    """Peak anonymous memory while load_model(quantize=4) reads an FP16 checkpoint stays well under the size of the
    FP16 linear weights; loading first and quantizing afterwards (the upstream way) does not."""
    import json
    H, I, L = 1024, 4096, 12
    config = json.loads((open(os.path.join(demo_model_path, "config.json"), encoding="utf-8").read()))
    config.update(hidden_size=H, inner_hidden_size=I, num_layers=L, num_attention_heads=8, quantization_bit=0)
    (tmp_path / "config.json").write_text(json.dumps(config))
    for name in ("ice_text.model", "tokenizer_config.json"):
        (tmp_path / name).write_bytes(open(os.path.join(demo_model_path, name), "rb").read())
    V = config["vocab_size"]
    g = torch.Generator().manual_seed(0)
    rand = lambda *s: (torch.randn(*s, generator=g) * 0.02).half()  # noqa: E731
    weight_map, linear_bytes = {}, 0
    for i in range(L):
        p = f"transformer.layers.{i}."
        shard = {p + "input_layernorm.weight": torch.ones(H).half(), p + "input_layernorm.bias": rand(H),
                 p + "post_attention_layernorm.weight": torch.ones(H).half(),
                 p + "post_attention_layernorm.bias": rand(H)}
        for path, (o, n) in zip(QUANTIZED_LINEARS, [(3 * H, H), (H, H), (I, H), (H, I)]):
            shard[p + path + ".weight"], shard[p + path + ".bias"] = rand(o, n), rand(o)
            linear_bytes += o * n * 2
        if i == 0:
            shard["transformer.word_embeddings.weight"] = rand(V, H)
            shard["transformer.final_layernorm.weight"] = torch.ones(H).half()
            shard["transformer.final_layernorm.bias"] = rand(H)
        name = f"pytorch_model-{i + 1:05d}-of-{L:05d}.bin"
        torch.save(shard, tmp_path / name)
        weight_map.update({k: name for k in shard})
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))

    # glibc would keep freed blocks resident and blur the peak; a fixed mmap threshold makes RSS track live memory
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    growth = {}
    for mode in ("quantize while loading", "load then quantize"):
        out = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(ROOT), str(tmp_path), mode, demo_model_path],
                             capture_output=True, text=True, timeout=300, env=env)
        assert out.returncode == 0, out.stderr[-2000:]
        growth[mode] = json.loads(out.stdout.strip().splitlines()[-1])["peak_growth"]
    # INT4 weights are a quarter of the FP16 bytes; allow that plus a few MB of temporaries
    assert growth["quantize while loading"] < 0.4 * linear_bytes, (growth, linear_bytes)
    assert growth["load then quantize"] > 0.9 * linear_bytes, (growth, linear_bytes)  # the probe can tell


def test_quantized_models_default_to_bfloat16_on_cpu_with_exact_scales(demo_model_path):
    """The fused int8/int4 CPU kernels are only vectorized for bfloat16, so that is the CPU default for quantized
    models; scales stay float16 (never bf16-rounded), and float32 remains available for exact parity."""
    from chatglm import load_model
    _, model = load_model(demo_model_path, device="cpu", quantize=4)
    layer = model.transformer.layers[0].attention.query_key_value
    assert model.transformer.word_embeddings.weight.dtype == torch.bfloat16
    assert layer.weight_scale.dtype == torch.float16
    _, model32 = load_model(demo_model_path, device="cpu", quantize=4, dtype="float32")
    assert model32.transformer.layers[0].attention.query_key_value.weight_scale.dtype == torch.float32
    assert torch.equal(layer.weight_scale.float(), model32.transformer.layers[0].attention.query_key_value.weight_scale)


# ---- CPU kernels: INT8 through the INT4 op, row blocks padded, row gathers, cached scales -------------------------

def bf16_layer(bits, out_features, in_features=256, seed=0):
    """(a QuantizedLinear as a bfloat16 model holds it: float16 scales, bfloat16 bias; its official weight bytes;
    its exact float32 weight q * scale)."""
    _, layer = random_layer(bits, out_features=out_features, in_features=in_features, seed=seed)
    layer.bias = nn.Parameter(layer.bias.detach().bfloat16(), requires_grad=False)
    official = layer.weight.detach().clone()
    q = official if bits == 8 else unpack_int4(official)
    return layer, official, q.float() * layer.weight_scale.float()[:, None]


def needs_cpu_int4_op():
    from chatglm.quantization import cpu_int4_layout
    if cpu_int4_layout() is None:
        pytest.skip("this machine's PyTorch has no usable CPU INT4 op")


def assert_bf16_product(y, x, exact, bias):
    """y is x @ exact.T + bias up to a few bfloat16 roundings of the terms."""
    ref = x.float() @ exact.T + bias.float()
    bound = (x.float().abs() @ exact.abs().T) * 2 ** -7 + 1e-3
    assert y.dtype == torch.bfloat16 and y.shape == ref.shape
    assert ((y.float() - ref).abs() <= bound).all(), (y.float() - ref).abs().max()


@pytest.mark.parametrize("out_features", [192, 130])
def test_int8_through_the_int4_kernel_matches_the_exact_product_for_every_fused_row_count(out_features):
    """Decoding one sequence repacks INT8 weights as hi/lo nibbles for the INT4 op; every row count that then runs
    fused (1..FUSED_MAX_ROWS), and the first above it, gives the exact product to bfloat16 accuracy."""
    from chatglm.quantization import FUSED_MAX_ROWS
    needs_cpu_int4_op()
    layer, _, exact = bf16_layer(8, out_features)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        x = torch.randn(1, 256, generator=g).bfloat16()
        assert_bf16_product(layer(x), x, exact, layer.bias)
        assert layer.weight.dtype == torch.uint8, "a one-row bfloat16 call did not repack the INT8 weight"
        for rows in range(1, FUSED_MAX_ROWS[torch.bfloat16, 8] + 2):
            x = torch.randn(rows, 256, generator=g).bfloat16()
            assert_bf16_product(layer(x), x, exact, layer.bias)
        x = torch.randn(3, 1, 256, generator=g).bfloat16()  # batched decoding input shape
        assert_bf16_product(layer(x).view(3, -1), x.view(3, -1), exact, layer.bias)


def test_batched_decoding_and_float32_keep_int8_weights_official_for_the_int8_kernel():
    """Several rows (the INT4 op would be slower there) and float32 (whose numbers must not change) use PyTorch's
    INT8 op on the official layout; only a one-row bfloat16 call repacks."""
    needs_cpu_int4_op()
    layer, official, exact = bf16_layer(8, 192)
    with torch.no_grad():
        x = torch.randn(4, 256).bfloat16()
        assert_bf16_product(layer(x), x, exact, layer.bias)
        assert layer.weight.dtype == torch.int8 and torch.equal(layer.weight, official)
        layer32 = copy.deepcopy(layer).float()
        x32 = torch.randn(1, 256)
        torch.testing.assert_close(layer32(x32), x32 @ exact.T + layer.bias.float(), rtol=1e-5, atol=1e-4)
        assert layer32.weight.dtype == torch.int8
        layer(x[:1])
        assert layer.weight.dtype == torch.uint8


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("out_features", [192, 130, 96])
def test_state_dict_stays_official_and_byte_identical_after_a_fused_forward(bits, out_features):
    """Also for row counts that are not whole blocks of the CPU op (130, 96 = 64 + 32 like the 130528-row vocab):
    the repacked weight is padded, and the official shape and bytes come back everywhere they are exposed."""
    needs_cpu_int4_op()
    layer, official, exact = bf16_layer(bits, out_features)
    scale, bias = layer.weight_scale.detach().clone(), layer.bias.detach().clone()
    x = torch.randn(1, 256).bfloat16()
    with torch.no_grad():
        y = layer(x)
    assert layer.weight.dtype == torch.uint8, "the CPU INT4 op did not run"
    state = layer.state_dict()
    assert list(state) == ["bias", "weight", "weight_scale"]
    assert state["weight"].dtype == torch.int8 and state["weight"].shape == official.shape
    assert torch.equal(state["weight"], official)
    assert torch.equal(state["weight_scale"], scale) and torch.equal(state["bias"], bias)
    assert torch.equal(layer.int_weight(), official)
    values = official if bits == 8 else unpack_int4(official)
    assert torch.equal(layer.int_values(), values)
    for start, stop in [(0, 1), (3, 70), (64, out_features), (out_features - 5, None), (7, 7)]:
        assert torch.equal(layer.int_values(start, stop), values[start:stop]), (start, stop)
    assert torch.equal(layer.dequantized_weight(torch.float32), exact)
    fresh = QuantizedLinear(256, out_features, bits, dtype=torch.bfloat16)
    fresh.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(fresh(x), y)  # the same bytes in, the same kernel, the same output
    layer.load_state_dict(state)  # into a repacked layer: it goes back to the official layout first
    assert layer.weight.dtype == torch.int8 and torch.equal(layer.weight, official)
    with torch.no_grad():
        assert torch.equal(layer(x), y)
    layer.float()  # moving / casting restores the official layout too
    assert layer.weight.dtype == torch.int8 and torch.equal(layer.weight, official)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("chunked", [False, True])
def test_prompts_after_decoding_multiply_by_the_repacked_weight_correctly(bits, chunked, monkeypatch):
    """A long prompt after decoding (many rows: dequantize + GEMM) reads the repacked, padded weight, in row chunks
    for big weights; bfloat16 and float32 both give the exact product to their accuracy."""
    import chatglm.quantization as Q
    needs_cpu_int4_op()
    if chunked:
        monkeypatch.setattr(Q, "DEQUANT_CHUNK_ELEMENTS", 64 * 256)  # chunks of 64 rows; the last one is 2 rows
    layer, _, exact = bf16_layer(bits, 130)
    x = torch.randn(2, 100, 256).bfloat16()
    with torch.no_grad():
        layer(x[0, :1])
        assert layer.weight.dtype == torch.uint8
        assert_bf16_product(layer(x).view(200, -1), x.view(200, -1), exact, layer.bias)
        x32 = x.float()
        torch.testing.assert_close(layer(x32), x32 @ exact.T + layer.bias.float(), rtol=1e-5, atol=1e-4)
    assert layer.weight.dtype == torch.uint8


@pytest.mark.parametrize("bits", [8, 4])
def test_gradients_reach_the_input_through_repacked_weights(bits):
    needs_cpu_int4_op()
    layer, _, exact = bf16_layer(bits, 130)
    with torch.no_grad():
        layer(torch.randn(1, 256).bfloat16())
    assert layer.weight.dtype == torch.uint8
    x = torch.randn(1, 256).bfloat16().requires_grad_()
    (layer(x).float() * torch.arange(130.0)).sum().backward()
    want = torch.arange(130.0) @ exact
    torch.testing.assert_close(x.grad.float(), want[None], rtol=2e-2, atol=2e-2 * want.abs().max().item())


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("out_features", [192, 130, 96])
def test_gather_rows_gives_the_exact_dequantized_rows_in_either_layout(bits, out_features):
    """What a quantized embedding looks up: q[ids] * scale[ids], exactly in float32, in the shape of the ids, from the
    official layout and from the repacked (padded) one alike; the same values as dequantized_weight in any dtype."""
    needs_cpu_int4_op()
    layer, _, exact = bf16_layer(bits, out_features)
    ids = torch.tensor([[0, out_features - 1, 5, 5], [63, 64, out_features // 2, 1]])
    for layout in ("official", "repacked"):
        if layout == "repacked":
            with torch.no_grad():
                layer(torch.randn(1, 256).bfloat16())
            assert layer.weight.dtype == torch.uint8
        rows = layer.gather_rows(ids, torch.float32)
        assert rows.shape == (2, 4, 256) and rows.dtype == torch.float32
        assert torch.equal(rows, exact[ids]), layout
        assert torch.equal(layer.gather_rows(ids[0, 1], torch.float32), exact[out_features - 1]), layout
        for dtype in (torch.bfloat16, torch.float16):
            assert torch.equal(layer.gather_rows(ids, dtype), layer.dequantized_weight(dtype)[ids]), (layout, dtype)
        for bad in (out_features, -1):
            with pytest.raises(IndexError):
                layer.gather_rows(torch.tensor([2, bad]), torch.float32)


def test_gather_rows_of_a_vocab_sized_int4_weight_stays_cheap():
    """An INT4 lm_head over the 130528-token vocabulary (padded for the CPU op to whole blocks of rows only: 32 rows
    where the op's blocks are 64 rows)
    serves a 512-token prompt's embedding lookup from its repacked weight without dequantizing the whole matrix."""
    import time
    needs_cpu_int4_op()
    vocab, hidden = 130528, 4096
    layer = QuantizedLinear(hidden, vocab, 4, bias=False, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        layer.weight.view(torch.uint8).random_(generator=g)
        layer.weight_scale.copy_(torch.rand(vocab, generator=g) * 0.01 + 1e-3)
    ids = torch.randint(0, vocab, (1, 512), generator=g)
    ids[0, :2] = torch.tensor([0, vocab - 1])
    want = layer.gather_rows(ids, torch.float32)
    assert torch.equal(want[0, 1], unpack_int4(layer.weight[-1:]).float()[0] * layer.weight_scale[-1].float())
    official_bytes = layer.weight.untyped_storage().nbytes()
    with torch.no_grad():
        layer(torch.randn(1, hidden).bfloat16())  # repacks
    assert layer.weight.dtype == torch.uint8
    block = cpu_int4_layout()[0]  # 64 rows with AVX-512, 32 with AVX2: 130528 is a whole number of 32-row blocks
    padding_rows = -(-vocab // block) * block - vocab
    repacked_bytes = layer.weight.untyped_storage().nbytes()  # an int: a failing assert must not repr the storage
    assert repacked_bytes == official_bytes + padding_rows * hidden // 2
    seconds = []
    for _ in range(3):
        start = time.perf_counter()
        got = layer.gather_rows(ids, torch.bfloat16)
        seconds.append(time.perf_counter() - start)
    assert torch.equal(layer.gather_rows(ids, torch.float32), want)
    assert got.shape == (1, 512, hidden)
    assert min(seconds) < 0.1, seconds  # ~5 ms here; dequantizing all 535M weights takes seconds


def held_bytes(module):
    """Bytes of the distinct tensor storages a module's own attributes hold (parameters, buffers, caches)."""
    storages = {}

    def walk(value):
        if isinstance(value, torch.Tensor):
            storages[value.untyped_storage().data_ptr()] = value.untyped_storage().nbytes()
        elif isinstance(value, (tuple, list)):
            for v in value:
                walk(v)
        elif isinstance(value, dict):
            for v in value.values():
                walk(v)
    for value in vars(module).values():
        walk(value)
    return sum(storages.values())


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("out_features", [192, 130])
def test_repacking_keeps_a_single_copy_of_the_weight(bits, out_features):
    from chatglm.quantization import cpu_int4_layout
    needs_cpu_int4_op()
    layer, official, _ = bf16_layer(bits, out_features, in_features=512)
    block = cpu_int4_layout()[0]
    padding = (-out_features % block) * official.shape[1]  # zero rows up to whole row blocks of the CPU op
    before = held_bytes(layer)
    with torch.no_grad():
        layer(torch.randn(1, 512).bfloat16())
        assert layer.weight.dtype == torch.uint8
        assert layer.weight.untyped_storage().nbytes() == official.numel() + padding  # the same bytes, repacked
        pointer = layer.weight.data_ptr()
        for rows in (1, 2, 5, 1):
            layer(torch.randn(rows, 512).bfloat16())
        layer.state_dict(), layer.int_weight(), layer.gather_rows(torch.tensor([1, 2]), torch.float32)
    assert layer.weight.data_ptr() == pointer  # repacked once
    # the only other growth: a bfloat16 copy of the scales (2 bytes a row) and the op's table of unit scales, shared
    # by all layers of this shape (16 bytes a row here); a second copy of the weight would be 256-512 bytes a row
    rows = out_features + padding // official.shape[1]
    assert held_bytes(layer) <= before + padding + 2 * out_features + 16 * rows


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("bias_dtype", [torch.bfloat16, torch.float16])
def test_changing_scales_or_bias_after_a_forward_takes_effect(bits, bias_dtype):
    """The kernels keep the scales and bias converted to the activation dtype; writing or replacing those
    Parameters, or loading a state dict, must not leave stale copies in use."""
    layer, _, _ = bf16_layer(bits, 192)
    layer.bias = nn.Parameter(layer.bias.detach().to(bias_dtype), requires_grad=False)
    x = torch.randn(1, 256).bfloat16()
    state = copy.deepcopy(layer.state_dict())
    with torch.no_grad():
        y = layer(x).float()
        layer.weight_scale.mul_(2)
        bias = layer.bias.float()
        torch.testing.assert_close(layer(x).float(), 2 * (y - bias) + bias, rtol=2e-2, atol=2e-2)
        layer.bias.zero_()
        torch.testing.assert_close(layer(x).float(), 2 * (y - bias), rtol=2e-2, atol=2e-2)
        layer.bias = nn.Parameter(torch.ones(192, dtype=bias_dtype), requires_grad=False)
        torch.testing.assert_close(layer(x).float(), 2 * (y - bias) + 1, rtol=2e-2, atol=2e-2)
        layer.load_state_dict(state)
        assert torch.equal(layer(x).float(), y)


@pytest.mark.parametrize("bits", [8, 4])
def test_without_a_usable_cpu_int4_op_layers_keep_the_official_layout(bits, monkeypatch):
    """Where the layout probe fails (other CPUs / PyTorch builds), INT8 runs PyTorch's INT8 op and INT4 dequantizes;
    results, state dict and row gathers are unchanged."""
    import chatglm.quantization as Q
    monkeypatch.setattr(Q, "cpu_int4_layout", lambda: None)
    layer, official, exact = bf16_layer(bits, 130)
    with torch.no_grad():
        for rows in (1, 3, 40):
            x = torch.randn(rows, 256).bfloat16()
            assert_bf16_product(layer(x), x, exact, layer.bias)
    assert layer.weight.dtype == torch.int8 and torch.equal(layer.state_dict()["weight"], official)
    assert torch.equal(layer.gather_rows(torch.tensor([0, 129]), torch.float32), exact[[0, 129]])
