"""load_model(): find the weights, check them, and build (tokenizer, model) on the right device and dtype.

Weights stream in shard by shard onto a model built on the meta device, so no second copy of the model is ever
made; with quantize=4|8 each weight is quantized as it arrives, so peak memory stays near the quantized size.
"""
import json
import os
import pickle
import re
import sys
import warnings
from typing import Optional

import torch
from torch import nn

from . import kernel_choice
from .configuration import ChatGLMConfig, config_problems
from .tokenization import VOCAB_FILE, ChatGLMTokenizer

HOW_TO_GET_WEIGHTS = (
    "Get the real weights with `git lfs install && git clone https://huggingface.co/THUDM/chatglm-6b` (or the "
    "chatglm-6b-int4 / chatglm-6b-int8 variants) and pass that folder as --model-path or $CHATGLM_MODEL.")
DEMO_NOTICE = (
    "NOTICE: running the built-in DEMO checkpoint (a tiny random model that writes gibberish), not ChatGLM-6B. "
    "Pass --model-path /path/to/chatglm-6b or set CHATGLM_MODEL to use real weights.")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
LFS_POINTER_PREFIX = b"version https://git-lfs"


class ModelLoadError(RuntimeError):
    """A model folder that cannot be loaded; the message names the file, what was expected and the fix."""


# ---- where the files are ----------------------------------------------------------------------------------------

def resolve_model_path(path: str) -> str:
    """A local folder as is; a hub id (e.g. THUDM/chatglm-6b) through the local Hugging Face cache."""
    path = os.path.expanduser(str(path))
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise ModelLoadError(f"model path {path!r} is a file; pass the folder that holds config.json and the weights")
    if path.count("/") == 1 and not path.startswith((".", "/")):
        try:
            from huggingface_hub import snapshot_download
            try:
                return snapshot_download(path, local_files_only=True)
            except Exception:
                if os.environ.get("HF_HUB_OFFLINE") == "1":
                    raise
                return snapshot_download(path, allow_patterns=["*.json", "*.model", "*.bin", "*.safetensors"])
        except Exception as e:
            raise ModelLoadError(f"model {path!r} is neither a local folder nor in the Hugging Face cache and could "
                                 f"not be downloaded ({type(e).__name__}: {e}). {HOW_TO_GET_WEIGHTS}") from e
    raise ModelLoadError(f"model folder {path!r} does not exist. {HOW_TO_GET_WEIGHTS}")


def _check_file(path: str, what: str):
    if not os.path.isfile(path):
        raise ModelLoadError(f"{path} is missing ({what}). The download is incomplete: fetch the file again. "
                             f"{HOW_TO_GET_WEIGHTS}")
    with open(path, "rb") as f:
        head = f.read(64)
    if head.startswith(LFS_POINTER_PREFIX):
        raise ModelLoadError(f"{path} is a git-lfs pointer ({os.path.getsize(path)} bytes), not the {what}: the "
                             f"large files were not downloaded. Run `git lfs install && git lfs pull` in the model "
                             f"folder, or download the file by hand.")
    if os.path.getsize(path) == 0:
        raise ModelLoadError(f"{path} is empty; expected the {what}. Download it again.")


def weight_files(folder: str):
    """The checkpoint's weight files, in order: from the index json if there is one, else the single file."""
    for index in WEIGHT_INDEXES:
        index_path = os.path.join(folder, index)
        if os.path.isfile(index_path):
            _check_file(index_path, "weight index")
            try:
                with open(index_path, encoding="utf-8") as f:
                    shards = sorted(set(json.load(f)["weight_map"].values()))
            except (ValueError, KeyError) as e:
                raise ModelLoadError(f"{index_path} is not a valid weight index ({e}); download it again") from e
            paths = [os.path.join(folder, s) for s in shards]
            for p in paths:
                _check_file(p, f"weight shard listed in {index}")
            return paths
    for name in WEIGHT_FILES:
        p = os.path.join(folder, name)
        if os.path.exists(p):
            _check_file(p, "model weights")
            return [p]
    raise ModelLoadError(f"no weights in {folder}: expected one of {', '.join(WEIGHT_INDEXES + WEIGHT_FILES)}. "
                         f"{HOW_TO_GET_WEIGHTS}")


def read_state_dict(path: str):
    """Tensors of one weight file; never unpickles arbitrary objects."""
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            return load_file(path)
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)  # an old, non-zip torch.save file
    except pickle.UnpicklingError as e:
        if "Weights only load failed" not in str(e):
            raise _unreadable(path, e) from e
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        raise ModelLoadError(
            f"{path} is UNSAFE: besides tensors it holds Python objects ({found.group(1) if found else 'unknown'}) "
            f"that would run code when loaded, so it was not loaded. Official weights never do this: download "
            f"them again from a source you trust (prefer .safetensors files).") from None
    except Exception as e:
        raise _unreadable(path, e) from e


def _unreadable(path: str, e: Exception) -> ModelLoadError:
    return ModelLoadError(f"cannot read weights from {path} ({type(e).__name__}: {str(e)[:300]}). The file is "
                          f"probably truncated or corrupt ({os.path.getsize(path)} bytes): download it again.")


def release_pages(t: torch.Tensor):
    """Tell Linux we are done with a tensor read from a memory-mapped checkpoint, so its file pages leave our
    resident memory now rather than when the whole shard is closed (it keeps quantize-while-loading's peak near
    the quantized size). A no-op elsewhere, and for tensors not backed by a file mapping."""
    if not sys.platform.startswith("linux") or t.device.type != "cpu" or t.numel() == 0:
        return
    try:
        import ctypes
        import mmap
        libc = ctypes.CDLL(None, use_errno=True)
        page = mmap.PAGESIZE
        start, end = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
        first, last = -(-start // page) * page, end // page * page  # whole pages inside the tensor only
        if last > first:
            libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), 4)  # MADV_DONTNEED
    except (OSError, AttributeError):
        pass


def load_config(folder: str, **overrides) -> ChatGLMConfig:
    p = os.path.join(folder, "config.json")
    _check_file(p, "model config")
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
    from .modeling import ChatGLMForConditionalGeneration, PrefixEncoder, rotary_inv_freq

    folder = resolve_model_path(path)
    config = config if config is not None else load_config(folder)
    if device_map:
        device = _as_device(device_map.get("transformer.word_embeddings", next(iter(device_map.values()))))
    else:
        device = torch.device(device or default_device())
    dtype = choose_dtype(device, dtype, quantized=bool(quantize or config.quantization_bit))
    # scales stay exact: float32 in float32 models, else float16 (the official files' dtype), never bfloat16
    scale_dtype = torch.float32 if dtype == torch.float32 else torch.float16
    device_of = device_lookup(device_map, device)
    if quantize is not None and quantize not in (4, 8):
        raise ValueError(f"quantize must be 4 or 8 (bits), got {quantize!r}")
    if quantize and config.quantization_bit and quantize != config.quantization_bit:
        raise ModelLoadError(f"{folder} is already quantized to {config.quantization_bit} bits; cannot re-quantize "
                             f"to {quantize}. Load the FP16 checkpoint instead.")
    if quantize_embeddings and not (quantize or config.quantization_bit):
        raise ValueError("quantize_embeddings needs quantize=4 or 8 (the embedding is quantized like the block "
                         "linears) or a pre-quantized checkpoint")
    # bits for the FP16 weights of the file that land in quantized layers (quantized as they stream in)
    quantize_bits = quantize or (config.quantization_bit if quantize_embeddings else None)
    files = weight_files(folder)
    if device.type == "cpu" and not device_map:  # this machine's fastest kernels (timed once, before any weights)
        kernel_choice.choose(dtype, quantize or config.quantization_bit, config.hidden_size, config.inner_hidden_size)
    with torch.device("meta"):
        model = ChatGLMForConditionalGeneration(config)  # pre-quantized checkpoints: empty quantized layers
    if quantize_bits:
        from .quantization import replace_with_empty_quantized
        replace_with_empty_quantized(model, quantize_bits, embeddings=quantize_embeddings or None)
    quantized_embeddings = bool(getattr(model.config, "quantization_embeddings", False))
    # lm_head shares the embedding's tensors (tied, or the same quantized ones): never loaded on its own
    expected = {k for k in model.state_dict() if not k.endswith("rotary_emb.inv_freq") and not k.startswith("lm_head.")}
    targets = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    loaded, shapes_wrong, quantized_head, file_layers = set(), [], {}, set()
    for f in files:
        sd = read_state_dict(f)
        for key, t in sd.items():
            layer = re.match(r"transformer\.layers\.(\d+)\.", key)
            if layer:
                file_layers.add(int(layer.group(1)))
            if key.startswith("lm_head.") and (t.dtype == torch.int8 or key.endswith("_scale")):
                quantized_head[key] = t  # an int4-qe file's copy of the embedding's tensors: compared below
                continue
            if key == "transformer.word_embeddings.weight_scale" and not quantized_embeddings:
                shapes_wrong.append(f"{key}: the file's embedding is quantized, but config.json does not say "
                                    f"quantization_embeddings: true")
                continue
            if key.endswith("rotary_emb.inv_freq") or key.startswith("lm_head.") or key not in expected:
                continue  # recomputed / tied to the embedding / not ours (reported below if it matters)
            target = targets[key]
            if quantize_bits and t.is_floating_point() and target.dtype == torch.int8 and key.endswith(".weight"):
                from .quantization import quantize_weight
                q, scale = quantize_weight(t, quantize_bits)
                _assign(model, key, q.to(device_of(key)))
                _assign(model, key + "_scale", scale.to(device=device_of(key), dtype=scale_dtype))
                loaded.update({key, key + "_scale"})
                release_pages(t)
                continue
            if tuple(t.shape) != tuple(target.shape) or t.is_floating_point() != target.is_floating_point():
                file_kind = "int8 (quantized)" if t.dtype == torch.int8 else str(t.dtype).replace("torch.", "")
                model_kind = "int8 (quantized)" if target.dtype == torch.int8 else "floating point"
                shapes_wrong.append(f"{key}: file {tuple(t.shape)} {file_kind}, model {tuple(target.shape)} "
                                    f"{model_kind}")
                continue
            target_dtype = scale_dtype if key.endswith(".weight_scale") else dtype
            source = t
            t = t.to(device=device_of(key), dtype=target_dtype if t.is_floating_point() else t.dtype)
            _assign(model, key, t)
            loaded.add(key)
            if t.data_ptr() != source.data_ptr():  # converted or moved: the model keeps no view of the file
                release_pages(source)
        del sd
    if file_layers and len(file_layers) != config.num_layers:
        raise ModelLoadError(f"the weights in {folder} have {len(file_layers)} layers, but "
                             f"{os.path.join(folder, 'config.json')} says num_layers {config.num_layers}: use the "
                             f"config.json that came with these weights")
    if shapes_wrong:
        raise ModelLoadError(f"weights in {folder} do not fit its config.json ({os.path.join(folder, 'config.json')})"
                             f": {'; '.join(shapes_wrong[:5])}. Use the config.json that came with these weights.")
    missing = expected - loaded
    prefix_missing = {k for k in missing if k.startswith("transformer.prefix_encoder.")}
    if missing - prefix_missing:
        names = sorted(missing - prefix_missing)
        raise ModelLoadError(f"{len(names)} weights are missing from {folder} (e.g. {', '.join(names[:3])}); the "
                             f"checkpoint is incomplete or not ChatGLM-6B. {HOW_TO_GET_WEIGHTS}")
    if prefix_missing:  # a new P-Tuning model: the prefix encoder starts from a fresh (fp32) initialisation
        model.transformer.prefix_encoder = PrefixEncoder(config).to(device_of("transformer.prefix_encoder"))
    if quantized_embeddings:
        _share_quantized_embedding(model, quantized_head, folder, dtype, device_of("transformer.word_embeddings"))
    for i, layer in enumerate(model.transformer.layers):
        rot = layer.attention.rotary_emb
        rot.inv_freq = rotary_inv_freq(rot.dim).half().to(device_of(f"transformer.layers.{i}"))
    model.lm_head.weight = model.transformer.word_embeddings.weight  # tied, as in the original
    if quantize:
        model.config.quantization_bit = quantize
    packs = dtype in (torch.bfloat16, torch.float32) and device.type == "cpu"
    if packs and not device_map and config.pre_seq_len is None and kernel_choice.dense_layout(dtype) == "onednn":
        from .cpu_pack import pack_for_cpu
        pack_for_cpu(model, release_dense=True)
    if dtype == torch.bfloat16 and device.type == "cpu" and getattr(config, "quantization_bit", 0):
        # repack quantized weights for the CPU kernel now (in place), not as a stall on the first reply (~3 s for 6B)
        from .quantization import INT8_LAYOUT, QuantizedLinear
        for m in model.modules():
            if isinstance(m, QuantizedLinear) and (m.bits == 4 or INT8_LAYOUT[dtype] == "nibble"):
                m._prepare_cpu_kernel()
    model.name_or_path = str(path)
    model.config._name_or_path = str(path)
    return model.eval()


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


# ---- P-Tuning -----------------------------------------------------------------------------------------------------

def read_ptuning_checkpoint(folder: str):
    """(pre_seq_len, prefix_projection, tensors) of a P-Tuning v2 checkpoint folder."""
    if not os.path.isdir(folder):
        raise ModelLoadError(f"P-Tuning checkpoint {folder!r} does not exist (expected a folder with config.json and "
                             f"pytorch_model.bin or model.safetensors, e.g. output/adgen-chatglm-6b-pt-128-2e-2/"
                             f"checkpoint-3000)")
    cfg, cfg_path = {}, os.path.join(folder, "config.json")
    if os.path.isfile(cfg_path):
        try:
            with open(cfg_path, encoding="utf-8") as f:
                cfg = json.load(f)
        except (ValueError, OSError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            raise ModelLoadError(f"{cfg_path} is not a valid P-Tuning config ({e}); it should be the config.json "
                                 f"saved with the checkpoint") from None
        if not isinstance(cfg, dict):
            raise ModelLoadError(f"{cfg_path} must hold a JSON object, got {type(cfg).__name__}")
    tensors = {}
    for f in weight_files(folder):
        for k, v in read_state_dict(f).items():
            if k.startswith("transformer.prefix_encoder."):
                tensors[k[len("transformer.prefix_encoder."):]] = v
    if not tensors:
        raise ModelLoadError(f"{folder} holds no transformer.prefix_encoder.* weights: it is not a P-Tuning v2 "
                             f"checkpoint")
    return cfg.get("pre_seq_len"), cfg.get("prefix_projection", False), tensors


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
        from .demo_checkpoint import ensure_demo_checkpoint
        path, is_demo = ensure_demo_checkpoint(), True
        print(DEMO_NOTICE, file=sys.stderr, flush=True)
    if quantize is not None and quantize not in (4, 8):
        raise ValueError(f"quantize must be 4 or 8 (bits), got {quantize!r}")
    folder = resolve_model_path(path)
    _check_file(os.path.join(folder, VOCAB_FILE), "SentencePiece tokenizer model")
    tokenizer = ChatGLMTokenizer.from_pretrained(folder)
    config = load_config(folder)
    prefix = None
    if ptuning_checkpoint:
        ck_len, ck_proj, prefix = read_ptuning_checkpoint(ptuning_checkpoint)
        config.pre_seq_len = pre_seq_len or ck_len
        config.prefix_projection = ck_proj if prefix_projection is None else prefix_projection
        if config.pre_seq_len is None:
            raise ModelLoadError(f"{ptuning_checkpoint}/config.json does not say pre_seq_len; pass --pre-seq-len")
        check_config(config, "--pre-seq-len" if pre_seq_len else os.path.join(ptuning_checkpoint, "config.json"))
    elif pre_seq_len:  # 0 or None: no prefix
        config.pre_seq_len = pre_seq_len
        config.prefix_projection = bool(prefix_projection)
        check_config(config, "--pre-seq-len")
    if tokenizer.vocab_size > config.vocab_size:
        raise ModelLoadError(f"{os.path.join(folder, VOCAB_FILE)} has {tokenizer.vocab_size} pieces but "
                             f"config.json's vocab_size is {config.vocab_size}: tokenizer and weights do not belong "
                             f"together. Download both from the same model repository.")
    model = load_weights(folder, dtype=dtype, device=device, config=config, quantize=quantize, device_map=device_map,
                         quantize_embeddings=quantize_embeddings)
    if prefix is not None:
        from .ptuning import load_prefix_encoder
        load_prefix_encoder(model, prefix, source=ptuning_checkpoint)
    # also when the demo folder is named explicitly: its config carries a marker
    model.is_demo = is_demo or bool(getattr(config, "chatglm_demo_version", None))
    model.name_or_path = str(path)
    model.ptuning_checkpoint = str(ptuning_checkpoint) if ptuning_checkpoint else None  # shown by the front doors
    return tokenizer, model
