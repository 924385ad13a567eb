#!/usr/bin/env bash
# Chat in the browser with the base model plus a trained P-Tuning prefix (the project's web_demo.py).
# Extra arguments go to web_demo.py (e.g. --port 7861, --quantize 4, --host 0.0.0.0).
# Environment: MODEL (default $CHATGLM_MODEL, else the demo model), CHECKPOINT + STEP (the run under output/) or
# PTUNING_CHECKPOINT (a checkpoint folder), PRE_SEQ_LEN (the training value; by default read from the checkpoint's
# config.json).
set -euo pipefail
cd "$(dirname "$0")"

MODEL=${MODEL:-${CHATGLM_MODEL:-}}  # empty: the demo model
CHECKPOINT=${CHECKPOINT:-adgen-chatglm-6b-pt-128-2e-2}
STEP=${STEP:-3000}
PTUNING_CHECKPOINT=${PTUNING_CHECKPOINT:-output/$CHECKPOINT/checkpoint-$STEP}
PRE_SEQ_LEN=${PRE_SEQ_LEN:-}

exec python3 ../web_demo.py \
    ${MODEL:+--model-path "$MODEL"} \
    --ptuning-checkpoint "$PTUNING_CHECKPOINT" \
    ${PRE_SEQ_LEN:+--pre-seq-len "$PRE_SEQ_LEN"} \
    "$@"
