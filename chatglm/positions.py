"""GLM's 2-D positions, in one place: the model, generate()'s hooks and the engine all call glm_positions.

A GLM prompt is [context] [gMASK] <sop> reply...: the context (everything before <sop>) is attended
bidirectionally and keeps its absolute positions; from <sop> on, the absolute position stays frozen at the mask
token and a second "block" position counts 1, 2, 3, ... (NOTES.md §5).
"""
from typing import List, Tuple

import torch


def glm_anchors(ids: List[int], config) -> Tuple[int, int]:
    """(context length, mask position) of one sequence: where <sop> is, and where [gMASK] (else [MASK]) is. The
    model prefers [gMASK]; the tokenizer's own rule prefers [MASK] (tokenization.glm_inputs), as the original."""
    bos, gmask, mask = config.bos_token_id, config.gmask_token_id, config.mask_token_id
    if bos not in ids:
        raise ValueError(f"input has no <sop> (id {bos}); ChatGLM inputs end with [gMASK] <sop> — "
                         f"encode them with the tokenizer (add_special_tokens=True)")
    token = gmask if gmask in ids else mask
    if token not in ids:
        raise ValueError(f"input has neither [gMASK] ({gmask}) nor [MASK] ({mask}); encode it with the tokenizer")
    return ids.index(bos), ids.index(token)


def glm_positions(context_length: int, mask_position: int, start: int, end: int, device=None) -> torch.Tensor:
    """[2, end - start] positions of tokens start..end-1: (absolute, block)."""
    i = torch.arange(start, end, device=device)
    after = i >= context_length
    return torch.stack([torch.where(after, mask_position, i), torch.where(after, i - context_length + 1, 0)])
