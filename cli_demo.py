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

from chatglm.context import ContextTooLongError, fit_history
from chatglm.model_info import describe_model
from chatglm.options import add_generation_args, add_model_args, check_generation_options, generation_kwargs, \
    load_from_args
from chatglm.validation import InputError, check_text
from utils import TextDeltas

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


def reply(model, tokenizer, query, history, args):
    """Streams one answer to stdout and returns the new history. Ctrl-C stops generation and keeps what was shown."""
    print(BOT_LABEL, end="", flush=True)
    deltas, response, new_history = TextDeltas(), "", None
    gen = model.stream_chat(tokenizer, query, history, **generation_kwargs(args))
    try:
        for response, new_history in gen:
            print(deltas.step(response), end="", flush=True)
        print(deltas.finish(response), flush=True)
        return new_history if new_history is not None else history
    except KeyboardInterrupt:  # also one that arrives as the reply ends: it is then shown whole and kept
        gen.close()  # stops decoding now
        print(INTERRUPTED, flush=True)
        return history + [(query, deltas.sent)] if deltas.sent else history


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
            check_text(query, "the message")
        except InputError as e:
            print(f"（输入无效 / not sent: {e}）")
            continue
        try:
            history, dropped = fit_history(tokenizer, query, history, args.max_length,
                                           model.config.max_sequence_length)
        except ContextTooLongError as e:
            print(f"（输入过长 / message too long: {e}）")
            continue
        if dropped:
            print(f"（对话过长，已忘记最早的 {dropped} 轮 / dropped the {dropped} oldest turn(s) to fit）")
        history = reply(model, tokenizer, query, history, args)


if __name__ == "__main__":
    sys.exit(main())
