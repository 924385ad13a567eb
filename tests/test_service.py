"""The model service (chatglm/service.py) on the demo checkpoint: replies stream side by side, each equal to what
it is alone; cancel, queue limit, seeds, bad input and shutdown behave as the front doors rely on."""
import asyncio
import os
import threading
import time

import pytest
import torch

from chatglm import openmp
from chatglm.service import ModelService, QueueFull
from chatglm.validation import GenerationOptions, InputError

LONG = GenerationOptions(do_sample=False, max_new_tokens=48, max_length=2048)


@pytest.fixture(scope="module")
def tok_model(demo_model_path):
    from chatglm import load_model
    return load_model(demo_model_path, device="cpu")


@pytest.fixture
def service(tok_model):
    tok, model = tok_model
    svc = ModelService(model, tok, max_queue=8)
    yield svc
    svc.close()


def timed(reply):
    """[(seconds, delta)] of a reply, read on its own thread."""
    out = []
    thread = threading.Thread(target=lambda: out.extend((time.monotonic(), d) for d in reply))
    thread.start()
    return out, thread


def test_two_replies_stream_at_the_same_time_and_equal_their_answers_alone(service, tok_model):
    tok, model = tok_model
    queries = ["写一篇很长的文章", "讲一个故事"]
    alone = [model.chat(tok, q, do_sample=False, max_new_tokens=48)[0] for q in queries]
    replies = [service.submit(q, options=LONG) for q in queries]
    runs = [timed(r) for r in replies]
    for _, thread in runs:
        thread.join(120)
    (a, _), (b, _) = runs
    assert [r.result.response for r in replies] == alone
    assert ["".join(d for _, d in run) for run, _ in runs] == alone  # the deltas add up to the reply
    assert len(a) > 3 and len(b) > 3
    # both grew during the same second: deltas of each arrive between the other's first and last
    assert any(a[0][0] <= t <= a[-1][0] for t, _ in b) and any(b[0][0] <= t <= b[-1][0] for t, _ in a)
    assert min(abs(ta - tb) for ta, _ in a for tb, _ in b) < 1.0
    assert replies[0].result.finish_reason == "length" and replies[1].result.finish_reason in ("stop", "length")
    assert replies[0].result.completion_tokens == 48
    assert replies[0].result.history == [(queries[0], alone[0])]


def test_async_iteration_leaves_the_event_loop_free(service):
    async def main():
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        async def read(reply):
            return "".join([d async for d in reply])

        tick = asyncio.create_task(ticker())
        longer = LONG.with_(max_new_tokens=300)
        replies = [service.submit(q, options=longer) for q in ("写一篇很长的文章", "写一首诗")]
        texts = await asyncio.gather(*(read(r) for r in replies))
        tick.cancel()
        return texts, [r.result.response for r in replies], ticks

    texts, responses, ticks = asyncio.run(main())
    assert texts == responses and all(texts)
    assert ticks > 5  # the loop ran its other task while waiting for deltas (blocking reads would starve it)


def test_a_cancelled_reply_ends_and_the_other_goes_on(service, tok_model):
    tok, model = tok_model
    keep = service.submit("讲一个故事", options=LONG)
    drop = service.submit("写一篇很长的文章", options=LONG)
    got = []
    for delta in drop:
        got.append(delta)
        if len(got) == 2:
            drop.cancel()
    assert drop.result.finish_reason == "cancelled" and drop.result.completion_tokens < 48
    assert "".join(keep) == model.chat(tok, "讲一个故事", do_sample=False, max_new_tokens=48)[0]
    assert not service.engine.running or drop.seq not in service.engine.running
    assert drop.seq.cache is None


def test_leaving_the_loop_early_cancels_the_reply(service):
    reply = service.submit("写一篇很长的文章", options=GenerationOptions(max_new_tokens=1500, max_length=2048))
    for _ in reply:
        break  # the consumer is gone (a closed page, a dropped connection)
    deadline = time.monotonic() + 30
    while reply.result is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert reply.result.finish_reason == "cancelled" and reply.result.completion_tokens < 1500


def test_a_full_queue_refuses_with_a_retry_hint_and_the_queue_drains(tok_model):
    tok, model = tok_model
    with ModelService(model, tok, max_queue=1, kv_budget=1) as service:  # one reply at a time
        first = service.submit("写一篇很长的文章", options=LONG)
        deadline = time.monotonic() + 30
        while not first.admitted and time.monotonic() < deadline:
            time.sleep(0.01)
        second = service.submit("你好", options=LONG)  # waits: the budget holds one reply
        with pytest.raises(QueueFull) as refused:
            service.submit("讲一个故事", options=LONG)
        assert refused.value.retry_after >= 1 and "busy" in str(refused.value)
        first.cancel()
        assert "".join(second) == second.result.response and second.result.finish_reason in ("stop", "length")
        third = service.submit("讲一个故事", options=LONG)  # room again
        assert "".join(third)


def test_seeds_reproduce_a_sampled_reply_even_side_by_side(service):
    sampled = GenerationOptions(max_new_tokens=24, temperature=1.0, top_p=1.0, top_k=0)
    one = "".join(service.submit("讲一个故事", options=sampled, seed=7))
    torch.manual_seed(123)  # the global generator must not matter
    pair = [service.submit("讲一个故事", options=sampled, seed=s) for s in (7, 8)]
    texts = ["".join(r) for r in pair]
    assert texts[0] == one
    assert texts[1] != one


def test_bad_input_raises_from_the_iterator_and_long_history_is_fitted(service):
    bad = service.submit("hi\x00there")
    with pytest.raises(InputError, match="NUL"):
        list(bad)
    with pytest.raises(InputError, match="max_length"):
        list(service.submit("hi", options=GenerationOptions(max_length=10**6)))
    history = [("问题" * 50, "回答" * 50)] * 40
    reply = service.submit("你好", history, GenerationOptions(do_sample=False, max_new_tokens=4))
    list(reply)
    assert reply.result.dropped_turns > 0 and len(reply.result.history) == 40 - reply.result.dropped_turns + 1


def test_close_ends_every_open_reply(tok_model):
    tok, model = tok_model
    service = ModelService(model, tok)
    reply = service.submit("写一篇很长的文章", options=GenerationOptions(max_new_tokens=2000, max_length=2048))
    next(iter(reply))
    service.close()
    list(reply)
    assert reply.result.finish_reason == "cancelled"
    assert not any(t.is_alive() for t in service._threads)
    with pytest.raises(RuntimeError, match="shut down"):
        service.submit("hi")


def _threads_now() -> set:
    return set(os.listdir("/proc/self/task"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in /proc")
def test_the_loading_thread_hands_its_openmp_workers_to_the_engine(tok_model):
    """The thread that built the service ran parallel ops (loading does); its OpenMP workers must end, or the
    engine thread's workers stop spinning between ops (chatglm/openmp.py: 1.3x slower decode on 2 CPUs)."""
    tok, model = tok_model
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the tests' processes run one thread each (conftest)
    openmp.release_workers()
    before = _threads_now()
    torch.ones(1 << 22).mul_(2)  # a parallel region on this thread: PyTorch's OpenMP starts its worker
    workers = _threads_now() - before
    assert workers, "a parallel op started no OpenMP worker threads"
    service = ModelService(model, tok)
    try:
        deadline = time.monotonic() + 5
        while workers & _threads_now() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not workers & _threads_now()
        reply = service.submit("你好", options=GenerationOptions(do_sample=False, max_new_tokens=8))
        "".join(reply)
        assert reply.result.response == model.chat(tok, "你好", do_sample=False, max_new_tokens=8)[0]
    finally:
        service.close()
        torch.set_num_threads(threads)
