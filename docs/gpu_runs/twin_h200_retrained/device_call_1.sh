python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
R=$OUT; nvidia-smi --query-gpu=index,name,driver_version --format=csv,noheader > $R/card.txt; git log --oneline -1 >> $R/card.txt 2>/dev/null
python3 -c "import torch,transformers,triton,bitsandbytes;print(torch.__version__,transformers.__version__,triton.__version__,bitsandbytes.__version__)" >> $R/card.txt 2>&1
(export CUDA_VISIBLE_DEVICES=0; s=$(date +%s); timeout 500 bash scripts/train_drafters.sh data/drafter_data models results/drafters --device cuda --num_clips 300 --num_workers 8 > $R/train_drafters.log 2>&1; echo "drafters rc $? $(( $(date +%s) - s ))s" >> $R/rc.txt) &
(export CUDA_VISIBLE_DEVICES=1; s=$(date +%s); timeout 100 python3 -m scripts.widen_pair --output_dir data/twin_7b > $R/widen.log 2>&1; echo "widen rc $? $(( $(date +%s) - s ))s" >> $R/rc.txt
 s=$(date +%s); timeout 320 python3 -m benchmark_inference.gemv_profile --sections nf4_floor,nf4_step --json $R/nf4.json > $R/nf4.log 2>&1; echo "nf4 rc $? $(( $(date +%s) - s ))s" >> $R/rc.txt) &
wait; cat $R/rc.txt; tail -n 2 $R/train_drafters.log; tail -c 2500 $R/nf4.log
