#!/usr/bin/env bash
# Train the TokenAdapter, hidden adapters L1 and L5 and the EAGLE head of a small pair (scripts.train_drafters):
#   scripts/train_drafters.sh DATA_DIR PAIR_DIR OUT_DIR [--device cuda --num_clips 160 ...]
# PAIR_DIR holds eventgpt/ and videollava/ (e.g. models). OUT_DIR/drafters.json then feeds the twin benchmark:
#   scripts/run_twin_benchmark.sh --drafters_json OUT_DIR/drafters.json
set -euo pipefail
if [[ $# -lt 3 ]]; then
  echo "usage: scripts/train_drafters.sh DATA_DIR PAIR_DIR OUT_DIR [flags of python -m scripts.train_drafters]" >&2
  exit 2
fi
data_dir=$1 pair_dir=$2 out_dir=$3
shift 3
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" -m scripts.train_drafters --data_dir "$data_dir" --pair_dir "$pair_dir" \
    --output_dir "$out_dir" "$@"
