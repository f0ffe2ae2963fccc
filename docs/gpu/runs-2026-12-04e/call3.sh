# Call 3 (issue 12): the final code (norm_in_gemv with the split GEMVs into the residual, the norm's block sums summed
# after the loop): CUDA tests, the A/B against the add + LayerNorm kernels, the timeline at 1 and 8 rows, then
# bench/gpu_bench.py (decode through Triton, fraction of the floor, greedy agreement with HF transformers fp16).
source docs/gpu/runs-2026-12-04/common.sh
step cuda_tests.txt 170 "$GPU_HOST_PYTHON" -m pytest -q -x -p no:cacheprovider tests/test_engine_cuda.py tests/test_select_kernels.py tests/test_step_graphs.py
if grep -q "failed\|error" $OUT/cuda_tests.txt; then echo "CUDA tests failed: stopping"; exit 1; fi
step ab.txt 120 python docs/gpu/runs-2026-12-04e/norm_in_gemv_ab.py
step timeline.txt 40 python bench/profile_decode.py --batch 1 8 --steps 32 --timeline
HF_PYTHON="$GPU_HOST_PYTHON" step gpu_bench.log 330 python bench/gpu_bench.py --streaming --out $OUT --seconds 5 --concurrency 1,64
