"""The decode engine: one prefill/decode loop over a batch of live sequences (continuous batching).

Each step admits the waiting sequences that fit (first come, first served) and prefills them together, their
prompts laid end to end (kv_cache.PackedPrompts: the weight matmuls run once over all the prompts' tokens, each
prompt attends over its own cache), then runs one decode step over every other live sequence together: again the
weight matmuls see all rows at once (one pass over the weights serves the batch; that is the speed-up on CPUs, where
decoding is bound by reading the weights) while each row attends over its own KV cache (kv_cache.RaggedCache). GLM
prompts are prefix-LM (the context before <sop> is attended bidirectionally), so a prompt cannot be prefilled in
chunks exactly; a step packs newcomers only up to PACK_TOKENS prompt tokens (a longer prompt goes alone), which
bounds how long one prefill holds up the others' streams. Finished or cancelled sequences leave at once and free
their cache.

A KV memory budget decides admission: a sequence is admitted only when its worst-case cache (max length x bytes
per token) fits beside the others'; otherwise it waits (a sequence that alone exceeds the budget runs alone).
"""
from collections import deque
from typing import Callable, List, Optional, Sequence as Seq

import psutil
import torch

from .kv_cache import KVCache, PackedPrompts, RaggedCache
from .positions import glm_anchors, glm_positions
from .sampling import Sampler
from .text import IncrementalDecoder, cut_at_stop, process_response, without_stop_prefix
from .validation import GenerationOptions


# Most prompt tokens prefilled together in one step: prompts arriving together cost about one prefill instead of one
# each (on a CPU a short prompt's prefill is bound by streaming the weights, like a decode step), while a step's
# prefill, during which the running streams wait, stays about as long as one 256-token prompt's.
PACK_TOKENS = 256


def kv_bytes_per_token(model) -> int:
    """Keys and values of every layer for one token, in the model's compute dtype."""
    c = model.config
    return 2 * c.num_layers * c.hidden_size * torch.empty(0, dtype=model.dtype).element_size()


def default_kv_budget(device) -> int:
    """Half of the free GPU memory (the activations and allocator need the rest) or a third of the available
    RAM on a CPU: the weights are already loaded, so what is free now is what the caches can use."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] // 2
    return psutil.virtual_memory().available // 3


class Sequence:
    """One reply being generated: prompt ids, options, cache, and the reply text so far.

    processors / stopping_criteria: transformers-style callables for callers that still pass them (api.py until
    it moves onto chatglm.service); stopping_criteria(ids [1, n], scores) -> a bool or a [1] bool tensor.
    """

    def __init__(self, prompt_ids: List[int], options: GenerationOptions, tokenizer, config,
                 processors: Seq = (), stopping_criteria: Optional[Callable] = None):
        self.ids, self.n_prompt, self.options = list(prompt_ids), len(prompt_ids), options
        limit = self.n_prompt + options.max_new_tokens if options.max_new_tokens else options.max_length
        limit = min(limit, config.max_sequence_length)  # max_new_tokens never reaches past the context
        self.max_length = max(limit, self.n_prompt + 1)  # a prompt at the limit still gets one token, as before
        self.context_length, self.mask_position = glm_anchors(self.ids, config)
        self.eos, self.pre_seq_len = config.eos_token_id, config.pre_seq_len or 0
        self.sampler = Sampler(options, processors)
        self.stopping_criteria = stopping_criteria
        self.decoder = IncrementalDecoder(tokenizer) if tokenizer is not None else None  # None: ids only
        self.response = ""          # process_response(reply so far), cut before a stop string
        self.finish_reason = None   # "stop" (<eop> or a stop string) | "length" | "cancelled"
        self.stopped_by_string = False
        self.cancelled = False      # set from any thread; the engine drops the sequence at its next step
        self.cache: Optional[KVCache] = None
        self.id_buffer = torch.empty(self.max_length, dtype=torch.long) if self.sampler.needs_ids else None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def cache_tokens(self) -> int:
        return self.max_length + self.pre_seq_len

    @property
    def visible(self) -> str:
        """The reply so far without a tail that may still grow into a stop string."""
        return without_stop_prefix(self.response, self.options.stop) if self.options.stop else self.response

    def ids_tensor(self) -> Optional[torch.Tensor]:
        if self.id_buffer is None:
            return None
        n = len(self.ids)
        self.id_buffer[n - 1] = self.ids[-1]
        return self.id_buffer[None, :n]

    def next_token(self, scores: torch.Tensor):
        """Sample from the last position's [1, V] float scores and append the token."""
        if self.id_buffer is not None and len(self.ids) == self.n_prompt:
            self.id_buffer[:self.n_prompt] = torch.tensor(self.ids)
        token = self.sampler(scores, self.ids_tensor())
        self.ids.append(token)
        self.sampler.observe(token)
        response = process_response(self.decoder.add(token)) if self.decoder is not None else ""
        done = token == self.eos or len(self.ids) >= self.max_length
        if self.stopping_criteria is not None:
            done = bool(self.stopping_criteria(self.ids_tensor() if self.id_buffer is not None
                                               else torch.tensor([self.ids]), scores)) or done
        response, self.stopped_by_string = cut_at_stop(response, self.options.stop)
        if self.stopped_by_string or done:
            self._finish("stop" if self.stopped_by_string or token == self.eos else "length")
        else:
            self.response = response

    def _finish(self, reason: str):
        """The exact final text: the whole reply decoded once (the incremental text is for streaming)."""
        text = self.decoder.tokenizer.decode(self.ids[self.n_prompt:]) if self.decoder is not None else ""
        response, self.stopped_by_string = cut_at_stop(process_response(text), self.options.stop)
        self.response = response.strip() if self.stopped_by_string else response
        self.finish_reason = "stop" if self.stopped_by_string else reason


class Engine:
    """Runs sequences on one model; step() advances every live one by a token. Not thread-safe: one thread
    (chat()'s caller, or the model service's) owns it."""

    def __init__(self, model, kv_budget: Optional[int] = None):
        self.model = model
        self.device = model.device
        self.bytes_per_token = kv_bytes_per_token(model)
        self.kv_budget = default_kv_budget(self.device) if kv_budget is None else kv_budget
        self.waiting: deque = deque()
        self.running: List[Sequence] = []

    @property
    def reserved(self) -> int:
        """Bytes promised to the running sequences' caches (their worst case)."""
        return sum(s.cache_tokens for s in self.running) * self.bytes_per_token

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    def add(self, seq: Sequence):
        self.waiting.append(seq)

    def step(self) -> List[Sequence]:
        """One engine step: drop cancelled sequences, prefill the newcomers that fit, decode the rest by one token.
        Returns every sequence that changed (a new token, finished, or cancelled)."""
        changed = self._drop_cancelled()
        with torch.inference_mode():  # per step, never across a caller's yield (it may resume on another thread)
            newcomers = self._admit()
            rows = list(self.running)
            if newcomers:
                self._prefill(newcomers)
                self.running.extend(newcomers)
            if rows:
                self._decode(rows)
        changed += rows + newcomers
        for seq in changed:
            if seq.finished and seq in self.running:
                self.running.remove(seq)
                seq.cache = None  # frees the cache at once
        return changed

    def _drop_cancelled(self) -> List[Sequence]:
        gone = [s for s in list(self.waiting) + self.running if s.cancelled and not s.finished]
        for seq in gone:
            seq.finish_reason = "cancelled"
            seq.cache = None
        self.waiting = deque(s for s in self.waiting if not s.finished)
        self.running = [s for s in self.running if not s.finished]
        return gone

    def _admit(self) -> List[Sequence]:
        """The waiting sequences to prefill now, in arrival order: while their caches fit the budget beside the
        running ones' and their prompts total at most PACK_TOKENS (the first one always, if nothing runs)."""
        admitted, reserved, tokens = [], self.reserved, 0
        while self.waiting:
            seq = self.waiting[0]
            need = seq.cache_tokens * self.bytes_per_token
            crowded = (self.running or admitted) and reserved + need > self.kv_budget
            if crowded or admitted and tokens + len(seq.ids) > PACK_TOKENS:
                break  # first come, first served: later (smaller) requests do not overtake
            admitted.append(self.waiting.popleft())
            reserved, tokens = reserved + need, tokens + len(seq.ids)
        return admitted

    def _prefill(self, seqs: List[Sequence]):
        spans, masks, start = [], [], 0
        for seq in seqs:
            seq.cache = KVCache(self.model.config, max_length=seq.cache_tokens)
            spans.append((start, start + len(seq.ids)))
            masks.append(self._prompt_mask(seq))
            start += len(seq.ids)
        ids = torch.tensor([[t for seq in seqs for t in seq.ids]], device=self.device)
        positions = torch.cat([glm_positions(s.context_length, s.mask_position, 0, len(s.ids), self.device)
                               for s in seqs], dim=1)
        packed = PackedPrompts([s.cache for s in seqs], spans, masks)
        h = self.model.transformer(input_ids=ids, position_ids=positions[None], cache=packed)
        last = torch.tensor([end - 1 for _, end in spans], device=self.device)
        scores = self.model.lm_head(h[0, last]).float()
        for i, seq in enumerate(seqs):
            seq.next_token(scores[i:i + 1])

    def _prompt_mask(self, seq: Sequence) -> torch.Tensor:
        """The [1, 1, L, prefix + L] mask the model builds for this prompt alone (True = blocked)."""
        mask = self.model.transformer.build_mask(torch.tensor([seq.ids], device=self.device))
        if seq.pre_seq_len:
            mask = torch.cat([mask.new_zeros(1, 1, len(seq.ids), seq.pre_seq_len), mask], dim=3)
        return mask

    def _decode(self, rows: List[Sequence]):
        ids = torch.tensor([[s.ids[-1]] for s in rows], device=self.device)
        positions = torch.stack([glm_positions(s.context_length, s.mask_position, len(s.ids) - 1, len(s.ids))
                                 for s in rows]).to(self.device)
        cache = RaggedCache([s.cache for s in rows])
        logits = self.model(input_ids=ids, position_ids=positions, cache=cache, logits_to_keep=1).logits
        scores = logits[:, -1].float()
        for i, seq in enumerate(rows):
            seq.next_token(scores[i:i + 1])
