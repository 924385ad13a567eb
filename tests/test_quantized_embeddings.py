"""Quantized embeddings (opt-in, upstream's chatglm-6b-int4-qe format): the embedding that lm_head shares is
quantized like the block linears. No golden outputs exist for it, so parity is by construction: the same integers
and scales as quantize_weight, and the same logits as a model whose tied embedding is the dequantized matrix."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from torch import nn

from conftest import GOLDEN, ROOT

from chatglm import ModelLoadError, load_model
from chatglm.quantization import QuantizedLinear, quantize_weight
from chatglm.quantized_embedding import QuantizedEmbedding

PROMPTS = ["你好，请介绍一下你自己", "Hello"]


def tiny():
    if not (GOLDEN / "tiny").is_dir():
        pytest.skip(f"golden checkpoint {GOLDEN / 'tiny'} not found (only present beside the repo in CI)")
    return str(GOLDEN / "tiny")


def fp16_embedding():
    return torch.load(os.path.join(tiny(), "pytorch_model.bin"), map_location="cpu",
                      weights_only=True)["transformer.word_embeddings.weight"]


def dequantized_reference(w16: torch.Tensor, bits: int) -> torch.Tensor:
    """q * scale per NOTES.md §9, written out here rather than taken from chatglm.quantization: scale =
    fp16(max|row| / (2^(bits-1) - 1)), q = round(W / scale) (the division in fp32), exact in fp32."""
    max_q = 2 ** (bits - 1) - 1
    w = w16.float()
    scale = (w.abs().amax(dim=1) / max_q).half().float()
    return torch.round(w / scale[:, None]).clamp(-max_q, max_q) * scale[:, None]


def qe_model(bits=4, dtype="float32"):
    tok, model = load_model(tiny(), device="cpu", dtype=dtype)
    return tok, model.quantize(bits, quantize_embeddings=True)


def reference_model(bits=4):
    """The tiny model with quantized block linears and, as its tied embedding + lm_head, the dequantized matrix."""
    tok, model = load_model(tiny(), device="cpu", dtype="float32")
    model.quantize(bits)
    matrix = nn.Parameter(dequantized_reference(fp16_embedding(), bits), requires_grad=False)
    model.transformer.word_embeddings.weight = matrix
    model.lm_head.weight = matrix
    return tok, model


def logits(tok, model, prompts=PROMPTS):
    inputs = tok(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**inputs).logits


def copy_tokenizer_files(folder):
    for name in ("ice_text.model", "tokenizer_config.json"):
        shutil.copy(os.path.join(tiny(), name), folder / name)


# ---- the format -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [4, 8])
def test_the_embedding_holds_exactly_the_integers_and_scales_of_quantize_weight(bits):
    _, model = qe_model(bits)
    embedding = model.transformer.word_embeddings
    assert isinstance(embedding, QuantizedEmbedding) and embedding.bits == bits
    q, scale = quantize_weight(fp16_embedding(), bits)  # the routine the block linears use
    assert torch.equal(embedding.lm_head.int_weight(), q)
    assert torch.equal(embedding.weight_scale.half(), scale)
    # lm_head is a QuantizedLinear over the very same Parameters, not a copy
    assert isinstance(model.lm_head, QuantizedLinear) and model.lm_head.bias is None
    assert model.lm_head.weight is embedding.weight and model.lm_head.weight_scale is embedding.weight_scale
    assert model.config.quantization_embeddings is True and model.config.quantization_bit == bits


@pytest.mark.parametrize("bits", [4, 8])
def test_state_dict_has_the_official_int4_qe_keys_dtypes_and_shapes(bits):
    tok, model = load_model(tiny(), device="cpu", quantize=bits, quantize_embeddings=True)  # bfloat16 on CPU
    logits(tok, model)  # the CPU kernels may repack weights in memory; the state dict must not show it
    golden = torch.load(GOLDEN / f"tiny-int{bits}" / "pytorch_model.bin", map_location="cpu", weights_only=True)
    ours = model.state_dict()
    V, H = model.config.vocab_size, model.config.hidden_size
    cols = H // 2 if bits == 4 else H
    changed = {"transformer.word_embeddings.weight", "lm_head.weight"}
    scales = {"transformer.word_embeddings.weight_scale", "lm_head.weight_scale"}
    assert set(ours) == set(golden) | scales
    for key, want in golden.items():  # the rest as in the official chatglm-6b-int4 / -int8
        if key not in changed:
            assert ours[key].shape == want.shape and (ours[key].dtype == torch.int8) == (want.dtype == torch.int8), key
    for key in changed:
        assert ours[key].dtype == torch.int8 and tuple(ours[key].shape) == (V, cols), key
    for key in scales | {k for k in golden if k.endswith("weight_scale")}:
        assert ours[key].dtype == torch.float16 and tuple(ours[key].shape) == (ours[key[:-6]].shape[0],), key
    q, scale = quantize_weight(fp16_embedding(), bits)
    assert torch.equal(ours["transformer.word_embeddings.weight"], q) and torch.equal(ours["lm_head.weight"], q)
    assert torch.equal(ours["transformer.word_embeddings.weight_scale"], scale)


def test_the_embedding_costs_a_quarter_of_a_byte_per_int4_value():
    _, plain = load_model(tiny(), device="cpu", quantize=4)
    _, qe = load_model(tiny(), device="cpu", quantize=4, quantize_embeddings=True)

    def embedding_bytes(model):
        e = model.transformer.word_embeddings
        return sum(t.numel() * t.element_size() for t in e.state_dict().values())
    V, H = qe.config.vocab_size, qe.config.hidden_size
    assert embedding_bytes(plain) == V * H * 2  # bfloat16, shared with lm_head
    assert embedding_bytes(qe) == V * H // 2 + V * 2  # packed INT4 + fp16 scales, shared with lm_head


# ---- outputs ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [4, 8])
def test_logits_equal_a_model_whose_tied_embedding_is_the_dequantized_matrix(bits):
    tok, model = qe_model(bits)
    ref_tok, reference = reference_model(bits)
    torch.testing.assert_close(logits(tok, model), logits(ref_tok, reference), rtol=1e-5, atol=1e-5)
    # and the embedding rows themselves are exactly q * scale, in the model's dtype
    ids = torch.tensor([[0, 5, 1843], [7, 7, 130]])
    rows = model.transformer.word_embeddings(ids)
    assert rows.dtype == torch.float32 and torch.equal(rows, reference.transformer.word_embeddings(ids))


def test_cached_decoding_and_chat_match_the_dequantized_reference():
    tok, model = qe_model(4)
    _, reference = reference_model(4)
    history_q, history_r = [], []
    for query in ("你好", "请介绍一下你自己"):
        reply, history_q = model.chat(tok, query, history_q, do_sample=False, max_length=96)
        want, history_r = reference.chat(tok, query, history_r, do_sample=False, max_length=96)
        assert reply == want
    # one-token steps (the CPU's fused lm_head path) against the reference, teacher-forced
    ids = tok(["你好"], return_tensors="pt")["input_ids"]
    out_q = model.generate(ids, max_new_tokens=12, do_sample=False, output_logits=True, return_dict_in_generate=True)
    out_r = reference.generate(ids, max_new_tokens=12, do_sample=False, output_logits=True,
                               return_dict_in_generate=True)
    assert out_q.sequences.tolist() == out_r.sequences.tolist()
    torch.testing.assert_close(torch.stack(out_q.logits), torch.stack(out_r.logits), rtol=1e-5, atol=1e-4)


def test_bfloat16_model_chats_and_casts_to_float32_after_decoding():
    tok, model = load_model(tiny(), device="cpu", quantize=4, quantize_embeddings=True)
    assert model.transformer.word_embeddings(torch.tensor([[5]])).dtype == torch.bfloat16
    assert isinstance(model.chat(tok, "你好", do_sample=False, max_length=64)[0], str)
    # casting after CPU decoding (which may repack weights in memory) gives the model cast before any decoding
    _, fresh = load_model(tiny(), device="cpu", quantize=4, quantize_embeddings=True)
    fresh.float()
    model.float()
    assert model.transformer.word_embeddings(torch.tensor([[5]])).dtype == torch.float32
    assert torch.equal(model.transformer.word_embeddings.weight, quantize_weight(fp16_embedding(), 4)[0])
    assert model.lm_head.weight is model.transformer.word_embeddings.weight
    assert torch.equal(logits(tok, model), logits(tok, fresh))


# ---- loading and saving -------------------------------------------------------------------------------------------

def test_quantizing_while_loading_equals_quantizing_after_loading():
    # float32 holds the file's fp16 weights exactly (a bfloat16 model would quantize bf16-rounded weights)
    tok, loaded = load_model(tiny(), device="cpu", dtype="float32", quantize=4, quantize_embeddings=True)
    _, after = load_model(tiny(), device="cpu", dtype="float32")
    after.quantize(4, quantize_embeddings=True)
    a, b = loaded.state_dict(), after.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(logits(tok, loaded), logits(tok, after))


def test_the_official_int4_checkpoint_can_have_its_embedding_quantized_while_loading():
    if not (GOLDEN / "tiny-int4").is_dir():
        pytest.skip("golden data absent")
    tok, from_int4 = load_model(str(GOLDEN / "tiny-int4"), device="cpu", dtype="float32", quantize=4,
                                quantize_embeddings=True)
    _, from_fp16 = load_model(tiny(), device="cpu", dtype="float32", quantize=4, quantize_embeddings=True)
    assert isinstance(from_int4.transformer.word_embeddings, QuantizedEmbedding)
    assert torch.equal(logits(tok, from_int4), logits(tok, from_fp16))


def test_save_pretrained_round_trip_keeps_the_format_and_the_logits(tmp_path):
    tok, model = load_model(tiny(), device="cpu", quantize=4, quantize_embeddings=True)  # bfloat16
    before = logits(tok, model)
    reply = model.chat(tok, "你好", do_sample=False, max_length=64)[0]
    assert model.lm_head.weight.dtype == torch.uint8  # repacked in memory for the CPU kernel, shared by the lookups
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["quantization_embeddings"] is True and config["quantization_bit"] == 4
    # the dtype it computes in, not that of the embedding's fp16 scales (its first floating parameter)
    assert model.dtype == torch.bfloat16 and config["dtype"] == "bfloat16"
    import safetensors.torch
    saved = safetensors.torch.load_file(str(tmp_path / "model.safetensors"))
    # like the tied FP16 model, only the embedding's keys are written: lm_head shares them
    assert not any(k.startswith("lm_head.") for k in saved)
    assert torch.equal(saved["transformer.word_embeddings.weight"], quantize_weight(fp16_embedding(), 4)[0])
    assert saved["transformer.word_embeddings.weight_scale"].dtype == torch.float16
    _, reloaded = load_model(str(tmp_path), device="cpu")
    assert reloaded.config.quantization_embeddings is True
    assert isinstance(reloaded.transformer.word_embeddings, QuantizedEmbedding)
    assert reloaded.lm_head.weight is reloaded.transformer.word_embeddings.weight
    assert torch.equal(logits(tok, reloaded), before)
    assert reloaded.chat(tok, "你好", do_sample=False, max_length=64)[0] == reply


def pre_quantized_folder(tmp_path, state_dict, **config_changes):
    folder = tmp_path / "int4-qe"
    folder.mkdir()
    config = json.loads(open(os.path.join(tiny(), "config.json"), encoding="utf-8").read())
    config.update({"quantization_bit": 4, "quantization_embeddings": True, **config_changes})
    (folder / "config.json").write_text(json.dumps(config))
    copy_tokenizer_files(folder)
    torch.save(state_dict, folder / "pytorch_model.bin")
    return folder


def test_files_that_also_hold_lm_head_load_and_must_repeat_the_embedding(tmp_path):
    """An int4-qe file written by torch.save(model.state_dict()) (as upstream's files were) repeats the shared
    tensors under lm_head.*: they load, and they must equal the embedding's."""
    tok, model = qe_model(4)
    sd = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    assert "lm_head.weight" in sd and "lm_head.weight_scale" in sd
    folder = pre_quantized_folder(tmp_path, sd)
    _, loaded = load_model(str(folder), device="cpu", dtype="float32")
    torch.testing.assert_close(logits(tok, loaded), logits(tok, model), rtol=1e-3, atol=1e-3)  # fp16 file
    bad = dict(sd, **{"lm_head.weight": sd["lm_head.weight"].clone()})
    bad["lm_head.weight"][0, 0] += 1
    torch.save(bad, folder / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match=r"lm_head.weight in .* is not transformer.word_embeddings.weight"):
        load_model(str(folder), device="cpu")


def test_config_and_file_that_disagree_about_the_embedding_are_explained(tmp_path):
    _, model = qe_model(4)
    sd = model.state_dict()
    folder = pre_quantized_folder(tmp_path, sd, quantization_embeddings=False)
    with pytest.raises(ModelLoadError, match=r"do not fit its config.json.*transformer.word_embeddings.weight_scale: "
                                             r"the file's embedding is quantized, but config.json does not say "
                                             r"quantization_embeddings: true"):
        load_model(str(folder), device="cpu")
    # and the other way round: config.json says int4-qe, the file's embedding is FP16
    fp16 = torch.load(os.path.join(tiny(), "pytorch_model.bin"), map_location="cpu", weights_only=True)
    sd = dict(sd, **{"transformer.word_embeddings.weight": fp16["transformer.word_embeddings.weight"]})
    del sd["transformer.word_embeddings.weight_scale"]
    torch.save(sd, folder / "pytorch_model.bin")
    (folder / "config.json").write_text(json.dumps(dict(json.loads((folder / "config.json").read_text()),
                                                        quantization_embeddings=True)))
    with pytest.raises(ModelLoadError, match=r"transformer.word_embeddings.weight: file \(1844, 64\) float16, model "
                                             r"\(1844, 32\) int8 \(quantized\)"):
        load_model(str(folder), device="cpu")


def test_quantize_embeddings_needs_bits_and_consistent_bits():
    with pytest.raises(ValueError, match="quantize_embeddings needs quantize=4 or 8"):
        load_model(tiny(), device="cpu", quantize_embeddings=True)
    _, model = qe_model(4)
    embedding = model.transformer.word_embeddings
    assert model.quantize(4, quantize_embeddings=True) is model  # again: nothing changes
    assert model.transformer.word_embeddings is embedding
    with pytest.raises(ValueError, match="already quantized to 4 bits"):
        model.quantize(8, quantize_embeddings=True)


def test_an_untied_lm_head_is_not_quantized_into_the_embedding():
    from chatglm.cpu_pack import unpack
    _, model = load_model(tiny(), device="cpu", dtype="float32")
    unpack(model)  # plain nn.Linear / nn.Embedding layers instead of the oneDNN-packed ones loading gives on CPU
    model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())
    with pytest.raises(ValueError, match="lm_head is not tied"):
        model.quantize(4, quantize_embeddings=True)
    assert type(model.transformer.word_embeddings) is nn.Embedding  # refused before anything changed
    assert type(model.transformer.layers[0].mlp.dense_h_to_4h) is nn.Linear


# ---- P-Tuning -----------------------------------------------------------------------------------------------------

def test_p_tuning_on_a_qe_base_trains_the_prefix_with_the_reference_gradients(tmp_path, dequantized_copy,
                                                                             assert_same_prefix_grads):
    tok, model = load_model(tiny(), device="cpu", pre_seq_len=8)
    model.quantize(4, quantize_embeddings=True).eval()
    dense = dequantized_copy(model)  # the same model with every quantized matrix dequantized (fp32, frozen)
    dense.transformer.word_embeddings = nn.Embedding.from_pretrained(dequantized_reference(fp16_embedding(), 4))
    dense.lm_head = nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=False)
    dense.lm_head.weight = dense.transformer.word_embeddings.weight  # tied, frozen
    ids = torch.tensor([tok.encode("你好") + tok.encode("Hello world", add_special_tokens=False)])
    assert_same_prefix_grads(model, dense, ids)
    assert model.transformer.word_embeddings.weight.grad is None  # frozen
    # a saved qe base loads with a prefix for P-Tuning too
    model.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    _, again = load_model(str(tmp_path / "base"), device="cpu", pre_seq_len=8)
    assert isinstance(again.transformer.word_embeddings, QuantizedEmbedding)
    again.train()
    again(input_ids=ids, labels=ids).loss.backward()
    assert again.transformer.prefix_encoder.embedding.weight.grad is not None


def test_ptuning_main_trains_a_prefix_over_a_qe_base(tmp_path):
    import transformers
    from ptuning.main import main
    tok, model = qe_model(4)
    model.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    rows = [{"content": "你好", "summary": "Hello world"}, {"content": "Hello", "summary": "你好"}]
    (tmp_path / "train.json").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                         encoding="utf-8")
    level = transformers.utils.logging.get_verbosity()
    try:
        main(["--do_train", "--train_file", str(tmp_path / "train.json"), "--prompt_column", "content",
              "--response_column", "summary", "--model_name_or_path", str(tmp_path / "base"),
              "--output_dir", str(tmp_path / "out"), "--max_source_length", "16", "--max_target_length", "16",
              "--per_device_train_batch_size", "2", "--max_steps", "3", "--logging_steps", "1",
              "--learning_rate", "0.1", "--pre_seq_len", "4", "--disable_tqdm", "true", "--log_level", "warning"])
    finally:
        transformers.utils.logging.set_verbosity(level)
        transformers.utils.logging.reset_format()
    checkpoint = tmp_path / "out" / "checkpoint-3"
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    losses = [h["loss"] for h in state["log_history"] if "loss" in h]
    assert len(losses) == 3 and all(loss == loss and loss > 0 for loss in losses)  # finite, not NaN
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["quantization_embeddings"] is True and config["pre_seq_len"] == 4
    import safetensors.torch
    assert list(safetensors.torch.load_file(str(checkpoint / "model.safetensors"))) == [
        "transformer.prefix_encoder.embedding.weight"]


# ---- the front doors ----------------------------------------------------------------------------------------------

def test_cli_option_quantizes_the_embeddings(monkeypatch):
    import argparse
    from chatglm.options import add_model_args, load_from_args
    parser = add_model_args(argparse.ArgumentParser())
    assert "--quantize-embeddings" in parser.format_help() and "0.8 GB" in parser.format_help()
    args = parser.parse_args(["--model-path", tiny(), "--device", "cpu", "--quantize", "4", "--quantize-embeddings"])
    _, model = load_from_args(args)
    assert isinstance(model.transformer.word_embeddings, QuantizedEmbedding)
    args = parser.parse_args(["--model-path", tiny(), "--device", "cpu", "--quantize", "4"])
    assert type(load_from_args(args)[1].transformer.word_embeddings) is not QuantizedEmbedding  # opt-in


@pytest.mark.parametrize("script", ["cli_demo.py", "web_demo.py"])
def test_quantize_embeddings_without_quantize_is_a_clear_error(script):
    out = subprocess.run([sys.executable, script, "--model-path", tiny(), "--quantize-embeddings"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "--quantize-embeddings needs --quantize 4 or 8" in out.stderr and "Traceback" not in out.stderr, out.stderr
