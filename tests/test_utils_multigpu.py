"""utils.auto_configure_device_map and load_model_on_gpus: the split over 1-8 GPUs, and accelerate's dispatch run
for real (onto CPU devices here; onto GPUs when the machine has them)."""
from collections import Counter

import pytest
import torch

from utils import auto_configure_device_map, load_model_on_gpus

PINNED_TO_FIRST = ("transformer.word_embeddings", "transformer.final_layernorm", "lm_head")


def layers_per_gpu(device_map, num_gpus):
    counts = Counter(d for k, d in device_map.items() if k.startswith("transformer.layers."))
    return [counts[g] for g in range(num_gpus)]


@pytest.mark.parametrize("num_gpus", range(1, 9))
def test_device_map_spreads_28_layers_over_every_gpu(num_gpus):
    device_map = auto_configure_device_map(num_gpus)
    assert set(device_map) == set(PINNED_TO_FIRST) | {f"transformer.layers.{i}" for i in range(28)}
    assert all(device_map[name] == 0 for name in PINNED_TO_FIRST)  # chat() feeds ids to model.device
    devices = [device_map[f"transformer.layers.{i}"] for i in range(28)]
    assert devices == sorted(devices), "blocks must run in order across GPUs (one hop per boundary)"
    counts = layers_per_gpu(device_map, num_gpus)
    assert all(c > 0 for c in counts[1:]), f"a GPU is left without layers: {counts}"  # upstream's 7-GPU bug
    units = [counts[0] + 2] + counts[1:]  # embedding and final norm + lm_head weigh one layer each
    assert max(units) - min(units) <= 1, units
    assert units[0] == min(units), "GPU 0 also holds the embedding and the logits; it must not get extra layers"


@pytest.mark.parametrize("num_gpus,expected", [(2, [13, 15]), (3, [8, 10, 10])])
def test_device_map_keeps_upstream_split_where_it_was_even(num_gpus, expected):
    assert layers_per_gpu(auto_configure_device_map(num_gpus), num_gpus) == expected


def test_device_map_follows_the_layer_count_it_is_given():
    device_map = auto_configure_device_map(3, num_layers=2)
    assert sorted(k for k in device_map if k.startswith("transformer.layers.")) == [
        "transformer.layers.0", "transformer.layers.1"]
    assert layers_per_gpu(device_map, 3) == [0, 1, 1]


@pytest.mark.parametrize("bad", [0, -1, 2.0, "2", True])
def test_device_map_rejects_nonsense_gpu_counts(bad):
    with pytest.raises(ValueError, match="num_gpus"):
        auto_configure_device_map(bad)


@pytest.fixture(scope="module")
def reference(demo_model_path):
    from chatglm import load_model
    return load_model(demo_model_path, device="cpu")


def cpu_device_map(num_gpus, num_layers):
    """The GPU map with every GPU index replaced by "cpu", so accelerate's dispatch runs without GPUs."""
    return {name: "cpu" for name in auto_configure_device_map(num_gpus, num_layers)}


def test_dispatch_onto_cpu_devices_gives_the_same_replies(demo_model_path, reference):
    tokenizer, ref = reference
    device_map = cpu_device_map(3, ref.config.num_layers)
    model = load_model_on_gpus(demo_model_path, num_gpus=3, device_map=device_map)
    # accelerate hooked every block of the map (they move each block's inputs to its device)
    for name in device_map:
        hook = getattr(model.get_submodule(name), "_hf_hook", None)
        assert hook is not None and str(hook.execution_device) == "cpu", name
    assert model.hf_device_map == device_map
    assert model.lm_head.weight is model.transformer.word_embeddings.weight  # still tied after dispatch
    for query, history in [("你好", []), ("hello", [("你好", "Here. name")])]:
        expected = ref.chat(tokenizer, query, history, max_length=80, temperature=0)[0]
        assert model.chat(tokenizer, query, history, max_length=80, temperature=0)[0] == expected
        streamed = list(model.stream_chat(tokenizer, query, history, max_length=80, temperature=0))
        assert streamed[-1][0] == expected


def test_dispatch_places_a_ptuning_prefix_encoder_with_the_embedding(demo_model_path, reference):
    tokenizer, ref = reference
    device_map = cpu_device_map(2, ref.config.num_layers)
    model = load_model_on_gpus(demo_model_path, num_gpus=2, device_map=device_map, pre_seq_len=4)
    assert model.hf_device_map["transformer.prefix_encoder"] == device_map["transformer.word_embeddings"]
    assert hasattr(model.transformer.prefix_encoder, "_hf_hook")
    response, history = model.chat(tokenizer, "你好", max_length=40, temperature=0)
    assert history == [("你好", response)]


@pytest.mark.skipif(torch.cuda.device_count() >= 2, reason="this machine has the GPUs")
def test_asking_for_more_gpus_than_visible_says_so(demo_model_path):
    with pytest.raises(ValueError, match="CUDA GPU"):
        load_model_on_gpus(demo_model_path, num_gpus=2)


def _logits(model, tokenizer, text):
    inputs = tokenizer([text], return_tensors="pt").to(model.device)
    with torch.no_grad():
        return model(**inputs).logits.float().cpu()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_dispatch_onto_one_real_gpu(demo_model_path, reference):
    tokenizer, ref = reference
    device_map = {k: 0 for k in auto_configure_device_map(2, ref.config.num_layers)}
    model = load_model_on_gpus(demo_model_path, device_map=device_map)
    assert {p.device.type for p in model.parameters()} == {"cuda"} and model.dtype == torch.float16
    got, want = _logits(model, tokenizer, "你好"), _logits(ref, tokenizer, "你好")
    assert torch.allclose(got, want, atol=5e-2, rtol=5e-2), (got - want).abs().max()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_load_model_on_two_real_gpus(demo_model_path, reference):
    tokenizer, ref = reference
    model = load_model_on_gpus(demo_model_path, num_gpus=2)
    expected = auto_configure_device_map(2, ref.config.num_layers)
    for name, gpu in expected.items():
        assert {p.device for p in model.get_submodule(name).parameters()} == {torch.device("cuda", gpu)}, name
    got, want = _logits(model, tokenizer, "你好"), _logits(ref, tokenizer, "你好")
    assert torch.allclose(got, want, atol=5e-2, rtol=5e-2), (got - want).abs().max()
    assert model.chat(tokenizer, "你好", max_length=40, temperature=0)[1][0][0] == "你好"
