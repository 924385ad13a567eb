"""Beam search as ChatGLM-6B users got it (transformers 4.27's BeamSearchScorer), for generate(num_beams>1).

Current transformers normalises a finished hypothesis by its *generated* length; the original divided the
summed log-probabilities by the *whole* sequence length (prompt included, final <eop> excluded), which ranks
short and long answers differently. This replaces GenerationMixin._beam_search on our model so that
generate(num_beams=...) and chat(num_beams=...) give the original's answers and sequences_scores.
"""
import torch
from transformers.generation.utils import GenerateBeamDecoderOnlyOutput


class _Hypotheses:
    """The n best finished sequences of one batch row."""

    def __init__(self, num_beams, length_penalty, early_stopping):
        self.num_beams, self.length_penalty, self.early_stopping = num_beams, length_penalty, early_stopping
        self.beams = []  # (score, token ids)
        self.worst_score = 1e9

    def add(self, ids, sum_logprobs):
        score = sum_logprobs / (ids.shape[-1] ** self.length_penalty)
        if len(self.beams) < self.num_beams or score > self.worst_score:
            self.beams.append((score, ids))
            if len(self.beams) > self.num_beams:
                ranked = sorted((s, i) for i, (s, _) in enumerate(self.beams))
                del self.beams[ranked[0][1]]
                self.worst_score = ranked[1][0]
            else:
                self.worst_score = min(score, self.worst_score)

    def is_done(self, best_sum_logprobs, cur_len):
        if len(self.beams) < self.num_beams:
            return False
        if self.early_stopping is True:
            return True
        return self.worst_score >= best_sum_logprobs / cur_len ** self.length_penalty


def beam_search(self, input_ids, logits_processor, stopping_criteria, generation_config, synced_gpus=False,
                **model_kwargs):
    nb = generation_config.num_beams
    n_return = generation_config.num_return_sequences or 1
    eos_ids = generation_config._eos_token_tensor
    eos_ids = eos_ids.view(-1).tolist() if eos_ids is not None else []
    eos = set(eos_ids)
    pad = int(generation_config._pad_token_tensor) if generation_config._pad_token_tensor is not None else 0
    max_length = generation_config.max_length
    B = input_ids.shape[0] // nb
    device = input_ids.device
    hyps = [_Hypotheses(nb, generation_config.length_penalty, generation_config.early_stopping) for _ in range(B)]
    done = [False] * B
    beam_scores = torch.zeros(B, nb, device=device)
    beam_scores[:, 1:] = -1e9  # only the first copy of each prompt may expand at step one
    beam_scores = beam_scores.view(-1)
    while True:
        with torch.no_grad():
            inputs = self.prepare_inputs_for_generation(input_ids, **model_kwargs)
            out = self(**inputs)
        model_kwargs = self._update_model_kwargs_for_generation(out, model_kwargs)
        logprobs = torch.log_softmax(out.logits[:, -1].float(), dim=-1)
        scores = logits_processor(input_ids, logprobs) + beam_scores[:, None]
        V = scores.shape[-1]
        top_scores, top_ids = torch.topk(scores.view(B, nb * V), 2 * nb, dim=1, largest=True, sorted=True)
        beam_scores, next_tokens, rows = _next_beams(input_ids, top_scores, top_ids, V, hyps, done, eos, pad)
        input_ids = torch.cat([input_ids[rows], next_tokens.view(-1, 1)], dim=-1)
        model_kwargs["cache"].reorder_cache(rows)
        if all(done) or bool(stopping_criteria(input_ids, None).all()):
            break
    # unfinished rows: their live beams become hypotheses too
    for b in range(B):
        if not done[b]:
            for j in range(nb):
                hyps[b].add(input_ids[b * nb + j], beam_scores[b * nb + j].item())
    out_ids, best_scores = _best_sequences(hyps, n_return, max_length, pad, eos_ids, device)
    if generation_config.return_dict_in_generate:
        scores = torch.tensor(best_scores, device=device) if generation_config.output_scores else None
        return GenerateBeamDecoderOnlyOutput(sequences=out_ids, sequences_scores=scores)
    return out_ids


def _next_beams(input_ids, top_scores, top_ids, V: int, hyps, done, eos: set, pad: int):
    """(scores, tokens, source rows) of the num_beams best continuations per batch row; an <eop> among the top
    num_beams finishes a hypothesis instead. Marks rows whose hypotheses can no longer improve as done."""
    B, nb = len(hyps), top_ids.shape[1] // 2
    device = input_ids.device
    next_scores = torch.zeros(B, nb, device=device)
    next_tokens = torch.full((B, nb), pad, dtype=torch.long, device=device)
    next_rows = torch.zeros(B, nb, dtype=torch.long, device=device)
    cur_len = input_ids.shape[-1]
    for b in range(B):
        if done[b]:
            continue
        k = 0
        for rank, (score, flat) in enumerate(zip(top_scores[b].tolist(), top_ids[b].tolist())):
            row, token = b * nb + flat // V, flat % V
            if token in eos:
                if rank < nb:  # a finished hypothesis only counts if it ranks among the top num_beams
                    hyps[b].add(input_ids[row].clone(), score)
            else:
                next_scores[b, k], next_tokens[b, k], next_rows[b, k] = score, token, row
                k += 1
            if k == nb:
                break
        done[b] = done[b] or hyps[b].is_done(top_scores[b].max().item(), cur_len)
    return next_scores.view(-1), next_tokens, next_rows.view(-1)


def _best_sequences(hyps, n_return: int, max_length, pad: int, eos_ids: list, device):
    """([B * n_return, width] ids padded after an <eop>, their scores) of the best finished hypotheses."""
    best, best_scores = [], []
    for h in hyps:
        ranked = sorted(h.beams, key=lambda x: x[0])
        for _ in range(n_return):
            score, ids = ranked.pop()
            best.append(ids)
            best_scores.append(score)
    lengths = [len(ids) for ids in best]
    width = min(max(lengths) + 1, max_length) if max_length is not None else max(lengths) + 1
    out_ids = torch.full((len(best), width), pad, dtype=torch.long, device=device)
    for i, ids in enumerate(best):
        out_ids[i, :len(ids)] = ids
        if len(ids) < width:
            out_ids[i, len(ids)] = eos_ids[0] if eos_ids else pad
    return out_ids, best_scores
