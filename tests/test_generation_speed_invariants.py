"""What makes decoding fast, checked as behaviour (no timings): the KV cache is written in place and gives the same
results as transformers' concatenating cache, and decode steps extend the GLM positions instead of rebuilding them
from the ids. Runs on the demo checkpoint."""
import pytest
import torch
from transformers.cache_utils import DynamicCache

from chatglm.kv_cache import KVCache


@pytest.fixture(scope="module")
def tok_model(demo_model_path):
    from chatglm import load_model
    torch.manual_seed(0)
    return load_model(demo_model_path, device="cpu")


def teacher_forced_logits(model, ids, cont, cache, reorder_at=None, rows=None):
    """Last-token logits of every step: the prompt, then one continuation token per step (generate()'s hooks)."""
    kwargs, out_logits = {"cache": cache}, []
    for k in range(cont.shape[1] + 1):
        inputs = model.prepare_inputs_for_generation(ids, **kwargs)
        with torch.inference_mode():
            out = model(**inputs)
        kwargs = model._update_model_kwargs_for_generation(out, kwargs)
        out_logits.append(out.logits[:, -1])
        if k == reorder_at:  # what beam search does: rows swap their histories
            kwargs["cache"].reorder_cache(rows)
            ids = ids[rows]
        if k < cont.shape[1]:
            ids = torch.cat([ids, cont[:, k:k + 1]], dim=1)
    return torch.stack(out_logits, 1)


def test_in_place_cache_matches_concatenating_cache_through_growth_and_reordering(tok_model):
    tok, model = tok_model
    prompt = tok(["你好，请介绍一下你自己"], return_tensors="pt")["input_ids"]
    ids = torch.cat([prompt, prompt], 0)
    cont = torch.randint(10, 800, (2, 12), generator=torch.Generator().manual_seed(1))
    rows = torch.tensor([1, 0])
    want = teacher_forced_logits(model, ids, cont, DynamicCache(config=model.config), reorder_at=4, rows=rows)
    # a capacity hint of prompt + 2 forces the buffers to grow (copying what they hold) during the run
    cache = KVCache(model.config, max_length=ids.shape[1] + 2)
    got = teacher_forced_logits(model, ids, cont, cache, reorder_at=4, rows=rows)
    assert cache.get_seq_length() == ids.shape[1] + cont.shape[1]
    assert cache.layers[0]._k.shape[2] >= cache.get_seq_length() > ids.shape[1] + 2
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    # the rows really were swapped (a no-op reorder would have passed the comparison above vacuously)
    assert not torch.allclose(want[0, 5:], want[1, 5:])


def test_generation_writes_one_buffer_in_place(tok_model):
    tok, model = tok_model
    inputs = tok(["写一首诗"], return_tensors="pt")
    cache = KVCache(model.config, max_length=inputs["input_ids"].shape[1] + 20)
    buffers = []
    hook = model.transformer.layers[0].register_forward_hook(
        lambda mod, args, out: buffers.append((cache.layers[0]._k.data_ptr(), cache.get_seq_length())))
    try:
        out = model.generate(**inputs, cache=cache, max_new_tokens=20, min_new_tokens=20, do_sample=False)
    finally:
        hook.remove()
    assert out.shape[1] == inputs["input_ids"].shape[1] + 20
    assert len(buffers) == 20  # one forward per token, each appending to the same storage
    assert len({ptr for ptr, _ in buffers}) == 1
    assert [n for _, n in buffers] == list(range(inputs["input_ids"].shape[1], out.shape[1]))


def test_engine_decoding_extends_positions_without_rereading_the_ids(tok_model, monkeypatch):
    """Positions come from the ids once per sequence (a host sync); each step then adds one to the block position.
    The positions fed to the model must equal what the GLM rule gives for the whole sequence so far."""
    tok, model = tok_model
    calls = []
    real = model.transformer.context_lengths
    monkeypatch.setattr(model.transformer, "context_lengths", lambda ids: calls.append(1) or real(ids))
    fed = []
    def inputs(module, args, kw):  # the engine's prefill passes keywords; the model's forward passes positions
        fed.append((kw["input_ids"], kw["position_ids"]) if "input_ids" in kw else args[:2])
    hook = model.transformer.register_forward_pre_hook(inputs, with_kwargs=True)
    counts = {}
    try:
        for n in (3, 16):
            calls.clear()
            fed.clear()
            *_, (reply, _) = model.stream_chat(tok, "你好", max_new_tokens=n, do_sample=False)
            counts[n] = len(calls)
            ids = torch.cat([kw_ids for kw_ids, _ in fed], dim=1)  # the prompt, then each fed token
            whole = model.transformer.build_position_ids(ids)
            for step, (_, pos) in enumerate(fed[1:], start=1):
                at = fed[0][0].shape[1] + step - 1  # forward i feeds the token at P + i - 1
                assert pos.tolist() == whole[..., at:at + 1].tolist(), step
    finally:
        hook.remove()
    assert len(fed) >= 2
    assert counts[3] == counts[16] <= 2  # per sequence (positions, mask), not per token


def test_single_query_attention_in_16_bits_agrees_with_sdpa_on_cache_views_and_masks():
    """A decoding step in bf16/fp16 on CPU skips SDPA (slow for one query) for two matmuls and an fp32 softmax; it must
    give SDPA's float32 result to 16-bit precision, on keys/values that are views of a bigger cache buffer, with the
    left-padding mask applied."""
    from chatglm.modeling import attention
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 1, 16, generator=g)
    k_buf, v_buf = torch.randn(2, 4, 48, 16, generator=g), torch.randn(2, 4, 48, 16, generator=g)
    k, v = k_buf[:, :, :33], v_buf[:, :, :33]
    mask = torch.zeros(2, 1, 1, 33, dtype=torch.bool)
    mask[1, ..., :20] = True  # row 1 is left-padded: its first 20 keys are hidden
    reference = attention(q, k, v, mask, 3)  # float32: the SDPA path
    unmasked = attention(q, k, v, None, 3)
    assert (reference[1] - unmasked[1]).abs().max() > 0.1  # the mask matters for this check
    for dtype in (torch.bfloat16, torch.float16):
        got = attention(q.to(dtype), k.to(dtype), v.to(dtype), mask, 3)
        assert got.dtype == dtype and got.shape == reference.shape
        assert (got.float() - reference).abs().max() < 3e-2
