"""ChatGLMTokenizer: SentencePiece (`ice_text.model`) with ChatGLM-6B's text conventions.

Standalone on purpose: it reproduces the original tokenizer's behaviour under transformers 4.27 (special-token
splitting, decode clean-up, left padding with GLM position ids and masks) without depending on transformers'
tokenizer base classes, whose behaviour changed across releases.
"""
import json
import os
import re
import shutil
from typing import Dict, List, Optional, Union

import numpy as np
import sentencepiece as spm
from transformers import BatchEncoding

from .checkpoint import resolve_model_path

VOCAB_FILE = "ice_text.model"
CONFIG_FILE = "tokenizer_config.json"
MAX_BLANK = 80  # runs of 2..80 spaces have their own piece, <|blank_n|>

# transformers 4.27's clean_up_tokenization (on by default then, and part of the original's decode output)
_CLEANUP = [(" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
            (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")]


def clean_up_spaces(text: str) -> str:
    """transformers' clean_up_tokenization_spaces: no space before English punctuation and contractions."""
    for a, b in _CLEANUP:
        text = text.replace(a, b)
    return text


def _blank(n: int) -> str:
    return f"<|blank_{n}|>"


def encode_whitespace(text: str) -> str:
    """Newlines, tabs and runs of spaces become the pieces the model was trained on."""
    text = text.replace("\n", "<n>").replace("\t", "<|tab|>")
    for n in range(MAX_BLANK, 1, -1):
        text = text.replace(" " * n, _blank(n))
    return text


def decode_whitespace(text: str) -> str:
    text = text.replace("<n>", "\n").replace("<|tab|>", "\t")
    for n in range(2, MAX_BLANK + 1):
        text = text.replace(_blank(n), " " * n)
    return text


class ChatGLMTokenizer:
    vocab_files_names = {"vocab_file": VOCAB_FILE}
    model_input_names = ["input_ids", "attention_mask", "position_ids"]
    padding_side = "left"

    def __init__(self, vocab_file, bos_token="<sop>", eos_token="<eop>", end_token="</s>", mask_token="[MASK]",
                 gmask_token="[gMASK]", pad_token="<pad>", unk_token="<unk>", num_image_tokens=0,
                 remove_space=False, do_lower_case=False, padding_side="left", name_or_path="", **unused):
        if padding_side != "left":
            raise ValueError("ChatGLMTokenizer only pads on the left (the model's position ids assume it)")
        if not os.path.isfile(vocab_file):
            raise FileNotFoundError(f"tokenizer file not found: {vocab_file}")
        self.vocab_file = vocab_file
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(vocab_file)
        except Exception as e:
            raise ValueError(f"{vocab_file} is not a valid SentencePiece model ({e}); "
                             f"re-download ice_text.model (it is about 2.7 MB for ChatGLM-6B)") from e
        self.name_or_path = name_or_path
        self.num_image_tokens = num_image_tokens
        self.remove_space = remove_space
        self.do_lower_case = do_lower_case
        self.bos_token, self.eos_token, self.end_token = bos_token, eos_token, end_token
        self.mask_token, self.gmask_token, self.pad_token, self.unk_token = mask_token, gmask_token, pad_token, unk_token
        self.bos_token_id = self._piece_id(bos_token)
        self.eos_token_id = self._piece_id(eos_token)
        self.end_token_id = self._piece_id(end_token)
        self.mask_token_id = self._piece_id(mask_token)
        self.gmask_token_id = self._piece_id(gmask_token)
        self.pad_token_id = self._piece_id(pad_token)
        self.unk_token_id = self._piece_id(unk_token)
        # The original's "special tokens" (transformers' bos/eos/unk/pad/mask attributes): these are split out of
        # raw text and dropped by skip_special_tokens. [gMASK] and </s> are not among them.
        self.all_special_tokens = [bos_token, eos_token, unk_token, pad_token, mask_token]
        self.all_special_ids = [self._piece_id(t) for t in self.all_special_tokens]
        self.unique_no_split_tokens = sorted(set(self.all_special_tokens))
        self._split_re = re.compile("(" + "|".join(re.escape(t) for t in
                                                   sorted(self.unique_no_split_tokens, key=len, reverse=True)) + ")")
        self.init_kwargs = dict(bos_token=bos_token, eos_token=eos_token, end_token=end_token, mask_token=mask_token,
                                gmask_token=gmask_token, pad_token=pad_token, unk_token=unk_token,
                                num_image_tokens=num_image_tokens, remove_space=remove_space,
                                do_lower_case=do_lower_case, padding_side="left")

    # ---- loading / saving -------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path, **kwargs):
        path = str(path)
        if not os.path.isdir(path):
            path = resolve_model_path(path)
        cfg = {}
        cfg_file = os.path.join(path, CONFIG_FILE)
        if os.path.isfile(cfg_file):
            with open(cfg_file, encoding="utf-8") as f:
                cfg = json.load(f)
        for k in ("auto_map", "tokenizer_class", "name_or_path"):
            cfg.pop(k, None)
        cfg.update({k: v for k, v in kwargs.items() if k in cls.__init__.__code__.co_varnames})
        return cls(os.path.join(path, VOCAB_FILE), name_or_path=path, **cfg)

    def save_pretrained(self, save_directory, **kwargs):
        os.makedirs(save_directory, exist_ok=True)
        target = os.path.join(save_directory, VOCAB_FILE)
        if os.path.abspath(target) != os.path.abspath(self.vocab_file):
            shutil.copyfile(self.vocab_file, target)
        with open(os.path.join(save_directory, CONFIG_FILE), "w", encoding="utf-8") as f:
            json.dump({**self.init_kwargs, "tokenizer_class": "ChatGLMTokenizer"}, f, ensure_ascii=False, indent=2)
        return (target,)

    # ---- vocabulary -------------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.sp.GetPieceSize() + self.num_image_tokens

    def __len__(self):
        return self.vocab_size

    def get_vocab(self) -> Dict[str, int]:
        return {self.convert_ids_to_tokens(i): i for i in range(self.vocab_size)}

    def _piece_id(self, piece: str) -> int:
        return self.sp.PieceToId(piece) + self.num_image_tokens

    def convert_tokens_to_ids(self, tokens):
        if isinstance(tokens, str):
            return self._piece_id(tokens)
        return [self._piece_id(t) for t in tokens]

    def convert_ids_to_tokens(self, ids, skip_special_tokens=False):
        if isinstance(ids, int):
            return self._id_piece(ids)
        return [self._id_piece(int(i)) for i in ids if not (skip_special_tokens and int(i) in self.all_special_ids)]

    def _id_piece(self, i: int) -> str:
        if i < self.num_image_tokens:
            return f"<image_{i}>"
        return self.sp.IdToPiece(i - self.num_image_tokens)

    # ---- encoding ---------------------------------------------------------------------------------------------
    def _sp_tokenize(self, text: str) -> List[str]:
        if self.remove_space:
            text = " ".join(text.strip().split())
        if self.do_lower_case:
            text = text.lower()
        return self.sp.Encode(encode_whitespace(text), out_type=str)

    def tokenize(self, text: str) -> List[str]:
        """Pieces of `text`. Special tokens typed in the text are kept whole, and whitespace directly around them
        is dropped; each chunk between them is encoded on its own (with its own leading ▁)."""
        chunks = self._split_re.split(text)
        for i, chunk in enumerate(chunks):
            if chunk in self.unique_no_split_tokens:
                if i > 0:
                    chunks[i - 1] = chunks[i - 1].rstrip()
                if i + 1 < len(chunks):
                    chunks[i + 1] = chunks[i + 1].lstrip()
        pieces = []
        for i, chunk in enumerate(chunks):
            if not chunk:
                continue
            pieces.extend([chunk] if i % 2 == 1 else self._sp_tokenize(chunk))
        return pieces

    def build_inputs_with_special_tokens(self, ids_a: List[int], ids_b: Optional[List[int]] = None) -> List[int]:
        ids = list(ids_a) + [self.gmask_token_id, self.bos_token_id]
        if ids_b is not None:
            ids = ids + list(ids_b) + [self.eos_token_id]
        return ids

    def encode(self, text, text_pair=None, add_special_tokens=True, truncation=False, max_length=None, **kwargs):
        return self._encode_one(text, text_pair, add_special_tokens, truncation, max_length)

    def _encode_one(self, text, text_pair, add_special_tokens, truncation, max_length):
        ids_a = self.convert_tokens_to_ids(self.tokenize(text))
        ids_b = None if text_pair is None else self.convert_tokens_to_ids(self.tokenize(text_pair))
        if truncation and max_length is not None:
            n_special = (2 if ids_b is None else 3) if add_special_tokens else 0
            budget = max_length - n_special
            # longest_first, from the right (transformers' default truncation)
            while len(ids_a) + len(ids_b or []) > budget and (ids_a or ids_b):
                if ids_b is not None and len(ids_b) > len(ids_a):
                    ids_b = ids_b[:-1]
                else:
                    ids_a = ids_a[:-1]
        if add_special_tokens:
            return self.build_inputs_with_special_tokens(ids_a, ids_b)
        return ids_a + (ids_b or [])

    def __call__(self, text: Union[str, List[str]], text_pair=None, add_special_tokens=True, padding=False,
                 truncation=False, max_length=None, pad_to_multiple_of=None, return_tensors=None, **kwargs):
        batched = isinstance(text, (list, tuple))
        texts = list(text) if batched else [text]
        pairs = (list(text_pair) if batched else [text_pair]) if text_pair is not None else [None] * len(texts)
        rows = [self._encode_one(t, p, add_special_tokens, truncation, max_length) for t, p in zip(texts, pairs)]
        if padding is True or padding == "longest":
            target = max(len(r) for r in rows)
        elif padding == "max_length":
            target = max_length if max_length is not None else max(len(r) for r in rows)
        elif padding in (False, None, "do_not_pad"):
            target = None
        else:
            raise ValueError(f"unknown padding strategy {padding!r}")
        if target is None:
            data = {"input_ids": rows if batched else rows[0]}
        else:
            if pad_to_multiple_of and target % pad_to_multiple_of:
                target = (target // pad_to_multiple_of + 1) * pad_to_multiple_of
            data = self._pad_with_glm_inputs(rows, target)
            if not batched:
                data = {k: v[0] for k, v in data.items()}
        if return_tensors is not None and not batched:
            data = {k: [v] for k, v in data.items()}  # a single text still gets a batch axis
        return BatchEncoding(data, tensor_type=return_tensors)

    def glm_inputs(self, ids: List[int]):
        """The attention mask (True = blocked) and 2-D position ids of one unpadded sequence, as the tokenizer
        builds them. Note: [MASK] is preferred over [gMASK] here (the model prefers [gMASK])."""
        n = len(ids)
        context = ids.index(self.bos_token_id) if self.bos_token_id in ids else n
        visible = np.tril(np.ones((1, n, n)))
        visible[:, :, :context] = 1
        mask = visible < 0.5
        pos = np.arange(n, dtype=np.int64)
        mask_token = self.mask_token_id if self.mask_token_id in ids else self.gmask_token_id
        if mask_token in ids:
            pos[context:] = ids.index(mask_token)
        block = np.concatenate([np.zeros(context, dtype=np.int64), np.arange(1, n - context + 1, dtype=np.int64)])
        return mask, np.stack([pos, block])

    def _pad_with_glm_inputs(self, rows, target):
        out = {"input_ids": [], "attention_mask": [], "position_ids": []}
        for ids in rows:
            mask, pos = self.glm_inputs(ids)
            d = max(target - len(ids), 0)
            out["input_ids"].append([self.pad_token_id] * d + ids)
            out["attention_mask"].append(np.pad(mask, [(0, 0), (d, 0), (d, 0)], constant_values=True))
            out["position_ids"].append(np.pad(pos, [(0, 0), (d, 0)]))
        if len({len(r) for r in out["input_ids"]}) == 1:
            out["attention_mask"] = np.stack(out["attention_mask"])
            out["position_ids"] = np.stack(out["position_ids"])
        return out

    # ---- decoding ---------------------------------------------------------------------------------------------
    def decode(self, token_ids, skip_special_tokens=False, clean_up_tokenization_spaces=True, **kwargs) -> str:
        if hasattr(token_ids, "tolist"):
            token_ids = token_ids.tolist()
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        ids = [int(i) for i in token_ids if int(i) != self.pad_token_id]
        if not ids:
            return ""
        pieces = self.convert_ids_to_tokens(ids, skip_special_tokens=skip_special_tokens)
        text = decode_whitespace(self.sp.DecodePieces(pieces))
        return clean_up_spaces(text) if clean_up_tokenization_spaces else text

    def batch_decode(self, sequences, **kwargs) -> List[str]:
        if hasattr(sequences, "tolist"):
            sequences = sequences.tolist()
        return [self.decode(s, **kwargs) for s in sequences]

    def __repr__(self):
        return f"ChatGLMTokenizer(name_or_path={self.name_or_path!r}, vocab_size={self.vocab_size})"
