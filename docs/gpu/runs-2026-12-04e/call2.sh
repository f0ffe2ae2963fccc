# Call 2 (issue 12): the LayerNorms' gains and biases folded into QKV/FC1 and each norm applied to the GEMV's product
# (the loop streams x as loaded), GEMVs into the residual whole (or split, in the A/B): CUDA tests, the A/B, timeline.
source docs/gpu/runs-2026-12-04/common.sh
step cuda_tests.txt 170 "$GPU_HOST_PYTHON" -m pytest -q -x -p no:cacheprovider tests/test_engine_cuda.py tests/test_select_kernels.py tests/test_step_graphs.py
if grep -q "failed\|error" $OUT/cuda_tests.txt; then echo "CUDA tests failed: stopping"; exit 1; fi
step ab.txt 150 python docs/gpu/runs-2026-12-04e/norm_in_gemv_ab.py
step resources.txt 30 python docs/gpu/runs-2026-12-04e/kernel_resources.py
step timeline.txt 40 python bench/profile_decode.py --batch 1 8 --steps 32 --timeline
