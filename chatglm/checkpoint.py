"""Reading checkpoint files: find the folder, list its weight files, read their tensors safely, and say clearly
what is wrong with a download (ModelLoadError). Imports nothing else of the package: everything builds on it."""
import ctypes
import json
import mmap
import os
import pickle
import re
import sys

import torch
from huggingface_hub import snapshot_download
from safetensors.torch import load_file

HOW_TO_GET_WEIGHTS = (
    "Get the real weights with `git lfs install && git clone https://huggingface.co/THUDM/chatglm-6b` (or the "
    "chatglm-6b-int4 / chatglm-6b-int8 variants) and pass that folder as --model-path or $CHATGLM_MODEL.")
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


def check_file(path: str, what: str):
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
            check_file(index_path, "weight index")
            try:
                with open(index_path, encoding="utf-8") as f:
                    shards = sorted(set(json.load(f)["weight_map"].values()))
            except (ValueError, KeyError) as e:
                raise ModelLoadError(f"{index_path} is not a valid weight index ({e}); download it again") from e
            paths = [os.path.join(folder, s) for s in shards]
            for p in paths:
                check_file(p, f"weight shard listed in {index}")
            return paths
    for name in WEIGHT_FILES:
        p = os.path.join(folder, name)
        if os.path.exists(p):
            check_file(p, "model weights")
            return [p]
    raise ModelLoadError(f"no weights in {folder}: expected one of {', '.join(WEIGHT_INDEXES + WEIGHT_FILES)}. "
                         f"{HOW_TO_GET_WEIGHTS}")


def read_state_dict(path: str):
    """Tensors of one weight file; never unpickles arbitrary objects."""
    try:
        if path.endswith(".safetensors"):
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
        libc = ctypes.CDLL(None, use_errno=True)
        page = mmap.PAGESIZE
        start, end = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
        first, last = -(-start // page) * page, end // page * page  # whole pages inside the tensor only
        if last > first:
            libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), 4)  # MADV_DONTNEED
    except (OSError, AttributeError):
        pass
