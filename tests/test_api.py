"""api.py as users run it: a real server process on a loopback port with the demo checkpoint, driven over HTTP by
httpx (upstream's POST / contract, raw Server-Sent Events) and by the official openai client."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import httpx
import openai
import pytest

from chatglm import build_prompt, load_model

ROOT = Path(__file__).resolve().parent.parent
API_KEY = "test-key-5f2c"


class Server:
    def __init__(self, model_path, log_path, *args, env=None, key=None):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path, self.key, self.model_path = log_path, key, model_path
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.log_file = open(log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "api.py", "--model-path", model_path, "--port", str(self.port), *args], cwd=ROOT,
            stdout=self.log_file, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        deadline = time.monotonic() + 180
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"api.py exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/health", headers=self.headers, timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"api.py did not come up:\n{self.log()}")
            time.sleep(0.3)

    def log(self) -> str:
        self.log_file.flush()
        return Path(self.log_path).read_text(encoding="utf-8", errors="replace")

    def stop(self):
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log_file.close()


@pytest.fixture(scope="module")
def server(demo_model_path, tmp_path_factory):
    env = {"CHATGLM_API_KEY": ""}  # a key set in the caller's environment must not leak into this server
    s = Server(demo_model_path, tmp_path_factory.mktemp("api") / "server.log", env=env)
    yield s
    s.stop()
    assert s.proc.returncode == 0, s.log()[-3000:]


@pytest.fixture(scope="module")
def ref(demo_model_path):
    """The same checkpoint in this process: greedy replies to compare the server's with."""
    return load_model(demo_model_path, device="cpu")


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def prompt_tokens(tokenizer, query, history=()):
    return len(tokenizer([build_prompt(query, list(history))])["input_ids"][0])


def greedy(ref, query, history=(), max_new=None, max_length=None):
    tokenizer, model = ref
    if max_length is None:
        max_length = prompt_tokens(tokenizer, query, history) + max_new
    return model.chat(tokenizer, query, list(history), max_length=max_length, temperature=0)[0]


def disconnect_lines(server):
    return re.findall(r"client disconnected; stopped after (\d+) tokens", server.log())


def wait_until_idle(server, seconds):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not httpx.get(server.url + "/health", headers=server.headers, timeout=5).json()["generating"]:
            return True
        time.sleep(0.1)
    return False


# ---- upstream's POST / -------------------------------------------------------------------------------------------

def test_post_root_answers_upstreams_curl_request(server, ref):
    # as the README's curl sends it (-H 'Content-Type: application/json' -d '...')
    body = '{"prompt": "你好", "history": [], "max_length": 64, "temperature": 0}'.encode()
    r = httpx.post(server.url, content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 200, r.text
    data = r.json()
    assert list(data) == ["response", "history", "status", "time"]
    assert data["response"] == greedy(ref, "你好", max_length=64)
    assert data["history"] == [["你好", data["response"]]]
    assert data["status"] == 200
    stamp = datetime.strptime(data["time"], "%Y-%m-%d %H:%M:%S")
    assert abs((datetime.now() - stamp).total_seconds()) < 60


def test_long_history_drops_the_oldest_turns_and_says_so(server, ref):
    from chatglm.context import fit_history
    tokenizer = ref[0]
    history = [[f"问题{i} " * 8, f"回答{i} " * 8] for i in range(12)]
    kept, dropped = fit_history(tokenizer, "hello", history, 200, 2048)
    assert 0 < dropped < len(history)
    r = httpx.post(server.url, json={"prompt": "hello", "history": history, "max_length": 200, "temperature": 0},
                   timeout=60)
    assert r.status_code == 200, r.text
    assert r.headers["X-ChatGLM-Dropped-Turns"] == str(dropped)
    assert r.json()["response"] == greedy(ref, "hello", kept, max_length=200)
    assert r.json()["history"] == history + [["hello", r.json()["response"]]]  # nothing the caller sent is lost
    messages = [m for q, a in history for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]
    messages = messages * 8 + [{"role": "user", "content": "hello"}]  # far beyond the 2048-token context
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": "m", "messages": messages, "max_tokens": 4},
                   timeout=60)
    assert r.status_code == 200, r.text
    assert int(r.headers["X-ChatGLM-Dropped-Turns"]) > 0 and r.json()["usage"]["prompt_tokens"] < 2048


def test_post_root_continues_the_history_it_is_given(server, ref):
    history = [["你好", "Here. name"]]
    r = httpx.post(server.url, json={"prompt": "hello", "history": history, "max_length": 60, "top_p": 0.7,
                                     "temperature": 0}, timeout=60)
    assert r.status_code == 200, r.text
    expected = greedy(ref, "hello", [("你好", "Here. name")], max_length=60)
    assert expected != greedy(ref, "hello", max_length=60)  # the history really changes the answer
    assert r.json()["response"] == expected
    assert r.json()["history"] == history + [["hello", expected]]


def test_post_root_samples_with_upstream_defaults_when_fields_are_left_out(server):
    r = httpx.post(server.url, json={"prompt": "你好", "history": None, "max_length": 40}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["history"] == [["你好", r.json()["response"]]]


LONG_PROMPT = "hello " * 2500  # > 2048 tokens, the demo model's context

BAD_REQUESTS = [
    # (route, body (str = raw bytes), status, words the message must contain)
    ("/", '{"prompt": "你好"', 400, "not valid JSON"),
    ("/", "", 400, "empty"),
    ("/", "[1, 2]", 400, "JSON object"),
    ("/", {"history": []}, 400, "prompt"),
    ("/", {"prompt": 42}, 400, "prompt"),
    ("/", {"prompt": "   "}, 400, "prompt is empty"),
    ("/", {"prompt": "hi", "history": [["only one"]]}, 400, "[query, response] pair"),
    ("/", {"prompt": "hi", "history": "你好"}, 400, "history"),
    ("/", {"prompt": "hi", "history": [["a", 1]]}, 400, "history[0][1]"),
    ("/", {"prompt": "hi", "temperature": "hot"}, 400, "temperature"),
    ("/", {"prompt": "hi", "temperature": -0.1}, 400, "temperature"),
    ("/", {"prompt": "hi", "top_p": 1.5}, 400, "top_p"),
    ("/", {"prompt": "hi", "max_length": 0}, 400, "max_length"),
    ("/", {"prompt": "hi", "max_length": 2049}, 400, "beyond the model's context (max_sequence_length 2048)"),
    ("/", {"prompt": "hi", "max_length": 2.5}, 400, "max_length"),
    ("/", {"prompt": LONG_PROMPT}, 400, "limit for prompt plus reply is 2048 tokens"),
    ("/", {"prompt": "hello world", "max_length": 4}, 400, "limit for prompt plus reply is 4 tokens"),
    ("/v1/chat/completions", {"model": "m", "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": "m"}, 400, "messages"),
    ("/v1/chat/completions", {"model": "m", "messages": [{"role": "robot", "content": "hi"}]}, 400, "role"),
    ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user"}]}, 400, "content"),
    ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "a"},
                                                         {"role": "assistant", "content": "b"}]}, 400, "last message"),
    ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": " "}]}, 400, "empty"),
    ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 2.5},
     400, "temperature"),
    ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0},
     400, "max_tokens"),
    ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": "yes"},
     400, "stream"),
    ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "hi"}], "n": 3}, 400, "n=1"),
    ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "hi"}],
                              "logit_bias": {"99999": 5}}, 400, "vocabulary"),
    ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "hi"}],
                              "tools": [{"type": "function"}]}, 400, "not supported"),
    ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": LONG_PROMPT}]}, 400,
     "limit for prompt plus reply is 2048 tokens"),
    # generation controls: the library's own ranges (chatglm.validation.GenerationOptions), naming the field
    ("/", {"prompt": "hi", "top_p": 0}, 400, "top_p must be in (0, 1]"),  # was a 500 from inside generation
    ("/", {"prompt": "hi", "top_k": -1}, 400, "top_k must be an integer >= 0"),
    ("/", {"prompt": "hi", "top_k": "5"}, 400, "top_k"),
    ("/", {"prompt": "hi", "top_k": 2.5}, 400, "top_k"),
    ("/", {"prompt": "hi", "repetition_penalty": 0}, 400, "repetition_penalty must be in (0, 100]"),
    ("/", {"prompt": "hi", "repetition_penalty": "high"}, 400, "repetition_penalty"),
    ("/", {"prompt": "hi", "stop": [""]}, 400, "stop strings must not be empty"),
    ("/", {"prompt": "hi", "stop": [1]}, 400, "stop"),
    ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "hi"}], "top_k": -2},
     400, "top_k must be an integer >= 0"),
    ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "hi"}],
                              "repetition_penalty": -1.0}, 400, "repetition_penalty must be in (0, 100]"),
    ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "hi"}],
                              "frequency_penalty": 2.5}, 400, "frequency_penalty"),
    ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "hi"}],
                              "presence_penalty": -3}, 400, "presence_penalty"),
    ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "hi"}],
                              "stop": ["a", "b", "c", "d", "e"]}, 400, "at most 4"),
]


def test_bad_requests_get_a_clear_4xx_and_the_server_keeps_serving(server):
    failures = []
    with httpx.Client(timeout=30) as http:
        for route, body, status, words in BAD_REQUESTS:
            if isinstance(body, str):
                r = http.post(server.url + route, content=body.encode(),
                              headers={"Content-Type": "application/json"})
            else:
                r = http.post(server.url + route, json=body)
            message = r.json().get("error", {}).get("message", "") if r.status_code < 500 else r.text
            if r.status_code != status or words not in message:
                failures.append(f"{route} {str(body)[:80]!r}: {r.status_code} {message!r}")
        r = http.post(server.url + "/v1/chat/completions", content=b'{"model": "m", "messages": []}',
                      headers={"Content-Type": "text/plain"})
        if r.status_code != 415 or "application/json" not in r.json()["error"]["message"]:
            failures.append(f"text/plain body: {r.status_code} {r.text}")
        ok = http.post(server.url, json={"prompt": "你好", "max_length": 30, "temperature": 0})
    assert not failures, "\n".join(failures)
    assert ok.status_code == 200 and ok.json()["response"]
    assert "Traceback" not in server.log()


# ---- OpenAI-compatible API, through the official client ----------------------------------------------------------

def served_name(ref, model_path):
    return "chatglm-demo" if ref[1].is_demo else os.path.basename(model_path)


def test_openai_client_lists_the_model(server, client, ref, demo_model_path):
    assert [m.id for m in client.models.list()] == [served_name(ref, demo_model_path)]


def test_models_and_the_start_up_line_say_what_is_loaded(server, demo_model_path):
    """/v1/models carries what is loaded (an extra "chatglm" field that OpenAI clients ignore), and the start-up
    line in the terminal says the same."""
    info = httpx.get(server.url + "/v1/models", timeout=30).json()["data"][0]["chatglm"]
    assert info == {"name": "demo", "demo": True, "device": "cpu", "dtype": "float32", "quantization_bit": None,
                    "quantized_embeddings": False, "ptuning_checkpoint": None, "pre_seq_len": None}
    start_up = [line for line in server.log().splitlines() if "ChatGLM-6B API on http://127.0.0.1:" in line]
    assert len(start_up) == 1
    assert start_up[0].endswith(f"Model: demo model, NOT ChatGLM-6B ({demo_model_path}) · cpu · float32 · "
                                f"not quantized"), start_up


def test_openai_client_chat_completion_matches_the_model(client, ref):
    messages = [{"role": "system", "content": "回答要简短。"}, {"role": "user", "content": "你好"},
                {"role": "assistant", "content": "Here. name"}, {"role": "user", "content": "hello"}]
    # ChatGLM-6B has no system role: it leads the first user turn; earlier turns become the history
    history = [("回答要简短。\n你好", "Here. name")]
    reply = client.chat.completions.create(model="chatglm-6b", messages=messages, max_tokens=12, temperature=0)
    expected = greedy(ref, "hello", history, max_new=12)
    assert reply.choices[0].message.content == expected
    assert reply.choices[0].message.role == "assistant"
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")
    n_prompt = prompt_tokens(ref[0], "hello", history)
    assert reply.usage.prompt_tokens == n_prompt
    # "hello" makes the demo model repeat itself, so it runs into max_tokens
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 12
    assert reply.usage.total_tokens == n_prompt + 12


def test_openai_client_finish_reason_stop_when_the_model_ends(client, ref):
    # content as a list of text parts, as newer clients send it
    reply = client.chat.completions.create(model="x", messages=[{"role": "user", "content": [
        {"type": "text", "text": "你"}, {"type": "text", "text": "好"}]}], max_tokens=40, temperature=0)
    assert reply.choices[0].message.content == greedy(ref, "你好", max_new=40)
    assert reply.choices[0].finish_reason == "stop" and reply.usage.completion_tokens < 40


def test_openai_client_streams_the_same_text_chunk_by_chunk(client, ref):
    messages = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "Here. name"},
                {"role": "user", "content": "hello"}]
    stream = client.chat.completions.create(model="x", messages=messages, max_tokens=30, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    contents = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    expected = greedy(ref, "hello", [("你好", "Here. name")], max_new=30)
    assert "".join(contents) == expected
    assert len(contents) > 3  # streamed, not sent in one piece
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert len({c.id for c in chunks}) == 1
    assert chunks[-1].usage.prompt_tokens == prompt_tokens(ref[0], "hello", [("你好", "Here. name")])


def test_stream_is_server_sent_events_ending_in_done(server):
    body = {"model": "x", "messages": [{"role": "user", "content": "你好"}], "max_tokens": 10, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines), lines
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line[6:]) for line in lines[:-1]]
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    assert events[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_stop_sequences_end_the_reply_before_them(client, ref):
    full = greedy(ref, "hello", max_new=30)
    stop = "you you"
    assert stop in full
    reply = client.chat.completions.create(model="x", messages=[{"role": "user", "content": "hello"}],
                                           max_tokens=30, temperature=0, stop=[stop])
    # the text before the stop string, trimmed as every ChatGLM reply is (one stop rule, model.chat's)
    before = full[:full.index(stop)].rstrip()
    assert reply.choices[0].message.content == before
    assert reply.choices[0].finish_reason == "stop"
    stream = client.chat.completions.create(model="x", messages=[{"role": "user", "content": "hello"}],
                                            max_tokens=30, temperature=0, stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == before


# ---- generation controls ---------------------------------------------------------------------------------------
# On the demo checkpoint, "hello" gets "for you you you ..." greedily; repetition_penalty 1.5 changes that to
# "for youownown...owncally ...", which "ownc" cuts; top_k 1 makes sampling at temperature 1 greedy.

def penalised(ref, max_length, **kw):
    tokenizer, model = ref
    return model.chat(tokenizer, "hello", max_length=max_length, do_sample=False, repetition_penalty=1.5, **kw)[0]


def test_post_root_takes_repetition_penalty_top_k_and_stop(server, ref):
    expected = penalised(ref, 200, stop=["ownc"])
    assert expected != penalised(ref, 200) != greedy(ref, "hello", max_length=200)  # each control matters
    body = {"prompt": "hello", "max_length": 200, "temperature": 1.0, "top_p": 1.0, "top_k": 1,
            "repetition_penalty": 1.5, "stop": ["ownc"]}
    for _ in range(2):  # sampling, but top_k 1 leaves one candidate
        r = httpx.post(server.url, json=body, timeout=60)
        assert r.status_code == 200, r.text
        assert list(r.json()) == ["response", "history", "status", "time"]
        assert r.json()["response"] == expected and r.json()["history"] == [["hello", expected]]
    r = httpx.post(server.url, json={**body, "stop": "ownc", "top_k": 0, "temperature": 0}, timeout=60)
    assert r.json()["response"] == expected  # a single stop string; top_k 0 = no limit


def test_openai_route_takes_repetition_penalty_and_top_k_as_extensions(client, ref):
    n_prompt = prompt_tokens(ref[0], "hello")
    full = penalised(ref, n_prompt + 40)
    assert "ownc" in full and full != greedy(ref, "hello", max_new=40)
    for top_k in (1, -1):  # -1: no limit, as vLLM takes it
        reply = client.chat.completions.create(
            model="x", messages=[{"role": "user", "content": "hello"}], max_tokens=40, stop=["ownc"],
            temperature=1.0 if top_k == 1 else 0, top_p=1.0, extra_body={"repetition_penalty": 1.5, "top_k": top_k})
        assert reply.choices[0].message.content == full[:full.index("ownc")]  # OpenAI's stop: no trimming
        assert reply.choices[0].finish_reason == "stop"


def test_frequency_and_presence_penalty_follow_openais_definition(client, ref):
    """OpenAI: the score of token j drops by c[j] * frequency_penalty + (c[j] > 0) * presence_penalty, c[j] being
    how often j was generated so far. Checked against this test's own implementation of that formula."""
    tokenizer, model = ref
    n_prompt = prompt_tokens(tokenizer, "hello")

    def openai_penalty(frequency, presence):
        def apply(input_ids, scores):
            scores = scores.clone()
            for row, ids in enumerate(input_ids[:, n_prompt:].tolist()):
                for token in set(ids):
                    scores[row, token] -= ids.count(token) * frequency + presence
            return scores
        return apply

    def ask(**penalties):
        return client.chat.completions.create(model="x", messages=[{"role": "user", "content": "hello"}],
                                              max_tokens=30, temperature=0, **penalties).choices[0].message.content

    def reference(frequency, presence):
        from transformers import LogitsProcessorList
        return model.chat(tokenizer, "hello", max_length=n_prompt + 30, do_sample=False,
                          logits_processor=LogitsProcessorList([openai_penalty(frequency, presence)]))[0]

    plain = greedy(ref, "hello", max_new=30)
    assert ask(frequency_penalty=0.0, presence_penalty=0.0) == plain
    expected = {(f, p): reference(f, p) for f, p in ((0.5, 0.0), (0.5, 1.0), (1.0, 1.0))}
    assert len(set(expected.values()) | {plain}) == 4  # each penalty changes the reply, presence included
    for (frequency, presence), reply in expected.items():
        assert ask(frequency_penalty=frequency, presence_penalty=presence) == reply, (frequency, presence)


def test_seed_makes_sampling_repeatable(client):
    def ask(seed):
        return client.chat.completions.create(model="x", messages=[{"role": "user", "content": "讲个故事"}],
                                              max_tokens=24, temperature=1.0, top_p=1.0,
                                              seed=seed).choices[0].message.content
    first = ask(7)
    assert ask(7) == first
    assert len({ask(s) for s in (1, 2, 3, 4)} | {first}) > 1  # and it really samples


def test_openai_client_reports_bad_requests_as_errors(client):
    with pytest.raises(openai.BadRequestError, match="last message"):
        client.chat.completions.create(model="x", messages=[{"role": "assistant", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model="x", messages=[{"role": "user", "content": "hi"}], temperature=5)


# ---- concurrency, cancellation ----------------------------------------------------------------------------------

def test_health_answers_during_a_long_generation_and_disconnect_stops_it(server, ref):
    eos = ref[0].eos_token_id
    before = len(disconnect_lines(server))
    body = {"model": "x", "messages": [{"role": "user", "content": "hello"}], "stream": True, "max_tokens": 2000,
            "temperature": 0, "logit_bias": {str(eos): -100}}  # no end token: a long reply
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", server.url + "/v1/chat/completions", json=body) as r:
            lines, seen = r.iter_lines(), 0  # keep the iterator: dropping it closes the connection
            while seen < 5:
                seen += '"content":"' in next(lines)
            start = time.perf_counter()
            health = httpx.get(server.url + "/health", timeout=10).json()
            took = time.perf_counter() - start
            assert health["generating"] is True
            assert took < 2.0, f"/health took {took:.2f} s while the model was busy"
        # leaving the block closes the connection mid-stream
    assert wait_until_idle(server, 10), "generation went on after the client disconnected"
    deadline = time.monotonic() + 5
    while len(disconnect_lines(server)) == before and time.monotonic() < deadline:
        time.sleep(0.1)
    stopped_after = int(disconnect_lines(server)[before])
    assert stopped_after < 1000


@pytest.mark.parametrize("route", ["/", "/v1/chat/completions"])
def test_non_streaming_client_that_gives_up_stops_its_generation(server, route):
    before = len(disconnect_lines(server))
    body = ({"prompt": "hello", "max_length": 2048, "temperature": 0} if route == "/" else
            {"model": "x", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 2000,
             "temperature": 0})
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + route, json=body, timeout=httpx.Timeout(30, read=1.0))
    assert wait_until_idle(server, 10), "generation went on after the client gave up"
    deadline = time.monotonic() + 5
    while len(disconnect_lines(server)) == before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(disconnect_lines(server)) == before + 1


def test_32_concurrent_mixed_requests_each_get_their_own_answer(server, client, ref):
    with open(ROOT / "chatglm" / "demo_corpus.txt", encoding="utf-8") as f:
        lines = [line.strip() for line in f if line.strip()]
    queries = [f"{lines[i % len(lines)][:12]}{i}" for i in range(32)]
    max_new = 12
    expected = {q: greedy(ref, q, max_new=max_new) for q in queries}
    assert len(set(expected.values())) >= 24, "the prompts must lead to different answers"
    start = threading.Barrier(32)

    def post_root(q):
        start.wait()
        r = httpx.post(server.url, json={"prompt": q, "max_length": prompt_tokens(ref[0], q) + max_new,
                                         "temperature": 0}, timeout=300)
        return r.json()["response"]

    def openai_plain(q):
        start.wait()
        return client.chat.completions.create(model="x", messages=[{"role": "user", "content": q}],
                                              max_tokens=max_new, temperature=0).choices[0].message.content

    def openai_stream(q):
        start.wait()
        stream = client.chat.completions.create(model="x", messages=[{"role": "user", "content": q}],
                                                max_tokens=max_new, temperature=0, stream=True)
        return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    def raw_sse(q):
        start.wait()
        body = {"model": "x", "messages": [{"role": "user", "content": q}], "max_tokens": max_new,
                "temperature": 0, "stream": True}
        text = ""
        with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=300) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    text += json.loads(line[6:])["choices"][0]["delta"].get("content", "")
        return text

    kinds = [post_root, openai_plain, openai_stream, raw_sse]
    began = time.perf_counter()
    with ThreadPoolExecutor(32) as pool:
        futures = {q: pool.submit(kinds[i % 4], q) for i, q in enumerate(queries)}
        got = {q: f.result(timeout=300) for q, f in futures.items()}
    took = time.perf_counter() - began
    wrong = {q: (got[q], expected[q]) for q in queries if got[q] != expected[q]}
    assert not wrong, wrong
    assert took < 240, took


# ---- API key ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def keyed_server(demo_model_path, tmp_path_factory):
    # a KV budget below one long reply: replies run one at a time, so a second one waits in the queue
    s = Server(demo_model_path, tmp_path_factory.mktemp("api-key") / "server.log", "--max-queue", "1",
               "--kv-budget", "0.001",
               env={"CHATGLM_API_KEY": API_KEY}, key=API_KEY)
    yield s
    s.stop()


def test_api_key_is_required_on_every_endpoint(keyed_server):
    calls = [("GET", "/v1/models", None), ("POST", "/", {"prompt": "你好"}),
             ("POST", "/v1/chat/completions", {"model": "x", "messages": [{"role": "user", "content": "hi"}]})]
    for method, path, body in calls:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
            r = httpx.request(method, keyed_server.url + path, json=body, headers=headers, timeout=30)
            assert r.status_code == 401, (method, path, headers, r.status_code)
            assert "API key" in r.json()["error"]["message"]
            # a liveness probe needs no key, and without one learns nothing else
            r = httpx.get(keyed_server.url + "/health", headers=headers, timeout=30)
            assert r.status_code == 200 and r.json() == {"status": "ok"}
    ok = httpx.post(keyed_server.url, json={"prompt": "你好", "max_length": 30},
                    headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)
    assert ok.status_code == 200 and ok.json()["status"] == 200


def test_openai_client_with_the_api_key(keyed_server):
    good = openai.OpenAI(base_url=keyed_server.url + "/v1", api_key=API_KEY, max_retries=0)
    assert good.chat.completions.create(model="x", messages=[{"role": "user", "content": "你好"}],
                                        max_tokens=8).choices[0].message.content is not None
    bad = openai.OpenAI(base_url=keyed_server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_a_full_queue_answers_503_at_once(keyed_server, ref):
    url, auth = keyed_server.url, keyed_server.headers
    long_reply = {"model": "x", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 2000,
                  "temperature": 0, "logit_bias": {str(ref[0].eos_token_id): -100}}

    def health():
        return httpx.get(url + "/health", headers=auth, timeout=10).json()

    with httpx.Client(headers=auth, timeout=60) as http:
        with http.stream("POST", url + "/v1/chat/completions", json={**long_reply, "stream": True}) as running:
            lines = running.iter_lines()
            while '"content":"' not in next(lines):  # generating now
                pass
            second = []

            def wait_in_queue():
                second.append(httpx.post(url + "/", json={"prompt": "你好", "max_length": 40}, headers=auth,
                                         timeout=60))

            waiting = threading.Thread(target=wait_in_queue)
            waiting.start()
            deadline = time.monotonic() + 10
            while health()["queued"] < 1 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert health() == {"status": "ok", "model": served_name(ref, keyed_server.model_path),
                                "generating": True, "queued": 1}
            start = time.perf_counter()
            r = http.post(url + "/v1/chat/completions", json=long_reply)
            assert r.status_code == 503 and time.perf_counter() - start < 2
            assert "busy" in r.json()["error"]["message"] and r.headers["retry-after"]
    # the long stream is closed: its generation stops and the waiting request gets its turn
    waiting.join(60)
    assert second and second[0].status_code == 200 and second[0].json()["history"][0][0] == "你好"
    assert wait_until_idle(keyed_server, 15)


# ---- many clients at once (continuous batching) -------------------------------------------------------------------

def sse_reply(server, query, max_tokens, times=None, stop_after=None):
    """(text, finish_reason) of a streamed completion read as raw Server-Sent Events; times: appended with the
    arrival time of every content chunk. stop_after: hang up after that many content chunks."""
    body = {"model": "x", "messages": [{"role": "user", "content": query}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True}
    text, finish = "", None
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=300) as r:
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            choice = json.loads(line[6:])["choices"][0]
            if choice["delta"].get("content"):
                text += choice["delta"]["content"]
                if times is not None:
                    times.append(time.monotonic())
                if stop_after is not None and len(times) >= stop_after:
                    return text, None  # leaving the block closes the connection
            finish = choice["finish_reason"] or finish
    return text, finish


def test_16_streaming_clients_at_once_each_get_the_answer_they_get_alone(server, ref):
    queries = [f"hello {i}" if i % 2 else f"hi there {i}" for i in range(16)]
    max_new = [60 + 5 * (i % 4) for i in range(16)]
    expected = [greedy(ref, q, max_new=n) for q, n in zip(queries, max_new)]
    assert len(set(expected)) >= 12, "the prompts must lead to different answers"
    times = [[] for _ in queries]
    start = threading.Barrier(16)

    def one(i):
        start.wait()
        return sse_reply(server, queries[i], max_new[i], times[i])

    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(one, range(16)))
    wrong = {queries[i]: (got[i][0], expected[i]) for i in range(16) if got[i][0] != expected[i]}
    assert not wrong, wrong
    # served together, not one after another: every reply that runs to max_tokens (some end early, with <eop>)
    # had begun before any of those ended
    full = [times[i] for i in range(16) if got[i][1] == "length"]
    assert len(full) >= 10 and max(t[0] for t in full) < min(t[-1] for t in full)


def test_a_client_that_hangs_up_leaves_the_others_streaming(server, ref):
    queries, max_new = ["hello", "hi there", "hello again", "hi there again"], 200
    expected = [greedy(ref, q, max_new=max_new) for q in queries]
    before = len(disconnect_lines(server))
    times = [[] for _ in queries]
    start = threading.Barrier(len(queries))

    def one(i):
        start.wait()
        return sse_reply(server, queries[i], max_new, times[i], stop_after=10 if i == 0 else None)

    with ThreadPoolExecutor(len(queries)) as pool:
        got = list(pool.map(one, range(len(queries))))
    hung_up = times[0][-1]
    for i in range(1, len(queries)):
        assert got[i] == (expected[i], "length"), queries[i]
        assert times[i][-1] > hung_up + 0.05, "the others must go on streaming after one client left"
    assert expected[0].startswith(got[0][0]) and got[0][0]
    deadline = time.monotonic() + 10
    while len(disconnect_lines(server)) == before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(disconnect_lines(server)) == before + 1
