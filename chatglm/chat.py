"""What the model's chat() / stream_chat() methods (chatglm/modeling.py) share: their options, checked once, and
the generate() path that beam search (num_beams > 1) and transformers-only options still take."""
from dataclasses import fields

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from .sampling import guard_invalid
from .text import build_prompt, process_response, stop_strings
from .validation import GenerationOptions

OPTION_NAMES = {f.name for f in fields(GenerationOptions)}


class InvalidScoreLogitsProcessor(LogitsProcessor):
    """NaN/inf scores (an fp16 overflow) -> a harmless distribution (generate()'s path; the engine calls
    sampling.guard_invalid itself)."""

    def __call__(self, input_ids, scores):
        return guard_invalid(scores)


def generation_options(config, max_length, do_sample, top_p, temperature, stop, kwargs) -> GenerationOptions:
    """The validated options of a chat()/stream_chat() call (InputError, a ValueError, names a bad value)."""
    stop = stop_strings(stop)
    known = {k: v for k, v in kwargs.items() if k in OPTION_NAMES}
    return GenerationOptions.build(max_length=max_length, do_sample=do_sample, top_p=top_p, temperature=temperature,
                                   stop=stop, **known).validate(config)


def chat_with_generate(model, tokenizer, query, history, options: GenerationOptions, num_beams, logits_processor,
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
    inputs = tokenizer([build_prompt(query, history)], return_tensors="pt").to(model.device)
    if options.max_new_tokens is not None:  # it wins over max_length, as in transformers
        del gen_kwargs["max_length"]
        gen_kwargs["max_new_tokens"] = options.max_new_tokens
    elif inputs["input_ids"].shape[1] >= options.max_length:
        # transformers 4.27 (the original's) still generated one token here; current releases raise
        del gen_kwargs["max_length"]
        gen_kwargs["max_new_tokens"] = 1
    if options.seed is not None:
        torch.manual_seed(options.seed)
    out = model.generate(**inputs, **gen_kwargs)
    response = process_response(tokenizer.decode(out[0, inputs["input_ids"].shape[1]:].tolist()))
    return response, history + [(query, response)]
