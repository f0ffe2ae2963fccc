# Call 0 (issue 12; twenty-third session, 2026-12-05): calls 1 and 2 in one, for a session whose machine may come
# once (five starts refused before it). The one-launch step's CUDA tests and the engine's (the skinny GEMMs changed
# for int8), the A/B at 5 launch shapes with bounds and the traced default shape, then bench/gpu_bench.py through
# Triton with the fastest shape that beat the per-op kernels and lost no signal (or the per-op kernels if none did).
# 8 files: logs.txt (gpu.txt, setup.log, cuda_tests.txt) ab.txt one_launch_step.json/.md one_launch_trace.json/.png
# gpu_bench.log results.json
source docs/gpu/runs-2026-12-04/common.sh
step cuda_tests.txt 170 "$GPU_HOST_PYTHON" -m pytest -q -x -p no:cacheprovider tests/test_step_kernel.py tests/test_engine_cuda.py
FAILED=$(grep -c "failed\|error\|rc=[1-9]" $OUT/cuda_tests.txt)
[ "$FAILED" = 0 ] && step ab.txt 170 python bench/one_launch_step.py --launches 16384,4,3,168 16384,4,3,168,1 16384,4,3,168,2 16384,4,4,128,1 32768,8,2,128 --trace --out $OUT
LAUNCH=$(python - $OUT/one_launch_step.json <<'PY' 2>/dev/null
import json, sys
rows = [r for r in json.load(open(sys.argv[1]))["rows"] if r["batch"] == 1]
base = next(r["ms_per_step"] for r in rows if r["variant"] == "per-op kernels")
ok = [r for r in rows if "stalls" in r and r["stalls"] == 0 and r["ms_per_step"] < base]
print(min(ok, key=lambda r: r["ms_per_step"])["variant"] if ok else "")
PY
)
echo "one-launch shape for gpu_bench: '${LAUNCH:-none, per-op kernels}'" >> $OUT/gpu_bench.log
SKIP=$([ $(left) -lt 260 ] && echo --skip-hf)
if [ -n "$LAUNCH" ]; then export GPT_TRITON_ONE_LAUNCH=1 GPT_TRITON_STEP_LAUNCH=$LAUNCH; fi
HF_PYTHON="$GPU_HOST_PYTHON" step gpu_bench.log 330 python bench/gpu_bench.py --streaming --out $OUT --seconds 4 --concurrency 1,64 $SKIP
cd $OUT && cat gpu.txt setup.log cuda_tests.txt > logs.txt && rm gpu.txt setup.log cuda_tests.txt
