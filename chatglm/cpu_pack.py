"""bfloat16 and float32 linears on CPU with their weights prepacked for oneDNN.

Decoding reads every weight once per token, and oneDNN reads a weight reordered once into its blocked layout
much faster than F.linear reads the dense one (benchmarks/README.md, "Why the CPU kernels look as they do"). bfloat16
results are the same bit for bit; float32 sums are ordered differently (last-bit differences, ~1e-6 relative).
The packed weight replaces the dense one (no second copy); state dicts still hold the official dense `weight`, and
moving or casting the model unpacks it. The word embedding, which lm_head shares, is packed too
(PackedTiedEmbedding): lm_head reads 1.07 GB per token in bf16, 2.1 GB in fp32.
"""
import ctypes
import warnings
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import release_pages
from . import cpu_kernels
from .quantization import INT8_LAYOUT, INTDOT_MAX_ROWS, NUMBA_KERNELS, QuantizedLinear

BLOCK_LINEARS = ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")


PACKED_DTYPES = (torch.bfloat16, torch.float32)


def available(dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether oneDNN can run packed `dtype` linears here."""
    try:
        return (dtype in PACKED_DTYPES and torch.backends.mkldnn.is_available()
                and (dtype != torch.bfloat16 or bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())))
    except (AttributeError, RuntimeError):
        return False


def packable(w: torch.Tensor) -> bool:
    return w.device.type == "cpu" and available(w.dtype)


_warned = []


def _warn_no_weight_grads():
    if _warned:
        return
    _warned.append(True)
    warnings.warn("this model's weights are packed for inference (chatglm/cpu_pack.py) and get no gradients; call "
                  "model.train() before training (it restores them as Parameters), or run inference under "
                  "torch.no_grad()", stacklevel=3)


class PackedLinear(nn.Module):
    """nn.Linear's interface and state dict, with a oneDNN-packed bfloat16/float32 weight for inference on CPU."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.bias = linear.bias  # stays an ordinary (frozen or trainable) parameter
        self.weight_requires_grad = linear.weight.requires_grad
        self._set_weight(linear.weight.detach())

    def _set_weight(self, dense: torch.Tensor):
        # packed while it is bfloat16/float32 on the CPU; after .to(...)/.half() it is kept dense, used as nn.Linear
        if packable(dense):
            self.packed, self.dense = torch.ops.mkldnn._reorder_linear_weight(dense.contiguous(), None), None
        else:
            self.packed, self.dense = None, dense

    @property
    def weight(self) -> torch.Tensor:
        return self.packed.to_dense() if self.packed is not None else self.dense

    def _apply(self, fn, recurse=True):
        self._set_weight(fn(self.weight))
        return super()._apply(fn, recurse)

    def forward(self, x):
        if self.packed is None:
            return F.linear(x, self.dense, self.bias)
        if torch.is_grad_enabled() and x.requires_grad:
            _warn_no_weight_grads()
            return F.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed, self.bias, "none", [], "")

    def unpack(self) -> nn.Linear:
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = nn.Parameter(self.weight, requires_grad=self.weight_requires_grad)
        linear.bias = self.bias
        return linear

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.weight
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "weight"
        if key in state_dict:
            self._set_weight(state_dict[key].to(dtype=self.weight.dtype, device=self.weight.device))
        elif strict:
            missing_keys.append(key)
        if self.bias is not None and prefix + "bias" in state_dict:
            with torch.no_grad():
                self.bias.copy_(state_dict[prefix + "bias"])

    def extra_repr(self):
        kind = f"oneDNN-packed {str(self.packed.dtype)[6:]}" if self.packed is not None else "dense"
        return f"in_features={self.in_features}, out_features={self.out_features}, {kind}"


# ---- the tied embedding / lm_head matrix --------------------------------------------------------------------------
# lm_head reads the whole [vocab, hidden] matrix every token, so it is worth packing too. The embedding shares the
# matrix, and a lookup needs rows, which an opaque oneDNN tensor does not give out. So we read rows straight from
# the packed buffer: for inner products oneDNN blocks the weight as [ceil(rows / b), cols / k, b, k] (b = 64 with
# AVX-512; k = 2 in bf16, 1 in fp32: 32-bit groups), which we confirm on every chunk we pack by comparing rows with
# the dense original; if it ever differs (another CPU or oneDNN), the head stays unpacked.
# ---- unpacked bfloat16 linears: decode rows by cpu_kernels, prompts in float32 ---------------------------------

# Rows from which an unpacked bfloat16 linear multiplies in float32: on AVX2 CPUs (no oneDNN bf16 kernels) a bfloat16
# GEMM ran ~6x slower than converting the weight a tile at a time and running a float32 one. Below it, NUMBA_ROWS
# sends the call to chatglm/cpu_kernels.py's weight-streaming loop instead of F.linear. Both set per machine by
# chatglm/kernel_choice.py (NUMBA_ROWS only where numba is installed); the defaults never convert nor use numba.
FLOAT32_FROM_ROWS = 1 << 30
NUMBA_ROWS = False
UPCAST_CHUNK_ELEMENTS = 1 << 22  # weight elements converted at a time (16 MB in float32)


class CpuBf16Linear(nn.Linear):
    """nn.Linear (same parameters, state dict and training) whose bfloat16 inference calls on CPU take the faster
    route where the CPU has no bfloat16 arithmetic: fewer than FLOAT32_FROM_ROWS rows through cpu_kernels (when
    NUMBA_ROWS), more in float32 with the weight converted a tile at a time into one reused buffer. Either way the
    bias is added in float32 and the output rounded to bfloat16 once."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        fast = rows >= FLOAT32_FROM_ROWS or NUMBA_ROWS
        if (not fast or x.dtype != torch.bfloat16 or x.device.type != "cpu" or self.weight.dtype != torch.bfloat16
                or torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)):
            return F.linear(x, self.weight, self.bias)
        x2d = x.reshape(rows, self.in_features)
        if rows < FLOAT32_FROM_ROWS:
            y = cpu_kernels.matmul(x2d, self.weight)
            y = y if self.bias is None else y.add_(self.bias.detach().float())
            return y.to(torch.bfloat16).view(*x.shape[:-1], self.out_features)
        x32 = x2d.float()
        y = torch.empty(rows, self.out_features, dtype=torch.bfloat16)
        chunk = max(1, UPCAST_CHUNK_ELEMENTS // self.in_features)
        buffer = torch.empty(min(chunk, self.out_features), self.in_features)
        for start in range(0, self.out_features, chunk):
            stop = min(start + chunk, self.out_features)
            w = buffer[:stop - start]
            w.copy_(self.weight[start:stop])
            part = x32 @ w.T if self.bias is None else torch.addmm(self.bias[start:stop].float(), x32, w.T)
            y[:, start:stop] = part
        return y.view(*x.shape[:-1], self.out_features)


def route_bf16_linears(model: nn.Module) -> nn.Module:
    """Give the plain bfloat16 linears of every GLM block, and an unpacked lm_head, CpuBf16Linear's forward (a class
    swap: parameters, ties, state dict and training stay nn.Linear's)."""
    layers = [block.get_submodule(path) for block in model.transformer.layers for path in BLOCK_LINEARS]
    for layer in layers + [getattr(model, "lm_head", None)]:
        if type(layer) is nn.Linear and layer.weight.dtype == torch.bfloat16:
            layer.__class__ = CpuBf16Linear
    return model


HEAD_CHUNK_ROWS = 8192  # packed in chunks: while packing, only one chunk exists twice (67 MB in bf16, not 1 GB)
_ROW_BLOCKS = (64, 32, 16)


def _buffer_view(packed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A flat `dtype` tensor over the packed tensor's memory (valid while `packed` lives)."""
    nbytes = torch.ops.mkldnn._nbytes(packed)
    array = (ctypes.c_byte * nbytes).from_address(torch.ops.mkldnn.data_ptr(packed))
    return torch.frombuffer(array, dtype=dtype)


def _rows(view: torch.Tensor, local: torch.Tensor, cols: int) -> torch.Tensor:
    """Rows `local` of a packed chunk whose buffer is `view` ([blocks, cols / k, b, k])."""
    b = view.shape[2]
    return view[local // b, :, local % b, :].reshape(-1, cols)


def _pack_rows(dense: torch.Tensor):
    """(packed, row view) for a dense [rows, cols] chunk, or None if its packed layout is not the one we read."""
    rows, cols = dense.shape
    k = 4 // dense.element_size()
    if cols % k:
        return None
    packed = torch.ops.mkldnn._reorder_linear_weight(dense.contiguous(), None)
    flat = _buffer_view(packed, dense.dtype)
    g = torch.Generator().manual_seed(rows)
    probe = torch.cat([torch.tensor([0, 1, 17, 33, 63, rows - 1]).clamp(max=rows - 1),
                       torch.randint(0, rows, (10,), generator=g)])
    for b in _ROW_BLOCKS:
        if flat.numel() != -(-rows // b) * b * cols:
            continue
        view = flat.view(-1, cols // k, b, k)
        if torch.equal(_rows(view, probe, cols), dense[probe]):
            return packed, view
    return None


def _pack_chunks(w: torch.Tensor, release_dense: bool = False):
    """[(packed, row view)] for a dense bf16/fp32 CPU matrix, HEAD_CHUNK_ROWS rows per chunk; None where it cannot be
    packed or its rows could not be read back. release_dense: hand each packed chunk's dense pages back to the
    system at once (only when nothing else uses `w`); on failure, what was released is written back."""
    if not packable(w):
        return None
    chunks = []
    for start in range(0, w.shape[0], HEAD_CHUNK_ROWS):
        part = w[start:start + HEAD_CHUNK_ROWS]
        chunk = _pack_rows(part)
        if chunk is None:
            if release_dense:
                for i, (packed, _) in enumerate(chunks):
                    w[i * HEAD_CHUNK_ROWS:(i + 1) * HEAD_CHUNK_ROWS] = packed.to_dense()
            return None
        chunks.append(chunk)
        if release_dense:
            release_pages(part)
    return chunks


class PackedTiedEmbedding(nn.Module):
    """nn.Embedding's interface and state dict for the matrix lm_head shares, kept oneDNN-packed in row chunks."""

    def __init__(self, embedding: nn.Embedding, chunks):
        super().__init__()
        self.num_embeddings, self.embedding_dim = embedding.num_embeddings, embedding.embedding_dim
        self.padding_idx = embedding.padding_idx
        self.weight_requires_grad = embedding.weight.requires_grad
        self.chunks = chunks  # [(packed, row view)], HEAD_CHUNK_ROWS rows each (the last one fewer)
        self.dense = None  # set instead of chunks once moved off the CPU or cast to float16
        self._weight_cache = None

    @classmethod
    def pack(cls, embedding: nn.Embedding, release_dense: bool = False):
        """The packed replacement for `embedding`, or None where packing is not possible. release_dense: hand each
        packed chunk's dense pages back to the system at once (only when nothing else uses the dense weight)."""
        chunks = _pack_chunks(embedding.weight.detach(), release_dense)
        return cls(embedding, chunks) if chunks is not None else None

    @property
    def _packed_dtype(self) -> torch.dtype:
        return self.chunks[0][1].dtype  # the row view's dtype is the packed matrix's

    @property
    def weight(self) -> torch.Tensor:
        """The dense matrix (rebuilt from the packed chunks: 1 GB for ChatGLM-6B; cached while someone holds it,
        so lm_head.weight is embedding.weight as in the tied model)."""
        if self.dense is not None:
            return self.dense
        cached = self._weight_cache() if self._weight_cache is not None else None
        if cached is None:
            cached = torch.cat([packed.to_dense() for packed, _ in self.chunks])
            cached.requires_grad_(False)
            self._weight_cache = weakref.ref(cached)
        return cached

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.dense is not None:
            return F.embedding(ids, self.dense, self.padding_idx)
        flat = ids.reshape(-1)
        out = torch.empty(flat.numel(), self.embedding_dim, dtype=self._packed_dtype)
        chunk_of = flat // HEAD_CHUNK_ROWS
        for c in chunk_of.unique().tolist():
            where = (chunk_of == c).nonzero().squeeze(1)
            out[where] = _rows(self.chunks[c][1], flat[where] - c * HEAD_CHUNK_ROWS, self.embedding_dim)
        return out.view(*ids.shape, self.embedding_dim)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """x @ weight.T: lm_head's logits."""
        if self.dense is not None:
            return F.linear(x, self.dense)
        if torch.is_grad_enabled() and x.requires_grad:
            _warn_no_weight_grads()
            return F.linear(x, self.weight)
        x = x.contiguous()
        return torch.cat([torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
                          for packed, _ in self.chunks], dim=-1)

    def _apply(self, fn, recurse=True):
        weight = self.weight
        moved = fn(weight)
        if moved is weight and self.dense is None:  # e.g. .cpu() on a packed model: nothing to do
            return super()._apply(fn, recurse)
        chunks = _pack_chunks(moved)
        self.chunks, self.dense = (chunks, None) if chunks is not None else ([], moved)
        self._weight_cache = None
        return super()._apply(fn, recurse)

    def unpack(self) -> nn.Embedding:
        embedding = nn.Embedding(self.num_embeddings, self.embedding_dim, self.padding_idx, device="meta")
        embedding.weight = nn.Parameter(self.weight, requires_grad=self.weight_requires_grad)
        return embedding

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.weight

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "weight"
        if key in state_dict:
            w = state_dict[key].to(dtype=self._packed_dtype if self.dense is None else self.dense.dtype,
                                   device="cpu" if self.dense is None else self.dense.device)
            self._apply(lambda _: w)
        elif strict:
            missing_keys.append(key)

    def extra_repr(self):
        kind = f"oneDNN-packed {str(self._packed_dtype)[6:]}" if self.dense is None else "dense"
        return f"{self.num_embeddings}, {self.embedding_dim}, {kind}, shared with lm_head"


class PackedTiedHead(nn.Module):
    """lm_head over a PackedTiedEmbedding's matrix (no weights of its own: the embedding owns them)."""

    def __init__(self, embedding: PackedTiedEmbedding):
        super().__init__()
        self.in_features, self.out_features = embedding.embedding_dim, embedding.num_embeddings
        self.embeddings = [embedding]  # a list, so it is not registered twice as a submodule

    @property
    def weight(self) -> torch.Tensor:
        return self.embeddings[0].weight

    def forward(self, x):
        return self.embeddings[0].linear(x)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.weight

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        pass  # tied: the embedding loads the matrix

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, tied to the packed embedding"


# ---- whole models -------------------------------------------------------------------------------------------------

def pack_for_cpu(model: nn.Module, release_dense: bool = False) -> nn.Module:
    """Swap the four bfloat16/float32 linears of every GLM block for PackedLinear, and the tied embedding + lm_head
    for their packed pair (where oneDNN has kernels for the dtype). release_dense: the loader's own freshly loaded
    model, whose dense embedding nobody else holds (its pages are returned while packing, to keep the peak low)."""
    for block in model.transformer.layers:
        for path in BLOCK_LINEARS:
            parent_path, name = path.split(".")
            parent = getattr(block, parent_path)
            layer = getattr(parent, name)
            if type(layer) in (nn.Linear, CpuBf16Linear) and packable(layer.weight):
                setattr(parent, name, PackedLinear(layer))
    embedding, head = model.transformer.word_embeddings, getattr(model, "lm_head", None)
    if type(embedding) is nn.Embedding and type(head) is nn.Linear and head.weight is embedding.weight:
        packed = PackedTiedEmbedding.pack(embedding, release_dense)
        if packed is not None:
            model.transformer.word_embeddings, model.lm_head = packed, PackedTiedHead(packed)
    model.unpack_cpu_layers = unpack  # the model's train() and quantize() undo the packing through this
    return model



def prepare_for_cpu(model: nn.Module, dtype: torch.dtype, pack_dense: bool) -> nn.Module:
    """The loader's last step on CPU: dense linears packed for oneDNN (pack_dense; the loader's own fresh model), and
    quantized weights repacked for the CPU INT4 op now (in place), not as a stall on the first reply."""
    if pack_dense:
        pack_for_cpu(model, release_dense=True)
    if dtype == torch.bfloat16:
        route_bf16_linears(model)  # the linears left unpacked (no oneDNN bf16 kernels here, or mkl / numba chosen)
    if dtype == torch.bfloat16 and getattr(model.config, "quantization_bit", 0):
        for m in model.modules():
            if (isinstance(m, QuantizedLinear) and (m.bits == 4 or INT8_LAYOUT[dtype] == "nibble")
                    and (dtype, m.bits) not in NUMBA_KERNELS and not INTDOT_MAX_ROWS.get((dtype, m.bits))):
                # (cpu_kernels and cpu_intdot read the official bytes)
                m.repack_for_cpu()
    return model


def is_packed(model: nn.Module) -> bool:
    return any(isinstance(m, (PackedLinear, PackedTiedEmbedding)) for m in model.modules())


def unpack(model: nn.Module) -> nn.Module:
    """Back to plain nn.Linear / nn.Embedding layers with trainable Parameters, lm_head tied to the embedding again
    (model.train() does this by itself)."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, PackedLinear):
                setattr(module, name, child.unpack())
    base = getattr(model, "transformer", None)
    if base is not None and isinstance(base.word_embeddings, PackedTiedEmbedding):
        base.word_embeddings = base.word_embeddings.unpack()
        model.lm_head = nn.Linear(base.word_embeddings.embedding_dim, base.word_embeddings.num_embeddings,
                                  bias=False, device="meta")
        model.lm_head.weight = base.word_embeddings.weight
    return model
