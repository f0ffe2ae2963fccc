# Call 3 (issue 12): weights first (A/B against 648e485's kernels), the CUDA tests of the kernels, the skinny GEMM's
# launch shapes at 1 and 8 rows, and the timeline of the new kernels at batch 1.
source scripts/gpu/setup.sh > $OUT/setup.log 2>&1
START=$(date +%s)
left() { echo $(( 585 - ($(date +%s) - START) )); }
step() { local out=$1 limit=$2; shift 2; local l=$(left); [ $l -lt 20 ] && { echo "skipped: no time" >> $OUT/$out; return; }
  [ $limit -gt $l ] && limit=$l; timeout $limit "$@" >> $OUT/$out 2>&1; echo "rc=$? at $(( $(date +%s) - START )) s" >> $OUT/$out; }
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,clocks.sm,power.limit --format=csv > $OUT/gpu.txt
step weights_first_ab.txt 120 python docs/gpu/runs-2026-12-04b/weights_first_ab.py .gpu/gpt_kernels_648e485.py
step cuda_tests.txt 150 "$GPU_HOST_PYTHON" -m pytest -q -x -p no:cacheprovider tests/test_engine_cuda.py tests/test_select_kernels.py
step timeline.txt 60 python bench/profile_decode.py --batch 1 --steps 32 --timeline
step tune_skinny.txt 200 python bench/profile_decode.py --batch 1 8 --steps 64 --prefill 0 --no-profile --tune-skinny
