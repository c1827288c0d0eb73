#!/usr/bin/env bash
# Token-alignment workflow with 1 question(s) per clip; all the work is in run_workflow.sh (see its
# variables: DATASET_DIR, EVENTGPT_PATH, VIDEOLLAVA_PATH, PYTHON, ...). Extra arguments go to training.
#   mkdir -p results/logs && nohup bash token_alignment/run_1q_workflow.sh > results/logs/run_1q_workflow.out 2>&1 &
export MAX_QUESTIONS="${MAX_QUESTIONS:-1}"
exec bash "$(dirname "${BASH_SOURCE[0]}")/run_workflow.sh" "$@"
