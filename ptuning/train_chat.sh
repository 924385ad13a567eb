#!/usr/bin/env bash
# P-Tuning v2 on multi-turn dialogue data: JSON lines {"prompt": ..., "response": ..., "history": [[q, r], ...]}.
# Defaults to the small sample in data/chat-sample; point CHAT_TRAIN_DATA / CHAT_VAL_DATA at your own files.
# Extra arguments are passed on to main.py and win. Environment: NUM_GPUS (default 1), MODEL, PRE_SEQ_LEN,
# LR, QUANTIZATION_BIT (4; empty = none), CHECKPOINT_NAME (the output folder).
set -euo pipefail
cd "$(dirname "$0")"

PRE_SEQ_LEN=${PRE_SEQ_LEN:-128}
LR=${LR:-1e-2}
NUM_GPUS=${NUM_GPUS:-1}
MODEL=${MODEL:-${CHATGLM_MODEL:-}}  # empty: main.py loads the demo model
CHAT_TRAIN_DATA=${CHAT_TRAIN_DATA:-data/chat-sample/train.json}
CHAT_VAL_DATA=${CHAT_VAL_DATA:-data/chat-sample/dev.json}
QUANTIZATION_BIT=${QUANTIZATION_BIT-4}
CHECKPOINT_NAME=${CHECKPOINT_NAME:-output/chat-chatglm-6b-pt-$PRE_SEQ_LEN-$LR}

# One process runs as plain python; several under torchrun (which, on an error, adds its own report after ours).
if [ "$NUM_GPUS" = 1 ]; then LAUNCH=(python3); else LAUNCH=(torchrun --standalone --nnodes=1 --nproc_per_node="$NUM_GPUS"); fi
"${LAUNCH[@]}" main.py \
    --do_train \
    --train_file "$CHAT_TRAIN_DATA" \
    --validation_file "$CHAT_VAL_DATA" \
    --prompt_column prompt \
    --response_column response \
    --history_column history \
    --overwrite_cache \
    ${MODEL:+--model_name_or_path "$MODEL"} \
    --output_dir "$CHECKPOINT_NAME" \
    --overwrite_output_dir \
    --max_source_length 256 \
    --max_target_length 256 \
    --per_device_train_batch_size 1 \
    --per_device_eval_batch_size 1 \
    --gradient_accumulation_steps 16 \
    --predict_with_generate \
    --max_steps 3000 \
    --logging_steps 10 \
    --save_steps 1000 \
    --learning_rate "$LR" \
    --pre_seq_len "$PRE_SEQ_LEN" \
    ${QUANTIZATION_BIT:+--quantization_bit "$QUANTIZATION_BIT"} \
    "$@"
