"""chat() and stream_chat(): ChatGLM-6B's conversation API, run on chatglm.engine as a batch of one.

These functions become methods of ChatGLMForConditionalGeneration (`self` is the model). Beam search
(num_beams > 1) stays on transformers' generate() with the project's _beam_search.
"""
from dataclasses import fields
from typing import Optional

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from .engine import Engine, Sequence
from .sampling import guard_invalid
from .text import (History, build_prompt, cut_at_stop, process_response, stop_strings,  # noqa: F401 (re-exported)
                   without_stop_prefix)
from .validation import GenerationOptions

OPTION_NAMES = {f.name for f in fields(GenerationOptions)}


class InvalidScoreLogitsProcessor(LogitsProcessor):
    """NaN/inf scores (an fp16 overflow) -> a harmless distribution (generate()'s path; the engine calls
    sampling.guard_invalid itself)."""

    def __call__(self, input_ids, scores):
        return guard_invalid(scores)


def check_generation_args(config, max_length=None, top_p=None, temperature=None, top_k=None,
                          repetition_penalty=None, **unused):
    """ValueError with a clear message for values generation cannot use (front doors turn it into a 4xx)."""
    if max_length is not None:
        if not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"max_length must be a positive integer, got {max_length!r}")
        if max_length > config.max_sequence_length:
            raise ValueError(f"max_length {max_length} is beyond the model's context (max_sequence_length "
                             f"{config.max_sequence_length}); use at most {config.max_sequence_length}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if temperature is not None and temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 0):
        raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {top_k!r}")
    if repetition_penalty is not None and repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty must be > 0 (1 = off), got {repetition_penalty!r}")


def generation_options(config, max_length, do_sample, top_p, temperature, stop, kwargs) -> GenerationOptions:
    """The validated options of a chat()/stream_chat() call (InputError, a ValueError, names a bad value)."""
    stop = stop_strings(stop)
    known = {k: v for k, v in kwargs.items() if k in OPTION_NAMES}
    return GenerationOptions.build(max_length=max_length, do_sample=do_sample, top_p=top_p, temperature=temperature,
                                   stop=stop, **known).validate(config)


def chat(self, tokenizer, query: str, history: Optional[History] = None, max_length: int = 2048, num_beams=1,
         do_sample=True, top_p=0.7, temperature=0.95, logits_processor=None, stop=None, **kwargs):
    """(response, history + [(query, response)]). Extra kwargs: the GenerationOptions fields (repetition_penalty,
    top_k, max_new_tokens, seed, ...); others go to generate(). stop: strings that end the reply (the reply is
    cut before the first one)."""
    options = generation_options(self.config, max_length, do_sample, top_p, temperature, stop, kwargs)
    others = set(kwargs) - OPTION_NAMES - {"stopping_criteria"}
    if (num_beams > 1 or others) and not options.stop:
        return _chat_with_generate(self, tokenizer, query, history, options, num_beams, logits_processor, kwargs)
    *_, last = self.stream_chat(tokenizer, query, history, max_length=max_length, do_sample=do_sample, top_p=top_p,
                                temperature=temperature, logits_processor=logits_processor, stop=stop, **kwargs)
    return last


def stream_chat(self, tokenizer, query: str, history: Optional[History] = None, max_length: int = 2048,
                do_sample=True, top_p=0.7, temperature=0.95, logits_processor=None, stop=None,
                stopping_criteria=None, **kwargs):
    """Yields (response_so_far, history + [(query, response_so_far)]) as tokens arrive.

    The original never yielded the last token (a length-stopped reply lost it; an <eop>-only reply yielded
    nothing). We yield what it yielded and then, where it differs, the complete reply, so the last yield always
    equals chat()'s result. Closing the generator stops generation. logits_processor / stopping_criteria:
    transformers-style callables, still accepted (applied per token to this sequence).
    """
    options = generation_options(self.config, max_length, do_sample, top_p, temperature, stop, kwargs)
    history = list(history or [])
    prompt = tokenizer.encode(build_prompt(query, history))
    processors = [p for p in (logits_processor or [])]
    criteria = stopping_criteria
    seq = Sequence(prompt, options, tokenizer, self.config, processors,
                   (lambda ids, scores: bool(criteria(ids, scores).all())) if criteria else None)
    engine = Engine(self, kv_budget=0)  # a batch of one always runs, whatever its size
    engine.add(seq)
    last = None
    try:
        while not seq.finished:
            engine.step()
            if seq.stopped_by_string:
                break
            if not seq.finished:
                last = seq.visible
                yield last, history + [(query, last)]
    finally:
        seq.cancelled = True  # closing the generator ends generation at once
        seq.cache = None
    if last is None or seq.response != last:
        yield seq.response, history + [(query, seq.response)]


def _chat_with_generate(self, tokenizer, query, history, options: GenerationOptions, num_beams, logits_processor,
                        kwargs):
    """Beam search (and generate() options the engine does not have) through transformers' generate()."""
    history = list(history or [])
    processors = LogitsProcessorList(logits_processor or [])
    processors.append(InvalidScoreLogitsProcessor())
    others = {k: v for k, v in kwargs.items() if k not in OPTION_NAMES or k in ("top_k", "repetition_penalty")}
    gen_kwargs = dict(max_length=options.max_length, num_beams=num_beams, do_sample=not options.greedy,
                      logits_processor=processors, **others)
    if not options.greedy:
        gen_kwargs.update(top_p=options.top_p, temperature=options.temperature)
    inputs = tokenizer([build_prompt(query, history)], return_tensors="pt").to(self.device)
    if options.max_new_tokens is not None:  # it wins over max_length, as in transformers
        del gen_kwargs["max_length"]
        gen_kwargs["max_new_tokens"] = options.max_new_tokens
    elif inputs["input_ids"].shape[1] >= options.max_length:
        # transformers 4.27 (the original's) still generated one token here; current releases raise
        del gen_kwargs["max_length"]
        gen_kwargs["max_new_tokens"] = 1
    if options.seed is not None:
        torch.manual_seed(options.seed)
    out = self.generate(**inputs, **gen_kwargs)
    response = process_response(tokenizer.decode(out[0, inputs["input_ids"].shape[1]:].tolist()))
    return response, history + [(query, response)]
