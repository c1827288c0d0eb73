#!/usr/bin/env bash
# Token-alignment workflow: extract train and test token pairs, train the TokenAdapter, evaluate it
# teacher forced and live. ONE script does the work; run_1q/10q/full_workflow.sh only set variables.
#
#   mkdir -p results/logs && nohup bash token_alignment/run_10q_workflow.sh > results/logs/run_10q_workflow.out 2>&1 &     # log: results/logs/
#   MAX_QUESTIONS=10 DATASET_DIR=/data/dsec_1s EVENTGPT_PATH=/ckpt/EventGPT-7b \
#     VIDEOLLAVA_PATH=/ckpt/Video-LLaVA-7B-hf QUANT=4bit bash token_alignment/run_workflow.sh --star
#
# Every variable below can be set from the environment (relative paths are relative to the repository
# root); extra arguments go to train_and_evaluate.
# Resumable: rerun the same command after a kill. The synthetic dataset maker skips finished clips,
# extraction resumes where it stopped (and a second extraction of the same output waits for the
# first through OUTPUT.lock), training is skipped when a finished run is newer than its token files
# (FORCE_TRAIN=1 retrains).
# Several GPUs: NUM_GPUS=4 bash token_alignment/run_workflow.sh runs extraction and training under
# `accelerate launch --num_processes $NUM_GPUS` (one shard / one DDP rank per GPU); multi-node: NUM_GPUS is
# the total over all machines and ACCELERATE_ARGS="--num_machines 2 --machine_rank R --main_process_ip HOST
# --main_process_port 29500" goes to accelerate launch (run the same command on every machine).
set -euo pipefail

# The whole script is one function, parsed before it runs: editing this file while a run is in
# flight cannot derail that run.
main() {
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"

# ---- interpreter, models, data ------------------------------------------------------------------
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$REPO_ROOT/.venv/bin/python" ]]; then PYTHON="$REPO_ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
EVENTGPT_PATH="${EVENTGPT_PATH:-}"            # empty: the embedded default pair (common.defaults)
VIDEOLLAVA_PATH="${VIDEOLLAVA_PATH:-}"
QUANT="${QUANT:-}"                            # 4bit, 8bit, bf16, fp16, fp32; empty: bf16 on CUDA, fp32 on CPU
DEVICE="${DEVICE:-auto}"
NUM_GPUS="${NUM_GPUS:-1}"                     # > 1: accelerate launch --num_processes NUM_GPUS
ACCELERATE_ARGS="${ACCELERATE_ARGS:-}"        # extra accelerate launch flags (multi-node: --num_machines ...)
DATASET_DIR="${DATASET_DIR:-data/synthetic_token_alignment}"  # holds both splits (train and test)
TRAIN_SPLIT="${TRAIN_SPLIT:-train}"
TEST_SPLIT="${TEST_SPLIT:-test}"
# Synthetic data, generated when DATASET_DIR lacks a split and is synthetic (or does not exist yet).
SYNTH_TRAIN_CLIPS="${SYNTH_TRAIN_CLIPS:-40}"
SYNTH_TEST_CLIPS="${SYNTH_TEST_CLIPS:-12}"
SYNTH_WIDTH="${SYNTH_WIDTH:-320}"
SYNTH_HEIGHT="${SYNTH_HEIGHT:-240}"
SYNTH_SEED="${SYNTH_SEED:-1000}"

# ---- experiment ---------------------------------------------------------------------------------
MAX_QUESTIONS="${MAX_QUESTIONS:-1}"           # 1, 10 or 50 questions per clip
MAX_NEW_TOKENS="${MAX_NEW_TOKENS:-50}"
MAX_TRAIN_SAMPLES="${MAX_TRAIN_SAMPLES:-}"    # empty: all
MAX_TEST_SAMPLES="${MAX_TEST_SAMPLES:-}"
PARALLEL="${PARALLEL:-0}"                     # 1: both models loaded during extraction
EXTRACT_BATCH_SIZE="${EXTRACT_BATCH_SIZE:-1}"  # sequential extraction: samples answered together (e.g. 16 on a GPU)
EPOCHS="${EPOCHS:-50}"
EARLY_STOPPING="${EARLY_STOPPING:-10}"
BATCH_SIZE="${BATCH_SIZE:-32}"
D_MODEL="${D_MODEL:-256}"
N_LAYERS="${N_LAYERS:-4}"
LIVE_SAMPLES="${LIVE_SAMPLES:-20}"
GAMMA="${GAMMA:-5}"
TASK_NAME="${TASK_NAME:-tokens_${MAX_QUESTIONS}q}"
FORCE_TRAIN="${FORCE_TRAIN:-0}"

# ---- outputs ------------------------------------------------------------------------------------
TOKENS_DIR="${TOKENS_DIR:-data/token_alignment}"
TASK_ROOT="${TASK_ROOT:-results/token_alignment}"     # run folders <TASK_NAME>_<timestamp>/
LOG_DIR="${LOG_DIR:-results/logs}"

mkdir -p "$LOG_DIR" "$TOKENS_DIR"
LOG="$LOG_DIR/${TASK_NAME}_$(date +%Y%m%d_%H%M%S).log"
exec > >(tee -a "$LOG") 2>&1
say() { echo "[$(date '+%F %T')] $*"; }
say "workflow $TASK_NAME: MAX_QUESTIONS=$MAX_QUESTIONS DATASET_DIR=$DATASET_DIR PYTHON=$PYTHON log=$LOG"

MODEL_ARGS=(--device "$DEVICE")
run_module() {  # run_module MODULE ARGS...: plain python, or accelerate launch when NUM_GPUS > 1
  if [[ "$NUM_GPUS" -gt 1 ]]; then
    # shellcheck disable=SC2086  # ACCELERATE_ARGS is a list of flags
    "$PYTHON" -m accelerate.commands.launch --num_processes "$NUM_GPUS" $ACCELERATE_ARGS -m "$@"
  else
    "$PYTHON" -m "$@"
  fi
}
[[ -n "$EVENTGPT_PATH" ]] && MODEL_ARGS+=(--eventgpt_path "$EVENTGPT_PATH")
[[ -n "$VIDEOLLAVA_PATH" ]] && MODEL_ARGS+=(--videollava_path "$VIDEOLLAVA_PATH")
[[ -n "$QUANT" ]] && MODEL_ARGS+=(--quant "$QUANT")

# ---- 1. data --------------------------------------------------------------------------------------
has_split() {  # has_split DIR SPLIT -> 0 when the index lists that split
  "$PYTHON" - "$1" "$2" <<'PY'
import json, sys
from pathlib import Path
index = Path(sys.argv[1]) / "EventGPT_Instruction_Subset.json"
try:
    sys.exit(0 if any(e.get("split") == sys.argv[2] for e in json.loads(index.read_text())) else 1)
except (OSError, ValueError):
    sys.exit(1)
PY
}
for pair in "$TRAIN_SPLIT:$SYNTH_TRAIN_CLIPS" "$TEST_SPLIT:$SYNTH_TEST_CLIPS"; do
  split="${pair%%:*}"; clips="${pair##*:}"
  if ! has_split "$DATASET_DIR" "$split"; then
    if [[ -e "$DATASET_DIR/EventGPT_Instruction_Subset.json" && ! -d "$DATASET_DIR/ground_truth" ]]; then
      say "ERROR: $DATASET_DIR has no '$split' split and is not a synthetic dataset"; exit 1
    fi
    say "generating the synthetic $split split ($clips clips) in $DATASET_DIR"
    "$PYTHON" -m scripts.make_synthetic_dataset --output_dir "$DATASET_DIR" --split "$split" \
      --num_clips "$clips" --duration 1s --width "$SYNTH_WIDTH" --height "$SYNTH_HEIGHT" --seed "$SYNTH_SEED"
  fi
done

# ---- 2. token pairs (resumable; waits for a concurrent run of the same output) -------------------
# File names tell the dataset and the model pair apart (a file written by other checkpoints is refused).
DATA_NAME="$(basename "$DATASET_DIR")"
if [[ -z "${PAIR_TAG:-}" ]]; then
  if [[ -z "$EVENTGPT_PATH$VIDEOLLAVA_PATH" ]]; then PAIR_TAG=defaultpair
  else PAIR_TAG="pair$(printf '%s|%s' "$EVENTGPT_PATH" "$VIDEOLLAVA_PATH" | cksum | cut -d' ' -f1)"; fi
fi
TRAIN_TOKENS="$TOKENS_DIR/${DATA_NAME}_${PAIR_TAG}_${TRAIN_SPLIT}_${MAX_QUESTIONS}q_${MAX_NEW_TOKENS}t.jsonl"
TEST_TOKENS="$TOKENS_DIR/${DATA_NAME}_${PAIR_TAG}_${TEST_SPLIT}_${MAX_QUESTIONS}q_${MAX_NEW_TOKENS}t.jsonl"
extract() {  # extract SPLIT OUTPUT MAX_SAMPLES
  local args=(--dataset_dir "$DATASET_DIR" --split "$1" --max_questions "$MAX_QUESTIONS"
              --max_new_tokens "$MAX_NEW_TOKENS" --output_file "$2" "${MODEL_ARGS[@]}")
  [[ -n "$3" ]] && args+=(--max_samples "$3")
  [[ "$PARALLEL" == 1 ]] && args+=(--parallel)
  [[ "$EXTRACT_BATCH_SIZE" != 1 ]] && args+=(--batch_size "$EXTRACT_BATCH_SIZE")
  say "extracting $1 token pairs -> $2"
  run_module token_alignment.extract_tokens "${args[@]}"
}
extract "$TRAIN_SPLIT" "$TRAIN_TOKENS" "$MAX_TRAIN_SAMPLES"
extract "$TEST_SPLIT" "$TEST_TOKENS" "$MAX_TEST_SAMPLES"

# ---- 3. train, select on held-out train clips, evaluate on test (teacher forced + live) -----------
MARKER="$LOG_DIR/${TASK_NAME}.done"
if [[ "$FORCE_TRAIN" != 1 && -f "$MARKER" && "$MARKER" -nt "$TRAIN_TOKENS" && "$MARKER" -nt "$TEST_TOKENS" ]]; then
  say "training already done: $(cat "$MARKER") (FORCE_TRAIN=1 to redo)"
  exit 0
fi
say "training $TASK_NAME"
run_module token_alignment.train_and_evaluate --train_tokens "$TRAIN_TOKENS" --test_tokens "$TEST_TOKENS" \
  --task_name "$TASK_NAME" --output_dir "$TASK_ROOT" --dataset_dir "$DATASET_DIR" \
  --epochs "$EPOCHS" --early_stopping "$EARLY_STOPPING" --batch_size "$BATCH_SIZE" \
  --d_model "$D_MODEL" --n_layers "$N_LAYERS" --live_samples "$LIVE_SAMPLES" --gamma "$GAMMA" \
  "${MODEL_ARGS[@]}" "$@"
RUN_DIR="$(ls -td "$TASK_ROOT/${TASK_NAME}_"*/ 2>/dev/null | head -n 1)"
echo "${RUN_DIR%/}" > "$MARKER"
say "done: ${RUN_DIR%/} (RESULTS.md there); log $LOG"
}

main "$@"
