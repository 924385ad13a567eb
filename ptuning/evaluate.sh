#!/usr/bin/env bash
# Generate for the AdvertiseGen dev set with a P-Tuning checkpoint and score it (ROUGE-1/2/L, BLEU-4).
# Writes $OUTPUT_DIR/generated_predictions.txt and predict_results.json. Extra arguments go to main.py and win.
# Environment: NUM_GPUS (default 1), MODEL, DATA_DIR (AdvertiseGen), PRE_SEQ_LEN (must be the training value),
# CHECKPOINT + STEP (the run under output/), or PTUNING_CHECKPOINT (a checkpoint folder), QUANTIZATION_BIT,
# OUTPUT_DIR.
set -euo pipefail
cd "$(dirname "$0")"

PRE_SEQ_LEN=${PRE_SEQ_LEN:-128}
CHECKPOINT=${CHECKPOINT:-adgen-chatglm-6b-pt-128-2e-2}
STEP=${STEP:-3000}
NUM_GPUS=${NUM_GPUS:-1}
MODEL=${MODEL:-${CHATGLM_MODEL:-}}  # empty: main.py loads the demo model
DATA_DIR=${DATA_DIR:-AdvertiseGen}
QUANTIZATION_BIT=${QUANTIZATION_BIT-4}
PTUNING_CHECKPOINT=${PTUNING_CHECKPOINT:-output/$CHECKPOINT/checkpoint-$STEP}
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
    ${MODEL:+--model_name_or_path "$MODEL"} \
    --ptuning_checkpoint "$PTUNING_CHECKPOINT" \
    --output_dir "$OUTPUT_DIR" \
    --overwrite_output_dir \
    --max_source_length 64 \
    --max_target_length 64 \
    --per_device_eval_batch_size 1 \
    --predict_with_generate \
    --pre_seq_len "$PRE_SEQ_LEN" \
    ${QUANTIZATION_BIT:+--quantization_bit "$QUANTIZATION_BIT"} \
    "$@"
