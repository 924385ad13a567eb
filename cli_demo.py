"""Chat with ChatGLM-6B in the terminal; replies stream in as they are generated.

    python cli_demo.py [--model-path DIR] [--quantize 4|8] [--temperature 0.95] [--repetition-penalty 1.1]
                       [--top-k 50] [--stop TEXT ...] ...

`clear` forgets the conversation and clears the screen, `stop` exits. Ctrl-C during a reply stops that reply (what
was shown stays in the conversation); Ctrl-C or Ctrl-D at the prompt exits.
"""
import argparse
import os
import signal
import socket
import sys
import threading
import time

from chatglm.context import ContextTooLongError
from chatglm.model_info import describe_model
from chatglm.options import add_generation_args, add_model_args, check_generation_options, generation_kwargs, \
    load_from_args
from chatglm.service import ModelService
from chatglm.validation import GenerationOptions, InputError, check_text

WELCOME = "欢迎使用 ChatGLM-6B 模型，输入内容即可进行对话，clear 清空对话历史，stop 终止程序"
WELCOME_EN = "Type a message to chat; 'clear' clears the history, 'stop' exits, Ctrl-C stops a reply."
USER_PROMPT = "\n用户："
BOT_LABEL = "\nChatGLM-6B："
INTERRUPTED = "\n（已中断 / interrupted）"


def greet(model, notice=True):
    from chatglm import DEMO_NOTICE
    print(WELCOME)
    print(WELCOME_EN)
    print(describe_model(model))
    if notice and getattr(model, "is_demo", False):
        print(DEMO_NOTICE)
    sys.stdout.flush()


def clear_screen():
    if os.name == "nt":
        os.system("cls")
    else:
        print("\033[2J\033[H", end="", flush=True)  # clear, cursor home (no `clear` binary or TERM needed)


def deliver_ctrl_c_at_the_prompt() -> threading.Event:
    """Makes Ctrl-C at the prompt end input() every time (POSIX). Returns the event to set while at the prompt.

    CPython's readline loop looks at signals only when its select() is interrupted, so a SIGINT that lands after the
    prompt is printed but before select() blocks (a Ctrl-C typed just as a reply ends) waited for the next key. The
    signal module writes each signal's number to a wakeup socket; a thread reading it nudges the main thread with
    no-op SIGUSR1s while it is at the prompt, and the first nudge that finds select() waiting lets the
    KeyboardInterrupt through. (Not outside the prompt: there Python sees the signal at once, and the nudges would
    only interrupt readline reading the next message.)"""
    at_prompt = threading.Event()
    if not hasattr(signal, "pthread_kill"):
        return at_prompt
    receive, send = socket.socketpair()
    send.setblocking(False)
    signal.signal(signal.SIGUSR1, lambda *_: None)
    signal.set_wakeup_fd(send.fileno(), warn_on_full_buffer=False)
    at_prompt.wakeup_socket = send  # kept open as long as the signal module writes to it
    main_thread = threading.main_thread().ident

    def nudge():
        while data := receive.recv(64):
            for _ in range(40 if signal.SIGINT in data else 0):
                if not at_prompt.is_set():
                    break
                signal.pthread_kill(main_thread, signal.SIGUSR1)
                time.sleep(0.05)
    threading.Thread(target=nudge, daemon=True, name="ctrl-c").start()
    return at_prompt


def submit(service, query, history, options):
    """The queued reply, once the service has checked it and fitted the history; None (after saying why) when
    the message cannot be answered."""
    reply = service.submit(query, history, options)
    try:
        reply.prepared.wait()
    except KeyboardInterrupt:
        reply.cancel()
        raise
    if isinstance(reply.error, InputError):
        print(f"（输入无效 / not sent: {reply.error}）")
    elif isinstance(reply.error, ContextTooLongError):
        print(f"（输入过长 / message too long: {reply.error}）")
    elif reply.error is None:
        if reply.dropped_turns:
            print(f"（对话过长，已忘记最早的 {reply.dropped_turns} 轮 / dropped the {reply.dropped_turns} oldest "
                  f"turn(s) to fit）")
        return reply
    return None


def show_reply(reply, query, history):
    """Streams one answer to stdout and returns the new history. Ctrl-C stops generation and keeps what was shown."""
    print(BOT_LABEL, end="", flush=True)
    shown = ""
    try:
        for delta in reply:
            shown += delta  # before printing: a Ctrl-C during print() keeps what may be on screen
            print(delta, end="", flush=True)
        print(flush=True)
        return reply.result.history
    except KeyboardInterrupt:  # also one that arrives as the reply ends: it is then shown whole and kept
        reply.cancel()  # stops decoding now
        print(INTERRUPTED, flush=True)
        return reply.history + [(query, shown)] if shown else history


def main(argv=None):
    parser = argparse.ArgumentParser(description="Chat with ChatGLM-6B in the terminal.")
    add_model_args(parser)
    add_generation_args(parser)
    args = parser.parse_args(argv)
    check_generation_options(parser, args)  # a bad value is reported now, not after the model has loaded
    for stream in (sys.stdin, sys.stdout):  # a mis-set locale must not crash on Chinese or emoji
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")

    from chatglm import ModelLoadError
    try:
        tokenizer, model = load_from_args(args)
    except (ModelLoadError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    args.max_length = min(args.max_length, int(model.config.max_sequence_length))
    try:
        import readline  # noqa: F401  line editing and input history (wide characters included); not on Windows
    except ImportError:
        pass

    options = GenerationOptions.build(**generation_kwargs(args))
    with ModelService(model, tokenizer) as service:  # closed on the way out: Ctrl-C/Ctrl-D at the prompt, `stop`
        return chat_loop(service, model, options)


def chat_loop(service, model, options) -> int:
    history = []
    greet(model, notice=False)  # load_model has just printed the demo notice
    at_prompt = deliver_ctrl_c_at_the_prompt()
    while True:
        try:
            at_prompt.set()
            query = input(USER_PROMPT)
        except (KeyboardInterrupt, EOFError):
            print()
            return 0
        finally:
            at_prompt.clear()
        command = query.strip()
        if not command:
            continue
        if command == "stop":
            return 0
        if command == "clear":
            history = []
            clear_screen()
            greet(model)
            continue
        try:
            check_text(query, "the message")  # named as the user sees it; the service checks it again
        except InputError as e:
            print(f"（输入无效 / not sent: {e}）")
            continue
        try:
            reply = submit(service, query, history, options)
        except KeyboardInterrupt:
            print(INTERRUPTED, flush=True)
            continue
        if reply is not None:
            history = show_reply(reply, query, history)


if __name__ == "__main__":
    sys.exit(main())
