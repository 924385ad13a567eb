"""Reading JSON-lines data and turning rows into model inputs, the way upstream's ptuning/main.py did.

Training example (golden/NOTES.md §10): prompt ids (cut to max_source_length-1) + [gMASK] <sop> + answer ids (cut
to max_target_length-2) + <eop>; labels are -100 over the prompt and [gMASK], then copy the ids from <sop> on;
both are right-padded to max_source_length + max_target_length and, with ignore_pad_token_for_loss, padded
labels become -100. No attention mask or position ids: the model builds them from [gMASK]/<sop>.

Generation example (evaluation/prediction): the prompt, tokenized per batch with the tokenizer's left padding
(which also gives the GLM attention mask and 2-D positions), and the target ids as labels for the metrics.
"""
import json
import logging

import torch

from chatglm import build_prompt
from chatglm.validation import InputError, check_history, check_text

logger = logging.getLogger(__name__)
IGNORE_INDEX = -100  # label value that CrossEntropyLoss skips


def read_rows(path):
    """The rows of a JSON-lines file (a file holding one JSON array works too). ValueError naming the file and line
    for text that is not UTF-8, invalid JSON, or a row that is not an object."""
    return read_rows_and_lines(path)[0]


def read_rows_and_lines(path):
    """(rows, the line each row starts on) of a JSON-lines file or a JSON array file."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ValueError(f"{path} line {line}: not valid UTF-8 (byte 0x{raw[e.start]:02x}); save the file as "
                         f"UTF-8") from None
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        lines = [None] * len(rows)  # one document: rows have no lines of their own
    else:
        rows, lines = [], []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except (json.JSONDecodeError, RecursionError) as e:
                raise ValueError(f"{path} line {n}: not valid JSON ({e}); expected one object per line") from None
            lines.append(n)
    for n, (row, line) in enumerate(zip(rows, lines), 1):
        if not isinstance(row, dict):
            raise ValueError(f"{_where(path, n, line)}: expected a JSON object, got {type(row).__name__}")
    return rows, lines


def _where(path, n, line=None) -> str:
    return f"{path} line {line}" if line is not None else f"{path} row {n}"


def check_columns(rows, path, columns, lines=None):
    """ValueError naming the file, the line (or row) and the field for a row the prompt/response/history columns
    cannot be read from: a missing field, a value that is not text (or null), text the tokenizer cannot encode,
    a history that is not a list of [query, response] pairs. Null or empty prompts/responses are skipped later."""
    prompt, response, history = (tuple(columns) + (None, None, None))[:3]
    lines = lines or [None] * len(rows)
    for n, (row, line) in enumerate(zip(rows, lines), 1):
        where = _where(path, n, line)
        for column in columns:
            if column is not None and column not in row:
                raise ValueError(f"{where} has no field {column!r} (it has {sorted(row)}); "
                                 f"set --prompt_column/--response_column/--history_column to the right names")
        try:
            for column in (prompt, response):
                if column is not None and row[column] is not None:
                    check_text(row[column], column)
            if history is not None:
                check_history(row[history], history)
        except InputError as e:
            raise ValueError(f"{where}: {e}") from None


def prompts_and_answers(rows, prompt_column, response_column, history_column=None, source_prefix=""):
    """(prompt text, answer text) per usable row. Rows with an empty prompt or answer are skipped, as upstream.

    With a history column the prompt is the multi-turn chat prompt ([Round i] 问/答 ...), built by the same
    function model.chat uses, so training and inference see the same text. (Upstream built `[Round 0]` even for
    an empty history in training but not in evaluation or chat; we use the chat format everywhere.)
    """
    pairs = []
    for row in rows:
        query, answer = row.get(prompt_column), row.get(response_column)
        if not query or not answer:
            continue
        history = row.get(history_column) if history_column else None
        prompt = build_prompt(query, [tuple(turn) for turn in history] if history else [])
        pairs.append((source_prefix + prompt, answer))
    if len(pairs) < len(rows):
        logger.warning("skipped %d of %d rows with an empty prompt or response", len(rows) - len(pairs), len(rows))
    return pairs


def train_example(tokenizer, prompt, answer, max_source_length, max_target_length, ignore_pad_token_for_loss=True):
    a_ids = tokenizer.encode(prompt, add_special_tokens=False)[: max_source_length - 1]
    b_ids = tokenizer.encode(answer, add_special_tokens=False)[: max_target_length - 2]
    input_ids = tokenizer.build_inputs_with_special_tokens(a_ids, b_ids)
    context_length = len(a_ids) + 1  # the <sop> we appended; it is the first label, predicted at [gMASK]
    labels = [IGNORE_INDEX] * context_length + input_ids[context_length:]
    pad_len = max_source_length + max_target_length - len(input_ids)
    input_ids = input_ids + [tokenizer.pad_token_id] * pad_len
    labels = labels + [tokenizer.pad_token_id] * pad_len
    if ignore_pad_token_for_loss:
        labels = [IGNORE_INDEX if t == tokenizer.pad_token_id else t for t in labels]
    return {"input_ids": input_ids, "labels": labels}


def generation_example(tokenizer, prompt, answer, max_target_length):
    # The prompt stays text: the collator tokenizes each batch with left padding (and the GLM mask/positions).
    return {"prompt": prompt, "labels": tokenizer.encode(answer, add_special_tokens=False)[: max_target_length - 2]}


class TrainCollator:
    """Stacks training examples. Trailing columns that are padding with ignored labels in every row are dropped:
    they change nothing (they sit after <eop>, and the mask is causal there) but cost compute."""

    def __init__(self, pad_token_id):
        self.pad_token_id = pad_token_id

    def __call__(self, examples):
        input_ids = torch.tensor([e["input_ids"] for e in examples], dtype=torch.long)
        labels = torch.tensor([e["labels"] for e in examples], dtype=torch.long)
        used = ((input_ids != self.pad_token_id) | (labels != IGNORE_INDEX)).any(dim=0).nonzero()
        length = int(used.max()) + 1 if len(used) else input_ids.shape[1]
        return {"input_ids": input_ids[:, :length], "labels": labels[:, :length]}


class GenerationCollator:
    """Left-pads a batch of prompts with the tokenizer (as upstream's `padding=True` call) and right-pads the
    target ids with -100."""

    def __init__(self, tokenizer, max_source_length):
        self.tokenizer = tokenizer
        self.max_source_length = max_source_length

    def __call__(self, examples):
        batch = self.tokenizer([e["prompt"] for e in examples], max_length=self.max_source_length, truncation=True,
                               padding=True, return_tensors="pt")
        width = max(1, max(len(e["labels"]) for e in examples))
        labels = [e["labels"] + [IGNORE_INDEX] * (width - len(e["labels"])) for e in examples]
        return {**batch, "labels": torch.tensor(labels, dtype=torch.long)}
