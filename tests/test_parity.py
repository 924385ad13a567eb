"""Parity with the ORIGINAL ChatGLM-6B implementation, on the golden tiny checkpoints (tests/golden).

Token ids, strings, positions and masks must match exactly; logits within 1e-3 (the golden README's bar, ~25x
the fp32 noise), losses within 1e-4, grad norms within 1e-4 relative.
"""
import numpy as np
import pytest
import torch

from conftest import GOLDEN, load_golden, replay_cached_steps

LOGIT_TOL = 1e-3
BASE_AND_PTUNING = ["tiny", "tiny-ptuning", "tiny-ptuning-proj"]

_models = {}


def golden_model(name):
    """(tokenizer, model) for a golden folder, loaded the way users load it here; cached per test session."""
    if name not in _models:
        from chatglm import load_model
        torch.set_num_threads(2)
        if name.startswith("tiny-ptuning"):
            _models[name] = load_model(str(GOLDEN / "tiny"), ptuning_checkpoint=str(GOLDEN / name), device="cpu")
        else:
            _models[name] = load_model(str(GOLDEN / name), device="cpu")
    return _models[name]


def case_ids(name, section):
    g, _ = load_golden(name)
    return [c["name"] for c in g[section]]


def get_case(name, section, case):
    g, arrays = load_golden(name)
    return next(c for c in g[section] if c["name"] == case), arrays


def glm_inputs(case, arrays, tok=None):
    kw = {"input_ids": torch.tensor(case["input_ids"])}
    if "attention_mask" in case["inputs_given"]:
        if "attention_mask_key" in case:
            kw["attention_mask"] = torch.from_numpy(arrays[case["attention_mask_key"]])
            kw["position_ids"] = torch.tensor(case["position_ids"])
        else:  # the tokenizer's padding of the same rows (the golden stores only the ids)
            rows = []
            for row in case["input_ids"]:
                start = next(i for i, t in enumerate(row) if t != tok.pad_token_id)
                rows.append(row[start:])
            enc = tok._pad_with_glm_inputs(rows, len(case["input_ids"][0]))
            assert enc["input_ids"] == case["input_ids"]
            kw["attention_mask"] = torch.from_numpy(enc["attention_mask"])
            kw["position_ids"] = torch.from_numpy(enc["position_ids"])
    return kw


# ---- tokenizer ----------------------------------------------------------------------------------------------------

def test_tokenizer_cases_match_original_exactly():
    g, _ = load_golden("tiny")
    tok, _ = golden_model("tiny")
    for c in g["tokenizer"]["cases"]:
        t = c["text"]
        assert tok.tokenize(t) == c["tokenize"], c["name"]
        assert tok.encode(t) == c["encode"], c["name"]
        assert tok.encode(t, add_special_tokens=False) == c["encode_no_special"], c["name"]
        assert dict(tok(t)) == c["call"], c["name"]
        assert sorted(tok([t], return_tensors="pt").keys()) == c["call_batch1_pt_keys"], c["name"]
        assert tok.convert_ids_to_tokens(c["encode"]) == c["convert_ids_to_tokens"], c["name"]
        assert tok.decode(c["encode"]) == c["decode"], c["name"]
        assert tok.decode(c["encode"], skip_special_tokens=True) == c["decode_skip_special"], c["name"]
        assert tok.decode(c["encode_no_special"]) == c["decode_no_special_ids"], c["name"]


def test_tokenizer_batches_pad_left_with_glm_positions_and_masks():
    g, arrays = load_golden("tiny")
    tok, _ = golden_model("tiny")
    for c in g["tokenizer"]["batch"]:
        out = tok(c["texts"], return_tensors="np", **c["kwargs"])
        assert sorted(out.keys()) == c["keys"], c["name"]
        assert out["input_ids"].tolist() == c["input_ids"], c["name"]
        assert out["position_ids"].tolist() == c["position_ids"], c["name"]
        assert out["attention_mask"].dtype == np.bool_
        np.testing.assert_array_equal(out["attention_mask"], arrays[c["attention_mask_key"]], err_msg=c["name"])


def test_tokenizer_pairs_decode_and_attributes():
    g, _ = load_golden("tiny")
    tok, _ = golden_model("tiny")
    for c in g["tokenizer"]["pair"]:
        assert tok(c["text"], c["text_pair"])["input_ids"] == c["call"]["input_ids"]
        a = tok.encode(c["text"], add_special_tokens=False)
        b = tok.encode(c["text_pair"], add_special_tokens=False)
        assert tok.build_inputs_with_special_tokens(a, b) == c["build_inputs_with_special_tokens"]
    for c in g["tokenizer"]["decode"]:
        assert tok.decode(c["ids"]) == c["decode"], c["name"]
        assert tok.decode(c["ids"], skip_special_tokens=True) == c["decode_skip_special"], c["name"]
        assert tok.decode(c["ids"], clean_up_tokenization_spaces=False) == c["decode_no_cleanup"], c["name"]
    for attr, value in g["meta"]["tokenizer_attrs"].items():
        if attr != "clean_up_tokenization_spaces_default":
            assert getattr(tok, attr) == value, attr


# ---- forward ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", BASE_AND_PTUNING)
def test_forward_logits_match_original(name):
    g, arrays = load_golden(name)
    _, model = golden_model(name)
    for c in g["forward"]:
        with torch.no_grad():
            logits = model(**glm_inputs(c, arrays)).logits
        diff = np.abs(logits.numpy() - arrays[c["logits_key"]]).max()
        assert diff <= LOGIT_TOL, f"{name}/{c['name']}: max |Δlogit| {diff}"
        assert logits.argmax(-1).tolist() == c["argmax"], c["name"]


def test_model_builds_the_original_masks_and_positions():
    g, arrays = load_golden("tiny")
    _, model = golden_model("tiny")
    for c in g["forward"]:
        if c["inputs_given"] == ["input_ids"]:
            ids = torch.tensor(c["input_ids"])
            assert model.transformer.build_position_ids(ids).tolist() == c["position_ids"], c["name"]
            np.testing.assert_array_equal(model.transformer.build_mask(ids).numpy(), arrays[c["attention_mask_key"]])


# ---- cached decoding ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", BASE_AND_PTUNING)
def test_cached_decoding_matches_original_step_by_step(name):
    """Teacher-forced decoding through our generate hooks: same inputs per step, same logits."""
    g, arrays = load_golden(name)
    _, model = golden_model(name)
    for c in g["cache"]:
        def check_step(k, inputs, cache, c=c):
            step = c["steps"][k]
            assert inputs["input_ids"].tolist() == step["input_ids"], (c["name"], k)
            if k > 0:
                assert inputs["position_ids"].tolist() == step["position_ids"], (c["name"], k)
                got_mask = inputs["attention_mask"]
                want = step["attention_mask"]
                assert (got_mask is None) == (want is None), (c["name"], k)
                if want is not None:
                    assert got_mask.int().tolist() == want  # 1 = blocked, (c["name"], k)
            assert cache.get_seq_length() == step["past_len"], (c["name"], k)
        got = replay_cached_steps(model, c, check_step)
        diff = np.abs(got - arrays[c["step_logits_key"]]).max()
        assert diff <= LOGIT_TOL, f"{name}/{c['name']}: step logits max |Δ| {diff}"


# ---- generation ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", BASE_AND_PTUNING)
def test_generate_greedy_matches_original(name):
    check_generate(name, "greedy")


@pytest.mark.parametrize("name", BASE_AND_PTUNING)
def test_generate_beam_search_matches_original(name):
    check_generate(name, "beam")


def check_generate(name, kind):
    g, arrays = load_golden(name)
    tok, model = golden_model(name)
    for c in g["generate"]:
        if not c["name"].startswith(kind):
            continue
        kwargs = glm_inputs(c, arrays, tok)
        out = model.generate(**kwargs, **c["generate_kwargs"], output_scores=False)
        assert out.tolist() == c["output_ids"], f"{name}/{c['name']}"
        n = len(c["input_ids"][0])
        assert tok.batch_decode(out[:, n:], skip_special_tokens=True) == c["new_text_batch_decode_skip_special"]
        if "sequences_scores" in c and c["sequences_scores"] is not None:
            res = model.generate(**kwargs, **c["generate_kwargs"], return_dict_in_generate=True, output_scores=True)
            np.testing.assert_allclose(res.sequences_scores.numpy(), c["sequences_scores"], atol=1e-4)


# ---- chat ---------------------------------------------------------------------------------------------------------

def test_chat_prompts_match_original():
    from chatglm import build_prompt
    g, _ = load_golden("tiny")
    tok, _ = golden_model("tiny")
    for c in g["chat"]["prompts"]:
        prompt = build_prompt(c["query"], [tuple(h) for h in c["history"]])
        assert prompt == c["prompt"]
        assert tok([prompt])["input_ids"][0] == c["prompt_input_ids"]


@pytest.mark.parametrize("name", BASE_AND_PTUNING)
def test_chat_conversation_matches_original(name):
    g, _ = load_golden(name)
    tok, model = golden_model(name)
    history = []
    for turn in g["chat"]["conversation"]["turns"]:
        assert [list(h) for h in history] == turn["history_in"]
        response, history = model.chat(tok, turn["query"], history, **turn["chat_kwargs"])
        assert response == turn["response"], f"{name}: {turn['query']}"
        assert [list(h) for h in history] == turn["history_out"]
    if "beam" in g["chat"]:
        c = g["chat"]["beam"]
        assert model.chat(tok, c["query"], c["history_in"], **c["chat_kwargs"])[0] == c["response"]


@pytest.mark.parametrize("name", BASE_AND_PTUNING)
def test_stream_chat_yields_the_original_sequence_then_the_complete_reply(name):
    g, _ = load_golden(name)
    tok, model = golden_model(name)
    history = []
    chats = g["chat"]["conversation"]["turns"]
    for turn, chat_turn in zip(g["chat"]["stream_conversation"]["turns"], chats):
        yields = list(model.stream_chat(tok, turn["query"], history, **turn["stream_kwargs"]))
        want = [(y["response"], [tuple(h) for h in y["history"]]) for y in turn["yields"]]
        assert yields[:turn["n_yields"]] == want, f"{name}: {turn['query']}"
        # our one deliberate difference: the last yield is always what chat() returns
        assert yields[-1][0] == chat_turn["response"]
        assert len(yields) - turn["n_yields"] in (0, 1)
        history = yields[-1][1]
    stop = g["chat"]["max_length_stop"]
    yields = list(model.stream_chat(tok, stop["stream"]["query"], [], **stop["stream"]["stream_kwargs"]))
    assert [y[0] for y in yields[:stop["stream"]["n_yields"]]] == [y["response"] for y in stop["stream"]["yields"]]
    assert yields[-1][0] == stop["chat"]["response"]
    extra = 1 if stop["chat"]["response"] != stop["stream"]["final_response"] else 0
    assert len(yields) == stop["stream"]["n_yields"] + extra
    assert model.chat(tok, stop["chat"]["query"], [], **stop["chat"]["chat_kwargs"])[0] == stop["chat"]["response"]


def test_process_response_and_invalid_score_guard_match_original():
    from chatglm.chat import InvalidScoreLogitsProcessor, process_response
    g, _ = load_golden("tiny")
    for c in g["chat"]["process_response"]:
        assert process_response(c["input"]) == c["output"], c["input"]
    for c in g["chat"]["invalid_score_logits_processor"]:
        scores = torch.tensor([[float(x) for x in row] for row in c["scores_in"]])
        assert InvalidScoreLogitsProcessor()(None, scores).tolist() == c["scores_out"]


# ---- training -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", BASE_AND_PTUNING)
def test_training_loss_and_gradients_match_original(name):
    g, arrays = load_golden(name)
    _, model = golden_model(name)
    t = g["training"]
    ids = torch.tensor([e["input_ids"] for e in t["examples"]])
    labels = torch.tensor([e["labels"] for e in t["examples"]])
    with torch.no_grad():
        out = model(input_ids=ids, labels=labels)
    assert abs(out.loss.item() - t["loss_eval_no_grad"]) <= 1e-4
    assert np.abs(out.logits.numpy() - arrays[t["logits_key"]]).max() <= LOGIT_TOL
    # a model loaded for CPU inference holds its weights packed for oneDNN, not as Parameters: unpack them as
    # model.train() would (train mode itself would turn on P-Tuning's prefix dropout; the golden grads are eval's)
    from chatglm.cpu_pack import unpack
    unpack(model)
    model.zero_grad()
    loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    params = dict(model.named_parameters())
    for pname, norm in t["grad_norms"].items():
        got = params[pname].grad.double().norm().item()
        assert got == pytest.approx(norm, rel=1e-4), pname
    if "trainable_parameters" in t:
        assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == sorted(t["trainable_parameters"])
    if "loss_train_mode_gradient_checkpointing" in t:
        model.zero_grad()
        model.gradient_checkpointing_enable()
        model.train()
        try:
            loss = model(input_ids=ids, labels=labels).loss
            loss.backward()
        finally:
            model.gradient_checkpointing_disable()
            model.eval()
        assert abs(loss.item() - t["loss_train_mode_gradient_checkpointing"]) <= 1e-4
        for pname, norm in t["grad_norms_gradient_checkpointing"].items():
            assert params[pname].grad.double().norm().item() == pytest.approx(norm, rel=1e-4), pname
    model.zero_grad(set_to_none=True)
