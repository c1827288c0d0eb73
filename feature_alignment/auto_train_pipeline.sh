#!/usr/bin/env bash
# Train the hidden-state adapters L1..L5 in turn once extraction has finished, evaluating each.
#
#   mkdir -p results/logs && nohup bash feature_alignment/auto_train_pipeline.sh > results/logs/auto_train_pipeline.out 2>&1 &
#
# Waits until every index.json under TRAIN_DIR (and TEST_DIR, if set) says complete and no
# extract.lock is left (an extraction running elsewhere, e.g. under nohup), then for each level:
# train (resumable: a rerun continues where it stopped), evaluate offline on TEST_DIR and live
# on the dataset. Outputs go to results/feature_alignment/L<N>_<timestamp>/ (a rerun continues the
# newest unfinished one), logs to results/logs/.
# Override any variable from the environment, e.g. LEVELS="1 5" EPOCHS=20 bash ...
# Several GPUs: NUM_GPUS=4 trains each level with DDP under `accelerate launch --num_processes 4`
# (BATCH_SIZE stays the global batch); multi-node: NUM_GPUS = total processes over all machines plus
# ACCELERATE_ARGS="--num_machines 2 --machine_rank R --main_process_ip HOST --main_process_port 29500".
# Extraction with several GPUs (run before this script, it waits for it):
#   accelerate launch --num_processes 4 -m feature_alignment.extract_hidden_states --output_dir TRAIN_DIR ...
set -euo pipefail

# ---- paths and settings ---------------------------------------------------------------
REPO_DIR="${REPO_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
PYTHON="${PYTHON:-$REPO_DIR/.venv/bin/python}"
TRAIN_DIR="${TRAIN_DIR:-$REPO_DIR/data/feature_alignment/hidden/train}"
TEST_DIR="${TEST_DIR-$REPO_DIR/data/feature_alignment/hidden/test}"      # "" = no offline test evaluation
DATASET_DIR="${DATASET_DIR-}"                                       # "" = the default synthetic split
LIVE_SPLIT="${LIVE_SPLIT:-test}"
LIVE_MAX_QUESTIONS="${LIVE_MAX_QUESTIONS:-1}"                        # 1: one sample per clip (the clip's own question)
EVENTGPT_PATH="${EVENTGPT_PATH-}"                                   # "" = the default pair
VIDEOLLAVA_PATH="${VIDEOLLAVA_PATH-}"
TASKS_DIR="${TASKS_DIR:-$REPO_DIR/results/feature_alignment}"
LOG_DIR="${LOG_DIR:-$REPO_DIR/results/logs}"
LEVELS="${LEVELS:-1 2 3 4 5}"
EPOCHS="${EPOCHS:-50}"
BATCH_SIZE="${BATCH_SIZE:-64}"
LR="${LR:-1e-3}"
EARLY_STOPPING="${EARLY_STOPPING:-5}"
VAL_FRACTION="${VAL_FRACTION:-0.1}"
DEVICE="${DEVICE:-auto}"
NUM_GPUS="${NUM_GPUS:-1}"                                            # > 1: accelerate launch --num_processes
ACCELERATE_ARGS="${ACCELERATE_ARGS-}"                                # extra accelerate launch flags
QUANT="${QUANT-}"                                                   # "" = bf16 on CUDA, fp32 on CPU
LIVE_SAMPLES="${LIVE_SAMPLES:-20}"
GAMMA="${GAMMA:-5}"
MAX_NEW_TOKENS="${MAX_NEW_TOKENS:-50}"
POLL_SECONDS="${POLL_SECONDS:-60}"
WAIT_TIMEOUT_SECONDS="${WAIT_TIMEOUT_SECONDS:-0}"                    # 0 = wait forever
EXTRA_TRAIN_ARGS="${EXTRA_TRAIN_ARGS-}"
# -----------------------------------------------------------------------------------------

cd "$REPO_DIR"
mkdir -p "$LOG_DIR" "$TASKS_DIR"
log() { echo "[$(date '+%F %T')] $*" | tee -a "$LOG_DIR/pipeline.log"; }
trap 'log "stopped (signal)"; exit 143' TERM INT HUP

extraction_done() {  # $1 = extraction folder
  "$PYTHON" -c 'import sys; from feature_alignment.hidden_store import extraction_complete; sys.exit(0 if extraction_complete(sys.argv[1]) else 1)' "$1"
}

wait_for() {  # $1 = extraction folder
  local waited=0
  until extraction_done "$1"; do
    if [[ "$WAIT_TIMEOUT_SECONDS" -gt 0 && "$waited" -ge "$WAIT_TIMEOUT_SECONDS" ]]; then
      log "gave up waiting for $1 after ${waited}s"; exit 1
    fi
    log "waiting for extraction in $1 (index.json not complete or extract.lock present)"
    sleep "$POLL_SECONDS"; waited=$((waited + POLL_SECONDS))
  done
  log "extraction complete: $1"
}

run_module() {  # run_module MODULE ARGS...: plain python, or accelerate launch when NUM_GPUS > 1
  if [[ "$NUM_GPUS" -gt 1 ]]; then
    # shellcheck disable=SC2086  # ACCELERATE_ARGS is a list of flags
    "$PYTHON" -m accelerate.commands.launch --num_processes "$NUM_GPUS" $ACCELERATE_ARGS -m "$@"
  else
    "$PYTHON" -m "$@"
  fi
}

wait_for "$TRAIN_DIR"
[[ -n "$TEST_DIR" ]] && wait_for "$TEST_DIR"

model_args=()
[[ -n "$EVENTGPT_PATH" ]] && model_args+=(--eventgpt_path "$EVENTGPT_PATH")
[[ -n "$VIDEOLLAVA_PATH" ]] && model_args+=(--videollava_path "$VIDEOLLAVA_PATH")
[[ -n "$QUANT" ]] && model_args+=(--quant "$QUANT")
data_args=(--split "$LIVE_SPLIT" --max_questions "$LIVE_MAX_QUESTIONS")
[[ -n "$DATASET_DIR" ]] && data_args+=(--dataset_dir "$DATASET_DIR")

for level in $LEVELS; do
  log "L$level: training -> $TASKS_DIR/L${level}_<timestamp> (log $LOG_DIR/train_L$level.log)"
  test_args=()
  [[ -n "$TEST_DIR" ]] && test_args=(--test_dir "$TEST_DIR")
  # shellcheck disable=SC2086
  if ! run_module feature_alignment.train_hidden_adapter --train_dir "$TRAIN_DIR" --adapter_level "$level" \
      --results_dir "$TASKS_DIR" --task_name "L$level" --epochs "$EPOCHS" --batch_size "$BATCH_SIZE" --lr "$LR" \
      --early_stopping "$EARLY_STOPPING" --val_fraction "$VAL_FRACTION" --device "$DEVICE" \
      "${test_args[@]}" $EXTRA_TRAIN_ARGS >> "$LOG_DIR/train_L$level.log" 2>&1; then
    log "L$level: training FAILED (see $LOG_DIR/train_L$level.log); next level"; continue
  fi
  out="$(ls -td "$TASKS_DIR/L${level}_"*/ 2>/dev/null | head -n 1)"; out="${out%/}"
  log "L$level: evaluating -> $out/eval (log $LOG_DIR/eval_L$level.log)"
  eval_args=(--adapter "$out" --output_dir "$out/eval" --live_samples "$LIVE_SAMPLES" --gamma "$GAMMA"
             --max_new_tokens "$MAX_NEW_TOKENS" --device "$DEVICE" "${model_args[@]}" "${data_args[@]}")
  [[ -n "$TEST_DIR" ]] && eval_args+=(--hidden_dir "$TEST_DIR")
  if ! "$PYTHON" -m feature_alignment.evaluate_hidden_adapter "${eval_args[@]}" >> "$LOG_DIR/eval_L$level.log" 2>&1; then
    log "L$level: evaluation FAILED (see $LOG_DIR/eval_L$level.log)"; continue
  fi
  log "L$level: done ($out/RESULTS.md, $out/eval/RESULTS.md)"
done
log "all levels done: $LEVELS"
