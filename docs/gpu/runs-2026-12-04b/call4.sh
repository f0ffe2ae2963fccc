# Call 4 (issue 12): the final kernels (weights, biases and positions before the PDL wait; 2-warp skinny programs):
# CUDA tests, A/B against 648e485 at 1/8/32/64 rows, the batch-1 timeline, then bench/gpu_bench.py (decode through
# Triton, fraction of the floor, greedy agreement with HF transformers fp16, teacher-forced).
source scripts/gpu/setup.sh > $OUT/setup.log 2>&1
START=$(date +%s)
left() { echo $(( 585 - ($(date +%s) - START) )); }
step() { local out=$1 limit=$2; shift 2; local l=$(left); [ $l -lt 20 ] && { echo "skipped: no time" >> $OUT/$out; return; }
  [ $limit -gt $l ] && limit=$l; timeout $limit "$@" >> $OUT/$out 2>&1; echo "rc=$? at $(( $(date +%s) - START )) s" >> $OUT/$out; }
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,clocks.sm,power.limit --format=csv > $OUT/gpu.txt
step cuda_tests.txt 150 "$GPU_HOST_PYTHON" -m pytest -q -x -p no:cacheprovider tests/test_engine_cuda.py tests/test_select_kernels.py tests/test_step_graphs.py
if grep -q "failed\|error" $OUT/cuda_tests.txt; then echo "CUDA tests failed: stopping"; exit 1; fi
step kernels_ab.txt 90 python docs/gpu/runs-2026-12-04b/kernels_ab.py .gpu/gpt_kernels_648e485.py
step timeline.txt 40 python bench/profile_decode.py --batch 1 --steps 32 --timeline
HF_PYTHON="$GPU_HOST_PYTHON" step gpu_bench.log 330 python bench/gpu_bench.py --streaming --out $OUT --seconds 5 --concurrency 1,64
