"""api.py against hostile and broken requests, both API styles, on a real server on a loopback port: each gets a 4xx
whose message names the problem (never a 5xx or a traceback), and other clients keep being answered meanwhile."""
import json
import subprocess
import sys
import time

import httpx
import pytest

from test_api import Server

CHAT = "/v1/chat/completions"
TEN_MB = 10 * 1024 * 1024


def user(text):
    return {"model": "m", "messages": [{"role": "user", "content": text}], "max_tokens": 4}


def history_of(turns):
    return [[f"问题{i} 的内容", f"回答{i} 的内容"] for i in range(turns)]


def messages_of(count):
    roles = ("user", "assistant")
    return [{"role": roles[i % 2], "content": f"message {i}"} for i in range(count)]


@pytest.fixture(scope="module")
def server(demo_model_path, tmp_path_factory):
    s = Server(demo_model_path, tmp_path_factory.mktemp("hostile-api") / "server.log", env={"CHATGLM_API_KEY": ""})
    yield s
    s.stop()
    assert s.proc.returncode == 0, s.log()[-3000:]


JSON = {"Content-Type": "application/json"}
# (route, raw body bytes, extra headers, status, words the error message must contain)
HOSTILE = [
    ("/", b'{"prompt": "a\\ud800b"}', JSON, 400, "lone surrogate (U+D800)"),
    ("/", b'{"prompt": "hi", "history": [["q\\udfff", "a"]]}', JSON, 400, "history[0][0]"),
    ("/", '{"prompt": "a\ud800b"}'.encode("utf-8", "surrogatepass"), JSON, 400, "not valid UTF-8"),
    ("/", b'{"prompt": "a\\u0000b"}', JSON, 400, "NUL"),
    ("/", b'{"prompt": "hi", "temperature": NaN}', JSON, 400, "NaN"),
    ("/", b'{"prompt": "hi", "repetition_penalty": Infinity}', JSON, 400, "Infinity"),
    ("/", b'{"prompt": "hi", "top_p": 1e999}', JSON, 400, "finite"),
    ("/", b'{"prompt": "hi", "top_k": 1' + b"0" * 5000 + b"}", JSON, 400, "digits"),
    ("/", b'{"prompt": "hi", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", JSON, 400, "nested too deeply"),
    ("/", b'{"prompt": "hi", "x": ' + b"[" * 40 + b"]" * 40 + b"}", JSON, 400, "nested too deeply"),
    ("/", b'{"prompt": "hi"}', {"Content-Type": "text/plain"}, 415, "application/json"),
    ("/", b'{"prompt": "hi"}', {"Content-Type": "application/x-www-form-urlencoded"}, 415, "application/json"),
    ("/", b'{"prompt": "hi"}', {"Content-Type": "application/json", "Host": "evil.example:8000"}, 400,
     "Invalid host header"),
    (CHAT, json.dumps(user("a\ud800b")).encode(), JSON, 400, "messages[0].content contains a lone surrogate"),
    (CHAT, json.dumps(user("x")).replace('"x"', '"\xed\xa0\x80"').encode("latin-1"), JSON, 400, "not valid UTF-8"),
    (CHAT, json.dumps(user("a\x00")).encode(), JSON, 400, "NUL"),
    (CHAT, json.dumps({**user("hi"), "seed": 2**63}).encode(), JSON, 400, "seed must be an integer in [0, 2**63 - 1]"),
    (CHAT, json.dumps({**user("hi"), "seed": -1}).encode(), JSON, 400, "seed"),
    (CHAT, json.dumps({**user("hi"), "logit_bias": {"²": 1}}).encode(), JSON, 400, "logit_bias keys are token ids"),
    (CHAT, json.dumps({**user("hi"), "logit_bias": {"5": 1e308 * 10}}).encode(), JSON, 400, "Infinity"),
    (CHAT, json.dumps({**user("hi"), "top_p": float("nan")}).encode(), JSON, 400, "NaN"),
    (CHAT, json.dumps({**user("hi"), "stop": ["\ud800"]}).encode(), JSON, 400, "stop[0]"),
    (CHAT, json.dumps({**user("hi"), "stop": "s" * 900_000}).encode(), JSON, 400, "at most 500"),
    (CHAT, json.dumps({**user("hi"), "logit_bias": {str(i): 1 for i in range(50_000)}}).encode(), JSON, 400,
     "at most 300 token ids"),
    (CHAT, b'{"model": "m", "messages": ' + b"[" * 50 + b"]" * 50 + b"}", JSON, 400, "nested too deeply"),
    (CHAT, json.dumps(user("hi")).encode(), {"Content-Type": "text/plain"}, 415, "application/json"),
    (CHAT, json.dumps(user("hi")).encode(), {"Content-Type": "application/json", "Host": "rebind.example"}, 400,
     "Invalid host header"),
]


def test_hostile_bodies_get_a_4xx_naming_the_problem_and_never_a_5xx(server):
    failures = []
    with httpx.Client(timeout=60) as http:
        for route, raw, headers, status, words in HOSTILE:
            r = http.post(server.url + route, content=raw, headers=headers)
            message = r.json()["error"]["message"] if "json" in r.headers.get("content-type", "") else r.text
            if r.status_code != status or words not in message:
                failures.append(f"{route} {raw[:60]!r} {headers}: {r.status_code} {message[:200]!r}")
        ok = http.post(server.url, json={"prompt": "你好", "max_length": 30})
    assert not failures, "\n".join(failures)
    assert ok.status_code == 200 and ok.json()["response"]
    assert "Traceback" not in server.log()


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "localhost:1234"])
def test_loopback_host_names_are_accepted(server, host):
    r = httpx.get(server.url + "/v1/models", headers={"Host": host}, timeout=30)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("route", ["/", CHAT])
def test_a_ten_megabyte_body_is_refused_with_413(server, route):
    body = b'{"prompt": "' + b"x" * TEN_MB + b'"}'
    r = httpx.post(server.url + route, content=body, headers=JSON, timeout=60)
    assert r.status_code == 413 and "at most 1048576" in r.json()["error"]["message"]


def test_thousands_of_turns_drop_the_oldest_and_answer(server):
    r = httpx.post(server.url, json={"prompt": "hi", "history": history_of(3000), "max_length": 200}, timeout=60)
    assert r.status_code == 200, r.text
    assert 2900 < int(r.headers["X-ChatGLM-Dropped-Turns"]) < 3000
    assert len(r.json()["history"]) == 3001  # everything the caller sent comes back
    r = httpx.post(server.url + CHAT, json={"model": "m", "messages": messages_of(8001), "max_tokens": 4},
                   timeout=60)
    assert r.status_code == 200, r.text
    assert int(r.headers["X-ChatGLM-Dropped-Turns"]) > 3900


def test_far_more_turns_than_any_context_holds_are_refused_by_count(server):
    r = httpx.post(server.url + CHAT, json={"model": "m", "messages": messages_of(20_001)}, timeout=60)
    assert r.status_code == 400 and "messages has 20001 entries; at most 8193" in r.json()["error"]["message"]
    r = httpx.post(server.url, json={"prompt": "hi", "history": history_of(5000)}, timeout=60)
    assert r.status_code == 400 and "history has 5000 entries; at most 4096" in r.json()["error"]["message"]


# Run as a separate process, so the clients sending huge requests do not slow the measuring client's own threads.
HAMMER = r"""
import json, sys, threading, time
import httpx
url, seconds = sys.argv[1], float(sys.argv[2])
def history_of(turns):
    return [[f"问题{i} 的内容", f"回答{i} 的内容"] for i in range(turns)]
heavy = [("/", json.dumps({"prompt": "hi", "history": history_of(3000), "max_length": 40}).encode()),
         ("/v1/chat/completions", json.dumps({"model": "m", "max_tokens": 2, "messages": [
             {"role": ("user", "assistant")[i % 2], "content": f"message {i}"} for i in range(20_001)]}).encode()),
         ("/", b'{"prompt": "' + b"x" * (10 * 1024 * 1024) + b'"}'),
         ("/", json.dumps({"prompt": "y" * 1_000_000}).encode())]  # under the size limit: read, then refused
outcomes, end = [], time.monotonic() + seconds
def send():
    with httpx.Client(timeout=120) as http:
        while time.monotonic() < end:
            for route, raw in heavy:
                outcomes.append(http.post(url + route, content=raw,
                                          headers={"Content-Type": "application/json"}).status_code)
threads = [threading.Thread(target=send) for _ in range(int(sys.argv[3]))]
print("started", flush=True)
for t in threads: t.start()
for t in threads: t.join()
print(json.dumps(outcomes))
"""


def test_health_answers_fast_while_other_clients_send_huge_requests(server):
    # two clients: one is always being read or processed while the other waits for its answer
    hammer = subprocess.Popen([sys.executable, "-c", HAMMER, server.url, "8", "2"], stdout=subprocess.PIPE, text=True)
    try:
        assert hammer.stdout.readline().strip() == "started"
        time.sleep(1.0)  # the clients are busy sending or being answered
        took = {"/health": [], "/v1/models": []}
        with httpx.Client(timeout=10) as http:
            for _ in range(20):
                for path, times in took.items():
                    start = time.perf_counter()
                    assert http.get(server.url + path).status_code == 200
                    times.append(time.perf_counter() - start)
                time.sleep(0.1)
        outcomes = json.loads(hammer.communicate(timeout=180)[0])
    finally:
        hammer.kill()
    assert len(outcomes) >= 4 and all(code < 500 for code in outcomes), outcomes
    assert {200, 400, 413} <= set(outcomes), outcomes
    for path, times in took.items():
        assert max(times) < 0.5, f"{path} took up to {max(times):.2f} s under load: {[round(t, 2) for t in times]}"
    assert "Traceback" not in server.log()
