"""Keeping a conversation inside the model's context: drop the oldest turns, never the current query.

Upstream re-fed the whole history every turn until the prompt overflowed the 2048-token context (memory and
latency grew each turn, then generation failed). Every front door calls fit_history() before chat/stream_chat.

The work is bounded by the context, not by what a client sends: a query far longer than the context is refused
by its character count, and turns are measured newest first, each once, only until the budget is spent.
"""

from .text import History, build_prompt
from .tokenization import MAX_BLANK


# No token covers more characters than a run of MAX_BLANK spaces (<|blank_80|>); real pieces are far shorter.
# A text longer than limit * this is over the limit however it tokenizes.
MAX_CHARS_PER_TOKEN = max(MAX_BLANK, 64)


class ContextTooLongError(ValueError):
    """The query alone does not fit in the context; the message says how long it is and what the limit is."""


def prompt_length(tokenizer, query: str, history: History) -> int:
    return len(tokenizer.encode(build_prompt(query, history)))


def _too_long(what: str, limit: int, max_length: int, max_sequence_length: int) -> ContextTooLongError:
    return ContextTooLongError(
        f"the message is {what}, but the limit for prompt plus reply is {limit} tokens (max_length {max_length}, "
        f"context {max_sequence_length}); shorten the message or raise max_length (Maximum length)")


def _turn_length(tokenizer, i: int, turn, most: int) -> int:
    """Tokens of one round as build_prompt writes it (joined rounds may differ by a token at the seams; the
    exact check below settles that); more than `most` without encoding a turn too long to count."""
    if len(turn[0]) + len(turn[1]) > most * MAX_CHARS_PER_TOKEN:
        return most + 1
    return len(tokenizer.encode(f"[Round {i}]\n问：{turn[0]}\n答：{turn[1]}\n", add_special_tokens=False))


def fit_history(tokenizer, query: str, history: History, max_length: int, max_sequence_length: int):
    """(kept_history, n_dropped): the most recent turns whose prompt leaves room for a reply.

    The limit is min(max_length, max_sequence_length) tokens for prompt + reply; the prompt keeps a quarter of
    it (at most 256 tokens) free for the reply. A query that alone leaves no room at all is refused.
    """
    limit = min(max_length, max_sequence_length)
    budget = limit - min(256, limit // 4)
    history = [tuple(turn) for turn in (history or [])]
    if len(query) > limit * MAX_CHARS_PER_TOKEN:
        raise _too_long(f"{len(query)} characters long (more than {limit} tokens)", limit, max_length,
                        max_sequence_length)
    alone = prompt_length(tokenizer, query, [])
    if alone >= limit:
        raise _too_long(f"{alone} tokens long", limit, max_length, max_sequence_length)
    # newest first, each turn measured once, until twice the budget is spent: the answer lies in that window
    start, total = len(history), alone
    while start > 0 and total <= 2 * budget:
        start -= 1
        total += _turn_length(tokenizer, start, history[start], 2 * budget)
    lo = start if total <= 2 * budget else start + 1  # the window's overflowing oldest turn cannot be kept
    # the oldest start whose exact prompt fits (keeping nothing always does): a binary search, as the prompt only
    # shrinks when a turn is dropped; each exact encode is at most ~2x the budget
    hi = len(history)
    while lo < hi:
        mid = (lo + hi) // 2
        if prompt_length(tokenizer, query, history[mid:]) <= budget:
            hi = mid
        else:
            lo = mid + 1
    return history[lo:], lo
