"""The decode engine (chatglm/engine.py): every sequence of a batch gets exactly the tokens it gets alone, whatever
joins or leaves around it; cancelling frees the cache; the KV budget makes a request wait, then run."""
import pytest
import torch
from transformers import (LogitsProcessorList, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                          TopKLogitsWarper, TopPLogitsWarper)

from conftest import GOLDEN
from chatglm.engine import Engine, Sequence
from chatglm.sampling import Sampler
from chatglm.text import IncrementalDecoder, build_prompt
from chatglm.validation import GenerationOptions

QUERIES = ["你好", "写一首关于春天的诗，要长一些", "hello",
           "What is the capital of France? Explain in detail, with history and numbers, please."]
GREEDY = GenerationOptions(do_sample=False, max_length=200, max_new_tokens=24)
UNLIMITED = 1 << 62  # bytes: no KV budget
_models = {}


def model_named(name):
    """(tokenizer, model) of a golden tiny checkpoint in float32 (P-Tuning: tiny plus its prefix)."""
    from chatglm import load_model
    if not (GOLDEN / name).is_dir():
        pytest.skip(f"golden folder {GOLDEN / name} not found")
    if name not in _models:
        if name.startswith("tiny-ptuning"):
            _models[name] = load_model(str(GOLDEN / "tiny"), ptuning_checkpoint=str(GOLDEN / name), device="cpu")
        else:
            _models[name] = load_model(str(GOLDEN / name), device="cpu")
    return _models[name]


def sequence(tok, model, query, options=GREEDY):
    return Sequence(tok.encode(build_prompt(query)), options, tok, model.config)


def run_alone(tok, model, query, options=GREEDY):
    engine = Engine(model, kv_budget=UNLIMITED)
    seq = sequence(tok, model, query, options)
    engine.add(seq)
    while not seq.finished:
        engine.step()
    return seq


def reply_ids(seq):
    return seq.ids[seq.n_prompt:]


@pytest.mark.parametrize("name", ["tiny", "tiny-ptuning-proj", "tiny-int4", "tiny-int8"])
def test_every_row_of_a_batch_gets_the_tokens_it_gets_alone(name):
    tok, model = model_named(name)
    sampled = GREEDY.with_(do_sample=True, temperature=0.9, top_p=0.8, seed=1234)
    cases = [(q, GREEDY) for q in QUERIES] + [(QUERIES[1], sampled)]
    alone = [run_alone(tok, model, q, o) for q, o in cases]
    engine = Engine(model, kv_budget=UNLIMITED)
    together, widest = [], 0
    for i, (q, o) in enumerate(cases):  # each joins while the others are mid-reply, after 1 or 2 steps
        together.append(sequence(tok, model, q, o))
        engine.add(together[-1])
        for _ in range(1 + i % 2):
            engine.step()
            widest = max(widest, len(engine.running))
    while not engine.idle:
        engine.step()
    assert widest >= 3  # they really ran side by side
    for a, b in zip(alone, together):
        assert reply_ids(b) == reply_ids(a)
        assert (b.response, b.finish_reason) == (a.response, a.finish_reason)
    assert len({tuple(reply_ids(s)) for s in alone}) >= 3  # different replies, so a mix-up would show


@pytest.mark.parametrize("name", ["tiny", "tiny-ptuning-proj", "tiny-int4"])
def test_prompts_arriving_together_are_prefilled_in_one_pass_and_each_gets_its_tokens(name):
    """Newcomers of one step share one prefill (their prompts end to end, each attending over its own cache):
    the model runs once for all of them, and every reply is the one it gets alone."""
    tok, model = model_named(name)
    sampled = GREEDY.with_(do_sample=True, temperature=0.9, top_p=0.8, seed=99)
    cases = [(q, GREEDY) for q in QUERIES] + [(QUERIES[0], sampled)]
    alone = [run_alone(tok, model, q, o) for q, o in cases]
    calls = []
    hook = model.transformer.register_forward_pre_hook(lambda mod, args: calls.append(1))
    try:
        engine = Engine(model, kv_budget=UNLIMITED)
        together = [sequence(tok, model, q, o) for q, o in cases]
        for seq in together:
            engine.add(seq)
        engine.step()
        # one forward pass prefilled all five: each has its first token
        assert len(calls) == 1 and not engine.waiting and all(len(s.ids) == s.n_prompt + 1 for s in together)
        while not engine.idle:
            engine.step()
    finally:
        hook.remove()
    for a, b in zip(alone, together):
        assert reply_ids(b) == reply_ids(a)
        assert (b.response, b.finish_reason) == (a.response, a.finish_reason)


def test_a_step_packs_newcomers_only_up_to_pack_tokens(monkeypatch):
    from chatglm import engine as engine_module
    tok, model = model_named("tiny")
    seqs = [sequence(tok, model, q) for q in QUERIES]
    sizes = [len(s.ids) for s in seqs]
    monkeypatch.setattr(engine_module, "PACK_TOKENS", sizes[0] + sizes[1])
    engine = Engine(model, kv_budget=UNLIMITED)
    for seq in seqs:
        engine.add(seq)
    engine.step()
    assert list(engine.waiting) == seqs[2:] and all(len(s.ids) == s.n_prompt + 1 for s in seqs[:2])
    monkeypatch.setattr(engine_module, "PACK_TOKENS", 1)  # a prompt longer than the limit still goes (alone)
    engine.step()
    assert list(engine.waiting) == seqs[3:]


@pytest.mark.parametrize("quantize", [None, 4])
def test_bf16_batched_logits_stay_within_1e_2_of_single(quantize):
    from chatglm import load_model
    if not (GOLDEN / "tiny").is_dir():
        pytest.skip("golden folder not found")
    tok, model = load_model(str(GOLDEN / "tiny"), device="cpu", dtype=torch.bfloat16, quantize=quantize)

    def recorded(seq):
        seq.scores = []
        sample = seq.sampler.__call__
        seq.sampler = lambda scores, ids=None: seq.scores.append(scores.clone()) or sample(scores, ids)
        seq.sampler.observe, seq.sampler.needs_ids = (lambda t: None), False
        return seq

    alone = []
    for q in QUERIES:
        engine, seq = Engine(model, kv_budget=UNLIMITED), recorded(sequence(tok, model, q))
        engine.add(seq)
        while not seq.finished:
            engine.step()
        alone.append(seq)
    engine = Engine(model, kv_budget=UNLIMITED)
    together = [recorded(sequence(tok, model, q)) for q in QUERIES]
    for seq in together:
        engine.add(seq)
    while not engine.idle:
        engine.step()
    compared = 0
    for a, b in zip(alone, together):
        for step, (sa, sb) in enumerate(zip(a.scores, b.scores)):
            assert (sa - sb).abs().max().item() <= 1e-2, step
            compared += 1
            if a.ids[a.n_prompt + step] != b.ids[b.n_prompt + step]:
                break  # a different token: the sequences no longer see the same inputs
    assert compared >= 3 * len(QUERIES)


def test_cancelling_a_sequence_frees_its_cache_and_the_others_go_on():
    tok, model = model_named("tiny")
    engine = Engine(model, kv_budget=UNLIMITED)
    keep, drop = sequence(tok, model, QUERIES[1]), sequence(tok, model, QUERIES[3])
    engine.add(keep)
    engine.add(drop)
    for _ in range(4):
        engine.step()
    before = engine.reserved
    drop.cancelled = True
    changed = engine.step()
    assert drop in changed and drop.finish_reason == "cancelled" and drop.cache is None
    assert drop not in engine.running and engine.reserved == before - drop.cache_tokens * engine.bytes_per_token
    while not engine.idle:
        engine.step()
    assert reply_ids(keep) == reply_ids(run_alone(tok, model, QUERIES[1]))


def test_a_request_beyond_the_kv_budget_waits_then_runs_first_come_first_served():
    tok, model = model_named("tiny")
    first, second, third = (sequence(tok, model, q) for q in QUERIES[:3])
    # room for the largest of them, so never for two at once
    engine = Engine(model, kv_budget=max(s.cache_tokens for s in (first, second, third)) * kv_per_token(model))
    for seq in (first, second, third):
        engine.add(seq)
    while not first.finished:
        engine.step()
        assert second.cache is None and len(second.ids) == second.n_prompt  # waited, not started
    engine.step()
    assert len(second.ids) == second.n_prompt + 1 and len(third.ids) == third.n_prompt  # next in line ran
    while not engine.idle:
        engine.step()
        assert engine.reserved <= engine.kv_budget
    for seq, q in zip((first, second, third), QUERIES):
        assert reply_ids(seq) == reply_ids(run_alone(tok, model, q))


def kv_per_token(model):
    c = model.config
    return 2 * c.num_layers * c.hidden_size * 4  # float32 keys and values of every layer


def test_bytes_per_token_and_default_budget_are_stated():
    tok, model = model_named("tiny")
    engine = Engine(model)
    assert engine.bytes_per_token == kv_per_token(model)
    assert 0 < engine.kv_budget


def test_decode_positions_follow_the_glm_rule_for_the_whole_sequence():
    """The positions fed per step equal what the model's rule gives for the whole sequence so far."""
    tok, model = model_named("tiny")
    fed = []
    def positions(module, args, kw):  # the engine's prefill passes keywords, the model's forward positions
        fed.append(kw["position_ids"] if "position_ids" in kw else args[1])
    hook = model.transformer.register_forward_pre_hook(positions, with_kwargs=True)
    try:
        engine = Engine(model, kv_budget=UNLIMITED)
        seqs = [sequence(tok, model, q) for q in (QUERIES[1], QUERIES[3])]  # both reply with 24 tokens
        engine.add(seqs[0])
        engine.step()
        engine.add(seqs[1])  # one step later: prefilled alone, then one token behind the first
        while not engine.idle:
            engine.step()
    finally:
        hook.remove()
    assert len(reply_ids(seqs[0])) == 24 and len(reply_ids(seqs[1])) >= 8  # the first is row 0 throughout
    whole = [model.transformer.build_position_ids(torch.tensor([s.ids]))[0] for s in seqs]
    prefills, decodes = [p for p in fed if p.shape[-1] > 1], [p for p in fed if p.shape[-1] == 1]
    assert [p[0].tolist() for p in prefills] == [w[:, :s.n_prompt].tolist() for w, s in zip(whole, seqs)]
    # step 2 decodes the first sequence alone; from step 3 on both rows, the second one token behind
    for j, step in enumerate(decodes):
        for row, (w, s) in enumerate(zip(whole, seqs)):
            at = s.n_prompt + j - row
            if row < step.shape[0]:
                assert step[row].tolist() == w[:, at:at + 1].tolist(), (j, row)
    assert [p.shape[0] for p in decodes[:3]] == [1, 2, 2]


def test_incremental_decoding_equals_decoding_the_whole_reply():
    tok, _ = model_named("tiny")
    text = "你好 hello world, 这是 a test .  tabs\t\tand\nnewlines 😀 ÿ café , don 't ; ok ?" * 3
    ids = tok.encode(text, add_special_tokens=False)
    decoder = IncrementalDecoder(tok)
    for i, token in enumerate(ids):
        assert decoder.add(token) == tok.decode(ids[:i + 1]), i


def test_sampler_computes_what_transformers_processors_compute():
    """Repetition penalty, then temperature, top-k, top-p, then a draw: the original generate()'s order."""
    o = GenerationOptions(temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.3, seed=7)
    ids = torch.tensor([[3, 5, 5, 9]])
    scores = torch.randn(1, 100, generator=torch.Generator().manual_seed(0))
    chain = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.3), TemperatureLogitsWarper(0.7),
                                 TopKLogitsWarper(20), TopPLogitsWarper(0.8)])
    g = torch.Generator().manual_seed(7)
    want = [int(torch.multinomial(chain(ids, scores.clone()).softmax(-1), 1, generator=g)) for _ in range(20)]
    sampler = Sampler(o)
    assert [sampler(scores.clone(), ids) for _ in range(20)] == want
    assert len(set(want)) > 1


def test_sampler_penalties_and_logit_bias():
    scores = torch.zeros(1, 10)
    scores[0, 2] = 1.0
    assert Sampler(GenerationOptions(do_sample=False, logit_bias=((7, 5.0),)))(scores) == 7
    assert Sampler(GenerationOptions(do_sample=False, logit_bias=((2, -100.0),)))(scores) != 2
    s = Sampler(GenerationOptions(do_sample=False, frequency_penalty=0.6))
    assert s(scores) == 2
    s.observe(2)
    assert s(scores) == 2  # 1.0 - 0.6 > 0
    s.observe(2)
    assert s(scores) != 2  # 1.0 - 1.2 < 0
    p = Sampler(GenerationOptions(do_sample=False, presence_penalty=1.5))
    p(scores)
    p.observe(2)
    assert p(scores) != 2
    nan = torch.full((1, 10), float("nan"))
    assert Sampler(GenerationOptions(do_sample=False))(nan) == 5  # the original's invalid-score fallback
