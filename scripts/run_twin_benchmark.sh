#!/usr/bin/env bash
# The 7B twin on one GPU: data, widening (skipped when data/twin_7b is complete), every drafter vs our target
# alone and HF generate. Results go to $OUT/twin when OUT is set (the device machine), else results/twin.
# Extra flags go to the benchmark, e.g.
#   scripts/run_twin_benchmark.sh --num_short 40 --num_long 50 --num_free 8
#   scripts/run_twin_benchmark.sh --drafters_json results/drafters/drafters.json --tree_topk 4 --tree_tokens 16
#   (trained drafters of the pair: or --token_adapter P --hidden_adapter P1,P5 --eagle_head P)
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" -m benchmark_parallel_prefill.twin_benchmark --shape 7b --twin_dir data/twin_7b \
    --data_dir data/twin_data --output_dir "${OUT:-results}/twin" "$@"
