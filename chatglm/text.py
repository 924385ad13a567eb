"""ChatGLM-6B's text rules: the prompt format, the reply clean-up, stop strings, and turning token ids into text
as they arrive (incremental decoding and deltas that never take anything back)."""
import re
from typing import List, Optional, Tuple

from .tokenization import clean_up_spaces

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


class IncrementalDecoder:
    """The text of a growing list of reply ids (what tokenizer.decode gives), decoding only a window of the last
    tokens per new one: decoding the whole reply per token costs O(n) each (~14 ms at 2,400 tokens).

    The window is decoded without the clean-up of spaces, which reaches across tokens (" ." -> "."); that clean-up
    runs on the whole text instead (a few str.replace calls). Both decodes of the window start at the same token,
    so SentencePiece's leading-space rule cancels; a window that ends inside a multi-byte character (U+FFFD) is
    shown as is but not settled. Should the window ever disagree with what it settled, the whole reply is decoded.
    """

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.settled = tokenizer, [], ""
        self.start = self.read = 0  # the window: ids[start:read] is already in `settled`

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(ids, clean_up_tokenization_spaces=False)

    def add(self, token: int) -> str:
        """The reply's text after one more token."""
        self.ids.append(token)
        before, after = self._decode(self.ids[self.start:self.read]), self._decode(self.ids[self.start:])
        if not after.startswith(before):
            self.settled, self.start, self.read = self._decode(self.ids), len(self.ids), len(self.ids)
        elif after.endswith("\ufffd"):
            return clean_up_spaces(self.settled + after[len(before):])
        else:
            self.settled += after[len(before):]
            self.start, self.read = self.read, len(self.ids)
        return clean_up_spaces(self.settled)


class TextDeltas:
    """Turns a growing reply into the text to append (terminal, Server-Sent Events).

    A reply is not always the previous one plus more: its post-processing turns "," into "，" once a Chinese
    character follows, a half-decoded multi-byte character shows as U+FFFD until its last byte arrives, and the
    "[[训练时间]]" placeholder is replaced only once complete. So the unsettled tail is held back until it settles or
    the reply ends; the concatenated deltas then equal the final reply.
    """
    _SETTLES_LATER = (",", "!", ":", ";", "?")
    _PLACEHOLDER = "[[训练时间]]"

    def __init__(self):
        self.sent = ""

    def _settled(self, text: str) -> str:
        text = text.rstrip("\ufffd")
        for k in range(len(self._PLACEHOLDER) - 1, 0, -1):
            if text.endswith(self._PLACEHOLDER[:k]):
                text = text[:-k]
                break
        return text[:-1] if text.endswith(self._SETTLES_LATER) else text

    def step(self, response: str) -> str:
        """New text to show for a partial reply ("" while nothing new has settled)."""
        text = self._settled(response)
        if not text.startswith(self.sent) or len(text) == len(self.sent):
            return ""
        new, self.sent = text[len(self.sent):], text
        return new

    def finish(self, response: str) -> str:
        """The rest of the final reply (never repeats what was already shown)."""
        new = response[len(self.sent):] if len(response) > len(self.sent) else ""
        self.sent = response
        return new
