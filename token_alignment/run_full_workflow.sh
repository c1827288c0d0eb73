#!/usr/bin/env bash
# Token-alignment workflow at full scale: all 50 questions per clip, every sample, a longer live
# evaluation; all the work is in run_workflow.sh (see its variables). Extra arguments go to training.
#   mkdir -p results/logs && nohup bash token_alignment/run_full_workflow.sh > results/logs/run_full_workflow.out 2>&1 &
export MAX_QUESTIONS="${MAX_QUESTIONS:-50}"
export LIVE_SAMPLES="${LIVE_SAMPLES:-100}"
exec bash "$(dirname "${BASH_SOURCE[0]}")/run_workflow.sh" "$@"
