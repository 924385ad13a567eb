"""load_model(): find the weights, check them, and build (tokenizer, model) on the right device and dtype.

load_weights' steps: read the config and settle the quantization bits (once, into the config); build the model on the
meta device, with its quantized layer types; stream the tensors in shard by shard (quantized layers quantize FP16
weights as they arrive, so peak memory stays near the quantized size and no second copy of the model is made); add
what the files do not hold and tie lm_head; on CPU, prepare the weights for this machine's kernels.
"""
import os
import re
import sys
import warnings
from typing import Optional

import torch
from torch import nn

from . import kernel_choice
# front doors still import ModelLoadError, resolve_model_path here
from .checkpoint import (HOW_TO_GET_WEIGHTS, ModelLoadError, check_file, read_state_dict, release_pages,  # noqa: F401
                         resolve_model_path, weight_files)
from .cpu_pack import PACKED_DTYPES, prepare_for_cpu
from .configuration import ChatGLMConfig, config_problems
from .demo_checkpoint import ensure_demo_checkpoint
from .modeling import ChatGLMForConditionalGeneration, PrefixEncoder, rotary_inv_freq
from .prefix_checkpoint import load_prefix_encoder, read_ptuning_checkpoint
from .tokenization import VOCAB_FILE, ChatGLMTokenizer

DEMO_NOTICE = (
    "NOTICE: running the built-in DEMO checkpoint (a tiny random model that writes gibberish), not ChatGLM-6B. "
    "Pass --model-path /path/to/chatglm-6b or set CHATGLM_MODEL to use real weights.")


def load_config(folder: str, **overrides) -> ChatGLMConfig:
    p = os.path.join(folder, "config.json")
    check_file(p, "model config")
    try:
        config = ChatGLMConfig.from_pretrained(folder, **overrides)
    except Exception as e:
        raise ModelLoadError(f"{p} is not a valid ChatGLM config ({e})") from e
    if config.model_type != "chatglm":
        raise ModelLoadError(f"{p} describes a {config.model_type!r} model, not ChatGLM-6B (model_type 'chatglm')")
    check_config(config, p)
    return config


def check_config(config: ChatGLMConfig, source: str):
    """ModelLoadError naming `source` (the file or option the values came from) and every bad field."""
    problems = config_problems(config)
    if problems:
        raise ModelLoadError(f"{source}: {'; '.join(problems)}")


# ---- device and dtype -------------------------------------------------------------------------------------------

def default_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


def choose_dtype(device: torch.device, dtype=None, quantized: bool = False) -> torch.dtype:
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; use one of float32, bfloat16, float16")
        dtype = _DTYPES[dtype]
    if dtype is None:
        if device.type in ("cuda", "mps"):
            return torch.float16
        # PyTorch's weight-only int8/int4 CPU kernels are vectorized for bfloat16 and plain loops for float32
        # (several times slower); float32 stays available for exact parity with the original (dtype="float32")
        return torch.bfloat16 if quantized else torch.float32
    if dtype == torch.float16 and device.type == "cpu":
        warnings.warn("float16 is slow or unsupported on CPU; using float32 instead (bfloat16 is the low-memory "
                      "choice on CPU)")
        return torch.float32
    if dtype == torch.bfloat16 and device.type == "mps":
        warnings.warn("bfloat16 is not supported on every MPS device; using float16")
        return torch.float16
    return dtype


# ---- building the model -----------------------------------------------------------------------------------------

def _assign(model: nn.Module, key: str, tensor: torch.Tensor):
    module_path, _, name = key.rpartition(".")
    module = model.get_submodule(module_path)
    if name in module._parameters:
        old = module._parameters[name]
        grad = old.requires_grad and tensor.is_floating_point()
        module._parameters[name] = nn.Parameter(tensor, requires_grad=grad)
    elif name in module._buffers:
        module._buffers[name] = tensor
    else:
        raise KeyError(key)


def _as_device(d) -> torch.device:
    return torch.device(f"cuda:{d}" if isinstance(d, int) else d)


def device_lookup(device_map: Optional[dict], default: torch.device):
    """key -> device: the longest module-name prefix in device_map that contains the key (else default)."""
    if not device_map:
        return lambda key: default
    entries = sorted(((k, _as_device(v)) for k, v in device_map.items()), key=lambda kv: -len(kv[0]))

    def lookup(key):
        for prefix, dev in entries:
            if key == prefix or key.startswith(prefix + "."):
                return dev
        return default
    return lookup


def load_weights(path, *, dtype=None, device=None, config: Optional[ChatGLMConfig] = None, quantize=None,
                 device_map: Optional[dict] = None, quantize_embeddings: bool = False):
    """ChatGLMForConditionalGeneration from a folder in the official layout (see module docstring).

    quantize_embeddings: also quantize the embedding lm_head shares (to `quantize` bits, or to those of a
    pre-quantized checkpoint), as chatglm-6b-int4-qe does; checkpoints saved that way load as such by themselves.

    device_map (module name -> device or GPU index, e.g. utils.auto_configure_device_map) places each weight
    straight on its device as it is read, so a model split over several GPUs never exists whole in CPU memory.
    """
    folder = resolve_model_path(path)
    config = config if config is not None else load_config(folder)
    stream_bits = settle_quantization(config, quantize, quantize_embeddings, folder)
    device = main_device(device, device_map)
    dtype = choose_dtype(device, dtype, quantized=bool(config.quantization_bit))
    files = weight_files(folder)
    if device.type == "cpu" and not device_map:  # this machine's fastest kernels (timed once, before any weights)
        kernel_choice.choose(dtype, config.quantization_bit, config.hidden_size, config.inner_hidden_size)
    with torch.device("meta"):
        model = ChatGLMForConditionalGeneration(config)  # with its quantized layer types (config.quantization_bit)
    device_of = device_lookup(device_map, device)
    intake = WeightIntake(model, dtype, device_of, stream_bits)
    for f in files:
        for key, t in read_state_dict(f).items():
            intake.take(key, t)
    intake.check(folder)
    finish_model(model, intake, folder, dtype, device_of)
    if device.type == "cpu":
        pack_dense = (dtype in PACKED_DTYPES and not device_map and config.pre_seq_len is None
                      and kernel_choice.dense_layout(dtype) == "onednn")
        prepare_for_cpu(model, dtype, pack_dense)
    model.name_or_path = str(path)
    model.config._name_or_path = str(path)
    return model.eval()


def settle_quantization(config: ChatGLMConfig, quantize, quantize_embeddings: bool, folder: str) -> Optional[int]:
    """Checks the bits once and writes them to the config once, before the model is built from it. Returns the bits
    that FP16 weights meeting a quantized layer are quantized to as they stream in (None: none are)."""
    if quantize is not None and (isinstance(quantize, bool) or quantize not in (4, 8)):
        raise ValueError(f"quantize must be 4 or 8 (bits), got {quantize!r}")
    if quantize and config.quantization_bit and quantize != config.quantization_bit:
        raise ModelLoadError(f"{folder} is already quantized to {config.quantization_bit} bits; cannot re-quantize "
                             f"to {quantize}. Load the FP16 checkpoint instead.")
    if quantize_embeddings and not (quantize or config.quantization_bit):
        raise ValueError("quantize_embeddings needs quantize=4 or 8 (the embedding is quantized like the block "
                         "linears) or a pre-quantized checkpoint")
    stream_bits = quantize or (config.quantization_bit if quantize_embeddings else None)
    config.quantization_bit = quantize or config.quantization_bit
    if quantize_embeddings:
        config.quantization_embeddings = True
    return stream_bits


def main_device(device, device_map: Optional[dict]) -> torch.device:
    """Where the embedding goes (and everything, without a device_map)."""
    if device_map:
        return _as_device(device_map.get("transformer.word_embeddings", next(iter(device_map.values()))))
    return torch.device(device or default_device())


class WeightIntake:
    """Streams one checkpoint's tensors into a model built on the meta device, one tensor at a time, and collects
    what does not fit. Quantized layers quantize the FP16 weights they are given themselves."""

    def __init__(self, model, dtype: torch.dtype, device_of, stream_bits: Optional[int]):
        self.model, self.dtype, self.device_of, self.stream_bits = model, dtype, device_of, stream_bits
        # scales stay exact: float32 in float32 models, else float16 (the official files' dtype), never bfloat16
        self.scale_dtype = torch.float32 if dtype == torch.float32 else torch.float16
        self.quantized_embeddings = bool(getattr(model.config, "quantization_embeddings", False))
        # lm_head shares the embedding's tensors (tied, or the same quantized ones): never loaded on its own
        self.expected = {k for k in model.state_dict()
                         if not k.endswith("rotary_emb.inv_freq") and not k.startswith("lm_head.")}
        self.targets = {**dict(model.named_parameters()), **dict(model.named_buffers())}
        self.loaded, self.shapes_wrong, self.quantized_head, self.file_layers = set(), [], {}, set()

    def take(self, key: str, t: torch.Tensor):
        layer = re.match(r"transformer\.layers\.(\d+)\.", key)
        if layer:
            self.file_layers.add(int(layer.group(1)))
        if key.startswith("lm_head.") and (t.dtype == torch.int8 or key.endswith("_scale")):
            self.quantized_head[key] = t  # an int4-qe file's copy of the embedding's tensors: compared later
            return
        if key == "transformer.word_embeddings.weight_scale" and not self.quantized_embeddings:
            self.shapes_wrong.append(f"{key}: the file's embedding is quantized, but config.json does not say "
                                     f"quantization_embeddings: true")
            return
        if key.endswith("rotary_emb.inv_freq") or key.startswith("lm_head.") or key not in self.expected:
            return  # recomputed / tied to the embedding / not ours (reported by check() if it matters)
        target = self.targets[key]
        if self.stream_bits and t.is_floating_point() and target.dtype == torch.int8 and key.endswith(".weight"):
            self.model.get_submodule(key[:-len(".weight")]).load_float_weight(t, self.device_of(key),
                                                                                self.scale_dtype)
            self.loaded.update({key, key + "_scale"})
            release_pages(t)
            return
        if tuple(t.shape) != tuple(target.shape) or t.is_floating_point() != target.is_floating_point():
            file_kind = "int8 (quantized)" if t.dtype == torch.int8 else str(t.dtype).replace("torch.", "")
            model_kind = "int8 (quantized)" if target.dtype == torch.int8 else "floating point"
            self.shapes_wrong.append(f"{key}: file {tuple(t.shape)} {file_kind}, model {tuple(target.shape)} "
                                     f"{model_kind}")
            return
        target_dtype = self.scale_dtype if key.endswith(".weight_scale") else self.dtype
        placed = t.to(device=self.device_of(key), dtype=target_dtype if t.is_floating_point() else t.dtype)
        _assign(self.model, key, placed)
        self.loaded.add(key)
        if placed.data_ptr() != t.data_ptr():  # converted or moved: the model keeps no view of the file
            release_pages(t)

    def check(self, folder: str):
        """ModelLoadError for a checkpoint that does not fit the config (a prefix encoder may be missing)."""
        config, config_path = self.model.config, os.path.join(folder, "config.json")
        if self.file_layers and len(self.file_layers) != config.num_layers:
            raise ModelLoadError(f"the weights in {folder} have {len(self.file_layers)} layers, but {config_path} "
                                 f"says num_layers {config.num_layers}: use the config.json that came with these "
                                 f"weights")
        if self.shapes_wrong:
            raise ModelLoadError(f"weights in {folder} do not fit its config.json ({config_path}): "
                                 f"{'; '.join(self.shapes_wrong[:5])}. Use the config.json that came with these "
                                 f"weights.")
        missing = sorted(k for k in self.expected - self.loaded if not k.startswith("transformer.prefix_encoder."))
        if missing:
            raise ModelLoadError(f"{len(missing)} weights are missing from {folder} (e.g. {', '.join(missing[:3])}); "
                                 f"the checkpoint is incomplete or not ChatGLM-6B. {HOW_TO_GET_WEIGHTS}")

    def prefix_missing(self) -> bool:
        return any(k.startswith("transformer.prefix_encoder.") for k in self.expected - self.loaded)


def finish_model(model, intake: WeightIntake, folder: str, dtype, device_of):
    """What the file does not hold: a fresh prefix encoder, lm_head sharing the embedding, the rotary tables."""
    if intake.prefix_missing():  # a new P-Tuning model: the prefix encoder starts from a fresh (fp32) initialisation
        model.transformer.prefix_encoder = PrefixEncoder(model.config).to(device_of("transformer.prefix_encoder"))
    if intake.quantized_embeddings:
        embedding_device = device_of("transformer.word_embeddings")
        _share_quantized_embedding(model, intake.quantized_head, folder, dtype, embedding_device)
    for i, layer in enumerate(model.transformer.layers):
        rot = layer.attention.rotary_emb
        rot.inv_freq = rotary_inv_freq(rot.dim).half().to(device_of(f"transformer.layers.{i}"))
    model.lm_head.weight = model.transformer.word_embeddings.weight  # tied, as in the original


ChatGLMForConditionalGeneration.load_weights = staticmethod(load_weights)  # its from_pretrained()


def _share_quantized_embedding(model, head_in_file: dict, folder: str, dtype, device):
    """lm_head takes the loaded quantized embedding's Parameters (one matrix for both, as in chatglm-6b-int4-qe);
    lookups produce the model's dtype. A file that stores lm_head's tensors too must store the same ones."""
    embedding = model.transformer.word_embeddings.rebind(dtype, device)
    mine = {"lm_head.weight": embedding.lm_head.int_weight(), "lm_head.weight_scale": embedding.weight_scale}
    for key, t in head_in_file.items():
        ours = mine.get(key)
        if ours is None or not torch.equal(t.to(ours.device, ours.dtype), ours):
            raise ModelLoadError(f"{key} in {folder} is not transformer.word_embeddings.{key[8:]}: with quantized "
                                 f"embeddings (quantization_embeddings: true, as chatglm-6b-int4-qe) lm_head shares "
                                 f"the embedding's tensors, so a file may only repeat them unchanged. Use the "
                                 f"config.json and weights of one model download.")


def set_prefix_config(config: ChatGLMConfig, ptuning_checkpoint, pre_seq_len, prefix_projection):
    """P-Tuning v2: the prefix length and projection written into the config (from the checkpoint's config.json
    unless given); returns the checkpoint's prefix-encoder tensors (None without a checkpoint)."""
    if ptuning_checkpoint:
        ck_len, ck_proj, prefix = read_ptuning_checkpoint(ptuning_checkpoint)
        config.pre_seq_len = pre_seq_len or ck_len
        config.prefix_projection = ck_proj if prefix_projection is None else prefix_projection
        if config.pre_seq_len is None:
            raise ModelLoadError(f"{ptuning_checkpoint}/config.json does not say pre_seq_len; pass --pre-seq-len")
        check_config(config, "--pre-seq-len" if pre_seq_len else os.path.join(ptuning_checkpoint, "config.json"))
        return prefix
    if pre_seq_len:  # 0 or None: no prefix
        config.pre_seq_len = pre_seq_len
        config.prefix_projection = bool(prefix_projection)
        check_config(config, "--pre-seq-len")
    return None


# ---- the one function every script uses -------------------------------------------------------------------------

def load_model(path: Optional[str] = None, *, device=None, dtype=None, quantize=None, pre_seq_len=None,
               ptuning_checkpoint=None, prefix_projection=None, device_map=None, quantize_embeddings=False):
    """(tokenizer, model) ready for chat. path: a local folder or hub id; None -> $CHATGLM_MODEL, else the demo
    checkpoint (announced on stderr; model.is_demo is True). A path that does not load raises ModelLoadError.
    quantize_embeddings (with quantize=4|8, or a pre-quantized checkpoint): the embedding and lm_head share one
    quantized matrix, as in chatglm-6b-int4-qe (~0.8 GB less for INT4; outputs differ slightly from the official
    INT4 model)."""
    is_demo = False
    if path is None:
        path = os.environ.get("CHATGLM_MODEL") or None
    if path is None:
        path, is_demo = ensure_demo_checkpoint(), True
        print(DEMO_NOTICE, file=sys.stderr, flush=True)
    folder = resolve_model_path(path)
    check_file(os.path.join(folder, VOCAB_FILE), "SentencePiece tokenizer model")
    tokenizer = ChatGLMTokenizer.from_pretrained(folder)
    config = load_config(folder)
    prefix = set_prefix_config(config, ptuning_checkpoint, pre_seq_len, prefix_projection)
    if tokenizer.vocab_size > config.vocab_size:
        raise ModelLoadError(f"{os.path.join(folder, VOCAB_FILE)} has {tokenizer.vocab_size} pieces but "
                             f"config.json's vocab_size is {config.vocab_size}: tokenizer and weights do not belong "
                             f"together. Download both from the same model repository.")
    model = load_weights(folder, dtype=dtype, device=device, config=config, quantize=quantize, device_map=device_map,
                         quantize_embeddings=quantize_embeddings)
    if prefix is not None:
        load_prefix_encoder(model, prefix, source=ptuning_checkpoint)
    # also when the demo folder is named explicitly: its config carries a marker
    model.is_demo = is_demo or bool(getattr(config, "chatglm_demo_version", None))
    model.name_or_path = str(path)
    model.ptuning_checkpoint = str(ptuning_checkpoint) if ptuning_checkpoint else None  # shown by the front doors
    return tokenizer, model
