"""Run the known-limits prompt suite (limitations/prompts.yaml) through a model and write limitations/GALLERY.md.

    python limitations/render.py                                   # built-in demo model
    python limitations/render.py --model-path /path/to/chatglm-6b  # the real model

Same options as examples/render.py, whose code this runs.
"""
import importlib.util
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def _examples_renderer():
    # by file path: "examples" is not a package and other installed distributions sometimes ship one by that name
    spec = importlib.util.spec_from_file_location("examples_render", os.path.join(HERE, "..", "examples", "render.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


if __name__ == "__main__":
    sys.exit(_examples_renderer().main(default_suite=os.path.join(HERE, "prompts.yaml")))
