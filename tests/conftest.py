import json
import os
import sys

# One thread per process: the tests run servers and the test process side by side on small CI machines, where
# oversubscribed threads made a tiny model's replies 10x slower. Set before torch is imported; subprocesses inherit.
os.environ.setdefault("OMP_NUM_THREADS", "1")
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers.cache_utils import DynamicCache

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the scripts and the chatglm package run from the repo root
# The original implementation's outputs on tiny checkpoints (see tests/golden/README.md), kept in the repository so
# that every clone checks parity.
GOLDEN = ROOT / "tests" / "golden"


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    assert GOLDEN.is_dir(), f"golden data missing at {GOLDEN}: it is part of the repository (git checkout it)"
    return GOLDEN


def load_golden(name: str):
    """(golden.json dict, npz arrays) of one golden folder under tests/golden."""
    folder = GOLDEN / name
    assert folder.is_dir(), f"golden folder {folder} missing: it is part of the repository (git checkout it)"
    with open(folder / "golden.json", encoding="utf-8") as f:
        g = json.load(f)
    return g, np.load(folder / "golden_arrays.npz")


def replay_cached_steps(model, case, check_step=None) -> np.ndarray:
    """Teacher-forced KV-cache decoding of one golden "cache" case through the model's generate hooks: the step
    logits [batch, steps, vocab] as numpy. check_step(k, inputs, cache), if given, sees each step's inputs."""
    ids = torch.tensor(case["prompt_input_ids"])
    kwargs = {"cache": DynamicCache(config=model.config)}
    first = case["steps"][0]
    if first["model_built_position_ids"] is None:  # the tokenizer's mask/positions were passed in
        kwargs["glm_attention_mask"] = torch.tensor(first["attention_mask"]).bool()
        kwargs["glm_position_ids"] = torch.tensor(first["position_ids"])
    cont = torch.tensor(case["continuation_ids"])
    cont = cont.expand(ids.shape[0], -1) if cont.dim() == 1 else cont
    steps = []
    for k in range(len(case["steps"])):
        inputs = model.prepare_inputs_for_generation(ids, **kwargs)
        if check_step is not None:
            check_step(k, inputs, kwargs["cache"])
        with torch.no_grad():
            out = model(**inputs)
        kwargs = model._update_model_kwargs_for_generation(out, kwargs)
        steps.append(out.logits[:, -1].float())
        if k < cont.shape[1]:
            ids = torch.cat([ids, cont[:, k:k + 1]], dim=1)
    return torch.stack(steps, dim=1).numpy()


DEBIAN_CHROMIUM = os.environ.get("CHATGLM_CHROMIUM") or "/usr/bin/chromium"  # $CHATGLM_CHROMIUM: another one
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
NO_BROWSER = ("The browser tests need a Chromium and none was found. Install either Debian's "
              "(`sudo apt-get install chromium`) or Playwright's own (`python -m playwright install chromium`), "
              "then run the tests again.")


def chromium_executable(playwright) -> str:
    """Debian's Chromium (or $CHATGLM_CHROMIUM), else the one `python -m playwright install chromium` downloads; None
    when neither is there."""
    if Path(DEBIAN_CHROMIUM).exists():
        return DEBIAN_CHROMIUM
    bundled = playwright.chromium.executable_path
    return bundled if bundled and Path(bundled).exists() else None


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium driven by Playwright (both installed as README "Tests" says); a missing browser fails the
    test with what to install, not a traceback."""
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        executable = chromium_executable(p)
        if executable is None:
            pytest.fail(NO_BROWSER, pytrace=False)
        b = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="session")
def demo_model_path() -> str:
    """The demo checkpoint in its default place (built on first use), so scripts started by tests without
    --model-path find the same one."""
    from chatglm.demo_checkpoint import ensure_demo_checkpoint
    return ensure_demo_checkpoint()


@pytest.fixture
def dequantized_copy():
    """f(model) -> a deep copy whose quantized block linears are plain fp32 nn.Linear layers holding q * scale
    (frozen): the dense reference a quantized model must agree with."""
    import copy

    import torch
    from torch import nn

    from chatglm.quantization import QUANTIZED_LINEARS

    def make(model):
        dense = copy.deepcopy(model)
        for block in dense.transformer.layers:
            for path in QUANTIZED_LINEARS:
                parent_path, _, name = path.rpartition(".")
                q = block.get_submodule(path)
                lin = nn.Linear(q.in_features, q.out_features)
                lin.weight = nn.Parameter(q.dequantized_weight(torch.float32), requires_grad=False)
                lin.bias = nn.Parameter(q.bias.detach().float(), requires_grad=False)
                setattr(block.get_submodule(parent_path), name, lin)
        return dense
    return make


@pytest.fixture
def assert_same_prefix_grads():
    """f(model, dense, ids): one training step's loss gradients reach exactly the prefix encoder's parameters, all
    non-zero, and equal those of the dense reference."""
    import torch

    def check(model, dense, ids):
        grads = []
        for m in (model, dense):
            m.zero_grad()
            m(input_ids=ids, labels=ids).loss.backward()
            grads.append({n: p.grad for n, p in m.named_parameters() if p.requires_grad})
        prefix = {n for n, _ in model.named_parameters() if n.startswith("transformer.prefix_encoder.")}
        assert set(grads[0]) == prefix
        for name, g in grads[0].items():
            assert g is not None and g.abs().sum() > 0, name
            torch.testing.assert_close(g, grads[1][name], rtol=1e-4, atol=1e-6)
    return check
