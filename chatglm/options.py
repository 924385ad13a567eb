"""Command-line options shared by every front door (web_demo, web_demo_old, cli_demo, api, ptuning/web_demo).

One place defines them so every script spells and defaults them the same way.
"""
import argparse
import os

from .loading import ModelLoadError, load_model
from .validation import GenerationOptions, InputError


def add_model_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = parser.add_argument_group("model")
    g.add_argument("--model-path", default=os.environ.get("CHATGLM_MODEL") or None,  # set but empty: unset
                   help="local folder or hub id of the weights (default: $CHATGLM_MODEL, else the built-in demo "
                        "checkpoint, which is NOT the real model)")
    g.add_argument("--quantize", type=int, choices=(4, 8), default=None,
                   help="quantize the weights to 4 or 8 bits while loading")
    g.add_argument("--quantize-embeddings", action="store_true",
                   help="with --quantize: also quantize the word embeddings (shared with the output layer), as "
                        "upstream's chatglm-6b-int4-qe did. Saves ~0.8 GB with --quantize 4 (ChatGLM-6B on CPU: "
                        "~3.5 GB resident instead of ~4.3 GB), but outputs differ slightly from the official INT4 "
                        "model")
    g.add_argument("--device", default=None, help="cuda, cuda:1, mps or cpu (default: cuda, then mps, then cpu)")
    g.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="compute dtype (default: float16 on GPU; on CPU float32, or bfloat16 for a quantized model)")
    g.add_argument("--ptuning-checkpoint", default=None,
                   help="folder of a P-Tuning v2 checkpoint (prefix encoder) to load on top of the model")
    g.add_argument("--pre-seq-len", type=_positive_int, default=None,
                   help="prefix length of the P-Tuning checkpoint (default: read from its config.json)")
    return parser


def add_server_args(parser: argparse.ArgumentParser, port: int, share: bool = False) -> argparse.ArgumentParser:
    g = parser.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1; use 0.0.0.0 to serve other machines)")
    g.add_argument("--port", type=int, default=port, help=f"port to bind (default {port})")
    g.add_argument("--kv-budget", type=_positive_float, default=None, metavar="GIB",
                   help="memory for the replies' KV caches, in GiB; requests beyond it wait (default: a third of "
                        "the free RAM, or half the free GPU memory)")
    if share:
        g.add_argument("--share", action="store_true", help="create a public Gradio share link (off by default)")
    return parser


def load_from_args(args: argparse.Namespace):
    """(tokenizer, model) for parsed options; see chatglm.loading.load_model. Raises ModelLoadError (which every
    front door reports as a plain error) for options that cannot load a model."""
    quantize_embeddings = getattr(args, "quantize_embeddings", False)
    if quantize_embeddings and not args.quantize:
        raise ModelLoadError("--quantize-embeddings needs --quantize 4 or 8 (the embeddings are quantized to the "
                             "same bits as the other weights), e.g. --quantize 4 --quantize-embeddings")
    return load_model(args.model_path, device=args.device, dtype=args.dtype, quantize=args.quantize,
                      pre_seq_len=args.pre_seq_len, ptuning_checkpoint=args.ptuning_checkpoint,
                      quantize_embeddings=quantize_embeddings)


def kv_budget_bytes(args: argparse.Namespace):
    """--kv-budget in bytes (None: the engine's default from free memory)."""
    gib = getattr(args, "kv_budget", None)
    return None if gib is None else int(gib * 2**30)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def add_generation_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Sampling options with upstream's defaults. Options left out are not passed on, so generation keeps the
    library's own default for them (top_k 50 while sampling, no repetition penalty, no stop strings)."""
    d = GenerationOptions()  # the defaults live there only
    g = parser.add_argument_group("generation")
    g.add_argument("--max-length", type=_positive_int, default=d.max_length,
                   help=f"prompt + reply tokens at most (default {d.max_length}, capped at the model's context)")
    g.add_argument("--top-p", type=float, default=d.top_p,
                   help=f"nucleus sampling threshold, in (0, 1] (default {d.top_p})")
    g.add_argument("--temperature", type=float, default=d.temperature,
                   help=f"sampling temperature; 0 = always the most likely token (default {d.temperature})")
    g.add_argument("--repetition-penalty", type=float, default=None,
                   help="> 1 makes tokens already in the conversation less likely (default 1.0 = off)")
    g.add_argument("--top-k", type=int, default=None,
                   help="sample only among the K most likely tokens; 0 = no limit (default 50, the library's)")
    g.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="end the reply before TEXT; repeat for several (default: none)")
    return parser


def check_generation_options(parser: argparse.ArgumentParser, args: argparse.Namespace):
    """Exits with argparse's usage error for a sampling value generation would refuse (before the model loads),
    by the rules every front door shares (chatglm.validation); max_length against the context is checked once
    loaded."""
    try:
        GenerationOptions.build(**generation_kwargs(args)).validate()
    except InputError as e:
        parser.error(f"argument --{(e.field or 'stop').split('[')[0].replace('_', '-')}: {e}")


def generation_kwargs(args: argparse.Namespace) -> dict:
    """Keyword arguments for model.chat / stream_chat from parsed options (the ones left out are not passed)."""
    kwargs = dict(max_length=args.max_length, top_p=args.top_p, temperature=args.temperature)
    for name in ("repetition_penalty", "top_k", "stop"):
        if getattr(args, name) is not None:
            kwargs[name] = getattr(args, name)
    return kwargs
