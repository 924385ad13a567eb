"""Command-line arguments of ptuning/main.py, spelled as upstream's so their commands keep working.

main.py parses these two dataclasses together with transformers' own Seq2SeqTrainingArguments (--output_dir,
--do_train, --learning_rate, --max_steps, --per_device_train_batch_size, --deepspeed, ...). A single .json
file of arguments works too: `python main.py args.json`.
"""
from dataclasses import dataclass, field
from typing import Optional


@dataclass
class ModelArguments:
    model_name_or_path: Optional[str] = field(
        default=None,
        metadata={"help": "base model: a local folder or a hub id such as THUDM/chatglm-6b (default: "
                          "$CHATGLM_MODEL, else the built-in demo checkpoint, which is NOT the real model). For a "
                          "fully fine-tuned model, point this at its checkpoint folder."})
    ptuning_checkpoint: Optional[str] = field(
        default=None,
        metadata={"help": "folder of a P-Tuning v2 checkpoint (prefix encoder only) to load on top of the base "
                          "model, e.g. output/adgen-chatglm-6b-pt-128-2e-2/checkpoint-3000"})
    quantization_bit: Optional[int] = field(
        default=None, metadata={"help": "quantize the frozen base model to 4 or 8 bits (P-Tuning only)"})
    pre_seq_len: Optional[int] = field(
        default=None,
        metadata={"help": "P-Tuning v2 prefix length; without it (and without --ptuning_checkpoint) all weights "
                          "train (full fine-tuning)"})
    prefix_projection: bool = field(
        default=False, metadata={"help": "pass the prefix through a two-layer MLP (more parameters)"})

    def __post_init__(self):
        if self.quantization_bit is not None and self.quantization_bit not in (4, 8):
            raise ValueError(f"--quantization_bit must be 4 or 8, got {self.quantization_bit}")
        if self.pre_seq_len is not None and self.pre_seq_len < 1:
            raise ValueError(f"--pre_seq_len must be a positive number of prefix tokens, got {self.pre_seq_len}")


@dataclass
class DataTrainingArguments:
    train_file: Optional[str] = field(default=None, metadata={"help": "training data, JSON lines"})
    validation_file: Optional[str] = field(default=None, metadata={"help": "evaluation data (--do_eval), JSON lines"})
    test_file: Optional[str] = field(default=None, metadata={"help": "prediction data (--do_predict), JSON lines"})
    prompt_column: Optional[str] = field(default=None, metadata={"help": "field holding the input text"})
    response_column: Optional[str] = field(default=None, metadata={"help": "field holding the target text"})
    history_column: Optional[str] = field(
        default=None, metadata={"help": "field holding earlier turns, a list of [query, response] pairs"})
    source_prefix: str = field(default="", metadata={"help": "text put in front of every prompt"})
    max_source_length: int = field(
        default=1024, metadata={"help": "prompt tokens kept (longer prompts are cut on the right)"})
    max_target_length: int = field(
        default=128, metadata={"help": "target tokens kept in training (longer targets are cut on the right)"})
    val_max_target_length: Optional[int] = field(
        default=None, metadata={"help": "target tokens kept in evaluation/prediction (default: max_target_length)"})
    ignore_pad_token_for_loss: bool = field(
        default=True, metadata={"help": "padding positions do not count in the loss"})
    max_train_samples: Optional[int] = field(default=None, metadata={"help": "use only the first N training rows"})
    max_eval_samples: Optional[int] = field(default=None, metadata={"help": "use only the first N evaluation rows"})
    max_predict_samples: Optional[int] = field(default=None, metadata={"help": "use only the first N test rows"})
    num_beams: Optional[int] = field(default=None, metadata={"help": "beams for evaluation/prediction generation"})
    do_sample: bool = field(
        default=True, metadata={"help": "sample when generating for evaluation/prediction, as upstream did "
                                        "(--do_sample false: greedy, reproducible metrics)"})
    top_p: float = field(default=0.7, metadata={"help": "nucleus sampling for evaluation/prediction"})
    temperature: float = field(default=0.95, metadata={"help": "sampling temperature for evaluation/prediction"})
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "allow training into an --output_dir that already holds checkpoints"})
    overwrite_cache: bool = field(
        default=False, metadata={"help": "accepted for upstream's commands; data is tokenized afresh on every run"})

    def __post_init__(self):
        if self.val_max_target_length is None:
            self.val_max_target_length = self.max_target_length
        for name in ("train_file", "validation_file", "test_file"):
            path = getattr(self, name)
            if path is not None and not path.endswith((".json", ".jsonl")):
                raise ValueError(f"--{name} {path}: expected a .json or .jsonl file of JSON lines")
        if self.max_source_length < 2 or self.max_target_length < 3:
            raise ValueError("--max_source_length must be at least 2 and --max_target_length at least 3 "
                             "(room for [gMASK], <sop> and <eop>)")
