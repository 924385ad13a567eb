"""Convert our random ChatGLM-6B (v1) safetensors checkpoint (benchmarks/bench.py build_checkpoint layout) to a
chatglm.cpp GGML file with chatglm.cpp 0.4.2's own ChatGLMConverter (chatglm_cpp/convert.py of the unpacked sdist),
fed duck-typed model/tokenizer objects -- no transformers AutoModel / trust_remote_code, no original code needed.

    python chatglm_cpp_convert.py --chatglm-cpp-dir SDIST CKPT_DIR MODELS_DIR/glm6b-random-<L>l-q4_0.bin --type q4_0

Name the output glm6b-random-<L>l-<type>.bin: chatglm_cpp_bench.py looks for that name in its --models-dir.
Runs in our environment (torch, safetensors, transformers, tqdm: convert.py imports them; tabulate is stubbed when
missing). Tensors are read one at a time as float32 (what the official convert sees: AutoModel loads fp32).

Precision mapping: the converter stores the four matrices of every block AND the word embedding (which the output
layer shares) as --type; layernorms and biases stay f32. q8_0 / q4_0 are ggml's 32-weight blocks with one fp16
scale each, while ChatGLM's own int8/int4 keep one scale per output row and leave the embedding unquantized, so
q8_0 / q4_0 are closest to our INT8 / INT4 with --quantize-embeddings; f16 keeps the fp16 weights.
EOS is stored as -1 unless --keep-eos, so generation never stops early.
"""
import argparse
import importlib.util
import json
import os
import sys
import types
from collections.abc import Mapping

import torch
from safetensors import safe_open


def stub_tabulate():
    # convert.py imports tabulate only to print a table of the tensors it wrote; not one of our dependencies
    if "tabulate" in sys.modules:
        return
    try:
        import tabulate  # noqa: F401
    except ImportError:
        stub = types.ModuleType("tabulate")
        stub.tabulate = lambda rows, **kw: f"({len(rows)} tensors written)"
        sys.modules["tabulate"] = stub


def load_convert_module(chatglm_cpp_dir):
    convert_py = os.path.join(chatglm_cpp_dir, "chatglm_cpp", "convert.py")
    if not os.path.isfile(convert_py):
        sys.exit(f"{convert_py} not found: --chatglm-cpp-dir must be the unpacked chatglm-cpp 0.4.2 sdist")
    stub_tabulate()
    spec = importlib.util.spec_from_file_location("chatglm_cpp_convert", convert_py)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class LazyStateDict(Mapping):
    """Official key names; tensors read one at a time from the safetensors file as float32 (what the official
    convert sees: AutoModel.from_pretrained loads fp32 by default). lm_head.weight is the tied embedding."""

    def __init__(self, path):
        self.f = safe_open(path, framework="pt")
        self.keys_ = list(self.f.keys())

    def __getitem__(self, k):
        if k == "lm_head.weight":
            k = "transformer.word_embeddings.weight"
        return self.f.get_tensor(k).float()

    def __iter__(self):
        return iter(self.keys_ + ["lm_head.weight"])

    def __len__(self):
        return len(self.keys_) + 1


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ckpt", help="our random checkpoint folder, e.g. WORKDIR/glm6b-random-28l (bench.build_checkpoint)")
    ap.add_argument("out", help="GGML file to write, e.g. MODELS_DIR/glm6b-random-28l-q4_0.bin")
    ap.add_argument("--chatglm-cpp-dir", required=True,
                    help="the unpacked chatglm-cpp 0.4.2 sdist (its chatglm_cpp/convert.py is used)")
    ap.add_argument("--type", default="q4_0", choices=["f32", "f16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1"])
    ap.add_argument("--keep-eos", action="store_true",
                    help="store the config's eos id (default: -1, so generation never stops early)")
    args = ap.parse_args()

    conv = load_convert_module(args.chatglm_cpp_dir)
    with open(os.path.join(args.ckpt, "config.json")) as fh:
        cfg = json.load(fh)
    # exactly the attributes ChatGLMConverter reads from a transformers config
    config = types.SimpleNamespace(
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        num_attention_heads=cfg["num_attention_heads"],
        num_layers=cfg["num_layers"],
        inner_hidden_size=cfg["inner_hidden_size"],
        layernorm_epsilon=cfg["layernorm_epsilon"],
        position_encoding_2d=cfg.get("position_encoding_2d", True),
        pre_seq_len=cfg.get("pre_seq_len"),
        max_sequence_length=cfg["max_sequence_length"],
        eos_token_id=cfg.get("eos_token_id") if args.keep_eos else -1,
        pad_token_id=cfg.get("pad_token_id"),
        quantization_bit=cfg.get("quantization_bit", 0) or 0,
    )
    state_dict = LazyStateDict(os.path.join(args.ckpt, "model.safetensors"))
    model = types.SimpleNamespace(config=config, state_dict=lambda: state_dict)

    with open(os.path.join(args.ckpt, "ice_text.model"), "rb") as fh:
        proto = fh.read()  # the .model file is the serialized sentencepiece ModelProto
    sp = types.SimpleNamespace(serialized_model_proto=lambda: proto)
    tokenizer = types.SimpleNamespace(sp_tokenizer=types.SimpleNamespace(text_tokenizer=types.SimpleNamespace(sp=sp)))

    ggml_type = conv.GGMLType[args.type.upper()]
    torch.set_grad_enabled(False)
    with open(args.out, "wb") as f:
        conv.ChatGLMConverter.convert(f, model, tokenizer, ggml_type)
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 2**30:.2f} GiB), layers={config.num_layers}, "
          f"type={args.type}, eos_token_id={config.eos_token_id}")


if __name__ == "__main__":
    main()
