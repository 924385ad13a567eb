#!/usr/bin/env bash
# P-Tuning v2 of ChatGLM-6B on AdvertiseGen, with upstream's settings (prefix 128, lr 2e-2, INT4 base,
# batch 1 x 16 accumulation steps, 3000 steps). Extra arguments are passed on to main.py and win, e.g.
#   bash train.sh --max_steps 100
# Environment: NUM_GPUS (processes for torchrun, default 1), MODEL (default $CHATGLM_MODEL, else
# the demo model), DATA_DIR (default AdvertiseGen), PRE_SEQ_LEN, LR, QUANTIZATION_BIT (4; empty = none),
# OUTPUT_DIR.
set -euo pipefail
cd "$(dirname "$0")"

PRE_SEQ_LEN=${PRE_SEQ_LEN:-128}
LR=${LR:-2e-2}
NUM_GPUS=${NUM_GPUS:-1}
MODEL=${MODEL:-${CHATGLM_MODEL:-}}  # empty: main.py loads the demo model
DATA_DIR=${DATA_DIR:-AdvertiseGen}
QUANTIZATION_BIT=${QUANTIZATION_BIT-4}
OUTPUT_DIR=${OUTPUT_DIR:-output/adgen-chatglm-6b-pt-$PRE_SEQ_LEN-$LR}

# One process runs as plain python; several under torchrun (which, on an error, adds its own report after ours).
if [ "$NUM_GPUS" = 1 ]; then LAUNCH=(python3); else LAUNCH=(torchrun --standalone --nnodes=1 --nproc_per_node="$NUM_GPUS"); fi
"${LAUNCH[@]}" main.py \
    --do_train \
    --train_file "$DATA_DIR/train.json" \
    --validation_file "$DATA_DIR/dev.json" \
    --prompt_column content \
    --response_column summary \
    --overwrite_cache \
    ${MODEL:+--model_name_or_path "$MODEL"} \
    --output_dir "$OUTPUT_DIR" \
    --overwrite_output_dir \
    --max_source_length 64 \
    --max_target_length 64 \
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
