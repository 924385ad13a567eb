"""What web_demo.py and web_demo_old.py share: options, the demo-model notice, the generation controls, safe
rendering of chat text and one queued, stoppable chat turn.

Both pages keep the raw (query, reply) pairs in a gr.State (Conversation) and only ever show escaped copies, so model output can
never inject HTML into the page while Markdown (emphasis, lists, code blocks) still renders.
"""
import argparse
import os
import re
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import gradio as gr

from chatglm.chat import check_generation_args
from chatglm.context import ContextTooLongError, fit_history
from chatglm.loading import ModelLoadError
from chatglm.model_info import describe_model
from chatglm.options import add_model_args, add_server_args, load_from_args

# upstream's slider ranges and defaults
MAX_LENGTH = dict(minimum=0, maximum=4096, value=2048, step=1)
TOP_P = dict(minimum=0, maximum=1, value=0.7, step=0.01)
TEMPERATURE = dict(minimum=0, maximum=1, value=0.95, step=0.01)
# added controls; their defaults are what generation does when they are not given (no penalty, top_k 50, no stop)
REPETITION_PENALTY = dict(minimum=1, maximum=2, value=1.0, step=0.01)
TOP_K = dict(minimum=0, maximum=200, value=50, step=1)
DEFAULT_PORT = 7860

# a local font stack: the default theme fetches Google Fonts, which offline machines can't reach
THEME = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                          font_mono=["ui-monospace", "Consolas", "monospace"])
CSS = "#demo-notice {border: 1px solid #f59e0b; background: #fffbeb; border-radius: 6px; padding: 4px 12px;}"


def parse_args(description: str, argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    add_model_args(parser)
    add_server_args(parser, port=DEFAULT_PORT, share=True)
    # Gradio's own variables, which a Hugging Face Space sets (0.0.0.0:7860); unset, the defaults stay loopback
    parser.set_defaults(host=os.environ.get("GRADIO_SERVER_NAME") or "127.0.0.1",
                        port=int(os.environ.get("GRADIO_SERVER_PORT") or DEFAULT_PORT))
    return parser.parse_args(argv)


def load(args: argparse.Namespace):
    """(tokenizer, model) for the parsed options; a path that does not load exits with its message, not a trace."""
    try:
        return load_from_args(args)
    except ModelLoadError as e:
        raise SystemExit(f"error: {e}")


def launch(demo: gr.Blocks, args: argparse.Namespace):
    # run_history off: the chat keeps its own history, and calls need not be recorded (in the browser, or in a
    # Hugging Face bucket that page offers to connect)
    demo.queue().launch(server_name=args.host, server_port=args.port, share=args.share, theme=THEME, css=CSS,
                        ssr_mode=False, show_error=True, run_history=False)


def demo_notice(model) -> str:
    """Markdown for the banner shown while the demo checkpoint is loaded ("" for real weights)."""
    if not getattr(model, "is_demo", False):
        return ""
    return ("**Demo checkpoint loaded: this is a tiny model trained briefly on a few lines, not ChatGLM-6B, "
            "so its replies are gibberish.** Start the page with `--model-path THUDM/chatglm-6b` (or a local folder "
            "of the weights, or set `CHATGLM_MODEL`) to chat with the real model.")


def add_notice(model):
    """The banner: the demo-model warning (when it is loaded), then what is loaded: model, device, precision,
    quantization, P-Tuning checkpoint."""
    text = demo_notice(model)
    if text:
        gr.Markdown(text, elem_id="demo-notice")
    gr.Markdown(describe_model(model), elem_id="model-info")


def add_sliders():
    """The three generation sliders, in upstream's order: Maximum length, Top P, Temperature."""
    return (gr.Slider(label="Maximum length", interactive=True, elem_id="max-length", **MAX_LENGTH),
            gr.Slider(label="Top P", interactive=True, elem_id="top-p", **TOP_P),
            gr.Slider(label="Temperature", interactive=True, elem_id="temperature", **TEMPERATURE))


def add_more_controls():
    """The controls added to upstream's: Repetition penalty, Top K and Stop strings (shown below the sliders)."""
    return (gr.Slider(label="Repetition penalty", info="1 = off; above 1, words already said become less likely",
                      interactive=True, elem_id="repetition-penalty", **REPETITION_PENALTY),
            gr.Slider(label="Top K", info="sample among the K most likely tokens; 0 = no limit", interactive=True,
                      elem_id="top-k", **TOP_K),
            gr.Textbox(label="Stop strings", info="the reply ends before the first of these; one per line, or "
                       "comma-separated", lines=2, max_lines=6, placeholder="(none)", elem_id="stop-strings"))


def parse_stop(text) -> list:
    """The Stop strings box as a list: one per line; a line without others splits at commas. Blanks are dropped."""
    lines = (text or "").splitlines()
    parts = lines if len([line for line in lines if line.strip()]) > 1 else ",".join(lines).split(",")
    return [part.strip() for part in parts if part.strip()]


# ---------------------------------------------------------------------------------------------------------------
# Safe Markdown: escape HTML everywhere except inside code, where Markdown already shows text literally (an
# escaped "&lt;" there would be displayed as the five characters).

_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
_CODE_SPAN = re.compile(r"(?<!`)(`+)(?!`)(.+?)(?<!`)\1(?!`)", re.S)


def _escape_html(text: str) -> str:
    # "<" opens every tag and "&" every entity; ">" alone is harmless and starts Markdown quotes, so it stays
    return text.replace("&", "&amp;").replace("<", "&lt;")


def _escape_outside_code_spans(text: str) -> str:
    out, pos = [], 0
    for m in _CODE_SPAN.finditer(text):
        if "\n\n" in m.group(2):  # a code span never crosses a paragraph break
            continue
        out += [_escape_html(text[pos:m.start()]), m.group(0)]
        pos = m.end()
    out.append(_escape_html(text[pos:]))
    return "".join(out)


def to_safe_markdown(text: str) -> str:
    """Markdown that shows `text` as the model wrote it, with any HTML in it displayed as text, never run.

    A fence left open (a reply still streaming, or stopped) is closed so it cannot swallow what follows it."""
    out, prose, fence = [], [], None
    for line in text.split("\n"):
        m = _FENCE.match(line)
        if fence is None and m:
            out.append(_escape_outside_code_spans("\n".join(prose)))
            prose, fence = [], m.group(1)
            out.append(line)
        elif fence is not None:
            out.append(line)
            if m and m.group(1)[0] == fence[0] and len(m.group(1)) >= len(fence) and not line.strip().strip(fence[0]):
                fence = None
        else:
            prose.append(line)
    if prose:
        out.append(_escape_outside_code_spans("\n".join(prose)))
    if fence is not None:
        out.append(fence)
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------------------
# One model, many browser tabs: turns run one at a time, first come first served.

class ModelQueue:
    """First-come-first-served access to the model. Waiting is a poll, so a waiting turn can still be stopped."""

    def __init__(self):
        self._cond = threading.Condition()
        self._line = deque()

    def join(self, ticket):
        with self._cond:
            self._line.append(ticket)

    def wait_turn(self, ticket, timeout: float) -> int:
        """Turns ahead of `ticket` after waiting up to `timeout` seconds (0: its turn has come)."""
        with self._cond:
            self._cond.wait_for(lambda: self._line[0] is ticket, timeout)
            return self._line.index(ticket)

    def leave(self, ticket):
        with self._cond:
            self._line.remove(ticket)
            self._cond.notify_all()


MODEL_QUEUE = ModelQueue()


class Waiting(int):
    """Yielded by stream_reply instead of text while other chats hold the model: the number of turns ahead."""


def stream_reply(model, tokenizer, query: str, history: list, max_length, top_p, temperature, queue=MODEL_QUEUE,
                 **options):
    """Yields Waiting(n) while n turns are ahead (telling the user once), then the reply so far after every token.
    `options`: more keyword arguments of stream_chat (repetition_penalty, top_k, stop).

    Closing this generator (Stop, Clear, a closed tab) leaves the queue and closes model.stream_chat, which ends
    generation at once. Temperature 0 means greedy decoding (stream_chat handles it)."""
    ticket = object()
    queue.join(ticket)
    try:
        told = False
        while (ahead := queue.wait_turn(ticket, timeout=0.2)) > 0:
            if not told:
                gr.Info(f"Waiting for {ahead} other chat(s) to finish first.")
                told = True
            yield Waiting(ahead)
        steps = model.stream_chat(tokenizer, query, history, max_length=int(max_length), top_p=float(top_p),
                                  temperature=float(temperature), **options)
        try:
            for response, _ in steps:
                yield response
        finally:
            steps.close()
    finally:
        queue.leave(ticket)


class Refused(Exception):
    """A message that gets a warning instead of a reply (str: the warning, empty for an empty message)."""


def generation_options(top_p, temperature, repetition_penalty, top_k, stop) -> dict:
    """stream_chat's keyword arguments for the added controls; Refused names a value generation can't use."""
    options = dict(repetition_penalty=float(repetition_penalty), top_k=int(top_k), stop=parse_stop(stop))
    try:
        check_generation_args(None, top_p=float(top_p), temperature=float(temperature),
                              repetition_penalty=options["repetition_penalty"], top_k=options["top_k"])
    except ValueError as e:
        raise Refused(f"Your message was not sent: {e}.") from None
    return options


def plan_turn(model, tokenizer, query: str, history: list, max_length):
    """(turns the model will see, Maximum length it can honour) for one message; raises Refused when the message
    can't be answered (the pages then leave it in the text box, so nothing typed is lost)."""
    if not query.strip():
        raise Refused("")
    max_length, context = int(max_length), model.config.max_sequence_length
    if max_length > context:  # upstream's slider goes to 4096; the model can't
        gr.Info(f"Maximum length {max_length} is beyond this model's context; using {context}.")
        max_length = context
    try:
        kept, _ = fit_history(tokenizer, query, history, max_length, context)
    except ContextTooLongError as e:
        raise Refused(f"Your message cannot be answered: {e}.") from None
    if len(kept) < len(history):
        gr.Info(f"The oldest {len(history) - len(kept)} turn(s) are left out of the prompt so the reply fits in "
                f"Maximum length {max_length}.")
    return kept, max_length


@dataclass
class Conversation:
    """One tab's chat, kept in a gr.State: the raw (query, reply) turns. Clear bumps `epoch`, so a reply still
    streaming stops writing into a conversation that is gone; `streaming` tells Clear when it has let go. Stop sets
    `stopped_at` (time.monotonic()), which ends the turn running then, or starting within STOP_GRACE seconds."""
    turns: list = field(default_factory=list)
    epoch: int = 0
    streaming: bool = False
    stopped_at: float = float("-inf")


# A Stop clicked this long before a turn starts still stops it: Stop pressed right after sending can reach the
# server before the turn does.
STOP_GRACE = 1.0


_CONVERSATIONS = threading.Condition()  # guards every Conversation (tiny critical sections)


def turn_handler(model, tokenizer, render):
    """The Gradio handler of a sent message on both pages: yields (text box, conversation view) as the reply
    streams. `render` makes the page's view (its chat component's value) from the raw turns."""
    def handle(query, conversation: Conversation, max_length, top_p, temperature, repetition_penalty, top_k, stop):
        try:
            kept, max_length = plan_turn(model, tokenizer, query, list(conversation.turns), max_length)
            options = generation_options(top_p, temperature, repetition_penalty, top_k, stop)
        except Refused as problem:  # nothing is sent and the text stays in the box
            if str(problem):
                gr.Warning(str(problem))
            yield gr.skip(), gr.skip()
            return
        with _CONVERSATIONS:
            epoch, started = conversation.epoch, time.monotonic()
            conversation.turns.append((query, ""))
            conversation.streaming = True
            view = render(conversation.turns)
        replies = stream_reply(model, tokenizer, query, kept, max_length, top_p, temperature, **options)
        try:
            yield "", view  # the message shows at once, even while other chats go first
            for reply in replies:
                with _CONVERSATIONS:
                    cleared = conversation.epoch != epoch
                    stopped = conversation.stopped_at >= started - STOP_GRACE
                    if cleared or stopped:  # `reply` is dropped: the turns keep what the browser was sent
                        view = render(conversation.turns)
                    elif isinstance(reply, Waiting):
                        view = gr.skip()  # nothing new, but a point where Stop can close us
                    else:
                        conversation.turns[-1] = (query, reply)
                        view = render(conversation.turns)
                if cleared or stopped:
                    # This stream's last update is the view Clear or Stop left: a browser still painting earlier
                    # updates of this stream (they queue up while it is busy) then ends on it rather than on a stale
                    # reply, and what it shows is exactly the history the next turn sees.
                    replies.close()
                    yield gr.skip(), view
                    return
                yield gr.skip(), view
        finally:
            replies.close()  # ends generation (Stop, Clear, a closed tab) and leaves the model queue
            with _CONVERSATIONS:
                conversation.streaming = False
                _CONVERSATIONS.notify_all()
    return handle


def stop_handler(conversation: Conversation):
    """The Gradio handler of Stop. Not a Gradio cancel: cancelling a turn that has sent nothing yet marks the page
    with error badges, and a cancelled turn may have stored a longer reply than the browser got. Instead the turn
    sees `stopped_at`, ends generation and sends the stored conversation as its last update (see turn_handler)."""
    with _CONVERSATIONS:
        conversation.stopped_at = time.monotonic()


def clear_handler(render):
    """The Gradio handler of Clear: forgets the turns and returns the empty view once a reply still streaming has
    stopped. Clear does not cancel that reply's event: the reply sees the new epoch, ends generation and sends the
    empty view as its own last update (see turn_handler), which a cancelled event could not."""
    def clear(conversation: Conversation):
        with _CONVERSATIONS:
            conversation.epoch += 1
            conversation.turns = []
            _CONVERSATIONS.wait_for(lambda: not conversation.streaming, timeout=5)
        return render([])
    return clear
