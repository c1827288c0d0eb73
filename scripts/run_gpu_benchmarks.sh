#!/usr/bin/env bash
# The GPU measurements of docs/PERFORMANCE.md that are not a single command, by step name:
#
#   bash scripts/run_gpu_benchmarks.sh [STEP ...]        (default: every step in order)
#
#   gpu_tests       pytest -m gpu (graph decoding, batched greedy graph == eager)
#   extraction      feature_alignment.benchmark_extraction at 7B shapes (one GPU, batch sizes)
#   models          real-shape random-weight 7B checkpoints into $MODELS (skipped when present)
#   prefill_2gpu    benchmark_parallel_prefill on one GPU (streams) and on two GPUs (one model each)
#   scaling         extract_hidden_states on 1 GPU, then on $NUM_GPUS GPUs via accelerate launch
#
# Settings (environment): DATASET (a synthetic split; make one with scripts.make_synthetic_dataset),
# MODELS (default /tmp/real_shape_models), RESULTS (default results/gpu_runs), NUM_GPUS (default 2),
# QUANT (default bf16), MAX_QUESTIONS (default 50), BATCH_SIZE (default 16).
set -euo pipefail
cd "$(dirname "$0")/.."

DATASET=${DATASET:-data/synthetic_default/test}
MODELS=${MODELS:-/tmp/real_shape_models}
RESULTS=${RESULTS:-results/gpu_runs}
NUM_GPUS=${NUM_GPUS:-2}
QUANT=${QUANT:-bf16}
MAX_QUESTIONS=${MAX_QUESTIONS:-50}
BATCH_SIZE=${BATCH_SIZE:-16}
PYTHON=${PYTHON:-python}
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
mkdir -p "$RESULTS"
STEPS=("$@")
[ ${#STEPS[@]} -eq 0 ] && STEPS=(gpu_tests extraction models prefill_2gpu scaling)

step() { echo "=== $(date -u +%H:%M:%S) $*"; }
pair_args=(--eventgpt_path "$MODELS/eventgpt" --videollava_path "$MODELS/videollava" --quant "$QUANT")

for s in "${STEPS[@]}"; do
  case "$s" in
    gpu_tests)
      step "gpu tests"
      $PYTHON -m pytest -q -m gpu tests/test_gpu.py 2>&1 | tail -15 ;;
    extraction)
      step "extraction throughput, one GPU"
      $PYTHON -m feature_alignment.benchmark_extraction --output_dir "$RESULTS/extraction" ;;
    models)
      step "real-shape checkpoints -> $MODELS"
      $PYTHON -c "from common.models.real_shape import write_real_shape_pair as w; print(w('$MODELS'))" ;;
    prefill_2gpu)
      for devices in "cuda:0 cuda:0" "cuda:1 cuda:0"; do
        set -- $devices
        step "parallel prefill: draft $1, target $2"
        $PYTHON -m benchmark_parallel_prefill.benchmark_parallel_prefill --dataset_dir "$DATASET" "${pair_args[@]}" \
          --max_samples 4 --max_new_tokens 50 --gamma 5 --draft_device "$1" --target_device "$2" \
          --output_dir "$RESULTS/parallel_prefill" --task_name "draft_${1/:/}_target_${2/:/}" --no_resume \
          2>&1 | tee "$RESULTS/prefill_${1/:/}_${2/:/}.log" | tail -25
      done ;;
    scaling)
      for n in 1 "$NUM_GPUS"; do
        out="$RESULTS/scaling/gpus_$n"
        mkdir -p "$RESULTS/scaling"
        rm -rf "$out"
        step "extract_hidden_states on $n GPU(s) -> $out"
        launch=("$PYTHON" -m)
        [ "$n" -gt 1 ] && launch=("$PYTHON" -m accelerate.commands.launch --num_processes "$n" --num_machines 1
                                  --mixed_precision no --dynamo_backend no -m)
        "${launch[@]}" feature_alignment.extract_hidden_states --dataset_dir "$DATASET" "${pair_args[@]}" \
          --max_questions "$MAX_QUESTIONS" --batch_size "$BATCH_SIZE" --chunk_size 200 --output_dir "$out" \
          > "$out.log" 2>&1 || { tail -30 "$out.log"; exit 1; }
        grep -E "^\{|samples/s" "$out.log" | tail -6
      done ;;
    *) echo "unknown step $s (see the header of $0)"; exit 2 ;;
  esac
done
