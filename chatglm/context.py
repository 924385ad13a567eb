"""Keeping a conversation inside the model's context: drop the oldest turns, never the current query.

Upstream re-fed the whole history every turn until the prompt overflowed the 2048-token context (memory and
latency grew each turn, then generation failed). Every front door calls fit_history() before chat/stream_chat.
"""
from typing import List, Tuple

from .text import build_prompt

History = List[Tuple[str, str]]


class ContextTooLongError(ValueError):
    """The query alone does not fit in the context; the message says how long it is and what the limit is."""


def prompt_length(tokenizer, query: str, history: History) -> int:
    return len(tokenizer.encode(build_prompt(query, history)))


def fit_history(tokenizer, query: str, history: History, max_length: int, max_sequence_length: int):
    """(kept_history, n_dropped): the most recent turns whose prompt leaves room for a reply.

    The limit is min(max_length, max_sequence_length) tokens for prompt + reply; the prompt keeps a quarter of
    it (at most 256 tokens) free for the reply. A query that alone leaves no room at all is refused.
    """
    limit = min(max_length, max_sequence_length)
    room = min(256, limit // 4)
    history = [tuple(turn) for turn in (history or [])]
    alone = prompt_length(tokenizer, query, [])
    if alone >= limit:
        raise ContextTooLongError(
            f"the message is {alone} tokens long, but the limit for prompt plus reply is {limit} tokens "
            f"(max_length {max_length}, context {max_sequence_length}); shorten the message or raise max_length "
            f"(Maximum length)")
    # drop from the oldest end; binary search is unnecessary at chat lengths, but don't re-encode per turn twice
    for start in range(len(history) + 1):
        kept = history[start:]
        if not kept or prompt_length(tokenizer, query, kept) <= limit - room:
            return kept, start
    return [], len(history)
