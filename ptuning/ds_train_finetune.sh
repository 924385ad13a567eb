#!/usr/bin/env bash
# Full-parameter fine-tuning of ChatGLM-6B on AdvertiseGen with DeepSpeed ZeRO-2 (deepspeed.json), fp16,
# upstream's settings (4 GPUs x batch 4, lr 1e-4, 5000 steps). Needs `pip install deepspeed` and GPUs.
# Extra arguments go to main.py and win. Environment: NUM_GPUS (default 4), MODEL, DATA_DIR, LR, OUTPUT_DIR.
set -euo pipefail
cd "$(dirname "$0")"

LR=${LR:-1e-4}
NUM_GPUS=${NUM_GPUS:-4}
MODEL=${MODEL:-${CHATGLM_MODEL:-}}  # empty: main.py loads the demo model
DATA_DIR=${DATA_DIR:-AdvertiseGen}
OUTPUT_DIR=${OUTPUT_DIR:-output/adgen-chatglm-6b-ft-$LR}

torchrun --standalone --nnodes=1 --nproc_per_node="$NUM_GPUS" main.py \
    --deepspeed deepspeed.json \
    --do_train \
    --train_file "$DATA_DIR/train.json" \
    --test_file "$DATA_DIR/dev.json" \
    --prompt_column content \
    --response_column summary \
    --overwrite_cache \
    ${MODEL:+--model_name_or_path "$MODEL"} \
    --output_dir "$OUTPUT_DIR" \
    --overwrite_output_dir \
    --max_source_length 64 \
    --max_target_length 64 \
    --per_device_train_batch_size 4 \
    --per_device_eval_batch_size 1 \
    --gradient_accumulation_steps 1 \
    --predict_with_generate \
    --max_steps 5000 \
    --logging_steps 10 \
    --save_steps 1000 \
    --learning_rate "$LR" \
    --fp16 \
    "$@"
