export PYTHONUNBUFFERED=1; R=$OUT; T0=$(date +%s)
timeout 150 python3 -m benchmark_inference.tree_verify_profile --models_dir /tmp/rs1 --fixed_step 16 --output_dir $R/tvp_idle > $R/tvp_idle.log 2>&1; echo "idle rc $? $(( $(date +%s) - T0 ))s"
for i in $(seq 16); do timeout 100 python3 -c "while True: pass" & done
timeout $((250 - $(date +%s) + T0)) python3 -m benchmark_inference.tree_verify_profile --models_dir /tmp/rs1 --fixed_step 16 --output_dir $R/tvp_busy > $R/tvp_busy.log 2>&1; echo "busy rc $? $(( $(date +%s) - T0 ))s"
nproc; grep "^target\|^eagle" $R/tvp_*.log
