python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
export PYTHONUNBUFFERED=1; T0=$(date +%s); R=$OUT; mkdir -p /tmp/m
nvidia-smi --query-gpu=index,name,driver_version --format=csv,noheader > /tmp/m/card.txt; nproc >> /tmp/m/card.txt; python3 -c "import torch,transformers,triton,bitsandbytes;print(torch.__version__,transformers.__version__,triton.__version__,bitsandbytes.__version__)" >> /tmp/m/card.txt 2>&1; git log --oneline -1 >> /tmp/m/card.txt 2>&1
twin() { # name data_dir extra...
  local n=$1 d=$2; shift 2
  timeout $((575 - $(date +%s) + T0)) python3 -m benchmark_parallel_prefill.twin_benchmark --shape 7b --twin_dir data/twin_7b --data_dir $d --output_dir results/twin_$n --drafters_json results/drafters/drafters.json --num_long 40 --num_short 20 --max_new_tokens 128 --num_workers 6 --drafters eagle --tree_topk 4 --tree_tokens 16 --num_free 0 --no_hf "$@" > /tmp/m/twin_$n.log 2>&1; echo "twin_$n rc $? $(( $(date +%s) - T0 ))s" >> $R/rc.txt
  cp results/twin_$n/twin_results.json $R/twin_$n.json 2>/dev/null; cp results/twin_$n/TWIN_RESULTS.md /tmp/m/TWIN_RESULTS_$n.md 2>/dev/null; }
(export CUDA_VISIBLE_DEVICES=1; timeout 330 python3 -m benchmark_inference.real_shape_benchmark --engine --models_dir /tmp/rs1 --engine_json $R/engine.json > /tmp/m/engine.log 2>&1; echo "engine rc $? $(( $(date +%s) - T0 ))s" >> $R/rc.txt
 timeout 80 python3 -m benchmark_inference.tree_verify_profile --models_dir /tmp/rs1 --fixed_step 16 --output_dir /tmp/m/tvp_random > /tmp/m/tvp_random.log 2>&1; echo "tvp_random rc $? $(( $(date +%s) - T0 ))s" >> $R/rc.txt
 timeout 150 python3 -m pytest -q -m gpu tests/ > /tmp/m/gpu_tests_f.log 2>&1; echo "testsF rc $? $(( $(date +%s) - T0 ))s" >> $R/rc.txt
 while [ ! -f results/drafters/drafters.json ] && [ $(( $(date +%s) - T0 )) -lt 400 ]; do sleep 5; done
 twin depth6 data/twin_data_b --tree_depth 6) &
(export CUDA_VISIBLE_DEVICES=0; (timeout 100 python3 -m scripts.widen_pair --output_dir data/twin_7b > /tmp/m/widen.log 2>&1; echo "widen rc $? $(( $(date +%s) - T0 ))s" >> $R/rc.txt) &
 timeout 300 bash scripts/train_drafters.sh data/drafter_data models results/drafters --device cuda --num_clips 300 --num_workers 16 > /tmp/m/train_drafters.log 2>&1; echo "drafters rc $? $(( $(date +%s) - T0 ))s" >> $R/rc.txt; wait
 twin full data/twin_data_a
 twin depth8 data/twin_data_a --tree_depth 8) &
wait; cp /tmp/m/tvp_random/results.json $R/tvp_random.json
(cd /tmp/m && tar czf $R/misc.tgz *.log card.txt TWIN_RESULTS_*.md tvp_*/profile_*.txt; cd $OLDPWD; find results -name records.jsonl | tar czf /tmp/m/rec.tgz -T - ; mv /tmp/m/rec.tgz $R/ 2>/dev/null)
cat $R/rc.txt /tmp/m/card.txt; tail -n 2 /tmp/m/gpu_tests_f.log; grep "^target\|^eagle" /tmp/m/tvp_*.log; python3 -c "
import json;d=json.load(open('$R/engine.json'));print({k:v for k,v in d.items() if 'eagle_tree' in k or k in ('tree_verify_over_decode','verify_over_decode_4bit_nf4_kernel_tc','decode_ms_per_token','verify_over_decode','eagle_c','prefill_ms','concurrent_prefill_slowdown','free_draft_tokens')})"
for n in full depth6 depth8; do python3 -c "
import json;d=json.load(open('$R/twin_$n.json'))
for k,v in d['sets'].items(): print('$n', k, {n:(round(r['speedup_measured'],3),round(r['speedup_std'],3),round(r['verify_ratio'],3),round(r['mean_accepted_length'],2),round(r['cost_ratio_c'],3),r['lossless_rate']) for n,r in v['drafters'].items()})"; done
ls -la $R
