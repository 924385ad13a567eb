"""The scores upstream reported for AdvertiseGen: ROUGE-1/2/L F1 on jieba-segmented words (rouge_chinese) and
character-level sentence BLEU-4 (nltk, smoothing method 3), each ×100, rounded to 4 places, averaged over examples.
"""
import logging

import jieba
import numpy as np
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
from rouge_chinese import Rouge

from ptuning.data import IGNORE_INDEX

jieba.setLogLevel(logging.WARNING)  # its "Building prefix dict" chatter on first use
METRIC_NAMES = ("rouge-1", "rouge-2", "rouge-l", "bleu-4")


def score_pair(prediction: str, reference: str) -> dict:
    hypothesis = " ".join(jieba.cut(prediction))
    reference_words = " ".join(jieba.cut(reference))
    if hypothesis.strip() and reference_words.strip():
        rouge = Rouge().get_scores(hypothesis, reference_words)[0]
        scores = {name: round(rouge[name]["f"] * 100, 4) for name in ("rouge-1", "rouge-2", "rouge-l")}
    else:  # rouge_chinese raises on an empty side (upstream crashed on an empty prediction); it scores nothing
        scores = {"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0}
    bleu = sentence_bleu([list(reference)], list(prediction), smoothing_function=SmoothingFunction().method3)
    scores["bleu-4"] = round(bleu * 100, 4)
    return scores


def score_texts(predictions, references) -> dict:
    """Mean of each score over the (prediction, reference) pairs."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    per_pair = [score_pair(p, r) for p, r in zip(predictions, references)]
    return {name: float(np.mean([s[name] for s in per_pair])) if per_pair else 0.0 for name in METRIC_NAMES}


def decode(tokenizer, ids):
    """Texts of padded id rows (-100 marks padding added by the collator or the evaluation loop)."""
    ids = np.where(np.asarray(ids) == IGNORE_INDEX, tokenizer.pad_token_id, ids)
    return tokenizer.batch_decode(ids, skip_special_tokens=True)


def metrics_function(tokenizer):
    """compute_metrics for the Trainer: generated ids and target ids -> the four scores."""
    def compute_metrics(eval_prediction):
        predictions, labels = eval_prediction.predictions, eval_prediction.label_ids
        if isinstance(predictions, tuple):
            predictions = predictions[0]
        return score_texts(decode(tokenizer, predictions), decode(tokenizer, labels))
    return compute_metrics
