# Call 2 (issue 12; written in the twenty-first session, NOT RUN YET): the one-launch step through Triton at the launch
# shape call 1 found fastest ($1: TILE,WARPS,PROGRAMS,REGISTERS[,PREFETCH]): bench/gpu_bench.py (decode through Triton,
# fraction of the floor, greedy agreement with HF transformers fp16, HF's static cache in the same run), then the A/B
# against the per-op kernels again at that shape, 5 rounds, and the scheduler's CUDA tests (select kernels, step graphs).
#   bash docs/gpu/runs-one-launch/call2.sh 16384,4,3,168,1
source docs/gpu/runs-2026-12-04/common.sh
LAUNCH=${1:?usage: call2.sh TILE,WARPS,PROGRAMS,REGISTERS[,PREFETCH]}
GPT_TRITON_ONE_LAUNCH=1 GPT_TRITON_STEP_LAUNCH=$LAUNCH HF_PYTHON="$GPU_HOST_PYTHON" step gpu_bench.log 330 python bench/gpu_bench.py --streaming --out $OUT --seconds 5 --concurrency 1,64
step ab.txt 120 python bench/one_launch_step.py --launches $LAUNCH --rounds 5
step cuda_tests.txt 100 "$GPU_HOST_PYTHON" -m pytest -q -x -p no:cacheprovider tests/test_select_kernels.py tests/test_step_graphs.py
