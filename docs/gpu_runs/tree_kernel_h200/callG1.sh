python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
export PYTHONUNBUFFERED=1; T0=$(date +%s); R=$OUT; mkdir -p /tmp/m
nvidia-smi --query-gpu=index,name,driver_version --format=csv,noheader > /tmp/m/card.txt; nproc >> /tmp/m/card.txt; python3 -c "import torch,transformers,triton,bitsandbytes;print(torch.__version__,transformers.__version__,triton.__version__,bitsandbytes.__version__)" >> /tmp/m/card.txt 2>&1
(timeout 200 python3 -m pytest -q -m gpu tests/ > /tmp/m/gpu_tests_g.log 2>&1; echo "testsG rc $? $(( $(date +%s) - T0 ))s" >> $R/rc.txt) &
(timeout 100 python3 -m scripts.widen_pair --output_dir data/twin_7b > /tmp/m/widen.log 2>&1; echo "widen rc $? $(( $(date +%s) - T0 ))s" >> $R/rc.txt) &
timeout 320 bash scripts/train_drafters.sh data/drafter_data models results/drafters --device cuda --num_clips 300 --num_workers 16 > /tmp/m/train_drafters.log 2>&1; echo "drafters rc $? $(( $(date +%s) - T0 ))s" >> $R/rc.txt; wait
timeout $((500 - $(date +%s) + T0)) python3 -m benchmark_parallel_prefill.twin_benchmark --shape 7b --twin_dir data/twin_7b --data_dir data/twin_data_a --output_dir results/twin_full --drafters_json results/drafters/drafters.json --num_long 40 --num_short 20 --max_new_tokens 128 --num_workers 6 --drafters eagle --tree_topk 4 --tree_tokens 16 --num_free 0 --no_hf > /tmp/m/twin_full.log 2>&1; echo "twin_full rc $? $(( $(date +%s) - T0 ))s" >> $R/rc.txt
cp results/twin_full/twin_results.json $R/twin_full.json; cp results/twin_full/TWIN_RESULTS.md /tmp/m/TWIN_RESULTS_full.md
timeout $((570 - $(date +%s) + T0)) python3 -m benchmark_inference.tree_verify_profile --videollava_path data/twin_7b/videollava --fixed_step 16 --output_dir /tmp/m/tvp_twin > /tmp/m/tvp_twin.log 2>&1; echo "tvp_twin rc $? $(( $(date +%s) - T0 ))s" >> $R/rc.txt; cp /tmp/m/tvp_twin/results.json $R/tvp_twin.json
(cd /tmp/m && tar czf $R/misc.tgz *.log card.txt TWIN_RESULTS_*.md tvp_*/profile_*.txt; cd $OLDPWD; find results -name records.jsonl | tar czf /tmp/m/rec.tgz -T - ; mv /tmp/m/rec.tgz $R/ 2>/dev/null)
cat $R/rc.txt /tmp/m/card.txt; tail -n 2 /tmp/m/gpu_tests_g.log; grep "^target\|^eagle" /tmp/m/tvp_*.log
python3 -c "
import json;d=json.load(open('$R/twin_full.json'))
for k,v in d['sets'].items(): print(k, {n:(round(r['speedup_measured'],3),round(r['speedup_std'],3),round(r['verify_ratio'],3),round(r['mean_accepted_length'],2),round(r['cost_ratio_c'],3),r['lossless_rate'],r.get('target_routes')) for n,r in v['drafters'].items()})"
ls -la $R
