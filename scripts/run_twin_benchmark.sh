#!/usr/bin/env bash
# The 7B twin on one GPU: data, widening (skipped when data/twin_7b is complete), every drafter that
# needs no training vs our target alone and HF generate. Extra flags go to the benchmark, e.g.
#   scripts/run_twin_benchmark.sh --num_short 40 --num_long 50 --num_free 8
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" -m benchmark_parallel_prefill.twin_benchmark --shape 7b --twin_dir data/twin_7b \
    --data_dir data/twin_data --output_dir results/twin "$@"
