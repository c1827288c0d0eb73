#!/usr/bin/env bash
# Parallel-prefill benchmark over the whole 1s split (see run_full_benchmark.sh for every setting).
#   mkdir -p results/logs && nohup benchmark_parallel_prefill/run_full_1s_benchmark.sh > results/logs/run_full_1s_benchmark.out 2>&1 &
DURATION=1s exec "$(dirname "$0")/run_full_benchmark.sh" "$@"
