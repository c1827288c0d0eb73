#!/usr/bin/env bash
# Whole-split parallel-prefill benchmark, nohup-friendly and resumable.
#   mkdir -p results/logs && nohup benchmark_parallel_prefill/run_full_1s_benchmark.sh > results/logs/run_full_1s_benchmark.out 2>&1 &
# Rerunning continues the unfinished run folder of the same TASK_NAME (finished samples are kept).
# Every setting below can be overridden from the environment.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION="${DURATION:-1s}"                                   # 1s or 500ms
DATASET_DIR="${DATASET_DIR:-data/DSEC_${DURATION}}"          # clip dataset folder (index JSON + event_npy/ + mp4/)
EVENTGPT_PATH="${EVENTGPT_PATH:-}"                           # empty: the embedded default pair
VIDEOLLAVA_PATH="${VIDEOLLAVA_PATH:-}"
SPLIT="${SPLIT:-test}"
QUANT="${QUANT:-4bit}"
GAMMA="${GAMMA:-5}"
MAX_NEW_TOKENS="${MAX_NEW_TOKENS:-50}"
MAX_QUESTIONS="${MAX_QUESTIONS:-1}"
DEVICE="${DEVICE:-auto}"
EXTRA_ARGS="${EXTRA_ARGS:-}"                                 # e.g. "--drafter token_adapter" or "--draft_device cuda:1"
TASK_NAME="${TASK_NAME:-full_${DURATION}_${QUANT}}"
OUTPUT_DIR="${OUTPUT_DIR:-results/benchmark_parallel_prefill}"
PYTHON="${PYTHON:-python}"
LOG_DIR="${LOG_DIR:-results/logs}"

mkdir -p "$LOG_DIR"
LOG="$LOG_DIR/${TASK_NAME}_$(date +%Y%m%d_%H%M%S).log"
if [ ! -f "$DATASET_DIR/EventGPT_Instruction_Subset.json" ]; then
  echo "no dataset at $DATASET_DIR (set DATASET_DIR)" | tee -a "$LOG"
  exit 1
fi
model_args=()
[ -n "$EVENTGPT_PATH" ] && model_args+=(--eventgpt_path "$EVENTGPT_PATH")
[ -n "$VIDEOLLAVA_PATH" ] && model_args+=(--videollava_path "$VIDEOLLAVA_PATH")
echo "[$(date)] parallel prefill: $DATASET_DIR ($SPLIT, $DURATION) quant=$QUANT gamma=$GAMMA -> $OUTPUT_DIR/${TASK_NAME}_*" | tee -a "$LOG"
# shellcheck disable=SC2086
"$PYTHON" -m benchmark_parallel_prefill.benchmark_parallel_prefill \
  --dataset_dir "$DATASET_DIR" --split "$SPLIT" "${model_args[@]}" --quant "$QUANT" --device "$DEVICE" \
  --gamma "$GAMMA" --max_new_tokens "$MAX_NEW_TOKENS" --max_questions "$MAX_QUESTIONS" \
  --output_dir "$OUTPUT_DIR" --task_name "$TASK_NAME" $EXTRA_ARGS 2>&1 | tee -a "$LOG"
echo "[$(date)] done; log: $LOG" | tee -a "$LOG"
