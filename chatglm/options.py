"""Command-line options shared by every front door (web_demo, web_demo_old, cli_demo, api, ptuning/web_demo).

One place defines them so every script spells and defaults them the same way.
"""
import argparse
import os


def add_model_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = parser.add_argument_group("model")
    g.add_argument("--model-path", default=os.environ.get("CHATGLM_MODEL"),
                   help="local folder or hub id of the weights (default: $CHATGLM_MODEL, else the built-in demo "
                        "checkpoint, which is NOT the real model)")
    g.add_argument("--quantize", type=int, choices=(4, 8), default=None,
                   help="quantize the weights to 4 or 8 bits while loading")
    g.add_argument("--device", default=None, help="cuda, cuda:1, mps or cpu (default: cuda, then mps, then cpu)")
    g.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="compute dtype (default: float16 on GPU, float32 on CPU)")
    g.add_argument("--ptuning-checkpoint", default=None,
                   help="folder of a P-Tuning v2 checkpoint (prefix encoder) to load on top of the model")
    g.add_argument("--pre-seq-len", type=int, default=None,
                   help="prefix length of the P-Tuning checkpoint (default: read from its config.json)")
    return parser


def add_server_args(parser: argparse.ArgumentParser, port: int, share: bool = False) -> argparse.ArgumentParser:
    g = parser.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1; use 0.0.0.0 to serve other machines)")
    g.add_argument("--port", type=int, default=port, help=f"port to bind (default {port})")
    if share:
        g.add_argument("--share", action="store_true", help="create a public Gradio share link (off by default)")
    return parser


def load_from_args(args: argparse.Namespace):
    """(tokenizer, model) for parsed options; see chatglm.loading.load_model."""
    from .loading import load_model
    return load_model(args.model_path, device=args.device, dtype=args.dtype, quantize=args.quantize,
                      pre_seq_len=args.pre_seq_len, ptuning_checkpoint=args.ptuning_checkpoint)
