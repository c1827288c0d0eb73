#!/usr/bin/env bash
# The GPU measurements of docs/PERFORMANCE.md that are not a single command, by step name:
#
#   bash scripts/run_gpu_benchmarks.sh [STEP ...]        (default: every step in order)
#
#   gpu_tests       pytest -m gpu (graph decoding, batched greedy graph == eager)
#   extraction      feature_alignment.benchmark_extraction at 7B shapes (one GPU, batch sizes)
#   models          real-shape random-weight 7B checkpoints into $MODELS (skipped when present)
#   prefill_2gpu    benchmark_parallel_prefill on one GPU (streams) and on two GPUs (one model each), with
#                   graphed and with eager vision towers (PREFILL_VISION="graph eager")
#   scaling         extract_hidden_states on 1 GPU, then on $NUM_GPUS GPUs via accelerate launch
#   ddp             DDP training over NCCL, 1 vs $NUM_GPUS GPUs (tiny default pair, hidden adapter L1 and
#                   the TokenAdapter): prints both loss curves
#
# Settings (environment): DATASET (a synthetic split; make one with scripts.make_synthetic_dataset),
# TRAIN_DATASET (a train split, for ddp; default data/synthetic_default/train),
# MODELS (default /tmp/real_shape_models), RESULTS (default results/gpu_runs), NUM_GPUS (default 2),
# QUANT (default bf16), MAX_QUESTIONS (default 50), BATCH_SIZE (default 16).
set -euo pipefail
cd "$(dirname "$0")/.."

DATASET=${DATASET:-data/synthetic_default/test}
TRAIN_DATASET=${TRAIN_DATASET:-data/synthetic_default/train}
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
launcher() {  # launcher N: the command prefix that runs a module on N GPUs
  if [ "$1" -gt 1 ]; then
    echo "$PYTHON -m accelerate.commands.launch --num_processes $1 --num_machines 1 --mixed_precision no --dynamo_backend no -m"
  else
    echo "$PYTHON -m"
  fi
}
curve() {  # curve JSON KEY...: one line per epoch of a history list (or of a results file's "history")
  $PYTHON - "$@" <<'PY'
import json, sys
data = json.load(open(sys.argv[1]))
for h in data["history"] if isinstance(data, dict) else data:
    print(" ".join(f"{k}={h.get(k)}" for k in ["epoch", *sys.argv[2:]]))
PY
}
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
      for vision in ${PREFILL_VISION:-graph eager}; do
        for devices in "cuda:0 cuda:0" "cuda:1 cuda:0"; do
          set -- $devices
          name="draft_${1/:/}_target_${2/:/}_${vision}_vision"
          step "parallel prefill: draft $1, target $2, $vision vision towers"
          flag=(); [ "$vision" = eager ] && flag=(--eager_vision)
          $PYTHON -m benchmark_parallel_prefill.benchmark_parallel_prefill --dataset_dir "$DATASET" "${pair_args[@]}" \
            --max_samples 4 --max_new_tokens 50 --gamma 5 --draft_device "$1" --target_device "$2" "${flag[@]}" \
            --output_dir "$RESULTS/parallel_prefill" --task_name "$name" --no_resume > "$RESULTS/$name.log" 2>&1 \
            || { tail -30 "$RESULTS/$name.log"; exit 1; }
          grep "^results:" "$RESULTS/$name.log"
        done
      done ;;
    scaling)
      for n in 1 "$NUM_GPUS"; do
        out="$RESULTS/scaling/gpus_$n"
        mkdir -p "$RESULTS/scaling"
        rm -rf "$out"
        step "extract_hidden_states on $n GPU(s) -> $out"
        $(launcher "$n") feature_alignment.extract_hidden_states --dataset_dir "$DATASET" "${pair_args[@]}" \
          --max_questions "$MAX_QUESTIONS" --batch_size "$BATCH_SIZE" --chunk_size 200 --output_dir "$out" \
          > "$out.log" 2>&1 || { tail -30 "$out.log"; exit 1; }
        grep -E "^\{|samples/s" "$out.log" | tail -6
      done ;;
    ddp)
      d="$RESULTS/ddp"
      rm -rf "$d"; mkdir -p "$d"
      step "DDP: tiny-pair hidden states and tokens of $TRAIN_DATASET"
      $PYTHON -m feature_alignment.extract_hidden_states --dataset_dir "$TRAIN_DATASET" --max_questions 10 \
        --output_dir "$d/hidden" > "$d/extract.log" 2>&1 || { tail -20 "$d/extract.log"; exit 1; }
      for k in 0 1; do
        $PYTHON -m token_alignment.extract_tokens --dataset_dir "$TRAIN_DATASET" --max_questions 10 --num_chunks 2 \
          --chunk_idx $k --output_file "$d/tokens_$k.jsonl" >> "$d/extract.log" 2>&1 || { tail -20 "$d/extract.log"; exit 1; }
      done
      for n in 1 "$NUM_GPUS"; do
        step "train_hidden_adapter L1 on $n GPU(s)"
        $(launcher "$n") feature_alignment.train_hidden_adapter --train_dir "$d/hidden" --adapter_level 1 \
          --epochs 3 --batch_size 8 --early_stopping 0 --no_resume --output_dir "$d/L1_gpus_$n" \
          > "$d/L1_gpus_$n.log" 2>&1 || { tail -30 "$d/L1_gpus_$n.log"; exit 1; }
        curve "$d/L1_gpus_$n/history.json" train_loss val_loss val_cos
        step "token_alignment.train_and_evaluate on $n GPU(s)"
        $(launcher "$n") token_alignment.train_and_evaluate --train_tokens "$d/tokens_0.jsonl" \
          --test_tokens "$d/tokens_1.jsonl" --epochs 3 --early_stopping 0 --live_samples 0 \
          --output_dir "$d/tokens_gpus_$n" --task_name tokens > "$d/tokens_gpus_$n.log" 2>&1 \
          || { tail -30 "$d/tokens_gpus_$n.log"; exit 1; }
        curve "$(find "$d/tokens_gpus_$n" -name results.json | head -1)" train_loss val_loss val_top1
      done ;;
    *) echo "unknown step $s (see the header of $0)"; exit 2 ;;
  esac
done
