python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
R=$OUT; ls results/drafters data/twin_7b > $R/state.txt 2>&1
mkdir -p data/twin_7b_t && ln -sfn $PWD/data/twin_7b/eventgpt data/twin_7b_t/eventgpt && ln -sfn $PWD/data/twin_7b/videollava data/twin_7b_t/videollava && cp data/twin_7b/widen_pair.json data/twin_7b_t/
COMMON="--drafters_json results/drafters/drafters.json --num_long 50 --num_short 50 --max_new_tokens 128 --num_workers 6"
(export CUDA_VISIBLE_DEVICES=0; s=$(date +%s); timeout 480 python3 -m benchmark_parallel_prefill.twin_benchmark --shape 7b --twin_dir data/twin_7b --data_dir data/twin_data_a --output_dir results/twin_c $COMMON --drafters eagle,hybrid,L5 --num_free 0 > $R/twin_c.log 2>&1; echo "c rc $? $(( $(date +%s) - s ))s" >> $R/rc.txt) &
(export CUDA_VISIBLE_DEVICES=1; s=$(date +%s); timeout 240 python3 -m benchmark_parallel_prefill.twin_benchmark --shape 7b --twin_dir data/twin_7b_t --data_dir data/twin_data_t --output_dir results/twin_t $COMMON --drafters eagle --tree_topk 4 --tree_tokens 16 --num_free 0 --no_hf > $R/twin_t.log 2>&1; echo "t rc $? $(( $(date +%s) - s ))s" >> $R/rc.txt
 for i in 1 2; do timeout $((200 - 60 * i)) python3 -m pytest -q -m gpu tests/ > $R/gpu_tests_run$i.log 2>&1; echo "tests$i rc $?" >> $R/rc.txt; done
 ) &
wait
for x in c t; do (cd results/twin_$x && find . -name "*.md" -o -name "*.json" -o -name "*.png" -o -name "*records*.jsonl" | tar czf $R/twin_$x.tgz -T -); done
cat $R/rc.txt; ls -la $R; tail -n 3 $R/gpu_tests_run*.log; grep -A12 "^| drafter" results/twin_c/TWIN_RESULTS.md | head -30; grep -A6 "^| drafter" results/twin_t/TWIN_RESULTS.md | head -16
