"""P-Tuning v2 (with --pre_seq_len) or full fine-tuning (without) of ChatGLM-6B, plus evaluation and prediction
with ROUGE/BLEU, on transformers' own Seq2SeqTrainer.

    python main.py --do_train --train_file AdvertiseGen/train.json --prompt_column content \
        --response_column summary --model_name_or_path THUDM/chatglm-6b --output_dir output/adgen \
        --max_source_length 64 --max_target_length 64 --pre_seq_len 128 --quantization_bit 4 ...

Runs the same under `torchrun --nproc_per_node N main.py ...` and with `--deepspeed deepspeed.json`.
See README.md here for the scripts and every argument.
"""
import json
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root: chatglm/ and ptuning/

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import HfArgumentParser, Seq2SeqTrainer, Seq2SeqTrainingArguments, set_seed  # noqa: E402
from transformers.integrations import is_deepspeed_zero3_enabled  # noqa: E402

from chatglm import ModelLoadError, load_model  # noqa: E402
from chatglm.cpu_pack import unpack  # noqa: E402
from ptuning.arguments import DataTrainingArguments, ModelArguments  # noqa: E402
from ptuning.data import (GenerationCollator, TrainCollator, check_columns, generation_example,  # noqa: E402
                          prompts_and_answers, read_rows_and_lines, train_example)
from ptuning.metrics import decode, metrics_function  # noqa: E402

logger = logging.getLogger("ptuning")
PREFIX_KEY = "transformer.prefix_encoder."


class ChatGLMTrainer(Seq2SeqTrainer):
    """Seq2SeqTrainer, changed for a decoder-only model trained with P-Tuning v2: checkpoints hold only the prefix
    encoder when only it trains (and resuming from one expects no more); evaluation generates from the prompt
    and scores only the continuation, with default generation settings from our arguments."""

    def __init__(self, *args, save_prefix_only=False, generation_defaults=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.save_prefix_only = save_prefix_only
        self.generation_defaults = generation_defaults or {}

    # Seq2SeqTrainer switches evaluation to gather(), which keeps the samples a multi-process run repeats to even
    # out its last batch; gather_for_metrics() drops them, so N test rows give N predictions in any world size.
    @property
    def gather_function(self):
        return self.accelerator.gather_for_metrics

    @gather_function.setter
    def gather_function(self, _):
        pass

    def _save(self, output_dir=None, state_dict=None):
        if self.save_prefix_only:
            # upstream's P-Tuning checkpoint: config.json + the prefix-encoder tensors (the base is unchanged)
            model = self.accelerator.unwrap_model(self.model)
            state_dict = {k: v for k, v in model.state_dict().items() if k.startswith(PREFIX_KEY)}
        super()._save(output_dir, state_dict=state_dict)

    def _issue_warnings_after_load(self, load_result):
        if self.save_prefix_only:  # resuming from our checkpoint: the base weights are rightly not in it
            load_result = load_result._replace(
                missing_keys=[k for k in load_result.missing_keys if k.startswith(PREFIX_KEY)])
        super()._issue_warnings_after_load(load_result)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None, **gen_kwargs):
        if not self.args.predict_with_generate or prediction_loss_only:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)
        inputs = self._prepare_inputs(inputs)
        labels = inputs.pop("labels", None)
        gen_kwargs = {**self.generation_defaults, **getattr(self, "_gen_kwargs", {}), **gen_kwargs}
        gen_kwargs = {k: v for k, v in gen_kwargs.items() if v is not None}
        gen_kwargs.setdefault("synced_gpus", is_deepspeed_zero3_enabled())
        with torch.no_grad():
            output = self.model.generate(**inputs, **gen_kwargs)
        # The output repeats the prompt; targets are compared with what came after it. (No loss: the labels are
        # the bare target, not aligned with the prompt.)
        return None, output[:, inputs["input_ids"].shape[1]:], labels


def collate(tokenizer, max_source_length):
    """One collator for both kinds of example (training rows carry input_ids, generation rows a prompt)."""
    train, generation = TrainCollator(tokenizer.pad_token_id), GenerationCollator(tokenizer, max_source_length)
    return lambda examples: generation(examples) if "prompt" in examples[0] else train(examples)


def load_pairs(path, data_args, limit):
    if not os.path.isfile(path):
        raise SystemExit(f"data file not found: {path} (for AdvertiseGen, download and unpack it into ptuning/ "
                         f"as README.md says; or pass your own --train_file/--validation_file/--test_file)")
    try:
        rows, lines = read_rows_and_lines(path)
        check_columns(rows, path, (data_args.prompt_column, data_args.response_column, data_args.history_column),
                      lines)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    pairs = prompts_and_answers(rows, data_args.prompt_column, data_args.response_column, data_args.history_column,
                                data_args.source_prefix)
    if not pairs:
        raise SystemExit(f"{path}: no usable rows (the prompt and response fields must be non-empty)")
    return pairs[:limit] if limit is not None else pairs


def check_arguments(model_args, data_args, training_args):
    if not (training_args.do_train or training_args.do_eval or training_args.do_predict):
        raise SystemExit("nothing to do: pass --do_train, --do_eval and/or --do_predict")
    for flag, needed in (("do_train", "train_file"), ("do_eval", "validation_file"), ("do_predict", "test_file")):
        if getattr(training_args, flag) and getattr(data_args, needed) is None:
            raise SystemExit(f"--{flag} needs --{needed}")
    if data_args.prompt_column is None or data_args.response_column is None:
        raise SystemExit("--prompt_column and --response_column are required (e.g. content and summary)")
    if model_args.quantization_bit and model_args.pre_seq_len is None and model_args.ptuning_checkpoint is None:
        raise SystemExit("--quantization_bit needs --pre_seq_len: quantized weights are frozen, so only P-Tuning "
                         "can train on a quantized model")
    if training_args.do_predict and not training_args.predict_with_generate:
        logger.info("--do_predict generates its predictions: turning on --predict_with_generate")
        training_args.predict_with_generate = True
    out = Path(training_args.output_dir)
    held = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]) if p.name[11:].isdigit() else -1)
    resuming = training_args.resume_from_checkpoint
    if training_args.do_train and held and not (data_args.overwrite_output_dir or resuming):
        raise SystemExit(f"{out} already holds checkpoints; pass --overwrite_output_dir to train over them, or "
                         f"--resume_from_checkpoint {held[-1]} to continue")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.accelerator.is_available():
        # torchrun on a machine without GPUs: unless told, accelerate runs each process on its own (no gradient
        # averaging, no gathering of predictions). CPU processes talk over gloo.
        os.environ.setdefault("ACCELERATE_USE_CPU", "true")
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, Seq2SeqTrainingArguments))
    if len(argv) == 1 and argv[0].endswith(".json"):
        model_args, data_args, training_args = parser.parse_json_file(os.path.abspath(argv[0]))
    else:
        model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)

    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
                        datefmt="%m/%d/%Y %H:%M:%S", handlers=[logging.StreamHandler(sys.stdout)])
    if training_args.should_log:
        transformers.utils.logging.set_verbosity_info()
    log_level = training_args.get_process_log_level()
    logger.setLevel(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.enable_default_handler()
    transformers.utils.logging.enable_explicit_format()
    check_arguments(model_args, data_args, training_args)
    training_args.remove_unused_columns = False  # our collators build exactly the model's inputs from each row
    if not torch.cuda.is_available():
        training_args.dataloader_pin_memory = False  # pinning is for GPU copies; on CPU it only warns
    set_seed(training_args.seed)

    # ---- model ----------------------------------------------------------------------------------------------
    prefix_tuning = model_args.pre_seq_len is not None or model_args.ptuning_checkpoint is not None
    if not prefix_tuning:
        dtype = "float32"  # full fine-tuning keeps fp32 weights; --fp16/--bf16/DeepSpeed compute in half precision
    elif training_args.bf16:
        dtype = "bfloat16"
    else:
        dtype = None  # loading.py's choice: a frozen fp16 base on GPU (as upstream), float32 on CPU
    device = "cpu" if training_args.deepspeed else str(training_args.device)  # DeepSpeed places the model itself
    # prefix_projection None: what the --ptuning_checkpoint says, else off
    try:
        tokenizer, model = load_model(model_args.model_name_or_path, device=device, dtype=dtype,
                                      quantize=model_args.quantization_bit, pre_seq_len=model_args.pre_seq_len,
                                      prefix_projection=True if model_args.prefix_projection else None,
                                      ptuning_checkpoint=model_args.ptuning_checkpoint)
    except ModelLoadError as e:
        raise SystemExit(f"error: {e}") from None
    # logged once the model has loaded, so that a load error is the first thing a user reads, not the last
    logger.info("training/evaluation parameters %s", training_args)
    unpack(model)  # a model loaded for CPU inference holds oneDNN-packed weights; training needs them as Parameters
    if prefix_tuning:
        model.transformer.prefix_encoder.float()  # trained in fp32 over a frozen (fp16/int4/int8) base
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith(PREFIX_KEY))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    logger.info("%s: %d trainable parameters of %d (%.4f%%)", "P-Tuning v2" if prefix_tuning else "full fine-tuning",
                trainable, total, 100 * trainable / total)

    # ---- data -----------------------------------------------------------------------------------------------
    def train_examples(pairs, max_target_length):
        return [train_example(tokenizer, p, a, data_args.max_source_length, max_target_length,
                              data_args.ignore_pad_token_for_loss) for p, a in pairs]

    def generation_examples(pairs):
        return [generation_example(tokenizer, p, a, data_args.val_max_target_length) for p, a in pairs]

    train_dataset = eval_dataset = predict_dataset = None
    if training_args.do_train:
        train_dataset = train_examples(load_pairs(data_args.train_file, data_args, data_args.max_train_samples),
                                       data_args.max_target_length)
        first = train_dataset[0]
        logger.info("first training example:\ninput_ids %s\ninputs %r\nlabels %s\nlabel text %r", first["input_ids"],
                    tokenizer.decode(first["input_ids"]), first["labels"],
                    decode(tokenizer, [first["labels"]])[0])
    if training_args.do_eval:
        pairs = load_pairs(data_args.validation_file, data_args, data_args.max_eval_samples)
        eval_dataset = (generation_examples(pairs) if training_args.predict_with_generate
                        else train_examples(pairs, data_args.val_max_target_length))
    if training_args.do_predict:
        predict_dataset = generation_examples(load_pairs(data_args.test_file, data_args,
                                                         data_args.max_predict_samples))

    generation_defaults = {"max_length": data_args.max_source_length + data_args.val_max_target_length + 1,
                           "num_beams": data_args.num_beams, "do_sample": data_args.do_sample}
    if data_args.do_sample:
        generation_defaults.update(top_p=data_args.top_p, temperature=data_args.temperature)
    # The Trainer copies args.use_cache (default off) into model.config, and so into every saved config.json; keep the
    # model's own value (the model never uses the cache in a training forward anyway).
    training_args.use_cache = model.config.use_cache
    trainer = ChatGLMTrainer(
        model=model, args=training_args, train_dataset=train_dataset, eval_dataset=eval_dataset,
        processing_class=tokenizer, data_collator=collate(tokenizer, data_args.max_source_length),
        compute_metrics=metrics_function(tokenizer) if training_args.predict_with_generate else None,
        save_prefix_only=prefix_tuning, generation_defaults=generation_defaults)
    logger.info("%d process(es), distributed type %s", training_args.world_size,
                trainer.accelerator.distributed_type.value)

    # ---- train / evaluate / predict -------------------------------------------------------------------------
    if training_args.do_train:
        model.activation_checkpointing_enable()  # as upstream: what makes 6B P-Tuning fit in ~7 GB with INT4
        result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        metrics = result.metrics
        metrics["train_samples"] = len(train_dataset)
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        trainer.save_state()

    if training_args.do_eval:
        metrics = trainer.evaluate(metric_key_prefix="eval")
        metrics["eval_samples"] = len(eval_dataset)
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)

    if training_args.do_predict:
        result = trainer.predict(predict_dataset, metric_key_prefix="predict")
        metrics = result.metrics
        metrics["predict_samples"] = len(predict_dataset)
        trainer.log_metrics("predict", metrics)
        trainer.save_metrics("predict", metrics)
        if trainer.is_world_process_zero():
            predictions = decode(tokenizer, result.predictions)
            labels = decode(tokenizer, result.label_ids)
            path = os.path.join(training_args.output_dir, "generated_predictions.txt")
            with open(path, "w", encoding="utf-8") as f:
                for prediction, label in zip(predictions, labels):
                    f.write(json.dumps({"labels": label.strip(), "predict": prediction.strip()},
                                       ensure_ascii=False) + "\n")
            logger.info("wrote %d predictions to %s", len(predictions), path)
    return trainer


if __name__ == "__main__":
    main()
    # Under torchrun, tear the process group down before the interpreter exits: left to exit-time destructors, its
    # threads can abort the process ("terminate called without an active exception") after training has finished.
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
