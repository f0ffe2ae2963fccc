# Call 3 (issue 12's optional weight-only int8; written in the twenty-second session, 2026-12-05, when no GPU host was
# lent: NOT RUN YET). The int8 CUDA tests (the skinny GEMM widening int8 weights, an int8 model against the model of
# its dequantized weights with norms folded; call 1 runs the one-launch step's int8 cases), the A/B of the one-launch
# step against the per-op kernels with int8 matrices on both sides (3 shapes, with bounds), then bench/gpu_bench.py
# with render --weight-quantization int8: decode ms/token through Triton against the int8 floor, greedy agreement
# with HF transformers fp16 (teacher-forced: what the quantization costs), HF's static cache in the same run. Its fp16
# twin is call 2's gpu_bench (or the last measured 1.086 ms/token, docs/gpu/runs-2026-12-04e). 7 files come back:
# setup.log gpu.txt cuda_tests.txt ab.txt one_launch_step.json/.md gpu_bench.log (+ results.json: 8).
source docs/gpu/runs-2026-12-04/common.sh
step cuda_tests.txt 120 "$GPU_HOST_PYTHON" -m pytest -q -x -p no:cacheprovider tests/test_quantize.py -k "gpu or skinny"
step ab.txt 150 python bench/one_launch_step.py --weight-quantization int8 --launches 16384,4,3,168 16384,4,3,168,2 32768,8,2,128 --out $OUT
HF_PYTHON="$GPU_HOST_PYTHON" step gpu_bench.log 400 python bench/gpu_bench.py --weight-quantization int8 --streaming --out $OUT --seconds 5 --concurrency 1,64
