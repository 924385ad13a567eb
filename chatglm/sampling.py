"""The one place that turns a sequence's logits into its next token.

Each sequence of a batch has its own Sampler (its own options, its own torch.Generator when seeded), so a row
samples exactly what it would alone. The order is the one the original's generate() used, with the API's OpenAI
penalties where the API used to add them as logits processors: repetition penalty, frequency/presence penalties,
logit bias, (compatibility) caller processors, the invalid-score guard, then temperature, top-k, top-p.
"""
from typing import Optional, Sequence

import torch
from transformers import (RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper,
                          TopPLogitsWarper)

from .validation import GenerationOptions

INVALID_FALLBACK_TOKEN = 5  # hard-coded by the original (the "▁" piece in the real vocabulary)


def guard_invalid(scores: torch.Tensor) -> torch.Tensor:
    """NaN/inf scores (an fp16 overflow) -> a harmless distribution instead of a crash in sampling. The whole
    tensor is checked at once, as the original; torch.where avoids a host sync."""
    fallback = torch.zeros_like(scores)
    fallback[..., INVALID_FALLBACK_TOKEN] = 5e4
    return torch.where(torch.isfinite(scores).all(), scores, fallback)


class Sampler:
    """Next tokens of one sequence. processors: transformers-style callables (ids [1, n], scores [1, V]) -> scores,
    applied after the built-in penalties (kept for callers that still pass logits_processor)."""

    def __init__(self, options: GenerationOptions, processors: Sequence = ()):
        o = options
        self.greedy = o.greedy
        self.processors = list(processors)
        penalty = o.repetition_penalty
        self.repetition = RepetitionPenaltyLogitsProcessor(penalty) if penalty != 1.0 else None
        self.frequency, self.presence = o.frequency_penalty, o.presence_penalty
        self.counts: Optional[torch.Tensor] = None  # how often each token occurs in the reply so far
        self.logit_bias = o.logit_bias
        # greedy skips the warpers: temperature, top-k and top-p never change which token is the most likely
        self.warpers = [] if self.greedy else [w for w in (
            TemperatureLogitsWarper(o.temperature) if o.temperature != 1.0 else None,
            TopKLogitsWarper(o.top_k) if o.top_k else None,
            TopPLogitsWarper(o.top_p) if o.top_p < 1.0 else None) if w is not None]
        self.seed = None if self.greedy else o.seed
        self.generator = None  # made on the scores' device at the first draw

    @property
    def needs_ids(self) -> bool:
        return bool(self.processors) or self.repetition is not None

    def observe(self, token: int):
        """Count a reply token (frequency/presence penalties count the reply only, as OpenAI and vLLM)."""
        if self.counts is not None:
            self.counts[token] += 1

    def __call__(self, scores: torch.Tensor, ids: Optional[torch.Tensor] = None) -> int:
        """scores: [1, V] float32 logits of the last position; ids: [1, n] the sequence so far (if needs_ids)."""
        if self.repetition is not None:  # over prompt and reply, as transformers'
            scores = self.repetition(ids, scores)
        if self.frequency or self.presence:
            if self.counts is None:
                self.counts = torch.zeros(scores.shape[-1], dtype=scores.dtype, device=scores.device)
            scores = scores - self.counts * self.frequency - (self.counts > 0).to(scores.dtype) * self.presence
        if self.logit_bias:
            ids, values = zip(*self.logit_bias)
            scores = scores.clone()
            scores[:, list(ids)] += torch.tensor(values, dtype=scores.dtype, device=scores.device)
        for processor in self.processors:
            scores = processor(ids, scores)
        scores = guard_invalid(scores)
        if self.greedy:
            return int(scores.argmax(-1))
        for warper in self.warpers:
            scores = warper(ids, scores)
        if self.seed is not None and self.generator is None:
            self.generator = torch.Generator(device=scores.device).manual_seed(self.seed)
        return int(torch.multinomial(scores.softmax(-1), num_samples=1, generator=self.generator))
