"""What web_demo.py and web_demo_old.py share: options, the demo-model notice, the generation controls, safe
rendering of chat text, and one stoppable chat turn on the process's model service (the events both pages wire).

Both pages keep the raw (query, reply) pairs in a gr.State (Conversation) and only ever show escaped copies, so model output can
never inject HTML into the page while Markdown (emphasis, lists, code blocks) still renders.
"""
import argparse
import functools
import html
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

import gradio as gr
from markdown_it import MarkdownIt
from mdit_py_plugins.dollarmath import dollarmath_plugin

from chatglm.context import ContextTooLongError
from chatglm.loading import ModelLoadError
from chatglm.model_info import describe_model
from chatglm.options import add_model_args, add_server_args, kv_budget_bytes, load_from_args
from chatglm.service import ModelService, QueueFull, Reply
from chatglm.validation import GenerationOptions, InputError

# upstream's slider ranges; every default is GenerationOptions' (added controls: no penalty, top_k 50, no stop)
_D = GenerationOptions()
MAX_LENGTH = dict(minimum=0, maximum=4096, value=_D.max_length, step=1)
TOP_P = dict(minimum=0, maximum=1, value=_D.top_p, step=0.01)
TEMPERATURE = dict(minimum=0, maximum=1, value=_D.temperature, step=0.01)
REPETITION_PENALTY = dict(minimum=1, maximum=2, value=_D.repetition_penalty, step=0.01)
TOP_K = dict(minimum=0, maximum=200, value=_D.top_k, step=1)
DEFAULT_PORT = 7860

# a local font stack: the default theme fetches Google Fonts, which offline machines can't reach
THEME = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                          font_mono=["ui-monospace", "Consolas", "monospace"])
CSS = ("#demo-notice {border: 1px solid #f59e0b; background: #fffbeb; border-radius: 6px; padding: 4px 12px;}\n"
       ".typed {white-space: pre-wrap;}")  # the user's text keeps its spaces and line breaks


def _login(text: str):
    user, colon, password = (text or "").partition(":")
    if not (user and colon and password):
        raise argparse.ArgumentTypeError("expected USER:PASSWORD, both non-empty")
    return user, password


def parse_args(description: str, argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    add_model_args(parser)
    g = add_server_args(parser, port=DEFAULT_PORT, share=True)
    # Gradio's own variables, which a Hugging Face Space sets (0.0.0.0:7860); unset, the defaults stay loopback
    parser.set_defaults(host=os.environ.get("GRADIO_SERVER_NAME") or "127.0.0.1",
                        port=int(os.environ.get("GRADIO_SERVER_PORT") or DEFAULT_PORT))
    auth = os.environ.get("CHATGLM_WEB_AUTH") or None
    g.add_argument("--auth", type=_login, default=_login(auth) if auth else None, metavar="USER:PASSWORD",
                   help="ask for this login before the page opens (Gradio's own login; default: $CHATGLM_WEB_AUTH, "
                        "which keeps the password out of the process list; none)")
    return parser.parse_args(argv)


def exposure_warning(args: argparse.Namespace) -> str:
    """A loud warning when the page is reachable from other machines without a login ("" when it is not)."""
    local = args.host in ("127.0.0.1", "localhost", "::1") or args.host.startswith("127.")
    if args.auth or (local and not args.share):
        return ""
    where = "a public share link" if args.share else f"{args.host}:{args.port} (other machines can connect)"
    line = "!" * 100
    return (f"{line}\nWARNING: serving the chat page on {where} WITHOUT A LOGIN: anyone who reaches it can use the "
            f"model and this machine's compute.\nAdd --auth USER:PASSWORD (or set CHATGLM_WEB_AUTH) to require one."
            f"\n{line}")


def load(args: argparse.Namespace):
    """(tokenizer, model) for the parsed options; a path that does not load exits with its message, not a trace."""
    try:
        return load_from_args(args)
    except ModelLoadError as e:
        raise SystemExit(f"error: {e}")


def launch(demo: gr.Blocks, args: argparse.Namespace, **options):
    warning = exposure_warning(args)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    # run_history off: the chat keeps its own history, and calls need not be recorded (in the browser, or in a
    # Hugging Face bucket that page offers to connect)
    demo.queue().launch(server_name=args.host, server_port=args.port, share=args.share, theme=THEME, css=CSS,
                        ssr_mode=False, show_error=True, run_history=False, auth=args.auth, **options)


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
# Safe rendering. Model replies are Markdown rendered here by markdown-it-py with raw HTML off (so any HTML in them
# is text), images off (a reply must not make the browser fetch a URL) and $/$$ math left as written for Gradio's
# KaTeX. What the user typed is shown as typed: escaped text, no Markdown. Both come out as one line of HTML (no
# newline at all: inside code they are written &#10;), which Gradio's own Markdown pass keeps as a single HTML block
# and hands to its sanitizer unchanged.

def _math_as_written(self, tokens, idx, options, env) -> str:
    token = tokens[idx]
    text = html.escape(f"{token.markup}{token.content}{token.markup}", quote=False)
    return f"<p>{text}</p>" if token.block else text


_MARKDOWN = (MarkdownIt("commonmark", {"html": False, "breaks": True})
             .enable(["table", "strikethrough"]).disable("image")
             .use(dollarmath_plugin, allow_labels=False, allow_space=False, allow_digits=False, double_inline=True))
for _rule in ("math_inline", "math_inline_double", "math_block"):
    _MARKDOWN.add_render_rule(_rule, _math_as_written)


@functools.lru_cache(maxsize=512)  # every update re-renders the conversation; finished turns come from here
def render_reply(text: str) -> str:
    """HTML for a model reply: its Markdown rendered, any HTML in it shown as text, never run."""
    return _MARKDOWN.render(text).strip().replace("\n", "&#10;")


@functools.lru_cache(maxsize=512)
def render_typed(text: str) -> str:
    """HTML for what the user typed: the text exactly, line breaks and spaces kept, nothing interpreted."""
    return f'<p class="typed">{html.escape(text, quote=False).replace(chr(10), "&#10;")}</p>'


# ---------------------------------------------------------------------------------------------------------------
# One model service for every tab: the engine answers all of them at once (continuous batching).

def start_service(args: argparse.Namespace, tokenizer, model) -> ModelService:
    """The page's model service (one per process), its KV budget printed at start-up."""
    service = ModelService(model, tokenizer, kv_budget=kv_budget_bytes(args))
    print(service.describe(), flush=True)
    return service


def serve(description: str, build_demo, argv=None):
    """A page's main(): parse the options, load the model, serve build_demo(service) until Ctrl-C."""
    args = parse_args(description, argv)
    tokenizer, model = load(args)
    service = start_service(args, tokenizer, model)
    try:
        launch(build_demo(service), args)
    finally:
        service.close()  # Ctrl-C: replies still streaming end, cancelled


class Refused(Exception):
    """A message that gets a warning instead of a reply (str: the warning, empty for an empty message)."""


def _slider(value, integer=False):
    """A control's value as a number (a slider sends 50.0 for 50); anything else is left for validate() to name."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return value
    if integer and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def generation_options(config, max_length, top_p, temperature, repetition_penalty, top_k, stop) -> GenerationOptions:
    """The controls' values as GenerationOptions; Refused names a value generation can't use. A Maximum length
    beyond the model's context (upstream's slider goes to 4096) is lowered to it, with a notice."""
    try:
        o = GenerationOptions.build(max_length=_slider(max_length, integer=True), top_p=_slider(top_p),
                                    temperature=_slider(temperature), repetition_penalty=_slider(repetition_penalty),
                                    top_k=_slider(top_k, integer=True),
                                    stop=parse_stop(stop) if isinstance(stop, (str, type(None))) else stop).validate()
    except InputError as e:
        raise Refused(f"Your message was not sent: {e}.") from None
    if o.max_length > config.max_sequence_length:
        gr.Info(f"Maximum length {o.max_length} is beyond this model's context; using {config.max_sequence_length}.")
        o = o.with_(max_length=config.max_sequence_length)
    return o


def submit_turn(service: ModelService, query: str, history: list, options: GenerationOptions) -> Reply:
    """The message queued on the service and prepared (checked, fitted, tokenized on the service's thread);
    Refused when it can't be answered (the pages then leave it in the text box, so nothing typed is lost)."""
    if isinstance(query, str) and not query.strip():
        raise Refused("")
    try:
        reply = service.submit(query, history, options)
    except QueueFull as e:
        raise Refused(f"Your message was not sent: {e}.") from None
    reply.prepared.wait()
    if isinstance(reply.error, ContextTooLongError):
        raise Refused(f"Your message cannot be answered: {reply.error}.")
    if isinstance(reply.error, InputError):
        raise Refused(f"Your message was not sent: {reply.error}.")
    if reply.dropped_turns:
        gr.Info(f"The oldest {reply.dropped_turns} turn(s) are left out of the prompt so the reply fits in "
                f"Maximum length {options.max_length}.")
    return reply


@dataclass
class Conversation:
    """One tab's chat, kept in a gr.State: the raw (query, reply) turns. Clear bumps `epoch`, so a reply still
    streaming stops writing into a conversation that is gone; `streaming` tells Clear when it has let go. Stop sets
    `stopped_at` (time.monotonic()), which ends the turn running then, or starting within STOP_GRACE seconds.
    `reply`: the turn being generated, which Stop and Clear cancel."""
    turns: list = field(default_factory=list)
    epoch: int = 0
    streaming: bool = False
    stopped_at: float = float("-inf")
    reply: Optional[Reply] = None


# A Stop clicked this long before a turn starts still stops it: Stop pressed right after sending can reach the
# server before the turn does.
STOP_GRACE = 1.0


# A reply with nothing to show after this many seconds, behind other chats' messages, gets a waiting notice.
WAIT_NOTICE_AFTER = 1.0

_CONVERSATIONS = threading.Condition()  # guards every Conversation (tiny critical sections)


def _start(conversation: Conversation, query: str, reply: Reply, render):
    """Adds the turn to the conversation; (epoch, start time, the view with the message shown)."""
    with _CONVERSATIONS:
        conversation.turns.append((query, ""))
        conversation.streaming, conversation.reply = True, reply
        return conversation.epoch, time.monotonic(), render(conversation.turns)


def _show(conversation: Conversation, epoch: int, started: float, query: str, text: str, render):
    """(ended, view) for the reply so far: ended once Clear or Stop came; then the view is the stored turns,
    which hold exactly what the browser was sent."""
    with _CONVERSATIONS:
        ended = conversation.epoch != epoch or conversation.stopped_at >= started - STOP_GRACE
        if not ended:
            conversation.turns[-1] = (query, text)
        return ended, render(conversation.turns)


def turn_handler(service: ModelService, render):
    """The Gradio handler of a sent message on both pages: yields (text box, conversation view) as the reply
    streams. `render` makes the page's view (its chat component's value) from the raw turns."""
    def handle(query, conversation: Conversation, max_length, top_p, temperature, repetition_penalty, top_k, stop):
        try:
            options = generation_options(service.model.config, max_length, top_p, temperature, repetition_penalty,
                                         top_k, stop)
            reply = submit_turn(service, query, list(conversation.turns), options)
        except Refused as problem:  # nothing is sent and the text stays in the box
            if str(problem):
                gr.Warning(str(problem))
            yield gr.skip(), gr.skip()
            return
        epoch, started, view = _start(conversation, query, reply, render)
        try:
            yield "", view  # the message shows at once, even while other chats go first
            if not reply.wait_for_output(WAIT_NOTICE_AFTER):
                ahead = service.ahead_of(reply)
                if ahead:  # other chats hold the model (or its memory budget): say so instead of a silent wait
                    gr.Info(f"Waiting for the model: {ahead} message(s) from other chats are ahead of yours. "
                            f"Yours starts as soon as there is room.")
            text, ended = "", False
            for delta in reply:
                text += delta
                ended, view = _show(conversation, epoch, started, query, text, render)
                if ended:
                    break
                yield gr.skip(), view
            ended, view = _show(conversation, epoch, started, query, text, render)
            if ended:
                # This stream's last update is the view Clear or Stop left: a browser still painting earlier
                # updates of this stream (they queue up while it is busy) then ends on it rather than on a stale
                # reply, and what it shows is exactly the history the next turn sees.
                yield gr.skip(), view
        finally:
            reply.cancel()  # ends generation (Stop, Clear, a closed tab); a no-op once the reply is complete
            with _CONVERSATIONS:
                conversation.streaming, conversation.reply = False, None
                _CONVERSATIONS.notify_all()
    return handle


def _cancel_reply(conversation: Conversation):
    if conversation.reply is not None:
        conversation.reply.cancel()


def stop_handler(conversation: Conversation):
    """The Gradio handler of Stop. Not a Gradio cancel: cancelling a turn that has sent nothing yet marks the page
    with error badges, and a cancelled turn may have stored a longer reply than the browser got. Instead Stop
    cancels the reply on the service; the turn sees `stopped_at` and sends the stored conversation as its last
    update (see turn_handler)."""
    with _CONVERSATIONS:
        conversation.stopped_at = time.monotonic()
        _cancel_reply(conversation)


def clear_handler(render):
    """The Gradio handler of Clear: forgets the turns and returns the empty view once a reply still streaming has
    stopped. Clear does not cancel that reply's event: the reply sees the new epoch, ends generation and sends the
    empty view as its own last update (see turn_handler), which a cancelled event could not."""
    def clear(conversation: Conversation):
        with _CONVERSATIONS:
            conversation.epoch += 1
            conversation.turns = []
            _cancel_reply(conversation)
            _CONVERSATIONS.wait_for(lambda: not conversation.streaming, timeout=5)
        return render([])
    return clear


def connect(service: ModelService, render, *, sends, query, conversation, controls, view, stop, clears):
    """The events both pages wire the same way: a message sent (`sends`: its triggers), Stop, Clear (`clears`)."""
    gr.on(sends, turn_handler(service, render), inputs=[query, conversation, *controls], outputs=[query, view],
          concurrency_limit=None,  # the model service, not Gradio, lines the turns up
          trigger_mode="always_last")  # a message sent during a reply goes once the reply ends
    stop.click(stop_handler, inputs=[conversation], outputs=None, concurrency_limit=None, show_progress="hidden")
    for clicked in clears:
        clicked(clear_handler(render), inputs=[conversation], outputs=[view], concurrency_limit=None)
