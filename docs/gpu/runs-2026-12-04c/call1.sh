# Call 1 (issue 17): a pass's tokens sent after the next step's launch under load. The scheduler's tests on the GPU
# (the new ordering test's CUDA case among them), then an A/B on one host: the default (16: sends follow the launch
# while >= 16 rows decode) against 100000 (sends always before the launch, as until now), ABBA, 64 and 256 streams of
# the text core (fp8 KV cache).
source docs/gpu/runs-2026-12-04/common.sh
step cuda_tests.txt 120 "$GPU_HOST_PYTHON" -m pytest -q -x tests/test_scheduler.py tests/test_step_graphs.py
W=~/.cache/gpt-triton-bench/serving-bench-fp8
A="--levels 64,256 --skip-bs1 --skip-not-streamed --skip-core --skip-mixed --seconds 3 --max-trials 4"
A="$A --render-option kv_cache_dtype=fp8 --render-option text_in_core=true"
for v in 16 100000 100000 16; do
  n=$(ls $OUT/ab_${v}_*.json 2>/dev/null | wc -l); n=$((n + 1))
  echo "=== GPT_TRITON_SEND_AFTER_LAUNCH_MIN_ROWS=$v (run $n) ===" >> $OUT/ab.log
  step ab.log 110 env GPT_TRITON_SEND_AFTER_LAUNCH_MIN_ROWS=$v python bench/serving_bench.py --out $OUT/ab_${v}_$n.json --work $W $A
  grep -h "in-flight scheduler, last" $W/raw/server.log | grep -v " 0\.[0-9] rows" | cut -c1-420 >> $OUT/ab.log
done
