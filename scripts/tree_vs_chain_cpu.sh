#!/usr/bin/env bash
# Draft trees vs the chain at equal verify cost (6 verified rows) on the shipped pair, on the CPU:
#   scripts/tree_vs_chain_cpu.sh [OUT_DIR (default results/tree_vs_chain)] [NUM_TEST (default 40)]
# Trains a small EAGLE head for models/ (16 long-answer clips, 120 samples, 30 epochs), then runs the same
# held-out clips with the chain (gamma 5) and with EAGLE-2 trees of 6 nodes (topk 2 and 4). Steps that
# finished are reused when rerun. Compare mean accepted length and lossless rate in OUT_DIR/{chain,topk2,topk4}.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-results/tree_vs_chain} num_test=${2:-40}
py=${PYTHON:-python3}
[[ -d $out/train ]] || $py -m scripts.make_synthetic_dataset --output_dir "$out/train" --num_clips 16 --split train \
    --seed 7 --long_answers
[[ -d $out/test ]] || $py -m scripts.make_synthetic_dataset --output_dir "$out/test" --num_clips "$num_test" \
    --split test --seed 1000 --long_answers
$py -m feature_alignment.extract_hidden_states --dataset_dir "$out/train" --split train --output_dir "$out/hidden" \
    --device cpu --max_new_tokens 40 --layers=-1 --max_questions 10 --max_samples 120 --batch_size 8
[[ -f $out/head/config.json ]] || $py -m feature_alignment.train_eagle_head --train_dir "$out/hidden" \
    --output_dir "$out/head" --epochs 30 --device cpu
for run in "chain:" "topk2:--tree_topk 2 --tree_tokens 6" "topk4:--tree_topk 4 --tree_tokens 6"; do
  name=${run%%:*} flags=${run#*:}
  # shellcheck disable=SC2086  # flags are split on purpose
  $py -m benchmark_inference.benchmark_inference --dataset_dir "$out/test" --split test --max_samples "$num_test" \
      --max_new_tokens 40 --device cpu --drafter eagle --eagle_head "$out/head" --max_questions 51 --gamma 5 \
      $flags --output_dir "$out/$name"
done
