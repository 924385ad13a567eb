"""The embedded demo checkpoint: a tiny ChatGLM in the official on-disk layout, built here in a few seconds.

It lets every script run on a machine without the real weights (clearly announced as a demo) and is the fixture
for the tests. `python -m chatglm.demo_checkpoint [DIR]` builds it (or reuses a finished build) and prints its
folder as the last line. Default folder: $CHATGLM_DEMO_DIR, else ~/.cache/chatglm/demo-<version>.
"""
import io
import json
import os
import shutil
import sys
import tempfile

import sentencepiece as spm
import torch
from tqdm.auto import tqdm

from .configuration import ChatGLMConfig
from .modeling import ChatGLMForConditionalGeneration
from .text import build_prompt
from .tokenization import ChatGLMTokenizer, encode_whitespace

VERSION = 1
CORPUS = os.path.join(os.path.dirname(__file__), "demo_corpus.txt")
GLM_CONTROL = ["[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>"]
WHITESPACE_PIECES = ["<n>", "<|tab|>"] + [f"<|blank_{n}|>" for n in range(2, 81)]
GEOMETRY = dict(hidden_size=128, inner_hidden_size=512, num_layers=2, num_attention_heads=4,
                max_sequence_length=2048)
TRAIN_STEPS = 120  # a few seconds: enough that replies are word pieces, not random bytes


def default_dir() -> str:
    return os.environ.get("CHATGLM_DEMO_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "chatglm", f"demo-v{VERSION}")


def _train_tokenizer(folder: str):
    with open(CORPUS, encoding="utf-8") as f:
        lines = [encode_whitespace(line.rstrip("\n")) for line in f if line.strip()]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines * 4), model_writer=model, model_type="unigram", vocab_size=1200,
        hard_vocab_limit=False, character_coverage=1.0, byte_fallback=True, normalization_rule_name="identity",
        add_dummy_prefix=True, remove_extra_whitespaces=False, unk_id=0, bos_id=1, eos_id=2, pad_id=3,
        control_symbols=GLM_CONTROL, user_defined_symbols=WHITESPACE_PIECES, minloglevel=2, num_threads=1)
    with open(os.path.join(folder, "ice_text.model"), "wb") as f:
        f.write(model.getvalue())
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump({"name_or_path": "chatglm-demo", "bos_token": "<sop>", "eos_token": "<eop>", "end_token": "</s>",
                   "gmask_token": "[gMASK]", "mask_token": "[MASK]", "pad_token": "<pad>", "unk_token": "<unk>",
                   "remove_space": False, "do_lower_case": False, "tokenizer_class": "ChatGLMTokenizer",
                   "num_image_tokens": 0}, f, indent=2)


def _build_model(folder: str):
    tok = ChatGLMTokenizer.from_pretrained(folder)
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<sop>", "<eop>", "[MASK]", "[gMASK]", "<pad>")}
    config = ChatGLMConfig(vocab_size=tok.vocab_size, bos_token_id=ids["<sop>"], eos_token_id=ids["<eop>"],
                           mask_token_id=ids["[MASK]"], gmask_token_id=ids["[gMASK]"], pad_token_id=ids["<pad>"],
                           use_cache=True, torch_dtype="float16", architectures=["ChatGLMModel"], **GEOMETRY)
    torch.manual_seed(1234)
    model = ChatGLMForConditionalGeneration(config)
    # Teach it the corpus briefly, as (line -> next line) chat pairs, so replies are made of real pieces and end.
    with open(CORPUS, encoding="utf-8") as f:
        lines = [line.strip() for line in f if line.strip()]
    examples = []
    for q, a in zip(lines, lines[1:] + lines[:1]):
        x = tok.encode(build_prompt(q), add_special_tokens=False)[:48] + [ids["[gMASK]"], ids["<sop>"]]
        y = tok.encode(a, add_special_tokens=False)[:40] + [ids["<eop>"]]
        examples.append((x + y, [-100] * (len(x) - 1) + [ids["<sop>"]] + y))
    width = max(len(x) for x, _ in examples)
    inputs = torch.tensor([x + [ids["<pad>"]] * (width - len(x)) for x, _ in examples])
    labels = torch.tensor([y + [-100] * (width - len(y)) for _, y in examples])
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    steps = tqdm(range(TRAIN_STEPS), desc="training the demo model", unit="step", file=sys.stderr)
    for _ in steps:
        loss = model(input_ids=inputs, labels=labels, use_cache=False).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        steps.set_postfix(loss=f"{loss.item():.2f}", refresh=False)
    model.eval()
    sd = {k: v.detach().half().contiguous() for k, v in model.state_dict().items()}
    torch.save(sd, os.path.join(folder, "pytorch_model.bin"))
    cfg = config.to_dict()
    for k in ("transformers_version", "dtype", "quantization_bit", "quantization_embeddings", "pre_seq_len",
              "prefix_projection", "tie_word_embeddings"):
        cfg.pop(k, None)
    cfg.update(_name_or_path="chatglm-demo", torch_dtype="float16", chatglm_demo_version=VERSION)
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2)
    return loss.item()


def ensure_demo_checkpoint(folder: str = None) -> str:
    """The demo checkpoint's folder, building it first if it is not there (atomically: parallel callers are safe)."""
    folder = os.path.abspath(folder or default_dir())
    if os.path.isfile(os.path.join(folder, "pytorch_model.bin")):
        return folder
    parent = os.path.dirname(folder)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".demo-build-", dir=parent)
    os.chmod(tmp, 0o755)
    # the first run's only wait (about a minute on 2 CPU cores): say what is happening and how far it has got
    print(f"Building the demo model in {folder} (first run only; later runs load it at once). Training its "
          f"tokenizer...", file=sys.stderr, flush=True)
    try:
        _train_tokenizer(tmp)
        _build_model(tmp)
        try:
            os.rename(tmp, folder)
        except OSError:  # another process finished first (or an empty folder is in the way)
            if not os.path.isfile(os.path.join(folder, "pytorch_model.bin")):
                if os.path.isdir(folder) and not os.listdir(folder):
                    os.rmdir(folder)
                    os.rename(tmp, folder)
                else:
                    raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


if __name__ == "__main__":
    print(ensure_demo_checkpoint(sys.argv[1] if len(sys.argv) > 1 else None))
