# Call 1 (issue 12; written in the twenty-first session, 2026-12-04, revised in the twenty-second; no GPU host was lent
# in either: NOT RUN YET).
# The model's CUDA tests (the one-launch step's among them; call 2 runs the scheduler's), the A/B of the one-launch
# step's launch shapes against the per-op kernels at batch 1 (batch 8: the control), each shape's bound (with and
# without waits) and one traced step of the default shape (per-stage profile + plot), then the one-launch step's own
# test under compute-sanitizer's memcheck with the time left. 8 files come back: setup.log gpu.txt cuda_tests.txt
# ab.txt one_launch_step.json/.md one_launch_trace.json/.png.
source docs/gpu/runs-2026-12-04/common.sh
step cuda_tests.txt 260 "$GPU_HOST_PYTHON" -m pytest -q -x -p no:cacheprovider tests/test_step_kernel.py tests/test_engine_cuda.py
if grep -q "failed\|error\|rc=[1-9]" $OUT/cuda_tests.txt; then echo "CUDA tests failed: stopping"; exit 1; fi
step ab.txt 330 python bench/one_launch_step.py --trace --out $OUT
step cuda_tests.txt 100 compute-sanitizer --tool memcheck --error-exitcode 3 "$GPU_HOST_PYTHON" -m pytest -q -x -p no:cacheprovider tests/test_step_kernel.py -k matches
