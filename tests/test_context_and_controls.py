"""Long conversations stay inside the context; generation controls (stop strings, penalties) are validated."""
import pytest

from chatglm import build_prompt, load_model
from chatglm.context import ContextTooLongError, fit_history, prompt_length


@pytest.fixture(scope="module")
def demo(demo_model_path):
    return load_model(demo_model_path, device="cpu")


def test_oldest_turns_are_dropped_never_the_query(demo):
    tok, _ = demo
    history = [(f"第{i}个问题", f"第{i}个回答") for i in range(40)]
    kept, dropped = fit_history(tok, "最新的问题", history, max_length=256, max_sequence_length=2048)
    assert dropped > 0 and kept and kept == history[dropped:]
    assert prompt_length(tok, "最新的问题", kept) <= 256 - 64
    assert build_prompt("最新的问题", kept).endswith("问：最新的问题\n答：")
    kept_all, none_dropped = fit_history(tok, "hi", history[:1], max_length=2048, max_sequence_length=2048)
    assert none_dropped == 0 and kept_all == history[:1]


def test_a_query_that_alone_does_not_fit_is_refused_with_its_length_and_the_limit(demo):
    tok, _ = demo
    with pytest.raises(ContextTooLongError, match=r"is \d+ tokens long, but the limit .* is 64 tokens"):
        fit_history(tok, "很长的问题" * 100, [], max_length=64, max_sequence_length=2048)


def test_fifty_turn_conversation_keeps_prompt_bounded_and_replies_coming(demo):
    tok, model = demo
    history, lengths, replies = [], [], 0
    for turn in range(50):
        query = f"第{turn}轮：请继续讲这个故事，再多说一些细节。"
        history, _ = fit_history(tok, query, history, max_length=192, max_sequence_length=2048)
        lengths.append(prompt_length(tok, query, history))
        response, history = model.chat(tok, query, history, max_length=192, top_p=0.9, temperature=0.9)
        replies += isinstance(response, str)
    assert replies == 50
    assert max(lengths) <= 192 - 48  # the prompt never grows past its budget, so memory per turn stays flat


def test_stop_strings_cut_the_reply(demo):
    tok, model = demo
    full, _ = model.chat(tok, "Hello, who are you?", do_sample=False, max_length=96)
    assert len(full) > 4
    stop = full[len(full) // 2:len(full) // 2 + 2]
    cut, history = model.chat(tok, "Hello, who are you?", do_sample=False, max_length=96, stop=[stop])
    assert stop not in cut and full.startswith(cut) and history[-1] == ("Hello, who are you?", cut)
    streamed = [r for r, _ in model.stream_chat(tok, "Hello, who are you?", do_sample=False, max_length=96,
                                                  stop=[stop])]
    assert streamed[-1] == cut and all(stop not in r for r in streamed)


def test_repetition_penalty_and_top_k_change_decoding(demo):
    tok, model = demo
    plain, _ = model.chat(tok, "Numbers:", do_sample=False, max_length=128)
    penalised, _ = model.chat(tok, "Numbers:", do_sample=False, max_length=128, repetition_penalty=5.0)
    assert plain != penalised
    streamed = list(model.stream_chat(tok, "Numbers:", do_sample=False, max_length=128, repetition_penalty=5.0))
    assert streamed[-1][0] == penalised  # both paths apply the same penalty
    assert model.chat(tok, "Numbers:", max_length=128, top_k=1)[0] == plain  # top_k=1 sampling is greedy
    assert list(model.stream_chat(tok, "Numbers:", max_length=128, top_k=1))[-1][0] == plain


@pytest.mark.parametrize("bad, message", [
    (dict(top_p=0.0), "top_p must be in"), (dict(top_p=1.5), "top_p must be in"),
    (dict(temperature=-1.0), "temperature must be"), (dict(top_k=-3), "top_k must be"),
    (dict(repetition_penalty=0.0), "repetition_penalty must be"), (dict(max_length=0), "max_length must be"),
])
def test_invalid_generation_arguments_are_refused_clearly(demo, bad, message):
    tok, model = demo
    with pytest.raises(ValueError, match=message):
        model.chat(tok, "hi", **bad)
    with pytest.raises(ValueError, match=message):
        next(model.stream_chat(tok, "hi", **bad))


def test_temperature_zero_means_greedy(demo):
    tok, model = demo
    greedy, _ = model.chat(tok, "你好", do_sample=False, max_length=64)
    assert model.chat(tok, "你好", temperature=0.0, max_length=64)[0] == greedy
    assert list(model.stream_chat(tok, "你好", temperature=0.0, max_length=64))[-1][0] == greedy
