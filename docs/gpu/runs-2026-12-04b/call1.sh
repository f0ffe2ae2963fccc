# Call 1 (issue 12): early weight tiles in the skinny GEMM. CUDA tests of the kernels, the decode step per
# early_tiles value at 1/8/64 rows, and per-kernel timelines with and without them (and without PDL).
source scripts/gpu/setup.sh > $OUT/setup.log 2>&1
PY=python  # the venv: tritonclient beside the host's torch
START=$(date +%s)
left() { echo $(( 585 - ($(date +%s) - START) )); }
step() { local out=$1 limit=$2; shift 2; local l=$(left); [ $l -lt 20 ] && { echo "skipped: no time" >> $OUT/$out; return; }
  [ $limit -gt $l ] && limit=$l; timeout $limit "$@" >> $OUT/$out 2>&1; echo "rc=$? at $(( $(date +%s) - START )) s" >> $OUT/$out; }
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,clocks.sm,power.limit --format=csv > $OUT/gpu.txt
step cuda_tests.txt 150 "$GPU_HOST_PYTHON" -m pytest -q -x -p no:cacheprovider tests/test_engine_cuda.py tests/test_select_kernels.py
step early_tiles.txt 200 $PY bench/profile_decode.py --batch 1 8 64 --steps 64 --early-tiles 0 1 2 4
for e in 0 2; do
  echo "== GPT_TRITON_EARLY_TILES=$e ==" >> $OUT/timeline.txt
  GPT_TRITON_EARLY_TILES=$e step timeline.txt 60 $PY bench/profile_decode.py --batch 1 64 --steps 32 --timeline
done
echo "== GPT_TRITON_PDL=0 GPT_TRITON_EARLY_TILES=0 ==" >> $OUT/timeline.txt
GPT_TRITON_PDL=0 GPT_TRITON_EARLY_TILES=0 step timeline.txt 60 $PY bench/profile_decode.py --batch 1 --steps 32 --timeline
