#!/usr/bin/env bash
# Parallel-prefill benchmark over the whole 500ms split (see run_full_benchmark.sh for every setting).
#   mkdir -p results/logs && nohup benchmark_parallel_prefill/run_full_500ms_benchmark.sh > results/logs/run_full_500ms_benchmark.out 2>&1 &
DURATION=500ms exec "$(dirname "$0")/run_full_benchmark.sh" "$@"
