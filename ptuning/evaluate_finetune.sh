#!/usr/bin/env bash
# Generate for the AdvertiseGen dev set with a fully fine-tuned checkpoint (ds_train_finetune.sh) and score it.
# Extra arguments go to main.py and win. Environment: NUM_GPUS (default 1), DATA_DIR, CHECKPOINT + STEP, or
# MODEL_CHECKPOINT (a checkpoint folder), OUTPUT_DIR.
set -euo pipefail
cd "$(dirname "$0")"

CHECKPOINT=${CHECKPOINT:-adgen-chatglm-6b-ft-1e-4}
STEP=${STEP:-3000}
NUM_GPUS=${NUM_GPUS:-1}
DATA_DIR=${DATA_DIR:-AdvertiseGen}
MODEL_CHECKPOINT=${MODEL_CHECKPOINT:-output/$CHECKPOINT/checkpoint-$STEP}
OUTPUT_DIR=${OUTPUT_DIR:-output/$CHECKPOINT}

# One process runs as plain python; several under torchrun (which, on an error, adds its own report after ours).
if [ "$NUM_GPUS" = 1 ]; then LAUNCH=(python3); else LAUNCH=(torchrun --standalone --nnodes=1 --nproc_per_node="$NUM_GPUS"); fi
"${LAUNCH[@]}" main.py \
    --do_predict \
    --validation_file "$DATA_DIR/dev.json" \
    --test_file "$DATA_DIR/dev.json" \
    --overwrite_cache \
    --prompt_column content \
    --response_column summary \
    --model_name_or_path "$MODEL_CHECKPOINT" \
    --output_dir "$OUTPUT_DIR" \
    --overwrite_output_dir \
    --max_source_length 256 \
    --max_target_length 256 \
    --per_device_eval_batch_size 1 \
    --predict_with_generate \
    --fp16_full_eval \
    "$@"
