#!/usr/bin/env bash
# Parallel-prefill benchmark over the whole 1s split (see run_full_benchmark.sh for every setting).
#   nohup benchmark_parallel_prefill/run_full_1s_benchmark.sh > /dev/null 2>&1 &
DURATION=1s exec "$(dirname "$0")/run_full_benchmark.sh" "$@"
