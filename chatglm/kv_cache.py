"""A KV cache written in place: one preallocated [B, nh, capacity, hd] buffer per layer for keys and for values.

transformers' DynamicCache concatenates every step, copying the whole cache per token and layer; here a step
writes its new keys/values into the next free slots and attention reads a view of the filled part. The buffer
starts small (the prompt plus a margin, at most `max_length`) and doubles when full, so short chats do not
reserve max_length slots up front (that matters on GPUs, where reserved memory is resident).
"""
from contextlib import nullcontext

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

MARGIN = 256  # free slots reserved beyond the first update


class KVLayer(CacheLayerMixin):
    is_sliding = False
    is_croppable = True

    def __init__(self, max_length: int = 0):
        super().__init__()
        self.max_length = max_length  # a capacity hint (the generation limit), not a hard limit
        self.length = 0  # a Python int: reading the cache length never syncs with the device
        self._k = self._v = None

    def lazy_initialization(self, key_states, value_states):
        self.device = key_states.device
        self._allocate(key_states, key_states.shape[2], key_states.shape[2] + MARGIN)
        self.is_initialized = True

    def _allocate(self, like, needed, wanted):
        """New buffers of at least `needed` slots (`wanted`, capped at max_length while that suffices), holding
        what the old ones held."""
        if self.max_length and needed <= self.max_length:
            wanted = min(wanted, self.max_length)
        B, nh, _, hd = like.shape
        k, v = like.new_empty(B, nh, max(wanted, needed), hd), like.new_empty(B, nh, max(wanted, needed), hd)
        if self.length:
            with self._writable():
                k[:, :, :self.length] = self._k[:, :, :self.length]
                v[:, :, :self.length] = self._v[:, :, :self.length]
        self._k, self._v = k, v

    def _writable(self):
        # buffers made under torch.inference_mode (stream_chat's steps) may only be written to under it
        return torch.inference_mode() if self._k is not None and self._k.is_inference() else nullcontext()

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[2]
        if end > self._k.shape[2]:
            self._allocate(key_states, end, 2 * self._k.shape[2])
        with self._writable():
            self._k[:, :, self.length:end] = key_states
            self._v[:, :, self.length:end] = value_states
        self.length = end
        self.keys, self.values = self._k[:, :, :end], self._v[:, :, :end]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1  # grows when full

    def get_mask_sizes(self, query_length: int):
        return self.length + query_length, 0

    def reset(self):
        self.length = 0
        self.keys = self.values = None

    def crop(self, tokens_to_remove: int):
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative number of tokens to remove")
        self.length = max(0, self.length + tokens_to_remove)
        if self.is_initialized:
            self.keys, self.values = self._k[:, :, :self.length], self._v[:, :, :self.length]

    def _select_rows(self, rows):
        if self.is_initialized and self.length:
            n = self.length
            with self._writable():
                self._k[:, :, :n] = self._k[:, :, :n].index_select(0, rows)
                self._v[:, :, :n] = self._v[:, :, :n].index_select(0, rows)
            self.keys, self.values = self._k[:, :, :n], self._v[:, :, :n]

    def reorder_cache(self, beam_idx):
        """Beam search: row i takes the states of row beam_idx[i] (same batch size), in place."""
        self._select_rows(beam_idx.to(self.device))

    def _rebuild(self, keys, values):
        self._k, self._v = keys.contiguous(), values.contiguous()
        self.keys, self.values = self._k, self._v

    def batch_repeat_interleave(self, repeats: int):
        if self.is_initialized and self.length:
            self._rebuild(self._k.repeat_interleave(repeats, dim=0), self._v.repeat_interleave(repeats, dim=0))
            self.keys, self.values = self._k[:, :, :self.length], self._v[:, :, :self.length]

    def batch_select_indices(self, indices):
        if self.is_initialized and self.length:
            self._rebuild(self._k[indices], self._v[indices])
            self.keys, self.values = self._k[:, :, :self.length], self._v[:, :, :self.length]


class KVCache(Cache):
    """The cache generate(), chat() and stream_chat() use; pass max_length (prompt + new tokens + P-Tuning prefix)
    when known so the buffers never need to grow past it."""

    def __init__(self, config=None, max_length: int = 0, num_layers: int = None):
        n = num_layers if num_layers is not None else config.num_layers
        super().__init__(layers=[KVLayer(max_length) for _ in range(n)])


class RaggedCache:
    """One decode step over sequences of different lengths (chatglm.engine): row i of the batch appends to and
    attends over caches[i]. The weight matmuls still run once for the whole batch; only attention, which is per
    sequence anyway, loops over the rows, so every row computes exactly what it would alone."""

    def __init__(self, caches):
        self.caches = caches

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return max(c.get_seq_length(layer_idx) for c in self.caches)  # a bound for the rotary table

    def attend(self, layer_idx: int, q, k, v, attention):
        """q, k, v: [B, nh, 1, hd]; attention(q, keys, values) for one row -> [1, nh, 1, hd]."""
        out = []
        for i, cache in enumerate(self.caches):
            keys, values = cache.update(k[i:i + 1], v[i:i + 1], layer_idx)
            out.append(attention(q[i:i + 1], keys, values))
        return torch.cat(out)


class PackedPrompts:
    """Several newcomers' prompts prefilled in one forward pass (chatglm.engine): their tokens are laid end to end in
    batch row 0, so the weight matmuls run once over all of them, while each prompt writes to and attends over its
    own cache with its own GLM mask (and the P-Tuning prefix, if any, in front) -- exactly what it computes alone.

    spans: (start, end) of each prompt along the sequence; masks: each prompt's [1, 1, L, prefix + L] bool mask
    (True = blocked)."""

    def __init__(self, caches, spans, masks):
        self.caches, self.spans, self.masks = caches, spans, masks

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # every prompt starts its cache here

    def attend(self, layer_idx: int, q, k, v, attention, prefix_kv=None):
        """q, k, v: [1, nh, T, hd]; attention(q, keys, values, mask) for one prompt -> [1, nh, L, hd]."""
        out = []
        for cache, (start, end), mask in zip(self.caches, self.spans, self.masks):
            if prefix_kv is not None:
                cache.update(prefix_kv[0], prefix_kv[1], layer_idx)
            keys, values = cache.update(k[:, :, start:end], v[:, :, start:end], layer_idx)
            out.append(attention(q[:, :, start:end], keys, values, mask))
        return torch.cat(out, dim=2)
