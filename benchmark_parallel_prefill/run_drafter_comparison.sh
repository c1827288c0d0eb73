#!/usr/bin/env bash
# Drafter baselines end to end: extract the target's features -> train the EAGLE head -> compare every drafter.
#
#   mkdir -p results/logs && nohup bash benchmark_parallel_prefill/run_drafter_comparison.sh > results/logs/run_drafter_comparison.out 2>&1 &
#
# 1. feature_alignment.extract_hidden_states on TRAIN_DATASET_DIR (split TRAIN_SPLIT) into HIDDEN_DIR
#    (resumable: a rerun continues the extraction; skipped when it is already complete);
# 2. feature_alignment.train_eagle_head into HEAD_DIR (resumes from HEAD_DIR/last; skipped when
#    HEAD_DIR/results.json exists, unless RETRAIN=1);
# 3. benchmark_parallel_prefill.compare_drafters on DATASET_DIR (split TEST_SPLIT) with the head, the
#    TokenAdapter (if found or given) and the hidden adapters in HIDDEN_ADAPTERS (resumable per
#    drafter and sample under the same TASK_NAME).
# Every setting is a variable below; override from the environment, e.g. MAX_SAMPLES=50 QUANT=4bit bash ...
set -euo pipefail

# ---- paths and settings ---------------------------------------------------------------
REPO_DIR="${REPO_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
PYTHON="${PYTHON:-$REPO_DIR/.venv/bin/python}"
TRAIN_DATASET_DIR="${TRAIN_DATASET_DIR-}"                 # "" = a synthetic train split made once (the default
                                                          #      world settings): set a real train split for real runs
TRAIN_SPLIT="${TRAIN_SPLIT:-train}"
SYNTHETIC_TRAIN_DIR="${SYNTHETIC_TRAIN_DIR:-$REPO_DIR/data/synthetic_train_default}"
SYNTHETIC_TRAIN_CLIPS="${SYNTHETIC_TRAIN_CLIPS:-40}"
DATASET_DIR="${DATASET_DIR-}"                             # "" = the default synthetic split
TEST_SPLIT="${TEST_SPLIT-}"                               # "" = every split of DATASET_DIR
EVENTGPT_PATH="${EVENTGPT_PATH-}"                         # "" = the default pair
VIDEOLLAVA_PATH="${VIDEOLLAVA_PATH-}"
QUANT="${QUANT-}"                                         # "" = bf16 on CUDA, fp32 on CPU
DEVICE="${DEVICE:-auto}"
HIDDEN_DIR="${HIDDEN_DIR:-$REPO_DIR/data/feature_alignment/hidden/eagle_train}"
FEATURE_LAYER="${FEATURE_LAYER:--1}"
MAX_QUESTIONS="${MAX_QUESTIONS:-10}"
EXTRACT_MAX_SAMPLES="${EXTRACT_MAX_SAMPLES-}"             # "" = all
HEAD_DIR="${HEAD_DIR:-$REPO_DIR/results/feature_alignment/eagle_head}"
EPOCHS="${EPOCHS:-20}"
LR="${LR:-3e-4}"
BATCH_SIZE="${BATCH_SIZE:-16}"
EARLY_STOPPING="${EARLY_STOPPING:-5}"
RETRAIN="${RETRAIN:-0}"
TOKEN_ADAPTER_PATH="${TOKEN_ADAPTER_PATH-}"               # "" = the newest under results/token_alignment; "none" = skip
HIDDEN_ADAPTERS="${HIDDEN_ADAPTERS-}"                     # e.g. results/feature_alignment/L1_<timestamp>,results/feature_alignment/L5_<timestamp> (named by level)
POOL="${POOL:-2}"
MAX_SAMPLES="${MAX_SAMPLES:-20}"
GAMMA="${GAMMA:-5}"
MAX_NEW_TOKENS="${MAX_NEW_TOKENS:-50}"
HARNESS="${HARNESS:-parallel}"
OUTPUT_DIR="${OUTPUT_DIR:-$REPO_DIR/results/benchmark_parallel_prefill}"
TASK_NAME="${TASK_NAME:-compare_drafters}"
LOG_DIR="${LOG_DIR:-$REPO_DIR/results/logs}"
# -----------------------------------------------------------------------------------------

cd "$REPO_DIR"
mkdir -p "$LOG_DIR"
LOG="$LOG_DIR/drafter_comparison_$(date +%Y%m%d_%H%M%S).log"
log() { echo "[$(date '+%F %T')] $*" | tee -a "$LOG"; }
trap 'log "stopped (signal)"; exit 143' TERM INT HUP

opt() {  # opt FLAG VALUE: print "FLAG VALUE" only when VALUE is non-empty
  if [[ -n "$2" ]]; then printf '%s\n%s\n' "$1" "$2"; fi
}

MODEL_ARGS=()
while IFS= read -r a; do MODEL_ARGS+=("$a"); done < <(opt --eventgpt_path "$EVENTGPT_PATH"; opt --videollava_path "$VIDEOLLAVA_PATH"; opt --quant "$QUANT")

# ---- 0. a train split (only when none is given) ---------------------------------------------
if [[ -z "$TRAIN_DATASET_DIR" ]]; then
  TRAIN_DATASET_DIR="$SYNTHETIC_TRAIN_DIR"
  if [[ ! -f "$TRAIN_DATASET_DIR/EventGPT_Instruction_Subset.json" ]]; then
    log "making a synthetic train split in $TRAIN_DATASET_DIR ($SYNTHETIC_TRAIN_CLIPS clips)"
    "$PYTHON" -m scripts.make_synthetic_dataset --output_dir "$TRAIN_DATASET_DIR" --num_clips "$SYNTHETIC_TRAIN_CLIPS" \
      --duration 1s --split train --seed 0 --width 320 --height 240 2>&1 | tee -a "$LOG"
  fi
fi

# ---- 1. extraction ------------------------------------------------------------------------
if "$PYTHON" -c 'import sys; from feature_alignment.hidden_store import extraction_complete; sys.exit(0 if extraction_complete(sys.argv[1]) else 1)' "$HIDDEN_DIR"; then
  log "extraction already complete: $HIDDEN_DIR"
else
  log "extracting the target's features into $HIDDEN_DIR"
  EXTRACT_ARGS=(--split "$TRAIN_SPLIT" --output_dir "$HIDDEN_DIR" --layers="$FEATURE_LAYER" --max_questions "$MAX_QUESTIONS"
                --max_new_tokens "$MAX_NEW_TOKENS" --device "$DEVICE" "${MODEL_ARGS[@]}")
  while IFS= read -r a; do EXTRACT_ARGS+=("$a"); done < <(opt --dataset_dir "$TRAIN_DATASET_DIR"; opt --max_samples "$EXTRACT_MAX_SAMPLES")
  "$PYTHON" -m feature_alignment.extract_hidden_states "${EXTRACT_ARGS[@]}" 2>&1 | tee -a "$LOG"
fi

# ---- 2. EAGLE head ------------------------------------------------------------------------
if [[ -f "$HEAD_DIR/results.json" && "$RETRAIN" != "1" ]]; then
  log "EAGLE head already trained: $HEAD_DIR (RETRAIN=1 to train again)"
else
  log "training the EAGLE head into $HEAD_DIR"
  TRAIN_ARGS=(--train_dir "$HIDDEN_DIR" --output_dir "$HEAD_DIR" --feature_layer="$FEATURE_LAYER" --epochs "$EPOCHS"
              --lr "$LR" --batch_size "$BATCH_SIZE" --early_stopping "$EARLY_STOPPING" --device "$DEVICE")
  while IFS= read -r a; do TRAIN_ARGS+=("$a"); done < <(opt --videollava_path "$VIDEOLLAVA_PATH")
  "$PYTHON" -m feature_alignment.train_eagle_head "${TRAIN_ARGS[@]}" 2>&1 | tee -a "$LOG"
fi

# ---- 3. comparison ------------------------------------------------------------------------
log "comparing drafters on ${DATASET_DIR:-the default split} ($MAX_SAMPLES samples)"
COMPARE_ARGS=(--eagle_head "$HEAD_DIR" --pool "$POOL" --max_samples "$MAX_SAMPLES" --gamma "$GAMMA"
              --max_new_tokens "$MAX_NEW_TOKENS" --harness "$HARNESS" --device "$DEVICE" --output_dir "$OUTPUT_DIR"
              --task_name "$TASK_NAME" "${MODEL_ARGS[@]}")
while IFS= read -r a; do COMPARE_ARGS+=("$a"); done < <(opt --dataset_dir "$DATASET_DIR"; opt --split "$TEST_SPLIT"; opt --token_adapter "$TOKEN_ADAPTER_PATH"; opt --hidden_adapter "$HIDDEN_ADAPTERS")
"$PYTHON" -m benchmark_parallel_prefill.compare_drafters "${COMPARE_ARGS[@]}" 2>&1 | tee -a "$LOG"
log "done; RESULTS.md under $OUTPUT_DIR/${TASK_NAME}_*"
