python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
export PYTHONUNBUFFERED=1; T0=$(date +%s); R=$OUT; mkdir -p /tmp/m
nvidia-smi --query-gpu=index,name,driver_version --format=csv,noheader > /tmp/m/card.txt; python3 -c "import torch,transformers,triton,bitsandbytes;print(torch.__version__,transformers.__version__,triton.__version__,bitsandbytes.__version__)" >> /tmp/m/card.txt 2>&1
(export CUDA_VISIBLE_DEVICES=0; timeout 330 python3 -m benchmark_inference.real_shape_benchmark --engine --models_dir /tmp/rs1 --engine_json $R/engine.json > /tmp/m/engine.log 2>&1; echo "engine rc $? $(( $(date +%s) - T0 ))s" >> $R/rc.txt
 timeout 80 python3 -m benchmark_inference.tree_verify_profile --models_dir /tmp/rs1 --fixed_step 16 --output_dir /tmp/m/tvp_random > /tmp/m/tvp_random.log 2>&1; echo "tvp_random rc $? $(( $(date +%s) - T0 ))s" >> $R/rc.txt
 timeout $((565 - $(date +%s) + T0)) python3 -m pytest -q -m gpu tests/ > $R/gpu_tests_d.log 2>&1; echo "testsD rc $? $(( $(date +%s) - T0 ))s" >> $R/rc.txt) &
(export CUDA_VISIBLE_DEVICES=1; (timeout 100 python3 -m scripts.widen_pair --output_dir data/twin_7b > /tmp/m/widen.log 2>&1; echo "widen rc $? $(( $(date +%s) - T0 ))s" >> $R/rc.txt) &
 timeout 300 bash scripts/train_drafters.sh data/drafter_data models results/drafters --device cuda --num_clips 300 --num_workers 16 > /tmp/m/train_drafters.log 2>&1; echo "drafters rc $? $(( $(date +%s) - T0 ))s" >> $R/rc.txt; wait
 timeout 60 python3 -m benchmark_inference.tree_verify_profile --videollava_path data/twin_7b/videollava --fixed_step 16 --output_dir /tmp/m/tvp_twin > /tmp/m/tvp_twin.log 2>&1; echo "tvp_twin rc $? $(( $(date +%s) - T0 ))s" >> $R/rc.txt
 timeout $((560 - $(date +%s) + T0)) python3 -m benchmark_parallel_prefill.twin_benchmark --shape 7b --twin_dir data/twin_7b --data_dir data/twin_data_t --output_dir results/twin_t --drafters_json results/drafters/drafters.json --num_long 40 --num_short 20 --max_new_tokens 128 --num_workers 6 --drafters eagle --tree_topk 4 --tree_tokens 16 --num_free 0 --no_hf > /tmp/m/twin_t.log 2>&1; echo "twin_t rc $? $(( $(date +%s) - T0 ))s" >> $R/rc.txt
 cp results/twin_t/twin_results.json results/twin_t/TWIN_RESULTS.md $R/ 2>/dev/null) &
wait; cp /tmp/m/tvp_twin/results.json $R/tvp_twin.json; cp /tmp/m/tvp_random/results.json $R/tvp_random.json
(cd /tmp/m && tar czf $R/misc.tgz *.log card.txt tvp_*/profile_*.txt; cd $OLDPWD; cd results/twin_t && find . -name records.jsonl | tar czf $R/twin_records.tgz -T -)
cat $R/rc.txt; tail -n 2 $R/gpu_tests_d.log; grep "^target\|^eagle" /tmp/m/tvp_*.log; python3 -c "
import json;d=json.load(open('$R/engine.json'));print({k:v for k,v in d.items() if 'eagle_tree' in k or k in ('tree_verify_over_decode','verify_over_decode_4bit_nf4_kernel_tc','decode_ms_per_token','verify_over_decode','eagle_c')})"
python3 -c "
import json;d=json.load(open('$R/twin_results.json'))
for k,v in d['sets'].items(): print(k, v.get('target_routes'), {n:(r['speedup_measured'],r['speedup_std'],r['verify_ratio'],r['mean_accepted_length'],r['cost_ratio_c'],r['lossless_rate'],r['target_routes']) for n,r in v['drafters'].items()})"
ls -la $R
