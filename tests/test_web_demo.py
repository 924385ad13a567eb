"""web_demo.py and web_demo_old.py as a user meets them: each script runs as a real server on a loopback port with
the demo checkpoint, and headless Chromium (Debian's or Playwright's, see conftest.browser) types, sends, stops
and clears.

Replies are compared with the same model run in this process with Temperature 0 (greedy), so a streamed reply
that went to the wrong tab, lost its history or was cut short shows up as different words.
"""
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

import web_common
from chatglm import build_prompt

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
SCRIPTS = ["web_demo.py", "web_demo_old.py"]

# On the demo checkpoint these two have greedy replies of a few tokens (so second-turn prompts stay far below the
# point where chatglm.context.fit_history drops turns) and LONG_Q's runs to the length limit (seconds of streaming).
SHORT_Q1, SHORT_Q2 = "Tell me a joke", "What is AI?"
LONG_Q = "hello"


# ---------------------------------------------------------------------------------------------------------------
# rendering, no browser needed

def test_model_html_is_shown_as_text_not_markup():
    out = web_common.render_reply('<img src=x onerror="alert(1)"> & <script>x()</script> **bold**')
    assert out == ('<p>&lt;img src=x onerror=&quot;alert(1)&quot;&gt; &amp; &lt;script&gt;x()&lt;/script&gt; '
                   '<strong>bold</strong></p>')


def test_code_keeps_its_text_and_an_open_fence_runs_to_the_end():
    text = "see `a<b>` and\n```html\n<div>&amp;</div>\n```\n<i>after</i>\n~~~\nstill <code>"
    out = web_common.render_reply(text)
    assert out == ('<p>see <code>a&lt;b&gt;</code> and</p>&#10;<pre><code class="language-html">&lt;div&gt;&amp;amp;'
                   '&lt;/div&gt;&#10;</code></pre>&#10;<p>&lt;i&gt;after&lt;/i&gt;</p>&#10;<pre><code>still '
                   '&lt;code&gt;</code></pre>')
    assert "\n" not in out  # one line: Gradio's Markdown pass keeps it as one HTML block


def test_what_the_user_typed_is_shown_as_typed():
    assert web_common.render_typed("**a** <b>\n  c") == '<p class="typed">**a** &lt;b&gt;&#10;  c</p>'


def test_web_pages_warn_when_exposed_without_a_login():
    def warning(*argv):
        return web_common.exposure_warning(web_common.parse_args("x", list(argv)))
    assert warning() == "" and warning("--auth", "a:b", "--share") == ""
    assert "WITHOUT A LOGIN" in warning("--host", "0.0.0.0") and "--auth" in warning("--host", "0.0.0.0")
    assert "public share link" in warning("--share")
    with pytest.raises(SystemExit):
        web_common.parse_args("x", ["--auth", "no-colon"])


@pytest.mark.parametrize("text, stops", [
    ("", []), ("  \n ", []), ("Observation:", ["Observation:"]), ("a, b ,,c", ["a", "b", "c"]),
    ("first, with comma\nsecond\n\n", ["first, with comma", "second"]), ("\n你好，世界\n", ["你好，世界"]),
])
def test_stop_strings_box_is_one_per_line_or_comma_separated(text, stops):
    assert web_common.parse_stop(text) == stops


# ---------------------------------------------------------------------------------------------------------------
# fixtures: the model (for expected replies), a server per script, one browser

def words(text: str) -> str:
    """What survives Markdown rendering: letters, digits and CJK, in order (the demo model writes '-', '>' ...)."""
    return " ".join(re.sub(r"[^0-9A-Za-z\u4e00-\u9fff]+", " ", text).split())


# One torch thread, here and in the servers: the same thread count keeps greedy replies identical in both, and
# on a busy 2-core machine a tiny model runs many times faster on one thread than on two that fight for cores.
THREADS = 1


@pytest.fixture(scope="module")
def model(demo_model_path):
    import torch
    from chatglm import load_model
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    tokenizer, model = load_model(demo_model_path)
    yield tokenizer, model
    torch.set_num_threads(threads)


def greedy(model, query, history=(), max_length=2048, **kw):
    tokenizer, m = model
    return m.chat(tokenizer, query, history=list(history), do_sample=False, max_length=max_length, **kw)[0]


def test_top_k_slider_default_is_what_generation_does_without_it(model):
    """Upstream passed no top_k, so sampling used the library's 50; the slider's default must keep that."""
    import torch
    tokenizer, m = model

    def sample(**kw):  # a hot temperature spreads the choice over many tokens, so top_k matters
        torch.manual_seed(0)
        return m.chat(tokenizer, "讲个故事", max_length=40, top_p=1.0, temperature=5.0, **kw)[0]

    assert sample(top_k=web_common.TOP_K["value"]) == sample() != sample(top_k=0)
    assert web_common.REPETITION_PENALTY["value"] == 1.0  # 1 = no penalty, as upstream


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, script: str, demo_model_path: str, log_dir: Path, *options: str):
        self.script, self.port = script, free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.log = log_dir / f"{script}.log"
        env = {k: v for k, v in os.environ.items() if k != "CHATGLM_MODEL"}  # no --model-path: the demo checkpoint
        env.update(GRADIO_ANALYTICS_ENABLED="False", OMP_NUM_THREADS=str(THREADS))
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, script, "--port", str(self.port), *options], cwd=ROOT,
                                         env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 240
        while True:
            try:
                with urllib.request.urlopen(self.url, timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if self.proc.poll() is not None or time.time() > deadline:
                self.stop()
                pytest.fail(f"{script} did not start serving {self.url}:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.5)

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module", params=SCRIPTS)
def server(request, demo_model_path, tmp_path_factory):  # demo_model_path: built before the script looks for it
    srv = Server(request.param, demo_model_path, tmp_path_factory.mktemp("web"))
    yield srv
    srv.stop()


class ChatPage:
    """The few things a user does on either page, and what they see there."""

    def __init__(self, page, server):
        self.page, self.old = page, server.script == "web_demo_old.py"
        page.goto(server.url)
        page.wait_for_selector("#query textarea")
        self.box = page.locator("#query textarea")

    def set_slider(self, elem_id, value):
        number = self.page.locator(f"#{elem_id} input[type=number]")
        number.fill(str(value))
        number.press("Enter")
        assert float(self.page.locator(f"#{elem_id} input[type=range]").input_value()) == value

    def greedy_settings(self, max_length):
        self.set_slider("temperature", 0)
        self.set_slider("max-length", max_length)

    def send(self, text, with_button=False):
        self.box.fill(text)
        if with_button:
            self.page.click("#generate" if self.old else "#submit")
        else:
            self.box.press("Enter")

    # what is on screen: (queries, replies) in order
    JS_TURNS = """old => {
        if (!old) {
            const all = s => [...document.querySelectorAll('#chatbot ' + s)].map(e => e.innerText);
            return [all('[data-testid="user"]'), all('[data-testid="bot"]')];
        }
        const text = document.querySelector('#transcript').innerText;
        const queries = [], replies = [];
        for (const turn of text.split('用户：').slice(1)) {
            const [q, r] = turn.split('ChatGLM-6B：');
            queries.push(q); if (r !== undefined && r.trim()) replies.push(r);
        }
        return [queries, replies];
    }"""

    def turns(self):
        queries, replies = self.page.evaluate(self.JS_TURNS, self.old)
        return [words(q) for q in queries], [words(r) for r in replies]

    def last_reply(self):
        return (self.turns()[1] or [""])[-1]

    def wait_reply(self, expected, timeout=60):
        """Until the last reply reads `expected` (compared as words); fails with what is shown instead."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.last_reply() == words(expected):
                return
            time.sleep(0.05)
        pytest.fail(f"reply never became {expected!r}; page shows {self.turns()}, text box holds "
                    f"{self.box.input_value()!r}")

    def wait_still(self, seconds=1.0, timeout=10):
        """The last reply once it has not changed for `seconds`; fails if it keeps changing for `timeout`."""
        deadline, shown, since = time.time() + timeout, self.last_reply(), time.time()
        while time.time() - since < seconds:
            assert time.time() < deadline, f"reply still growing after {timeout} s: {self.turns()}"
            time.sleep(0.05)
            if self.last_reply() != shown:
                shown, since = self.last_reply(), time.time()
        return shown

    def record_reply_updates(self):
        """From now on, remember every distinct text the last reply shows (sampled every 5 ms in the page)."""
        self.page.evaluate("""([js, old]) => { const turns = eval(js); window.__seen = [];
            setInterval(() => { const r = turns(old)[1]; const t = r.length ? r[r.length - 1] : '';
                                if (t !== window.__seen[window.__seen.length - 1]) window.__seen.push(t); }, 5); }""",
                           [self.JS_TURNS, self.old])

    def seen_updates(self):
        return [words(t) for t in self.page.evaluate("window.__seen") if t.strip()]


@pytest.fixture
def chat_page(server, browser):
    """Opens the page under test in a new tab (all tabs of one test share a browser context)."""
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    yield lambda: ChatPage(context.new_page(), server)
    context.close()


# ---------------------------------------------------------------------------------------------------------------
# the command line

@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_take_the_shared_options(script):
    out = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for option in ("--model-path", "--quantize {4,8}", "--device", "--dtype", "--ptuning-checkpoint", "--pre-seq-len",
                   "--host", "--port", "--share", "--auth USER:PASSWORD"):
        assert option in out.stdout
    assert "default 127.0.0.1" in out.stdout and "default 7860" in out.stdout


def test_a_model_path_that_does_not_load_is_reported_plainly(tmp_path):
    out = subprocess.run([sys.executable, "web_demo.py", "--model-path", str(tmp_path / "missing")], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert str(tmp_path / "missing") in out.stderr and "Traceback" not in out.stderr, out.stderr


# ---------------------------------------------------------------------------------------------------------------
# the pages

def test_page_shows_demo_notice_and_upstream_sliders(server, chat_page):
    page = chat_page().page
    notice = page.locator("#demo-notice")
    assert notice.is_visible()
    assert "--model-path" in notice.inner_text() and "not ChatGLM-6B" in notice.inner_text()
    # what is loaded: the demo model's folder, device, precision, quantization
    assert page.locator("#model-info").inner_text().startswith("Model: demo model, NOT ChatGLM-6B (")
    assert "· cpu · float32 · not quantized" in page.locator("#model-info").inner_text()
    for elem_id, (lo, hi, default, step) in {"max-length": (0, 4096, 2048, 1), "top-p": (0, 1, 0.7, 0.01),
                                              "temperature": (0, 1, 0.95, 0.01)}.items():
        slider = page.locator(f"#{elem_id} input[type=range]")
        assert [float(slider.get_attribute(a)) for a in ("min", "max", "step")] == [lo, hi, step]
        assert float(slider.input_value()) == default
    # the added controls, beside them: defaults that change nothing
    for elem_id, (lo, hi, default, step) in {"repetition-penalty": (1, 2, 1.0, 0.01),
                                              "top-k": (0, 200, 50, 1)}.items():
        slider = page.locator(f"#{elem_id} input[type=range]")
        assert [float(slider.get_attribute(a)) for a in ("min", "max", "step")] == [lo, hi, step]
        assert float(slider.input_value()) == default
    assert page.locator("#stop-strings textarea").input_value() == ""


def test_server_listens_on_loopback_only(server):
    listening = [line.split()[1] for line in Path("/proc/net/tcp").read_text().splitlines()[1:]
                 if line.split()[3] == "0A" and int(line.split()[1].split(":")[1], 16) == server.port]
    assert listening == [f"0100007F:{server.port:04X}"]


def test_reply_streams_in_many_updates_and_matches_the_model(server, chat_page, model):
    chat = chat_page()
    chat.greedy_settings(max_length=300)
    expected = greedy(model, LONG_Q, max_length=300)
    chat.record_reply_updates()
    chat.send(LONG_Q)
    chat.wait_reply(expected)
    updates = chat.seen_updates()
    # a busy browser may paint several tokens at once, but a streamed reply shows at least two partial texts
    assert len(updates) >= 3 and len(updates[0]) < len(updates[-1]) / 2, f"reply not streamed: {updates}"
    assert all(words(expected).startswith(u) for u in updates[:-1])  # each update extends the reply
    assert chat.box.input_value() == ""  # the box is cleared for the next message
    if server.script == "web_demo.py":
        ARTIFACTS.mkdir(exist_ok=True)
        chat.page.screenshot(path=str(ARTIFACTS / "web_demo.png"))


def test_second_turn_uses_history_and_clear_forgets_it(server, chat_page, model):
    r1 = greedy(model, SHORT_Q1, max_length=300)
    r2 = greedy(model, SHORT_Q2, [(SHORT_Q1, r1)], max_length=300)
    r2_fresh = greedy(model, SHORT_Q2, max_length=2048)
    assert words(r2) != words(r2_fresh), "demo model gives the same reply with and without history"
    chat = chat_page()
    chat.greedy_settings(max_length=300)
    chat.send(SHORT_Q1)
    chat.wait_reply(r1)
    chat.send(SHORT_Q2, with_button=True)
    chat.wait_reply(r2)
    assert chat.turns() == ([words(SHORT_Q1), words(SHORT_Q2)], [words(r1), words(r2)])
    if server.script == "web_demo_old.py":
        ARTIFACTS.mkdir(exist_ok=True)
        chat.page.screenshot(path=str(ARTIFACTS / "web_demo_old.png"))
    # Clear in the middle of a long reply: the reply stops and nothing of the conversation comes back
    chat.set_slider("max-length", 2048)
    chat.send(LONG_Q)
    chat.page.wait_for_function("([js, old]) => eval(js)(old)[1].length == 3", arg=[ChatPage.JS_TURNS, chat.old])
    chat.page.click("#clear")
    deadline = time.time() + 30
    while chat.turns() != ([], []) and time.time() < deadline:
        time.sleep(0.05)
    chat.wait_still(seconds=1.0)  # and it stays empty: no update of the cleared reply paints it back
    assert chat.turns() == ([], []), f"after Clear the page shows {chat.turns()}"
    chat.send(SHORT_Q2)
    chat.wait_reply(r2_fresh)
    assert chat.turns() == ([words(SHORT_Q2)], [words(r2_fresh)])


def test_clear_during_a_reply_ends_it_and_its_last_update_is_the_cleared_view(server):
    """A busy browser may still be painting a reply's earlier updates when Clear's empty view arrives; the reply's
    stream must end on the cleared view too, or those updates paint the old conversation back (seen in CI). Read
    here over HTTP, where every update of the reply's stream can be seen, with the pages' own client library."""
    from gradio_client import Client
    client = Client(server.url, verbose=False)
    reply = client.submit(LONG_Q, 2048, 0.7, 0, 1.0, 50, "", api_name="/handle")  # greedy: runs to 2048 tokens
    deadline = time.time() + 60
    while len(reply.outputs()) < 3 and time.time() < deadline:
        time.sleep(0.02)
    assert not reply.done() and reply.outputs()[-1][1], f"no reply streaming: {reply.outputs()}"
    assert not client.predict(api_name="/clear")
    reply.result(timeout=10)  # ended soon after Clear, not at Maximum length
    updates = [view for _, view in reply.outputs()]
    assert updates[-2] and not updates[-1], updates[-2:]


def test_stop_ends_generation_at_once_and_keeps_the_partial_reply(server, chat_page, model):
    tokenizer, m = model
    chat = chat_page()
    chat.set_slider("temperature", 0)
    cpu, start = server.cpu_seconds(), time.time()
    chat.send(LONG_Q)  # its greedy reply runs to Maximum length 2048: a few seconds of streaming
    chat.page.wait_for_function("([js, old]) => eval(js)(old)[1].length", arg=[ChatPage.JS_TURNS, chat.old],
                                polling="raf")
    chat.page.click("#stop")
    busy = (server.cpu_seconds() - cpu) / (time.time() - start)
    shown = chat.wait_still()  # a busy browser may still be painting updates that left the server before Stop
    idle = server.cpu_seconds()
    time.sleep(1.0)
    idle = server.cpu_seconds() - idle
    assert chat.last_reply() == shown, "reply grew again after Stop"
    assert busy > 0.1 and idle < min(0.15, busy / 3), f"server CPU {busy:.2f} s/s generating, {idle:.2f} after Stop"

    # what is shown is a prefix of the model's own reply, and far from its end
    prefixes = []
    for reply, _ in m.stream_chat(tokenizer, LONG_Q, do_sample=False, max_length=2048):
        prefixes.append(reply)
        if len(words(reply)) > len(shown) + 200:
            break
    else:
        pytest.fail(f"the model's whole reply is {len(words(reply))} characters, Stop came after {len(shown)}")
    matches = [i for i, p in enumerate(prefixes) if words(p) == shown]
    assert matches, f"shown reply {shown!r} is not a prefix of the model's reply"

    # the stopped reply stays in the history exactly as shown (Stop's last update is the stored conversation);
    # Maximum length is set so the whole history fits in the prompt (chatglm.context.fit_history) with a short reply
    held = [prefixes[i] for i in matches]
    prompt_len = len(tokenizer.encode(build_prompt(SHORT_Q2, [(LONG_Q, held[-1])])))
    max_length = prompt_len * 4 // 3 + 4
    chat.set_slider("max-length", max_length)
    candidates = {words(greedy(model, SHORT_Q2, [(LONG_Q, p)], max_length=max_length)) for p in held}
    chat.send(SHORT_Q2)
    deadline = time.time() + 60
    while chat.last_reply() not in candidates and time.time() < deadline:
        time.sleep(0.05)
    assert chat.last_reply() in candidates, f"second turn {chat.turns()} did not follow the stopped reply"


def test_stop_right_after_sending_ends_the_turn_without_an_error_or_a_reply(server, chat_page, model):
    """Send and Stop in the same instant (the Stop reaches the server before the turn starts): no error badge, no
    reply, and the next turn sees the stopped message with the empty reply the page shows."""
    chat = chat_page()
    chat.greedy_settings(max_length=300)
    chat.box.fill(LONG_Q)
    chat.page.evaluate("ids => { document.querySelector(ids[0]).click(); document.querySelector('#stop').click(); }",
                       ["#generate" if chat.old else "#submit"])
    chat.page.wait_for_function("([js, old]) => eval(js)(old)[0].length", arg=[ChatPage.JS_TURNS, chat.old])
    time.sleep(2)  # a reply that was not stopped would be streaming by now
    queries, replies = chat.turns()
    assert queries == [words(LONG_Q)]
    assert chat.page.get_by_text(re.compile(r"^\s*Error\s*$")).count() == 0
    # Usually no reply at all. The two clicks are separate requests, so the turn's first token can beat the Stop
    # to the page (it did once on a 2-core AMD EPYC VM); then a few words show and stay in the history as shown.
    tokenizer, m = model
    held = [""]
    if replies and replies[0]:
        shown = replies[0]
        held = []
        for reply, _ in m.stream_chat(tokenizer, LONG_Q, do_sample=False, max_length=300):
            if words(reply) == shown:
                held.append(reply)
            if len(words(reply)) > len(shown):
                break
        assert held and len(shown) < 40, f"{shown!r}: not a prefix of the model's reply, or Stop came late"
    chat.send(SHORT_Q1)
    candidates = {words(greedy(model, SHORT_Q1, [(LONG_Q, h)], max_length=300)) for h in held}
    deadline = time.time() + 60
    while chat.last_reply() not in candidates and time.time() < deadline:
        time.sleep(0.05)
    assert chat.last_reply() in candidates, f"second turn {chat.turns()} did not follow the shown history"


def test_the_conversation_comes_first_and_the_controls_below_it(server, chat_page):
    """Both pages as upstream laid them out: the chat at the top, the text box and buttons under it."""
    chat = chat_page()
    conversation = chat.page.locator("#transcript" if chat.old else "#chatbot").bounding_box()
    box = chat.page.locator("#query").bounding_box()
    assert conversation["y"] + conversation["height"] <= box["y"], (conversation, box)


def test_message_sent_during_a_reply_goes_after_it_and_old_turns_make_room(server, chat_page, model):
    r_long = greedy(model, LONG_Q, max_length=300)
    r_next = greedy(model, SHORT_Q2, max_length=300)  # LONG_Q's turn no longer fits beside it in 300 tokens
    chat = chat_page()
    chat.greedy_settings(max_length=300)
    chat.send(LONG_Q)
    chat.page.wait_for_function("([js, old]) => eval(js)(old)[1].length", arg=[ChatPage.JS_TURNS, chat.old])
    chat.send(SHORT_Q2)  # while the reply is still streaming
    chat.page.get_by_text("The oldest 1 turn(s) are left out of the prompt").wait_for(timeout=30_000)
    chat.wait_reply(r_next)
    assert chat.turns() == ([words(LONG_Q), words(SHORT_Q2)], [words(r_long), words(r_next)])


def test_two_tabs_stream_at_the_same_time_without_mixing(server, chat_page, model):
    """Both tabs' replies grow during the same second (the engine answers them together), each is its own
    question's answer, and Stop in one leaves the other streaming."""
    long_q2 = "hi there"  # also seconds of streaming on the demo model, a different answer
    r_1, r_2 = greedy(model, LONG_Q), greedy(model, long_q2)
    tab1, tab2 = chat_page(), chat_page()
    for tab in (tab1, tab2):
        tab.set_slider("temperature", 0)
    length = "([js, old]) => eval(js)(old)[1].join('').length"
    tab1.send(LONG_Q)
    tab1.page.wait_for_function(f"{length} > 0", arg=[ChatPage.JS_TURNS, tab1.old])
    tab2.send(long_q2)
    tab2.page.wait_for_function(f"{length} > 0", arg=[ChatPage.JS_TURNS, tab2.old])
    before = [tab.page.evaluate(length, [ChatPage.JS_TURNS, tab.old]) for tab in (tab1, tab2)]
    time.sleep(1.0)
    after = [tab.page.evaluate(length, [ChatPage.JS_TURNS, tab.old]) for tab in (tab1, tab2)]
    assert after[0] > before[0] and after[1] > before[1], f"reply lengths {before} -> {after} in one second"
    tab1.page.click("#stop")  # tab 2 goes on streaming
    time.sleep(0.5)
    still = tab2.page.evaluate(length, [ChatPage.JS_TURNS, tab2.old])
    time.sleep(1.0)
    assert tab2.page.evaluate(length, [ChatPage.JS_TURNS, tab2.old]) > still, "tab 2 stopped with tab 1"
    tab2.page.click("#stop")
    for tab, question, full in ((tab1, LONG_Q, r_1), (tab2, long_q2, r_2)):
        shown = tab.turns()  # its own stopped reply: a prefix of what the model says to its own question
        assert shown[0] == [words(question)] and len(shown[1]) == 1 and shown[1][0], shown
        assert words(full).startswith(shown[1][0]), f"{question!r} shows {shown}"


def test_a_message_behind_other_chats_says_it_is_waiting_then_gets_its_answer(demo_model_path, tmp_path, browser,
                                                                             model):
    """With room for one reply at a time (a tiny KV budget), a second tab's message waits for the first tab's reply;
    the page says so (not a silent wait), and the answer then comes, the same as alone."""
    srv = Server("web_demo.py", demo_model_path, tmp_path, "--kv-budget", "0.0001")
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    try:
        tab1, tab2 = ChatPage(context.new_page(), srv), ChatPage(context.new_page(), srv)
        for tab in (tab1, tab2):
            tab.set_slider("temperature", 0)
        tab1.send(LONG_Q)
        tab1.page.wait_for_function("([js, old]) => eval(js)(old)[1].join('').length > 0",
                                    arg=[ChatPage.JS_TURNS, tab1.old])
        tab2.send(SHORT_Q1)
        tab2.page.get_by_text("1 message(s) from other chats are ahead of yours").wait_for(timeout=20_000)
        assert tab2.turns()[1] in ([], [""]), "the second tab was answered while the first reply ran"
        tab2.wait_reply(greedy(model, SHORT_Q1), timeout=180)
        tab1.wait_reply(greedy(model, LONG_Q), timeout=180)
        assert tab1.page.get_by_text("ahead of yours").count() == 0  # the first tab had nobody ahead
    finally:
        context.close()
        srv.stop()


def test_html_in_messages_is_displayed_as_typed_not_run(server, chat_page):
    chat = chat_page()
    chat.set_slider("max-length", 400)
    typed = ('<img src=x onerror="window.pwned=1"> <b>hi</b> **bold** \\`<form><input type=password></form>` '
             '<div style="position:fixed;inset:0">cover</div><style>body{display:none}</style>')
    chat.send(typed)
    area = chat.page.locator("#transcript" if chat.old else "#chatbot")
    area.locator(".typed").filter(has_text="<img src=x").wait_for(timeout=10_000)
    assert area.locator(".typed").first.inner_text() == typed  # as typed: no Markdown, no HTML
    assert area.locator("img, form, input, .prose style, [style*=fixed]").count() == 0
    assert area.locator(".typed *").count() == 0  # no element at all inside the user's text
    assert chat.page.evaluate("window.pwned") is None


def test_text_the_model_cannot_read_is_refused_with_a_warning_and_kept(server, chat_page):
    chat = chat_page()
    # a lone surrogate, as a page script or a broken paste can put into the box (the keyboard cannot)
    chat.page.evaluate("""() => { const box = document.querySelector('#query textarea');
        box.value = 'a\\ud800b'; box.dispatchEvent(new Event('input', {bubbles: true})); }""")
    chat.box.press("Enter")
    chat.page.get_by_text("lone surrogate").first.wait_for(timeout=10_000)
    assert chat.turns() == ([], []) and "Traceback" not in chat.page.inner_text("body")


def test_empty_or_too_long_input_sends_nothing_and_keeps_the_text(server, chat_page):
    chat = chat_page()
    for text in ("", "   "):
        chat.send(text)
    chat.set_slider("max-length", 5)
    chat.send("a message longer than five tokens")
    chat.page.get_by_text("shorten the message or raise max_length").wait_for(timeout=10_000)
    assert chat.box.input_value() == "a message longer than five tokens"
    time.sleep(0.5)
    assert chat.turns() == ([], [])


def test_maximum_length_beyond_the_model_context_is_capped(server, chat_page, model):
    expected = greedy(model, SHORT_Q1, max_length=model[1].config.max_sequence_length)
    chat = chat_page()
    chat.greedy_settings(max_length=4096)
    chat.send(SHORT_Q1)
    chat.page.get_by_text("Maximum length 4096 is beyond this model's context; using 2048.").wait_for(timeout=10_000)
    chat.wait_reply(expected)


def test_repetition_penalty_top_k_and_stop_strings_reach_the_model(server, chat_page, model):
    # on the demo model the penalty turns "for you you you ..." into "for youownown...owncally ...", which "ownc"
    # cuts; Top K 1 makes sampling at Temperature 1 greedy
    expected = greedy(model, LONG_Q, max_length=200, repetition_penalty=1.5, stop=["ownc", "never seen"])
    penalised = greedy(model, LONG_Q, max_length=200, repetition_penalty=1.5)
    assert words(expected) != words(penalised) != words(greedy(model, LONG_Q, max_length=200))
    chat = chat_page()
    chat.set_slider("max-length", 200)
    chat.set_slider("top-p", 0)  # a value generation can't use: refused, nothing sent, the text stays
    chat.send(LONG_Q)
    chat.page.get_by_text("top_p must be in (0, 1]").wait_for(timeout=10_000)
    assert chat.box.input_value() == LONG_Q and chat.turns() == ([], [])
    for elem_id, value in (("top-p", 1), ("temperature", 1), ("top-k", 1), ("repetition-penalty", 1.5)):
        chat.set_slider(elem_id, value)
    chat.page.locator("#stop-strings textarea").fill("ownc\nnever seen")
    chat.record_reply_updates()
    chat.send(LONG_Q)
    chat.wait_reply(expected)
    # the reply never showed text it then took back (it grows "...ownown" before "ownc" appears)
    assert all(words(expected).startswith(u) for u in chat.seen_updates()), chat.seen_updates()
    assert chat.wait_still(0.5) == words(expected)
