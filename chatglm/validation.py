"""What every front door checks before any work starts: text the tokenizer can encode, history shapes, and the
generation options (one frozen object holding the defaults, validated once).

A failed check raises InputError naming the field and the problem; the API turns it into a 400, the pages and
the CLI into one line.
"""
import json
import math
import re
from dataclasses import asdict, dataclass, fields, replace
from typing import Optional, Tuple

MAX_SEED = 2**63 - 1  # torch.manual_seed takes a signed 64-bit integer
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 500  # the reply is searched for every stop string after every token
MAX_LOGIT_BIAS = 300  # token ids in one logit_bias (OpenAI's limit)
MAX_HISTORY_TURNS = 4096  # far more than a context holds: only the newest turns are ever kept
MAX_JSON_DEPTH = 32  # our request bodies nest 5 deep; deeper is an attack or a mistake
MAX_NUMBER_DIGITS = 40  # 2**63 has 19; Python refuses ints over 4300 digits with a ValueError of its own

# SentencePiece cannot encode lone surrogates, and NUL ends C strings on the way in: refuse both, everywhere
_UNENCODABLE = re.compile("[\x00\ud800-\udfff]")


class InputError(ValueError):
    """Input a front door must refuse; str(e) names the field and what is wrong."""

    def __init__(self, message: str, field: Optional[str] = None):
        super().__init__(message)
        self.field = field


def check_text(text, field: str) -> str:
    """text itself, if it is a str the tokenizer can encode; InputError otherwise."""
    if not isinstance(text, str):
        raise InputError(f"{field} must be text, got {type(text).__name__}", field)
    bad = _UNENCODABLE.search(text)
    if bad:
        what = "a NUL character" if bad.group() == "\x00" else f"a lone surrogate (U+{ord(bad.group()):04X})"
        raise InputError(f"{field} contains {what} at character {bad.start()}, which is not valid text; "
                         f"remove it and send again", field)
    return text


def check_count(items, field: str, most: int):
    """InputError when a list holds more than `most` entries (checked before anything looks at each one)."""
    if isinstance(items, (list, tuple)) and len(items) > most:
        raise InputError(f"{field} has {len(items)} entries; at most {most} are accepted (only the newest turns fit "
                         f"in the model's context anyway: send those)", field)


def check_history(history, field: str = "history") -> list:
    """history as a list of (query, response) str pairs; InputError for any other shape or unencodable text."""
    if history is None:
        return []
    if not isinstance(history, (list, tuple)):
        raise InputError(f"{field} must be a list of [query, response] pairs, got {type(history).__name__}", field)
    check_count(history, field, MAX_HISTORY_TURNS)
    pairs = []
    for i, pair in enumerate(history):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise InputError(f"{field}[{i}] must be a [query, response] pair, got {pair!r:.80}", field)
        pairs.append((check_text(pair[0], f"{field}[{i}][0]"), check_text(pair[1], f"{field}[{i}][1]")))
    return pairs


def check_text_field(text, field: str) -> str:
    """check_text for a message that must also say something (not only spaces)."""
    if not check_text(text, field).strip():
        raise InputError(f"{field} is empty", field)
    return text


# ---- JSON bodies -------------------------------------------------------------------------------------------------

def _refuse_constant(name: str):
    raise InputError(f"{name} is not a JSON number; send a finite number")


def _parse_int(digits: str) -> int:
    if len(digits) > MAX_NUMBER_DIGITS:
        raise InputError(f"a number in the body has {len(digits)} digits; at most {MAX_NUMBER_DIGITS} are accepted")
    return int(digits)


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise InputError(f"{text[:40]} is too large for a number; send a finite number")
    return value


def _depth(value) -> int:
    """Nesting depth of parsed JSON, without recursion."""
    deepest, todo = 0, [(value, 1)]
    while todo:
        item, depth = todo.pop()
        if isinstance(item, (list, dict)):
            deepest = max(deepest, depth)
            if depth > MAX_JSON_DEPTH:
                return depth
            todo.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def parse_json_object(raw: bytes) -> dict:
    """A request body as a JSON object; InputError for invalid UTF-8 (e.g. an encoded lone surrogate, ED A0 80),
    invalid JSON, NaN/Infinity, absurdly long numbers, nesting deeper than MAX_JSON_DEPTH, or a non-object.
    Text inside still needs check_text: JSON escapes can spell lone surrogates ("\\ud800") and NUL."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"request body is not valid UTF-8 (byte {e.start}: {raw[e.start:e.start + 4].hex(' ')}); "
                         f"send UTF-8 JSON") from None
    if not text.strip():
        raise InputError("request body is empty; send a JSON object")
    try:
        data = json.loads(text, parse_constant=_refuse_constant, parse_int=_parse_int, parse_float=_parse_float)
    except RecursionError:
        raise InputError(f"request body is nested too deeply (at most {MAX_JSON_DEPTH} levels)") from None
    except json.JSONDecodeError as e:
        raise InputError(f"request body is not valid JSON ({e})") from None
    if _depth(data) > MAX_JSON_DEPTH:
        raise InputError(f"request body is nested too deeply (at most {MAX_JSON_DEPTH} levels)")
    if not isinstance(data, dict):
        raise InputError(f"request body must be a JSON object, got {type(data).__name__}")
    return data


# ---- generation options ------------------------------------------------------------------------------------------

def _number(value, field: str, integer=False):
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise InputError(f"{field} must be {'an integer' if integer else 'a number'}, got {value!r:.40}", field)
    if not integer and not math.isfinite(value):
        raise InputError(f"{field} must be a finite number, got {value!r}", field)
    return value


@dataclass(frozen=True)
class GenerationOptions:
    """How one reply is generated. The defaults are upstream's chat() defaults; every front door builds this
    (CLI flags, web sliders, both API styles) and the engine reads nothing else."""
    max_length: int = 2048             # prompt + reply tokens
    max_new_tokens: Optional[int] = None  # reply tokens; wins over max_length when given (OpenAI's max_tokens)
    do_sample: bool = True
    temperature: float = 0.95          # 0 = always the most likely token
    top_p: float = 0.7
    top_k: int = 50                    # 0 = no limit
    repetition_penalty: float = 1.0    # 1 = off
    presence_penalty: float = 0.0      # OpenAI's, over the reply's tokens
    frequency_penalty: float = 0.0
    logit_bias: Tuple[Tuple[int, float], ...] = ()  # (token id, bias) pairs
    seed: Optional[int] = None
    stop: Tuple[str, ...] = ()         # the reply ends before the first of these

    @classmethod
    def build(cls, **given) -> "GenerationOptions":
        """Options from keyword values; None means "the default". stop may be one string or a list; logit_bias a
        {token id: bias} dict. Unknown names raise InputError. Not validated: call validate(config)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(given) - known)
        if unknown:
            raise InputError(f"unknown generation option(s): {', '.join(unknown)}", unknown[0])
        given = {k: v for k, v in given.items() if v is not None}
        if isinstance(given.get("stop"), str):
            given["stop"] = (given["stop"],)
        if "stop" in given:
            if not isinstance(given["stop"], (list, tuple)):
                raise InputError(f"stop must be a string or a list of strings, got {given['stop']!r:.40}", "stop")
            given["stop"] = tuple(given["stop"])
        if isinstance(given.get("logit_bias"), dict):
            given["logit_bias"] = tuple(given["logit_bias"].items())
        return cls(**given)

    def with_(self, **changes) -> "GenerationOptions":
        return replace(self, **changes)

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0

    def as_dict(self) -> dict:
        return asdict(self)

    def validate(self, config=None) -> "GenerationOptions":
        """self if every value can be used (config: the model's, for the context length and vocabulary);
        InputError naming the first field that cannot. Returns logit_bias with int token ids."""
        _number(self.max_length, "max_length", integer=True)
        if self.max_length < 1:
            raise InputError(f"max_length must be a positive integer, got {self.max_length}", "max_length")
        if config is not None and self.max_length > config.max_sequence_length:
            raise InputError(f"max_length {self.max_length} is beyond the model's context (max_sequence_length "
                             f"{config.max_sequence_length}); use at most {config.max_sequence_length}", "max_length")
        if self.max_new_tokens is not None:
            _number(self.max_new_tokens, "max_new_tokens", integer=True)
            if self.max_new_tokens < 1:
                raise InputError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens}",
                                 "max_new_tokens")
        if not isinstance(self.do_sample, bool):
            raise InputError(f"do_sample must be true or false, got {self.do_sample!r:.40}", "do_sample")
        if not 0 <= _number(self.temperature, "temperature") <= 100:
            raise InputError(f"temperature must be in [0, 100] (0 = greedy), got {self.temperature}", "temperature")
        if not 0 < _number(self.top_p, "top_p") <= 1:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p}", "top_p")
        if _number(self.top_k, "top_k", integer=True) < 0:
            raise InputError(f"top_k must be an integer >= 0 (0 = no limit), got {self.top_k}", "top_k")
        if not 0 < _number(self.repetition_penalty, "repetition_penalty") <= 100:
            raise InputError(f"repetition_penalty must be in (0, 100] (1 = off), got {self.repetition_penalty}",
                             "repetition_penalty")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= _number(getattr(self, name), name) <= 2:
                raise InputError(f"{name} must be in [-2, 2], got {getattr(self, name)}", name)
        if self.seed is not None and not 0 <= _number(self.seed, "seed", integer=True) <= MAX_SEED:
            raise InputError(f"seed must be an integer in [0, 2**63 - 1], got {self.seed}", "seed")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise InputError(f"stop takes at most {MAX_STOP_STRINGS} strings, got {len(self.stop)}", "stop")
        for i, s in enumerate(self.stop):
            if not check_text(s, f"stop[{i}]"):
                raise InputError("stop strings must not be empty", "stop")
            if len(s) > MAX_STOP_CHARS:
                raise InputError(f"stop[{i}] is {len(s)} characters long; at most {MAX_STOP_CHARS}", "stop")
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise InputError(f"logit_bias takes at most {MAX_LOGIT_BIAS} token ids, got {len(self.logit_bias)}",
                             "logit_bias")
        bias = []
        for token, value in self.logit_bias:
            if isinstance(token, str):
                if not (token.isascii() and token.isdigit()):
                    raise InputError(f"logit_bias keys are token ids, got {token!r:.40}", "logit_bias")
                token = int(token)
            _number(token, "logit_bias key", integer=True)
            if config is not None and not 0 <= token < config.vocab_size:
                raise InputError(f"logit_bias key {token} is not a token id in the vocabulary "
                                 f"(0..{config.vocab_size - 1})",
                                 "logit_bias")
            if not -100 <= _number(value, f"logit_bias[{token}]") <= 100:
                raise InputError(f"logit_bias[{token}] = {value} is outside [-100, 100]", "logit_bias")
            bias.append((token, float(value)))
        return replace(self, logit_bias=tuple(bias))
