"""Loading official-layout folders: key names, shards, safetensors, Auto classes, and clear errors for bad files."""
import json
import os
import shutil

import pytest
import torch

import chatglm
from chatglm import ChatGLMForConditionalGeneration, ChatGLMTokenizer, ModelLoadError, load_model
from chatglm import demo_checkpoint
from chatglm.loading import read_state_dict


@pytest.fixture()
def demo_copy(demo_model_path, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(demo_model_path, folder)
    return folder


def test_official_key_names_load_strictly(demo_model_path):
    sd = read_state_dict(os.path.join(demo_model_path, "pytorch_model.bin"))
    model = ChatGLMForConditionalGeneration(chatglm.ChatGLMConfig.from_pretrained(demo_model_path))
    result = model.load_state_dict(sd, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert set(model.state_dict()) == set(sd)  # we also write exactly the official key set


def test_golden_checkpoint_keys_are_exactly_the_models(golden_dir):
    sd = read_state_dict(str(golden_dir / "tiny" / "pytorch_model.bin"))
    model = ChatGLMForConditionalGeneration(chatglm.ChatGLMConfig.from_pretrained(golden_dir / "tiny"))
    assert list(model.state_dict()) == list(sd)  # same names, same order


def test_sharded_bin_and_safetensors_give_the_same_logits(demo_copy, tmp_path):
    from safetensors.torch import save_file
    tok, ref_model = load_model(str(demo_copy), device="cpu")
    ids = tok(["你好，请介绍一下你自己"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ref = ref_model(input_ids=ids).logits
    sd = read_state_dict(str(demo_copy / "pytorch_model.bin"))
    keys = list(sd)
    for fmt in ("bin", "safetensors"):
        folder = tmp_path / fmt
        folder.mkdir()
        for f in ("config.json", "ice_text.model", "tokenizer_config.json"):
            shutil.copy(demo_copy / f, folder / f)
        halves = {f"shard-1.{fmt}": keys[: len(keys) // 2], f"shard-2.{fmt}": keys[len(keys) // 2:]}
        for name, part in halves.items():
            tensors = {k: sd[k].clone() for k in part}
            if fmt == "bin":
                torch.save(tensors, folder / name)
            else:
                save_file(tensors, str(folder / name))
        index = "pytorch_model.bin.index.json" if fmt == "bin" else "model.safetensors.index.json"
        weight_map = {k: name for name, part in halves.items() for k in part}
        (folder / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        _, model = load_model(str(folder), device="cpu")
        with torch.no_grad():
            assert torch.equal(model(input_ids=ids).logits, ref), fmt


def test_auto_classes_load_our_implementation(demo_model_path):
    from transformers import AutoModel, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(demo_model_path)
    model = AutoModel.from_pretrained(demo_model_path)
    assert isinstance(tok, ChatGLMTokenizer) and isinstance(model, ChatGLMForConditionalGeneration)
    response, history = model.chat(tok, "你好", do_sample=False, max_length=64)
    assert history == [("你好", response)]


def test_stale_auto_map_and_remote_code_files_are_ignored(demo_copy):
    cfg = json.loads((demo_copy / "config.json").read_text())
    cfg["auto_map"] = {"AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration"}
    (demo_copy / "config.json").write_text(json.dumps(cfg))
    (demo_copy / "modeling_chatglm.py").write_text("raise SystemExit('remote code must never run')\n")
    tok, model = load_model(str(demo_copy), device="cpu")
    assert model.chat(tok, "hello", do_sample=False, max_length=40)[0] is not None


def test_cpu_float16_request_becomes_float32(demo_model_path):
    with pytest.warns(UserWarning, match="float32"):
        _, model = load_model(demo_model_path, device="cpu", dtype="float16")
    assert model.transformer.word_embeddings.weight.dtype == torch.float32


def test_bfloat16_on_cpu_chats(demo_model_path):
    tok, model = load_model(demo_model_path, device="cpu", dtype="bfloat16")
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert isinstance(model.chat(tok, "你好", max_length=48)[0], str)


def test_save_pretrained_round_trip(demo_model_path, tmp_path):
    tok, model = load_model(demo_model_path, device="cpu")
    model.save_pretrained(tmp_path / "saved")
    tok.save_pretrained(tmp_path / "saved")
    tok2, model2 = load_model(str(tmp_path / "saved"), device="cpu")
    ids = tok(["round trip"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, model2(input_ids=ids).logits)
    assert tok2.encode("round trip") == tok.encode("round trip")


# ---- clear errors -------------------------------------------------------------------------------------------------

def test_missing_folder_names_the_path_and_how_to_get_weights(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist.*git clone https://huggingface.co/THUDM/chatglm-6b"):
        load_model(str(tmp_path / "nowhere"))


def test_missing_shard_names_the_file(demo_copy):
    sd = read_state_dict(str(demo_copy / "pytorch_model.bin"))
    os.remove(demo_copy / "pytorch_model.bin")
    torch.save(sd, demo_copy / "pytorch_model-00001-of-00002.bin")
    weight_map = {k: "pytorch_model-00001-of-00002.bin" for k in sd}
    weight_map["transformer.final_layernorm.weight"] = "pytorch_model-00002-of-00002.bin"
    (demo_copy / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ModelLoadError, match="pytorch_model-00002-of-00002.bin is missing"):
        load_model(str(demo_copy))


def test_truncated_weights_name_the_file(demo_copy):
    path = demo_copy / "pytorch_model.bin"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(ModelLoadError, match="pytorch_model.bin.*truncated or corrupt"):
        load_model(str(demo_copy))


def test_git_lfs_pointer_is_recognised(demo_copy):
    (demo_copy / "pytorch_model.bin").write_text(
        "version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 1234\n")
    with pytest.raises(ModelLoadError, match="git-lfs pointer.*git lfs pull"):
        load_model(str(demo_copy))


def test_broken_tokenizer_file_is_reported(demo_copy):
    (demo_copy / "ice_text.model").write_bytes(b"\x00not a sentencepiece model")
    with pytest.raises(ValueError, match="ice_text.model is not a valid SentencePiece model"):
        load_model(str(demo_copy))


def test_config_that_does_not_fit_the_weights_is_reported(demo_copy):
    cfg = json.loads((demo_copy / "config.json").read_text())
    cfg["hidden_size"] = 256
    (demo_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="do not fit its config.json"):
        load_model(str(demo_copy))


@pytest.mark.parametrize("env_model", [None, ""])  # `export CHATGLM_MODEL=` reads as unset, not as a folder ''
def test_no_path_means_the_demo_checkpoint_announced_loudly(monkeypatch, capsys, demo_model_path, env_model):
    if env_model is None:
        monkeypatch.delenv("CHATGLM_MODEL", raising=False)
    else:
        monkeypatch.setenv("CHATGLM_MODEL", env_model)
    monkeypatch.setenv("CHATGLM_DEMO_DIR", demo_model_path)
    import argparse
    from chatglm.options import add_model_args, load_from_args
    args = add_model_args(argparse.ArgumentParser()).parse_args([])  # the scripts' way to the model
    for tok, model in (load_model(), load_from_args(args)):
        assert model.is_demo
    assert capsys.readouterr().err.count("DEMO checkpoint") == 2


def test_named_path_never_falls_back_to_the_demo(monkeypatch, tmp_path):
    monkeypatch.setenv("CHATGLM_MODEL", str(tmp_path / "missing"))
    with pytest.raises(ModelLoadError):
        load_model()


# ---- chat edge cases ----------------------------------------------------------------------------------------------

def test_chat_edge_cases(demo_model_path):
    tok, model = load_model(demo_model_path, device="cpu")
    response, history = model.chat(tok, "", do_sample=False, max_length=32)  # empty query: still a reply
    assert history == [("", response)]
    long_history = [("问题" * 50, "回答" * 50)] * 30  # prompt far beyond max_length: no crash, one token
    response, _ = model.chat(tok, "继续", long_history, do_sample=False, max_length=64)
    assert isinstance(response, str)
    with pytest.raises(ValueError, match="max_sequence_length"):
        model.chat(tok, "hi", max_length=model.config.max_sequence_length + 1)
    with pytest.raises(ValueError, match="max_sequence_length"):
        list(model.stream_chat(tok, "hi", max_length=model.config.max_sequence_length + 1))


def test_closing_a_stream_stops_generation(demo_model_path):
    tok, model = load_model(demo_model_path, device="cpu")
    forwards = []
    hook = model.transformer.register_forward_pre_hook(lambda *a: forwards.append(1))  # prefill and decode steps
    try:
        stream = model.stream_chat(tok, "写一篇很长的文章", max_length=2000, top_p=1.0, temperature=1.0)
        next(stream)
        stream.close()
        assert len(forwards) == 1  # the prefill only: no token is generated after the consumer left
    finally:
        hook.remove()


# ---- P-Tuning checkpoints -----------------------------------------------------------------------------------------

def test_ptuning_checkpoint_config_is_read_and_applied(golden_dir):
    tok, model = load_model(str(golden_dir / "tiny"), ptuning_checkpoint=str(golden_dir / "tiny-ptuning-proj"),
                            device="cpu")
    assert model.config.pre_seq_len == 8 and model.config.prefix_projection is True
    assert model.chat(tok, "你好", do_sample=False, max_length=40)[0] is not None


def test_ptuning_checkpoint_with_other_pre_seq_len_is_explained(golden_dir):
    with pytest.raises(ModelLoadError, match=r"pre_seq_len=16.*embedding.weight has shape \(8, 256\), expected "
                                             r"\(16, 256\).*--pre-seq-len"):
        load_model(str(golden_dir / "tiny"), ptuning_checkpoint=str(golden_dir / "tiny-ptuning"), pre_seq_len=16)


def test_ptuning_checkpoint_with_other_projection_is_explained(golden_dir):
    with pytest.raises(ModelLoadError, match="prefix_projection differs"):
        load_model(str(golden_dir / "tiny"), ptuning_checkpoint=str(golden_dir / "tiny-ptuning"),
                   prefix_projection=True)


def test_ptuning_checkpoint_for_another_base_model_is_explained(golden_dir, demo_model_path):
    with pytest.raises(ModelLoadError, match="does not fit this base model.*num_layers=2, hidden_size=128"):
        load_model(demo_model_path, ptuning_checkpoint=str(golden_dir / "tiny-ptuning"))


def test_folder_without_prefix_weights_is_not_a_ptuning_checkpoint(demo_model_path):
    with pytest.raises(ModelLoadError, match="not a P-Tuning v2 checkpoint"):
        load_model(demo_model_path, ptuning_checkpoint=demo_model_path)


def same_logits(a, b, dtype):
    if dtype == "bfloat16":  # F.linear runs the same oneDNN arithmetic: bit for bit
        return torch.equal(a, b)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)  # fp32: MKL vs oneDNN summation order
    return True


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_cpu_weights_are_packed_without_changing_results_or_the_state_dict(demo_model_path, tmp_path, dtype):
    from chatglm.cpu_pack import PackedLinear, PackedTiedEmbedding, available, unpack
    if not available(getattr(torch, dtype)):
        pytest.skip(f"oneDNN has no {dtype} kernels on this CPU")
    tok, packed = load_model(demo_model_path, device="cpu", dtype=dtype)
    assert isinstance(packed.transformer.layers[0].mlp.dense_h_to_4h, PackedLinear)
    assert isinstance(packed.transformer.word_embeddings, PackedTiedEmbedding)  # lm_head reads the packed matrix
    assert packed.lm_head.weight is packed.transformer.word_embeddings.weight  # still one (tied) matrix
    ids = tok(["你好，请介绍一下你自己"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        fast = packed(input_ids=ids).logits
    state = packed.state_dict()
    reply = packed.chat(tok, "你好", do_sample=False, max_length=64)[0]
    plain = unpack(load_model(demo_model_path, device="cpu", dtype=dtype)[1])
    assert not any(isinstance(m, (PackedLinear, PackedTiedEmbedding)) for m in plain.modules())
    assert plain.lm_head.weight is plain.transformer.word_embeddings.weight
    with torch.no_grad():
        assert same_logits(fast, plain(input_ids=ids).logits, dtype)
    assert plain.chat(tok, "你好", do_sample=False, max_length=64)[0] == reply
    reference = plain.state_dict()
    assert list(state) == list(reference) and all(torch.equal(state[k], reference[k]) for k in state)
    packed.save_pretrained(tmp_path / "saved")
    tok.save_pretrained(tmp_path / "saved")
    _, reloaded = load_model(str(tmp_path / "saved"), device="cpu", dtype=dtype)
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, fast)
    packed.half()  # casting to a dtype oneDNN does not pack here unpacks: a plain float16 model
    assert not any(isinstance(m, PackedLinear) and m.packed is not None for m in packed.modules())
    assert packed.transformer.word_embeddings.weight.dtype == torch.float16


def test_training_a_packed_bfloat16_model_gets_trainable_parameters_back(demo_model_path):
    from chatglm.cpu_pack import PackedLinear, PackedTiedEmbedding, available
    if not available(torch.bfloat16):
        pytest.skip("oneDNN has no bfloat16 kernels on this CPU: nothing is packed")
    tok, model = load_model(demo_model_path, device="cpu", dtype="bfloat16")
    n_inference = sum(p.numel() for p in model.parameters())
    model.train()
    assert not any(isinstance(m, (PackedLinear, PackedTiedEmbedding)) for m in model.modules())
    params = dict(model.named_parameters())
    assert sum(p.numel() for p in params.values()) > n_inference
    assert params["transformer.layers.0.mlp.dense_h_to_4h.weight"].requires_grad
    assert model.lm_head.weight is params["transformer.word_embeddings.weight"]  # tied again
    ids = torch.tensor([tok.encode("你好")])
    model(input_ids=ids, labels=ids).loss.backward()
    assert params["transformer.layers.0.mlp.dense_h_to_4h.weight"].grad is not None
    assert params["transformer.word_embeddings.weight"].grad is not None


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("chunk_rows", [64, 192, 100])
def test_packed_embedding_rows_and_logits_are_exact_across_chunks(demo_model_path, monkeypatch, chunk_rows, dtype):
    """The tied matrix is packed in row chunks and embedding rows are read from the packed buffers: every id must
    give its exact row, and logits must span all chunks in order (6B's vocab is 16 chunks; the demo's, 5-13)."""
    from chatglm import cpu_pack
    if not cpu_pack.available(getattr(torch, dtype)):
        pytest.skip(f"oneDNN has no {dtype} kernels on this CPU")
    monkeypatch.setattr(cpu_pack, "HEAD_CHUNK_ROWS", chunk_rows)
    _, model = load_model(demo_model_path, device="cpu", dtype=dtype)
    embedding = model.transformer.word_embeddings
    assert isinstance(embedding, cpu_pack.PackedTiedEmbedding) and len(embedding.chunks) > 4
    dense = embedding.weight.clone()
    everything = torch.arange(dense.shape[0]).flip(0).view(4, -1)
    with torch.no_grad():
        assert torch.equal(embedding(everything), dense[everything])
        x = torch.randn(2, 3, dense.shape[1]).to(dense.dtype)
        assert same_logits(model.lm_head(x), torch.nn.functional.linear(x, dense), dtype)


def test_building_the_demo_model_says_what_it_does_with_a_progress_bar(monkeypatch, capsys, tmp_path):
    """The first run's wait is explained: where the demo model goes, then a progress bar over its training steps
    (the real build has 120 steps; 3 keep this test short)."""
    monkeypatch.setattr(demo_checkpoint, "TRAIN_STEPS", 3)
    folder = demo_checkpoint.ensure_demo_checkpoint(str(tmp_path / "demo"))
    err = capsys.readouterr().err
    assert f"Building the demo model in {folder} (first run only" in err
    assert "training the demo model" in err and "3/3" in err and "loss=" in err
    assert os.path.isfile(os.path.join(folder, "pytorch_model.bin"))
    demo_checkpoint.ensure_demo_checkpoint(folder)  # built: no second build, nothing printed
    assert capsys.readouterr().err == ""


def test_the_description_names_quantization_and_the_ptuning_checkpoint(golden_dir):
    """What every front door shows (web banner, CLI greeting, api.py): a quantized base with a P-Tuning prefix."""
    from chatglm.model_info import describe_model, public_model_info
    checkpoint = str(golden_dir / "tiny-ptuning")
    _, model = load_model(str(golden_dir / "tiny"), quantize=8, ptuning_checkpoint=checkpoint, device="cpu")
    assert describe_model(model) == (f"Model: {golden_dir / 'tiny'} · cpu · bfloat16 · INT8 weights · "
                                     f"P-Tuning: {checkpoint} (prefix 8)")
    public = public_model_info(model)  # for API clients: no directory layout beyond the last parts
    assert public["name"] == "tiny" and public["ptuning_checkpoint"] == "golden/tiny-ptuning"
    assert public["quantization_bit"] == 8 and public["pre_seq_len"] == 8 and public["demo"] is False
