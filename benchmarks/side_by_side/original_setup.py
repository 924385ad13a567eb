"""Build the checkpoint folders the ORIGINAL ChatGLM-6B hub code loads with AutoModel(trust_remote_code=True).

    python original_setup.py --workdir DIR --code-dir CODE [--layers 2]

Run it with the original's venv (transformers 4.27.1; see README.md). Needs DIR/glm6b-random-<L>l, made by
benchmarks/bench.py build_checkpoint(DIR, L). CODE holds the original's files, downloaded by you from the Hugging
Face hub (this repository ships none of them):
  CODE/configuration_chatglm.py, modeling_chatglm.py, tokenization_chatglm.py, quantization.py   (THUDM/chatglm-6b)
  CODE/int4_repo/quantization.py                                                             (THUDM/chatglm-6b-int4)
Creates next to the random checkpoint:
  DIR/orig-<L>l       pytorch_model.bin (model.safetensors re-saved: same fp16 tensors, same key names) + config.json
                      with auto_map + the chatglm-6b code (its quantization.py is CUDA-only)
  DIR/orig-<L>l-cpuq  the same weights (symlink) and code, but with chatglm-6b-int4's quantization.py, the only
                      version of the original's code with a CPU int8/int4 path
"""
import argparse
import json
import os
import shutil

import torch

# copied from our config into the original's; the original ignores keys it does not know, so pick exactly its own
ORIGINAL_CONFIG_KEYS = ("bos_token_id", "eos_token_id", "mask_token_id", "gmask_token_id", "pad_token_id",
                        "hidden_size", "inner_hidden_size", "layernorm_epsilon", "max_sequence_length",
                        "num_attention_heads", "num_layers", "position_encoding_2d", "quantization_bit",
                        "pre_seq_len", "prefix_projection", "use_cache", "vocab_size")
ORIGINAL_CODE_FILES = ("configuration_chatglm.py", "modeling_chatglm.py", "tokenization_chatglm.py")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True,
                   help="folder holding glm6b-random-<L>l (the DIR given to bench.build_checkpoint); the orig-<L>l "
                        "folders are created here too")
    p.add_argument("--code-dir", required=True,
                   help="folder with the original's hub files: configuration_chatglm.py, modeling_chatglm.py, "
                        "tokenization_chatglm.py, quantization.py (THUDM/chatglm-6b)")
    p.add_argument("--cpu-quantization-py",
                   help="THUDM/chatglm-6b-int4's quantization.py (the one with CPU kernels); "
                        "default CODE_DIR/int4_repo/quantization.py")
    p.add_argument("--layers", type=int, default=2, help="use DIR/glm6b-random-<layers>l (default 2)")
    a = p.parse_args()
    a.workdir = os.path.abspath(a.workdir)  # the -cpuq folder's weights are a symlink: keep its target absolute
    cpu_quantization = a.cpu_quantization_py or os.path.join(a.code_dir, "int4_repo", "quantization.py")
    needed = [os.path.join(a.code_dir, n) for n in ORIGINAL_CODE_FILES + ("quantization.py",)] + [cpu_quantization]
    missing = [f for f in needed if not os.path.isfile(f)]
    if missing:
        p.error("missing original hub files (download them, see README.md): " + ", ".join(missing))
    src = os.path.join(a.workdir, f"glm6b-random-{a.layers}l")
    assert os.path.isfile(os.path.join(src, "done")), f"build {src} first (bench.build_checkpoint)"
    with open(os.path.join(src, "config.json")) as fh:
        ours = json.load(fh)
    cfg = {
        "architectures": ["ChatGLMModel"],
        "auto_map": {
            "AutoConfig": "configuration_chatglm.ChatGLMConfig",
            "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
            "AutoModelForSeq2SeqLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
        },
        "model_type": "chatglm",
        "torch_dtype": "float16",
        "transformers_version": "4.27.1",
    }
    for k in ORIGINAL_CONFIG_KEYS:
        cfg[k] = ours[k]
    main_dir = os.path.join(a.workdir, f"orig-{a.layers}l")
    cpu_quant_dir = os.path.join(a.workdir, f"orig-{a.layers}l-cpuq")
    for d in (main_dir, cpu_quant_dir):
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2)
        for name in ORIGINAL_CODE_FILES:
            shutil.copyfile(os.path.join(a.code_dir, name), os.path.join(d, name))
        for name in ("ice_text.model", "tokenizer_config.json"):  # unused by the benchmark (it feeds ids)
            shutil.copyfile(os.path.join(src, name), os.path.join(d, name))
    shutil.copyfile(os.path.join(a.code_dir, "quantization.py"), os.path.join(main_dir, "quantization.py"))
    shutil.copyfile(cpu_quantization, os.path.join(cpu_quant_dir, "quantization.py"))
    weights = os.path.join(main_dir, "pytorch_model.bin")
    if not os.path.isfile(weights):
        # transformers 4.27 + the original's code predate safetensors checkpoints: give it the .bin it expects
        from safetensors.torch import load_file
        state = load_file(os.path.join(src, "model.safetensors"))
        torch.save(state, weights + ".tmp")
        os.replace(weights + ".tmp", weights)
    link = os.path.join(cpu_quant_dir, "pytorch_model.bin")
    if not os.path.lexists(link):
        os.symlink(weights, link)
    print(main_dir)
    print(cpu_quant_dir)


if __name__ == "__main__":
    main()
