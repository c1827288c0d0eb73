#!/usr/bin/env bash
# Retrain the shipped tiny pair with long answers on one GPU, then score it; one command.
#
#   OUT=/tmp/out bash scripts/retrain_pair_gpu.sh   # GPU: ~1 min data, MINUTES (4.7) training, eval cut to end by ~8.3 min
#   OUT=/tmp/x TRAIN_CLIPS=8 EVAL_CLIPS=2 BLIND_CLIPS=4 MINUTES=0.2 DEVICE=cpu bash scripts/retrain_pair_gpu.sh  # CPU smoke
#
# Steps: (1) synthetic data with --long_answers (the key-elements and two description questions answered
# in 50-170 tokens, the other 48 of the top 50 short; 51 questions asked per clip): TRAIN_CLIPS train clips
# (seed 0), and an eval folder with EVAL_CLIPS held-out test clips (seed 1000) plus BLIND_CLIPS train clips
# for the blind baseline; (2) scripts.train_tiny_pair from INIT (default models/) for MINUTES minutes
# (data loading and frame precompute included), float16, EventGPT's pixels normalised so the event frames'
# white background is 0 (EVENT_NORM=white; with CLIP's mean the draft's visual tokens barely vary);
# (3) scripts.evaluate_pair on the held-out clips (per group, per long-answer question: mean tokens,
# token agreement; draft vs blind); (4) copies
# OUT/pair/models/{eventgpt,videollava,train_tiny_pair.json}, the eval run folder and logs into OUT/pair;
# (5) OUT/pair/README_section.md (scripts.pair_report: issue 14's checks and the tables for models/README.md).
# The data writer encodes mp4 with PyAV: on a machine without it, put the `av` wheel in .whl/ (installed
# into /tmp/site here). EXTRA: more train_tiny_pair flags. Nothing outside WORK and OUT is written.
set -euo pipefail

PY=${PY:-python3}
OUT=${OUT:-results/retrain_pair}
WORK=${WORK:-data/retrain_pair}
MINUTES=${MINUTES:-4.7}
TRAIN_CLIPS=${TRAIN_CLIPS:-2500}
EVAL_CLIPS=${EVAL_CLIPS:-12}
HELDOUT_CLIPS=${HELDOUT_CLIPS:-24}
BLIND_CLIPS=${BLIND_CLIPS:-300}
WORKERS=${WORKERS:-$(nproc)}
DEVICE=${DEVICE:-auto}
INIT=${INIT:-models}
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-200}
EVAL_SECONDS=${EVAL_SECONDS:-110}
TOTAL_SECONDS=${TOTAL_SECONDS:-490}  # the evaluation is cut so that the whole run ends by then (+ ~20 s scoring)
EVENT_NORM=${EVENT_NORM:-white}  # train_tiny_pair --event_image_norm: white = event frames' background is 0
EXTRA=${EXTRA:-}
NQ=51  # the top 50 + "What happened in this clip?" (DIR/top50_questions.json of --long_answers datasets)

start=$(date +%s)
stamp() { echo "[retrain_pair $(( $(date +%s) - start ))s] $*" >&2; }
mkdir -p "$OUT/pair" "$WORK"
export PYTHONUNBUFFERED=1

if ! "$PY" -c "import av" 2>/dev/null; then
  if ls .whl/av-*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/av-*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  else
    echo "retrain_pair_gpu.sh: PyAV is missing; put the av wheel in .whl/ (or pip install av) and rerun" >&2
    exit 2
  fi
fi

stamp "data: $TRAIN_CLIPS train clips, $EVAL_CLIPS+$HELDOUT_CLIPS test clips, $BLIND_CLIPS blind clips, $WORKERS workers"
gen() { "$PY" -m scripts.make_synthetic_dataset --width 320 --height 240 --num_workers "$WORKERS" --long_answers "$@" \
          > "$OUT/pair/data_$(basename "$2")_$4.json" 2>> "$OUT/pair/data.log"; }
gen --output_dir "$WORK/train" --split train --num_clips "$TRAIN_CLIPS" --seed 0
ntest=$(( EVAL_CLIPS > HELDOUT_CLIPS ? EVAL_CLIPS : HELDOUT_CLIPS ))
gen --output_dir "$WORK/eval" --split test --num_clips "$ntest" --seed 1000
gen --output_dir "$WORK/eval" --split train --num_clips "$BLIND_CLIPS" --seed 0
stamp "data done"

# shellcheck disable=SC2086
"$PY" -m scripts.train_tiny_pair --dataset_dir "$WORK/train" --split train --max_questions $NQ \
  --eval_dataset_dir "$WORK/eval" --eval_split test --eval_max_clips "$HELDOUT_CLIPS" \
  --output_dir "$WORK/pair" --init_from "$INIT" --epochs 0 --max_minutes "$MINUTES" --questions_per_clip 4 \
  --lr_warmup_steps 50 --num_workers "$WORKERS" --save_dtype float16 --no_resume --device "$DEVICE" --event_image_norm "$EVENT_NORM" $EXTRA \
  2> "$OUT/pair/train.log" > /dev/null
stamp "training done"

mkdir -p "$OUT/pair/models"
cp -r "$WORK/pair/eventgpt" "$WORK/pair/videollava" "$WORK/pair/train_tiny_pair.json" "$OUT/pair/models/"
du -sb "$OUT/pair/models" | awk '{printf "models/ size: %.1f MB\n", $1 / 1e6}' | tee "$OUT/pair/models_size.txt" >&2

evaluate() {  # evaluate N [time-out prefix...]
  local n=$1; shift
  "$@" "$PY" -m scripts.evaluate_pair --dataset_dir "$WORK/eval" --split test --max_questions $NQ \
    --max_samples "$n" --max_new_tokens "$MAX_NEW_TOKENS" --device "$DEVICE" --quant fp32 \
    --eventgpt_path "$WORK/pair/eventgpt" --videollava_path "$WORK/pair/videollava" \
    --output_dir "$WORK/results" --task_name retrain_pair
}
left=$(( TOTAL_SECONDS - ($(date +%s) - start) ))
EVAL_SECONDS=$(( left < EVAL_SECONDS ? (left > 20 ? left : 20) : EVAL_SECONDS ))
stamp "evaluation: at most $EVAL_SECONDS s"
# Time-boxed (records are written as they finish); if it is cut, the rerun resumes and scores what it finished.
if ! evaluate $(( EVAL_CLIPS * NQ )) timeout "$EVAL_SECONDS" > "$OUT/pair/eval_table.md" 2> "$OUT/pair/eval.log"; then
  records=$( (ls -td "$WORK"/results/retrain_pair_*/ 2>/dev/null || true) | head -1)records.jsonl
  done_n=$(cat "$records" 2>/dev/null | wc -l)
  stamp "evaluation cut at ${EVAL_SECONDS}s after $done_n samples: scoring those"
  if [ "$done_n" -gt 0 ]; then evaluate "$done_n" > "$OUT/pair/eval_table.md" 2>> "$OUT/pair/eval.log" || true; fi
fi
cp -r "$WORK"/results/retrain_pair_* "$OUT/pair/" 2>/dev/null || true
results=$( (ls -td "$WORK"/results/retrain_pair_*/ 2>/dev/null || true) | head -1)results.json
if [ -f "$results" ]; then  # the checks of issue 14 and the tables, ready for models/README.md
  "$PY" -m scripts.pair_report --results "$results" --models_dir "$OUT/pair/models" > "$OUT/pair/README_section.md" \
    2>> "$OUT/pair/eval.log" || true
fi
stamp "done: $OUT/pair (models/, README_section.md, train.log, eval_table.md, evaluate_pair run folder)"
cat "$OUT/pair/README_section.md" 2>/dev/null || cat "$OUT/pair/eval_table.md"
