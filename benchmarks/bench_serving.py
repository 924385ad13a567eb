"""Serving benchmark: api.py on a random checkpoint with ChatGLM-6B's geometry, 1 to 16 clients at once.

    python benchmarks/bench_serving.py [--precisions bf16,int4] [--layers 28] [--clients 1,2,4,8,16]

For each precision it starts api.py (a real server process on a loopback port), then for each client count runs
that many clients at once, each sending --requests requests one after another: prompt lengths mixed (short,
medium, long), every other request streamed. Replies are greedy with <eop> banned, so each is exactly
--new-tokens long. Printed per client count: aggregate completion tokens/s (all tokens / wall time), time to
first token p50/p95 (streamed requests: request sent -> first text), per-token latency p50/p95 (streamed
requests: (last text - first text) / (tokens - 1)); per precision the server's KV budget and peak RSS.

The weights come from bench.py's build_checkpoint (random, real geometry). Its tokenizer is the demo
checkpoint's, given num_image_tokens so that its ids fill the real 130,528-id vocabulary (the special ids in
config.json are that tokenizer's). Most ids then decode to no text, so every request also sends a logit_bias of
+100 on 299 ordinary pieces (and -100 on <eop>): each token the random model writes then shows as text, which is
what makes time to first token and per-token latency measurable. The forward passes cost what ChatGLM-6B's do.
--layers 1 with few clients is a quick end-to-end check; the real figures need --layers 28.
"""
import argparse
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time

import httpx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench import GEOMETRY, build_checkpoint  # noqa: E402

PRECISIONS = {"fp32": ["--dtype", "float32"], "bf16": ["--dtype", "bfloat16"], "int8": ["--quantize", "8"],
              "int4": ["--quantize", "4"]}
PROMPT_CHARS = "40,400,2000"  # short, medium, long; cycled over the requests


def serving_checkpoint(workdir: str, layers: int):
    """build_checkpoint's weights with a tokenizer whose ids cover the whole vocabulary (see the docstring)."""
    from chatglm.tokenization import ChatGLMTokenizer
    weights = build_checkpoint(workdir, layers)
    folder = os.path.join(workdir, f"glm6b-serving-{layers}l")
    os.makedirs(folder, exist_ok=True)
    link = os.path.join(folder, "model.safetensors")
    if not os.path.lexists(link):
        os.symlink(os.path.join(weights, "model.safetensors"), link)
    with open(os.path.join(weights, "ice_text.model"), "rb") as src, open(os.path.join(folder, "ice_text.model"),
                                                                            "wb") as dst:
        dst.write(src.read())
    with open(os.path.join(weights, "tokenizer_config.json")) as f:
        tokenizer_config = json.load(f)
    pieces = ChatGLMTokenizer(os.path.join(folder, "ice_text.model")).vocab_size
    tokenizer_config["num_image_tokens"] = GEOMETRY["vocab_size"] - pieces
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(tokenizer_config, f, indent=2)
    tokenizer = ChatGLMTokenizer(os.path.join(folder, "ice_text.model"), num_image_tokens=tokenizer_config[
        "num_image_tokens"])
    with open(os.path.join(weights, "config.json")) as f:
        config = json.load(f)
    for name, piece in (("bos_token_id", "<sop>"), ("eos_token_id", "<eop>"), ("mask_token_id", "[MASK]"),
                        ("gmask_token_id", "[gMASK]"), ("pad_token_id", "<pad>")):
        config[name] = tokenizer.convert_tokens_to_ids(piece)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return folder, tokenizer


def visible_bias(tokenizer, eos: int) -> dict:
    """logit_bias that keeps replies to 299 ordinary pieces (they decode to text) and bans <eop>."""
    with open(os.path.join(ROOT, "chatglm", "demo_corpus.txt"), encoding="utf-8") as f:
        ids = tokenizer.encode(f.read(), add_special_tokens=False)
    ordinary = sorted({i for i in ids if i not in tokenizer.all_special_ids and tokenizer.decode([i]).strip()})
    return {str(eos): -100, **{str(i): 100 for i in ordinary[:299]}}


class Server:
    """api.py in its own process, on a free loopback port."""

    def __init__(self, model_path: str, precision_args, log_path: str, extra=()):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.log_file = open(log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "api.py", "--model-path", model_path, "--port", str(self.port),
                                      *precision_args, *extra], cwd=ROOT, stdout=self.log_file,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 1800
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"api.py exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("api.py did not come up:\n" + self.log()[-3000:])
            time.sleep(0.5)

    def log(self) -> str:
        self.log_file.flush()
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def peak_rss_gib(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as f:
            kib = int(re.search(r"VmHWM:\s+(\d+) kB", f.read()).group(1))
        return kib / 2**20

    def kv_budget(self) -> str:
        found = re.search(r"KV cache budget [^\n]*", self.log())
        return found.group(0) if found else "?"

    def stop(self):
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log_file.close()


def one_request(url: str, prompt: str, new_tokens: int, bias: dict, stream: bool) -> dict:
    """{tokens, ttft, per_token} of one request (ttft and per_token None when not streamed)."""
    body = {"model": "x", "messages": [{"role": "user", "content": prompt}], "max_tokens": new_tokens,
            "temperature": 0, "logit_bias": bias, "stream": stream}
    sent = time.monotonic()
    if not stream:
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=3600)
        r.raise_for_status()
        return {"tokens": r.json()["usage"]["completion_tokens"], "ttft": None, "per_token": None}
    body["stream_options"] = {"include_usage": True}
    first = last = None
    tokens = 0
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=3600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                last = time.monotonic()
                first = first or last
    per_token = (last - first) / (tokens - 1) if first is not None and tokens > 1 else None
    return {"tokens": tokens, "ttft": None if first is None else first - sent, "per_token": per_token}


def prompts(n: int, lengths):
    with open(os.path.join(ROOT, "chatglm", "demo_corpus.txt"), encoding="utf-8") as f:
        text = " ".join(line.strip() for line in f if line.strip())
    return [(text * (1 + lengths[i % len(lengths)] // len(text)))[:lengths[i % len(lengths)]] for i in range(n)]


def run_level(url: str, clients: int, requests: int, new_tokens: int, bias: dict, lengths) -> dict:
    results, errors = [], []
    texts = prompts(clients * requests, lengths)

    def client(c):
        for r in range(requests):
            i = c * requests + r
            try:
                results.append(one_request(url, texts[(i + c) % len(texts)], new_tokens, bias, stream=i % 2 == 0))
            except Exception as e:  # reported, not hidden
                errors.append(repr(e))

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    began = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - began
    ttft = [r["ttft"] for r in results if r["ttft"] is not None]
    per_token = [r["per_token"] for r in results if r["per_token"] is not None]
    return {"clients": clients, "requests": len(results), "errors": errors, "wall_s": wall,
            "tokens_per_s": sum(r["tokens"] for r in results) / wall,
            "ttft_p50": pct(ttft, 50), "ttft_p95": pct(ttft, 95),
            "per_token_p50": pct(per_token, 50), "per_token_p95": pct(per_token, 95)}


def pct(values, p):
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[p - 1]


def positive_ints(text: str) -> list:
    """A comma-separated list of positive integers, e.g. "1,2,4,8"."""
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, got {text!r}")
    return values


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--precisions", default="bf16,int4", help=f"comma-separated, of {','.join(PRECISIONS)}")
    p.add_argument("--layers", type=int, default=28, help="GLM blocks (28 = ChatGLM-6B; 1 for a quick check)")
    p.add_argument("--clients", type=positive_ints, default="1,2,4,8,16",
                   help="client counts to run, one after another")
    p.add_argument("--requests", type=int, default=2, help="requests each client sends, one after another")
    p.add_argument("--new-tokens", type=int, default=64, help="completion tokens per request")
    p.add_argument("--prompt-chars", type=positive_ints, default=PROMPT_CHARS,
                   help="prompt lengths in characters, cycled over the requests (one value: every prompt alike)")
    p.add_argument("--kv-budget", default=None, help="api.py's --kv-budget, GiB (default: its own)")
    p.add_argument("--workdir", default=os.path.join(os.path.expanduser("~"), ".cache", "chatglm", "bench"))
    p.add_argument("--json", help="also write every row to this file")
    args = p.parse_args()
    precisions = args.precisions.split(",")
    unknown = [x for x in precisions if x not in PRECISIONS]
    if unknown:
        p.error(f"unknown precision(s) {','.join(unknown)}; choose from {','.join(PRECISIONS)}")
    clients, lengths = args.clients, args.prompt_chars
    folder, tokenizer = serving_checkpoint(args.workdir, args.layers)
    with open(os.path.join(folder, "config.json")) as f:
        bias = visible_bias(tokenizer, json.load(f)["eos_token_id"])
    extra = ["--kv-budget", args.kv_budget] if args.kv_budget else []
    print(f"api.py on a random ChatGLM-6B-geometry checkpoint, {args.layers} layer(s); {args.requests} request(s) "
          f"per client, {args.new_tokens} new tokens each, prompts of {','.join(map(str, lengths))} characters, "
          f"every other one streamed; 'x tok/s' and 'x TTFT p95' are ratios to the first client count's tok/s and "
          f"TTFT p95")
    rows = []
    for precision in precisions:
        server = Server(folder, PRECISIONS[precision], os.path.join(args.workdir, f"serving-{precision}.log"), extra)
        try:
            print(f"\n{precision}: {server.kv_budget()}")
            print(f"{'clients':>7} {'tok/s':>9} {'x tok/s':>8} {'TTFT p50':>9} {'TTFT p95':>9} {'x TTFT p95':>10} "
                  f"{'ms/tok p50':>10} {'ms/tok p95':>10}")
            first = None
            for n in clients:
                row = {"precision": precision, "layers": args.layers, **run_level(server.url, n, args.requests,
                                                                                  args.new_tokens, bias, lengths)}
                first = first or row
                row["x_tokens_per_s"] = row["tokens_per_s"] / first["tokens_per_s"]
                row["x_ttft_p95"] = row["ttft_p95"] / first["ttft_p95"]
                rows.append(row)
                print(f"{n:>7} {row['tokens_per_s']:>9.1f} {row['x_tokens_per_s']:>7.2f}x {row['ttft_p50']:>8.2f}s "
                      f"{row['ttft_p95']:>8.2f}s {row['x_ttft_p95']:>9.2f}x "
                      f"{1000 * row['per_token_p50']:>10.1f} {1000 * row['per_token_p95']:>10.1f}"
                      + (f"  {len(row['errors'])} error(s): {row['errors'][0]}" if row["errors"] else ""), flush=True)
            rss = server.peak_rss_gib()
            print(f"{precision}: server peak RSS {rss:.2f} GiB")
            for row in rows:
                if row["precision"] == precision:
                    row["peak_rss_gib"], row["kv_budget"] = rss, server.kv_budget()
        finally:
            server.stop()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 1 if any(row["errors"] for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
