"""chat() and stream_chat(): ChatGLM-6B's prompt format, decoding loop and reply post-processing.

These functions become methods of ChatGLMForConditionalGeneration (`self` is the model).
"""
import re
from typing import List, Optional, Tuple

import torch
from transformers import (LogitsProcessor, LogitsProcessorList, RepetitionPenaltyLogitsProcessor,
                          TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

History = List[Tuple[str, str]]


def build_prompt(query: str, history: Optional[History] = None) -> str:
    """The bare query with no history; otherwise numbered rounds (full-width colons)."""
    if not history:
        return query
    prompt = "".join(f"[Round {i}]\n问：{q}\n答：{a}\n" for i, (q, a) in enumerate(history))
    return prompt + f"[Round {len(history)}]\n问：{query}\n答："


_PUNCT = [(",", "，"), ("!", "！"), (":", "："), (";", "；"), (r"\?", "？")]


def process_response(response: str) -> str:
    """The original's clean-up: trim, fill the training-date placeholder, full-width punctuation next to CJK."""
    response = response.strip().replace("[[训练时间]]", "2023年")
    for ascii_mark, full in _PUNCT:
        response = re.sub(r"([\u4e00-\u9fff])%s" % ascii_mark, r"\1%s" % full, response)
        response = re.sub(r"%s([\u4e00-\u9fff])" % ascii_mark, r"%s\1" % full, response)
    return response


class InvalidScoreLogitsProcessor(LogitsProcessor):
    """NaN/inf scores (an fp16 overflow) -> a harmless distribution instead of a crash in sampling."""

    def __call__(self, input_ids, scores):
        # any NaN/inf anywhere in the batch resets every row, as the original; torch.where avoids a host sync
        fallback = torch.zeros_like(scores)
        fallback[..., 5] = 5e4  # hard-coded by the original (the "▁" piece in the real vocabulary)
        return torch.where(torch.isfinite(scores).all(), scores, fallback)


def _with_invalid_guard(logits_processor) -> LogitsProcessorList:
    if logits_processor is None:
        logits_processor = LogitsProcessorList()
    logits_processor.append(InvalidScoreLogitsProcessor())  # the caller's list is extended, as in the original
    return logits_processor


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


def stop_strings(stop) -> List[str]:
    """stop as a list: None -> [], one string -> [it]; ValueError for anything but non-empty strings (a bare
    string must not be read as a list of one-character stops)."""
    stop = [stop] if isinstance(stop, str) else list(stop or [])
    if not all(isinstance(s, str) and s for s in stop):
        raise ValueError(f"stop must be a list of non-empty strings, got {stop!r}")
    return stop


def cut_at_stop(text: str, stop) -> Tuple[str, bool]:
    """text up to the first stop string (if any appears), and whether one did."""
    cut = min((i for i in (text.find(s) for s in stop or () if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def without_stop_prefix(text: str, stop) -> str:
    """text minus a tail that may still grow into a stop string, so a stream never shows what it then takes back."""
    for n in range(min(len(text), max(map(len, stop), default=1) - 1), 0, -1):
        if any(len(s) > n and s.startswith(text[-n:]) for s in stop):
            return text[:-n].rstrip()
    return text


def chat(self, tokenizer, query: str, history: Optional[History] = None, max_length: int = 2048, num_beams=1,
         do_sample=True, top_p=0.7, temperature=0.95, logits_processor=None, stop=None, **kwargs):
    """(response, history + [(query, response)]). Extra kwargs (repetition_penalty, top_k, ...) go to generate();
    stop: strings that end the reply (the reply is cut before the first one)."""
    check_generation_args(self.config, max_length, top_p, temperature, **kwargs)
    stop = stop_strings(stop)
    if stop:  # stop strings need the token-by-token loop
        *_, last = self.stream_chat(tokenizer, query, history, max_length=max_length, do_sample=do_sample,
                                    top_p=top_p, temperature=temperature, logits_processor=logits_processor,
                                    stop=stop, **kwargs)
        return last
    history = list(history or [])
    if temperature is not None and temperature <= 0:
        do_sample = False  # temperature 0 means "no randomness"; the warper itself rejects 0
    gen_kwargs = dict(max_length=max_length, num_beams=num_beams, do_sample=do_sample,
                      logits_processor=_with_invalid_guard(logits_processor), **kwargs)
    if do_sample:
        gen_kwargs.update(top_p=top_p, temperature=temperature)
    inputs = tokenizer([build_prompt(query, history)], return_tensors="pt").to(self.device)
    if "max_new_tokens" in kwargs:  # it wins over max_length, as in transformers
        del gen_kwargs["max_length"]
    elif inputs["input_ids"].shape[1] >= max_length:
        # transformers 4.27 (the original's) still generated one token here; current releases raise
        del gen_kwargs["max_length"]
        gen_kwargs["max_new_tokens"] = 1
    out = self.generate(**inputs, **gen_kwargs)
    response = process_response(tokenizer.decode(out[0, inputs["input_ids"].shape[1]:].tolist()))
    return response, history + [(query, response)]


def stream_chat(self, tokenizer, query: str, history: Optional[History] = None, max_length: int = 2048,
                do_sample=True, top_p=0.7, temperature=0.95, logits_processor=None, stop=None, **kwargs):
    """Yields (response_so_far, history + [(query, response_so_far)]) as tokens arrive.

    The original never yielded the last token (a length-stopped reply lost it; an <eop>-only reply yielded
    nothing). We yield what it yielded and then, where it differs, the complete reply, so the last yield always
    equals chat()'s result. Closing the generator stops generation.
    """
    check_generation_args(self.config, max_length, top_p, temperature, **kwargs)
    stop = stop_strings(stop)
    history = list(history or [])
    inputs = tokenizer([build_prompt(query, history)], return_tensors="pt").to(self.device)
    n_prompt = inputs["input_ids"].shape[1]
    last = None
    steps = self.decode_steps(**inputs, max_length=max_length, do_sample=do_sample, top_p=top_p,
                              temperature=temperature, logits_processor=_with_invalid_guard(logits_processor),
                              **kwargs)
    try:
        for ids, finished in steps:
            response = process_response(tokenizer.decode(ids[0, n_prompt:].tolist()))
            response, stopped = cut_at_stop(response, stop)
            if stopped:
                response = response.strip()
                break
            if not finished:
                last = without_stop_prefix(response, stop) if stop else response
                yield last, history + [(query, last)]
    finally:
        steps.close()  # ends generation at once when our consumer stops early
    if last is None or response != last:
        yield response, history + [(query, response)]


def stream_generate(self, input_ids, **kwargs):
    """The original's streaming generator: yields the growing ids [B, S] after each token, except the token that
    ends generation (<eop> or the length limit)."""
    for ids, finished in self.decode_steps(input_ids, **kwargs):
        if finished:
            return
        yield ids


def decode_steps(self, input_ids, attention_mask=None, position_ids=None, max_length=2048, max_new_tokens=None,
                 do_sample=True, top_p=0.7, temperature=0.95, top_k=50, repetition_penalty=1.0,
                 logits_processor=None, stopping_criteria=None, **unused):
    """Token-by-token decoding with a KV cache: yields (ids [B, S], finished) after every new token."""
    if max_new_tokens is not None:
        max_length = input_ids.shape[1] + max_new_tokens
    if temperature is not None and temperature <= 0:
        do_sample = False
    processors = LogitsProcessorList()
    if repetition_penalty and repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(repetition_penalty))
    processors.extend(logits_processor or [])
    # the original applied the warpers even for greedy decoding (argmax is unaffected)
    if temperature and temperature != 1.0:
        processors.append(TemperatureLogitsWarper(temperature))
    if top_k:
        processors.append(TopKLogitsWarper(top_k))
    if top_p is not None and top_p < 1.0:
        processors.append(TopPLogitsWarper(top_p))
    eos, pad = self.config.eos_token_id, self.config.pad_token_id
    from .kv_cache import KVCache
    model_kwargs = {"cache": KVCache(self.config, max_length=max_length + (self.config.pre_seq_len or 0))}
    self._glm_inputs(attention_mask, position_ids, model_kwargs)
    unfinished = torch.ones(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    while True:
        # inference_mode per step, never across a yield: the consumer may resume us on another thread
        with torch.inference_mode():
            inputs = self.prepare_inputs_for_generation(input_ids, **model_kwargs)
            out = self(**inputs)
            model_kwargs = self._update_model_kwargs_for_generation(out, model_kwargs)
            scores = processors(input_ids, out.logits[:, -1].float())
            if do_sample:
                next_tokens = torch.multinomial(scores.softmax(-1), num_samples=1).squeeze(1)
            else:
                next_tokens = scores.argmax(-1)
            next_tokens = torch.where(unfinished, next_tokens, torch.full_like(next_tokens, pad))
            input_ids = torch.cat([input_ids, next_tokens[:, None]], dim=-1)
            unfinished &= next_tokens != eos
            stop = bool(stopping_criteria(input_ids, scores).all()) if stopping_criteria else False
        finished = not unfinished.any() or input_ids.shape[1] >= max_length or stop
        yield input_ids, finished
        if finished:
            return
