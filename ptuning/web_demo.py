"""Upstream's `python web_demo.py --model_name_or_path ... --ptuning_checkpoint ... --pre_seq_len ...`, kept
working: the chat page is the project's top-level web_demo.py; this only renames upstream's arguments to its
options (--model-path, --ptuning-checkpoint, --pre-seq-len, --quantize) and runs it.
"""
import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RENAMED = {"--model_name_or_path": "--model-path", "--ptuning_checkpoint": "--ptuning-checkpoint",
           "--pre_seq_len": "--pre-seq-len", "--quantization_bit": "--quantize"}
DROPPED = {"--prefix_projection"}  # read from the checkpoint's config.json


def translate(argv):
    out, skip_value = [], False
    for arg in argv:
        if skip_value and arg.lower() in ("true", "false", "1", "0", "yes", "no"):
            skip_value = False
            continue
        name, eq, value = arg.partition("=")
        skip_value = name in DROPPED and not eq
        if name not in DROPPED:
            out.append(RENAMED.get(name, name) + eq + value)
    return out


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.argv = [str(ROOT / "web_demo.py")] + translate(sys.argv[1:])
    runpy.run_path(str(ROOT / "web_demo.py"), run_name="__main__")
