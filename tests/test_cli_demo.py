"""cli_demo.py as a user runs it: a real subprocess in a pseudo-terminal (pexpect), typing with line editing,
Chinese and emoji, clear/stop, Ctrl-C during a reply and at the prompt, Ctrl-D."""
import os
import signal
import re
import sys
from pathlib import Path

import pexpect
import pytest

from chatglm import DEMO_NOTICE, build_prompt, load_model, process_response

ROOT = Path(__file__).resolve().parent.parent
WELCOME = "欢迎使用 ChatGLM-6B 模型，输入内容即可进行对话，clear 清空对话历史，stop 终止程序"
LABEL, PROMPT, INTERRUPTED = "ChatGLM-6B：", "用户：", "（已中断 / interrupted）"
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[=>]")
LEFT, BACKSPACE = "\x1b[D", "\x7f"


@pytest.fixture(scope="module")
def ref(demo_model_path):
    return load_model(demo_model_path, device="cpu")


def greedy(ref, query, history=(), max_length=200):
    tokenizer, model = ref
    return model.chat(tokenizer, query, list(history), max_length=max_length, temperature=0)[0]


def spawn(demo_model_path, *args):
    env = {**os.environ, "CHATGLM_DEMO_DIR": demo_model_path, "TERM": "xterm", "LANG": "C.UTF-8"}
    env.pop("CHATGLM_MODEL", None)  # no --model-path: the demo checkpoint, announced as such
    # SIGINT back to its default in the child: a test run started in the background inherits it ignored, and the
    # Ctrl-C tests would then test nothing but the runner
    child = pexpect.spawn(sys.executable, ["cli_demo.py", "--temperature", "0", *args], cwd=str(ROOT), env=env,
                          encoding="utf-8", timeout=120, dimensions=(40, 200),
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    child.expect_exact(PROMPT)
    return child


def text(s: str) -> str:
    return ANSI.sub("", s).replace("\r", "")


def ask(child, keys: str) -> str:
    """Types `keys` + Enter and returns the streamed reply as shown."""
    child.send(keys + "\r")
    child.expect_exact(LABEL)
    child.expect_exact(PROMPT)
    return text(child.before).strip("\n")


def finish(child):
    child.expect(pexpect.EOF, timeout=30)
    child.close()
    return child.exitstatus


def test_chat_with_line_editing_wide_characters_clear_and_stop(demo_model_path, ref):
    child = spawn(demo_model_path, "--max-length", "200")
    greeting = text(child.before)
    assert WELCOME in greeting and DEMO_NOTICE in greeting
    # what is loaded: the demo model's folder, device, precision, quantization
    assert f"Model: demo model, NOT ChatGLM-6B ({demo_model_path}) · cpu · float32 · not quantized" in greeting

    # type 你X好, step left over the wide 好, delete the X: the model must be asked "你好"
    assert greedy(ref, "你好") != greedy(ref, "你X好")
    first = ask(child, "你X好" + LEFT + BACKSPACE)
    assert first == greedy(ref, "你好")

    second = ask(child, "😀 你好")  # emoji + CJK, answered with the first turn as history
    assert second == greedy(ref, "😀 你好", [("你好", first)])

    child.send("clear\r")
    child.expect_exact("\x1b[2J")  # the screen is cleared and the greeting shown again
    child.expect_exact(WELCOME)
    child.expect_exact(PROMPT)
    assert DEMO_NOTICE in text(child.before)
    fresh = greedy(ref, "😀 你好")
    assert fresh != second  # so the next check can tell whether the history was really cleared
    assert ask(child, "😀 你好") == fresh

    child.send("stop\r")
    assert finish(child) == 0


def test_ctrl_c_stops_a_reply_keeps_it_and_ctrl_c_at_the_prompt_exits(demo_model_path, ref):
    child = spawn(demo_model_path, "--max-length", "1000")
    child.send("hello\r")  # the demo model answers "hello" with "you you you ..." until max_length
    child.expect_exact(LABEL)
    child.expect_exact("you you you")  # the reply is streaming
    shown = child.before + child.after
    child.sendintr()
    child.expect_exact(INTERRUPTED, timeout=20)
    partial = text(shown + child.before).replace("^C", "").strip("\n")  # ^C: the terminal's echo
    child.expect_exact(PROMPT)
    # the whole reply would be ~990 words (one token each); Ctrl-C came a few words in
    assert partial.startswith("for you you you") and len(partial.split()) < 300

    # the program lives on, and the shown part of the stopped reply is in the history
    assert ask(child, "你好") == greedy(ref, "你好", [("hello", partial)], max_length=1000)

    child.sendintr()
    assert finish(child) == 0
    assert "Traceback" not in text(child.before)


def test_ctrl_c_the_moment_a_reply_ends_still_exits(demo_model_path):
    """Ctrl-C sent as soon as the prompt is back (it used to land before readline waited for keys, and wait for the
    next key press). Each of two sessions gets it the instant its reply ends, and must exit promptly with status 0."""
    for _ in range(2):
        child = spawn(demo_model_path, "--max-length", "40")
        child.send("hello\r")
        child.expect_exact(LABEL)
        child.expect_exact(PROMPT)  # the short reply has ended
        child.sendintr()
        child.expect(pexpect.EOF, timeout=10)
        child.close()
        assert child.exitstatus == 0, text(child.before)


def test_ctrl_d_at_the_prompt_exits_cleanly(demo_model_path):
    child = spawn(demo_model_path)
    child.sendeof()
    assert finish(child) == 0
    assert "Traceback" not in text(child.before)


def test_long_conversations_drop_the_oldest_turns(ref):
    from chatglm.context import fit_history
    tokenizer = ref[0]
    history = [(f"question {i} " * 10, f"answer {i} " * 10) for i in range(12)]

    def n_tokens(h):
        return len(tokenizer([build_prompt("hi", h)])["input_ids"][0])

    assert n_tokens(history) > 400
    kept, dropped = fit_history(tokenizer, "hi", history, max_length=400, max_sequence_length=2048)
    assert dropped > 0 and kept == history[dropped:]  # the newest turns survive, in order
    assert n_tokens(kept) <= 400 - 100 < n_tokens(history[dropped - 1:])  # room for the reply; no more dropped


@pytest.mark.parametrize("raw", ["你好,世界!ok: yes;好?", "今年是[[训练时间]],对吗?", "a[[b]] [[训练", "x😀y"])
def test_streamed_pieces_add_up_to_the_final_reply(raw):
    """Post-processing rewrites earlier characters (",世" -> "，世", the date placeholder, half-decoded bytes);
    what was printed must never need taking back."""
    from chatglm.text import TextDeltas
    partials = [process_response(raw[:i]) for i in range(1, len(raw) + 1)]
    if "😀" in raw:  # a multi-byte character decodes as U+FFFD until its last byte is in
        partials.insert(partials.index(process_response(raw[:raw.index("😀") + 1])), raw[:raw.index("😀")] + "\ufffd")
    deltas = TextDeltas()
    shown = "".join(deltas.step(p) for p in partials[:-1])
    assert all(p.startswith(shown) for p in partials[-1:])
    assert shown + deltas.finish(partials[-1]) == process_response(raw)
    assert "\ufffd" not in shown


def test_a_model_path_that_does_not_load_is_a_clear_error(tmp_path):
    child = pexpect.spawn(sys.executable, ["cli_demo.py", "--model-path", str(tmp_path / "missing")],
                          cwd=str(ROOT), encoding="utf-8", timeout=120)
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 2
    out = text(child.before)
    assert "does not exist" in out and "Traceback" not in out


# ---- generation controls -------------------------------------------------------------------------------------------

CONTROLS = ["--max-length", "200", "--temperature", "1", "--top-p", "1", "--top-k", "1",
            "--repetition-penalty", "1.5", "--stop", "ownc", "--stop", "never seen"]


def test_repetition_penalty_top_k_and_stop_reach_the_model(demo_model_path, ref):
    import torch
    tokenizer, model = ref
    expected = model.chat(tokenizer, "hello", max_length=200, do_sample=False, repetition_penalty=1.5,
                          stop=["ownc", "never seen"])[0]
    penalised = model.chat(tokenizer, "hello", max_length=200, do_sample=False, repetition_penalty=1.5)[0]
    # each control matters here: the penalty changes the reply, "ownc" cuts it, and sampling at temperature 1
    # without top_k 1 is not greedy
    assert penalised != greedy(ref, "hello", max_length=200) and "ownc" in penalised
    assert expected == penalised[:penalised.index("ownc")].strip()
    torch.manual_seed(0)
    assert model.chat(tokenizer, "hello", max_length=200, temperature=1.0, top_p=1.0,
                      repetition_penalty=1.5)[0] != penalised
    child = spawn(demo_model_path, *CONTROLS)  # --temperature 1 overrides spawn's 0: sampling, with top_k 1
    for _ in range(2):
        # printed text is never taken back, so the stream must hold back what may become "ownc" (the reply grows
        # "...ownown" before "ownc" appears)
        assert ask(child, "hello") == expected
        child.send("clear\r")
        child.expect_exact(PROMPT)
    child.send("stop\r")
    assert finish(child) == 0


@pytest.mark.parametrize("args, message", [
    (["--top-k", "-1"], "argument --top-k: top_k must be an integer >= 0"),
    (["--top-k", "2.5"], "argument --top-k: invalid int value"),
    (["--repetition-penalty", "0"], "argument --repetition-penalty: repetition_penalty must be in (0, 100]"),
    (["--repetition-penalty", "nan"], "argument --repetition-penalty: repetition_penalty must be a finite number"),
    (["--top-p", "0"], "argument --top-p: top_p must be in (0, 1]"),
    (["--temperature", "-1"], "argument --temperature: temperature must be in [0, 100]"),
    (["--max-length", "0"], "argument --max-length: must be a positive integer"),
    (["--stop", ""], "argument --stop: stop strings must not be empty"),
    (["--pre-seq-len", "-3"], "argument --pre-seq-len: must be a positive integer, got -3"),
])
def test_bad_generation_options_are_refused_before_loading(args, message):
    import subprocess
    out = subprocess.run([sys.executable, "cli_demo.py", *args], cwd=ROOT, capture_output=True, text=True,
                         timeout=60, env={**os.environ, "CHATGLM_MODEL": "/nonexistent"})  # never reached
    assert out.returncode == 2 and message in out.stderr, out.stderr
    assert "Traceback" not in out.stderr and "does not exist" not in out.stderr


def test_input_the_model_cannot_read_gets_one_line_and_the_chat_goes_on(demo_model_path):
    """A NUL typed or piped in, and bytes that are not UTF-8 (an encoded lone surrogate, ED A0 80): one line
    naming the problem, or the bytes shown as U+FFFD, never a traceback; the next message is answered."""
    import subprocess
    piped = b"a\x00b\n\xed\xa0\x80\nhi\nstop\n"
    out = subprocess.run([sys.executable, "cli_demo.py", "--model-path", demo_model_path, "--max-length", "40"],
                         cwd=ROOT, input=piped, capture_output=True, timeout=120)
    stdout, stderr = out.stdout.decode("utf-8", "replace"), out.stderr.decode("utf-8", "replace")
    assert out.returncode == 0, stderr
    assert "not sent: the message contains a NUL character at character 1" in stdout
    assert stdout.count("ChatGLM-6B：") == 2  # the U+FFFD line and "hi" are answered
    assert "Traceback" not in stdout + stderr
