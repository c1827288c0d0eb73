python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
export PYTHONUNBUFFERED=1; T0=$(date +%s); R=$OUT; mkdir -p /tmp/m
nvidia-smi --query-gpu=index,name,driver_version --format=csv,noheader > /tmp/m/card.txt; nproc >> /tmp/m/card.txt; python3 -c "import torch,transformers,triton,bitsandbytes;print(torch.__version__,transformers.__version__,triton.__version__,bitsandbytes.__version__)" >> /tmp/m/card.txt 2>&1
timeout 330 python3 -m benchmark_inference.real_shape_benchmark --engine --models_dir /tmp/rs1 --engine_json $R/engine.json > /tmp/m/engine.log 2>&1; echo "engine rc $? $(( $(date +%s) - T0 ))s" >> $R/rc.txt
timeout 80 python3 -m benchmark_inference.tree_verify_profile --models_dir /tmp/rs1 --fixed_step 16 --output_dir /tmp/m/tvp_random > /tmp/m/tvp_random.log 2>&1; echo "tvp_random rc $? $(( $(date +%s) - T0 ))s" >> $R/rc.txt; cp /tmp/m/tvp_random/results.json $R/tvp_random.json
(cd /tmp/m && tar czf $R/misc.tgz *.log card.txt tvp_*/profile_*.txt)
cat $R/rc.txt /tmp/m/card.txt; grep "^target\|^eagle" /tmp/m/tvp_*.log; python3 -c "
import json;d=json.load(open('$R/engine.json'));print({k:v for k,v in d.items() if 'eagle_tree' in k or k in ('tree_verify_over_decode','verify_over_decode_4bit_nf4_kernel_tc','decode_ms_per_token','verify_over_decode','eagle_c','prefill_ms','concurrent_prefill_slowdown','free_draft_tokens')})"
