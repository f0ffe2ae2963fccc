#!/bin/bash
# One call on the GPU host (run from the project root; results under $OUT):
#   bash bench/gpu_run.sh quick   # CUDA tests + a short serving benchmark (64/256 streams, batch 1, short mixed)
#   bash bench/gpu_run.sh diag    # decode-step profile (bench/profile_decode.py) + a short serving run with timeline
#   bash bench/gpu_run.sh final   # CUDA tests + the goals' runs of bench/serving_bench.py -> docs/gpu/serving.*
#   bash bench/gpu_run.sh serving # the CUDA tests of the engine and scheduler, then the goals' serving runs without
#                                 # the core-model runs (one call under 10 minutes); step graphs off if their test fails;
#                                 # then the first token's stage timeline (bench/ttft_timeline.py)
#   bash bench/gpu_run.sh host    # the scheduler alone with a host profile (bench/inflight_engine.py --profile),
#                                 # then a short serving run (batch 1, 64/256 streams, mixed) with its timeline
#   bash bench/gpu_run.sh ab      # A/B on one machine: serving_bench.py once per value of an A/B switch,
#                                 # AB_VAR=<environment variable> AB_VALUES="<value> ...": batch 1, 64/256 streams,
#                                 # mixed (AB_BENCH_ARGS replaces serving_bench.py's options, BENCH_TIMEOUT its limit);
#                                 # with AB_RENDER=1, AB_VAR names a render option (--render-option AB_VAR=value)
#   bash bench/gpu_run.sh process # the same for the engine's placement (GPT_TRITON_ENGINE_PROCESS=0, then 1)
#   bash bench/gpu_run.sh trace   # where the first response's time goes under load: 64 streams and the mixed
#                                 # workload with Triton's trace of one request in TRACE_RATE (10), + their exports
#   bash bench/gpu_run.sh engine  # the scheduler alone (bench/inflight_engine.py): the mixed workload at 512 and 2048
#                                 # prompt tokens per step, then kernel profiles of the mixed workload and of 64/256
#                                 # streams of 128/128
#   bash bench/gpu_run.sh sweep   # batch-1 timings (TTFT, ensemble overhead) and the first token's stage timeline,
#                                 # then the decode step per attention launch shape (profile_decode.py --attention-sweep)
#   bash bench/gpu_run.sh kernels # CUDA tests + decode-step kernel choices at batch 1/8/64/256 with a batch-1
#                                 # kernel profile, and the attention launch sweep
# The server log (tail) comes back too: the in-flight scheduler logs its timeline every 10 s of work.
set -u
mode=${1:-full}
OUT=${OUT:-$(mktemp -d)}  # the device sets $OUT; elsewhere a private new folder
mkdir -p "$OUT"
# serving_bench.py's scratch folder (checkpoint, FT weights, rendered repository, raw files), kept across runs: its
# per-user default, never a shared /tmp path (serving_bench.py makes it 0700 and refuses one others could tamper
# with); ttft_timeline.py below serves the repository rendered in it. BENCH_WORK overrides it.
WORK=${BENCH_WORK:-${XDG_CACHE_HOME:-$HOME/.cache}/gpt-triton-bench/serving-bench}
source scripts/gpu/setup.sh > "$OUT/cuda_tests.txt" 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
start=$(date +%s)
# CUDA tests (transformers imports only under the host's own Python: README.md, "On a GPU host").
[ "$mode" != diag ] && [ "$mode" != bench ] && [ "$mode" != kernels ] && [ "$mode" != host ] \
  && [ "$mode" != serving ] && [ "$mode" != sweep ] && [ "$mode" != switch ] && [ "$mode" != trace ] && [ "$mode" != engine ] && [ "$mode" != process ] && timeout 240 "$GPU_HOST_PYTHON" -m pytest -q -p no:cacheprovider tests/test_engine_cuda.py tests/test_scheduler.py \
  >> "$OUT/cuda_tests.txt" 2>&1
echo "cuda tests rc=$? in $(( $(date +%s) - start )) s" >> "$OUT/cuda_tests.txt"
if [ "$mode" = kernels ]; then
  timeout 150 "$GPU_HOST_PYTHON" -m pytest -q -p no:cacheprovider tests/test_engine_cuda.py >> "$OUT/cuda_tests.txt" 2>&1
  echo "engine cuda tests rc=$? in $(( $(date +%s) - start )) s" >> "$OUT/cuda_tests.txt"
  timeout 150 python bench/profile_decode.py --batch 1 8 64 --prompt 128 --steps 64 --prefill 0 --no-profile \
    > "$OUT/profile.txt" 2>&1
  echo "rc=$? at $(( $(date +%s) - start )) s" >> "$OUT/profile.txt"
  timeout 90 python bench/profile_decode.py --batch 256 --prompt 192 --steps 32 --prefill 0 --no-profile \
    >> "$OUT/profile.txt" 2>&1
  echo "rc=$? at $(( $(date +%s) - start )) s" >> "$OUT/profile.txt"
  timeout 150 python bench/profile_decode.py --batch 1 --prompt 128 --steps 32 --prefill 0 --no-profile --tune-skinny \
    --gemm > "$OUT/tune.txt" 2>&1
  echo "rc=$? at $(( $(date +%s) - start )) s" >> "$OUT/tune.txt"
  exit 0
elif [ "$mode" = serving ]; then
  timeout 200 "$GPU_HOST_PYTHON" -m pytest -q -p no:cacheprovider tests/test_engine_cuda.py tests/test_step_graphs.py \
    tests/test_chunked_prefill.py tests/test_scheduler.py -k "cuda or step_graphs" >> "$OUT/cuda_tests.txt" 2>&1
  rc=$?
  echo "cuda tests rc=$rc in $(( $(date +%s) - start )) s" >> "$OUT/cuda_tests.txt"
  if [ $rc -ne 0 ]; then export GPT_TRITON_STEP_GRAPHS=0; echo "step graphs OFF for the bench" >> "$OUT/cuda_tests.txt"; fi
  timeout ${BENCH_TIMEOUT:-400} python bench/serving_bench.py --out "$OUT/serving.json" --work "$WORK" \
    --levels 1,64,256 --skip-core --seconds 3 --mixed-seconds 8 --max-trials 6 --bs1-reps 20 > "$OUT/bench.log" 2>&1
  # Where the first token's time goes, from Triton's trace (the repository serving_bench.py rendered above).
  timeout 150 python bench/ttft_timeline.py --repository "$WORK/repo" --prompt-tokens 512 --requests 40 \
    --machine "one NVIDIA H200" --out "$OUT/ttft_timeline.json" > "$OUT/ttft_timeline.log" 2>&1
elif [ "$mode" = sweep ]; then
  timeout 240 python bench/serving_bench.py --out "$OUT/serving.json" --work "$WORK" --levels 1 --skip-streamed \
    --skip-not-streamed --skip-core --skip-mixed --bs1-reps 20 > "$OUT/bench.log" 2>&1
  timeout 120 python bench/ttft_timeline.py --repository "$WORK/repo" --prompt-tokens 512 --requests 40 \
    --machine "one NVIDIA H200" --out "$OUT/ttft_timeline.json" > "$OUT/ttft_timeline.log" 2>&1
  for shape in "1 2 4 8 16 32:128" "1 4 16:768" "64 256:128" "64:768"; do
    timeout 100 python bench/profile_decode.py --attention-sweep --batch ${shape%%:*} --prompt ${shape##*:} \
      --steps 64 --prefill 0 --launches default 256,1,8 128,1,4 64,4,2 64,1,2 >> "$OUT/attention_sweep.txt" 2>&1
    echo "batches ${shape%%:*} prompt ${shape##*:}: rc=$? at $(( $(date +%s) - start )) s" >> "$OUT/attention_sweep.txt"
  done
elif [ "$mode" = process ] || [ "$mode" = ab ]; then
  if [ "$mode" = process ]; then AB_VAR=GPT_TRITON_ENGINE_PROCESS; AB_VALUES="0 1"; fi
  for v in $AB_VALUES; do
    if [ "${AB_RENDER:-0}" = 1 ]; then switch=(env); render=(--render-option "$AB_VAR=$v");
    else switch=(env "$AB_VAR=$v"); render=(); fi
    # shellcheck disable=SC2086  # AB_BENCH_ARGS: several options
    "${switch[@]}" timeout ${BENCH_TIMEOUT:-270} python bench/serving_bench.py "${render[@]}" \
      --out "$OUT/serving_${AB_VAR}_$v.json" --work "$WORK" \
      ${AB_BENCH_ARGS:---levels 1,64,256 --skip-core --skip-not-streamed --seconds 3 --mixed-seconds 6 --bs1-reps 10} \
      > "$OUT/bench_${AB_VAR}_$v.log" 2>&1
    echo "$AB_VAR=$v: rc=$? at $(( $(date +%s) - start )) s" >> "$OUT/bench.log"
    grep -a "in-flight scheduler\|engine process" "$WORK/raw/server.log" | tail -40 > "$OUT/timeline_${AB_VAR}_$v.txt"
  done
elif [ "$mode" = trace ]; then
  timeout ${BENCH_TIMEOUT:-400} python bench/serving_bench.py --out "$OUT/serving.json" --work "$WORK" \
    --levels 64 --skip-core --skip-bs1 --skip-not-streamed --seconds 3 --mixed-seconds 6 --max-trials 4 \
    --trace-rate "${TRACE_RATE:-10}" > "$OUT/bench.log" 2>&1
  cp "$WORK/raw/mixed_streamed_c64.export.json" "$WORK/raw/streamed_c64.export.json" "$OUT/" 2>/dev/null
elif [ "$mode" = engine ]; then
  timeout 200 python bench/inflight_engine.py --clients 64 --seconds 8 --mixed --stream --step-tokens 512 2048 \
    > "$OUT/mixed_budget.txt" 2>&1
  echo "rc=$? at $(( $(date +%s) - start )) s" >> "$OUT/mixed_budget.txt"
  timeout 150 python bench/inflight_engine.py --clients 64 --seconds 6 --mixed --stream --profile \
    > "$OUT/mixed_profile.txt" 2>&1
  echo "rc=$? at $(( $(date +%s) - start )) s" >> "$OUT/mixed_profile.txt"
  timeout 180 python bench/inflight_engine.py --clients 64 256 --seconds 6 --stream --profile \
    > "$OUT/streams_profile.txt" 2>&1
  echo "rc=$? at $(( $(date +%s) - start )) s" >> "$OUT/streams_profile.txt"
elif [ "$mode" = switch ]; then  # the loop's GIL switch interval: streamed runs only, at $GPT_TRITON_SWITCH_INTERVAL_US
  timeout 300 python bench/serving_bench.py --out "$OUT/serving.json" --work "$WORK" \
    --levels 1,64,256 --skip-core --skip-not-streamed --skip-mixed --seconds 3 --bs1-reps 20 > "$OUT/bench.log" 2>&1
elif [ "$mode" = host ]; then
  timeout 150 python bench/inflight_engine.py --clients 64 256 --seconds 6 --profile > "$OUT/host.txt" 2>&1
  echo "rc=$? at $(( $(date +%s) - start )) s" >> "$OUT/host.txt"
  timeout 60 python bench/inflight_engine.py --clients 64 --seconds 5 --stream >> "$OUT/host.txt" 2>&1
  echo "rc=$? at $(( $(date +%s) - start )) s" >> "$OUT/host.txt"
  timeout 300 python bench/serving_bench.py --out "$OUT/serving.json" --work "$WORK" \
    --levels 64,256 --skip-not-streamed --skip-core --seconds 3 --mixed-seconds 6 --bs1-reps 10 > "$OUT/bench.log" 2>&1
elif [ "$mode" = diag ]; then
  # The model's decode step alone (GPU time per step), then the serving path with its timeline in the server log.
  timeout 150 python bench/profile_decode.py --batch 64 256 --prompt 192 --steps 32 --prefill 512 --no-profile \
    > "$OUT/profile.txt" 2>&1
  GPT_TRITON_FUSED_ATTENTION_MAX_ROW_KEYS=10000000 timeout 100 python bench/profile_decode.py --batch 256 64 \
    --prompt 192 --steps 32 --prefill 0 --no-profile >> "$OUT/profile.txt" 2>&1
  timeout 60 python bench/profile_decode.py --batch 64 --prompt 768 --steps 32 --prefill 1024 --no-profile \
    >> "$OUT/profile.txt" 2>&1
  timeout 330 python bench/serving_bench.py --out "$OUT/serving.json" --work "$WORK" \
    --levels 64,256 --skip-not-streamed --skip-core --seconds 3 --mixed-seconds 6 --bs1-reps 10 > "$OUT/bench.log" 2>&1
elif [ "$mode" = quick ]; then
  timeout 420 python bench/serving_bench.py --out "$OUT/serving.json" --work "$WORK" \
    --levels 1,64,256 --core-levels 64 --seconds 3 --mixed-seconds 8 --bs1-reps 10 > "$OUT/bench.log" 2>&1
else  # final (or bench: the same without the CUDA tests): the goals' runs, under the device's 10-minute limit.
  timeout ${BENCH_TIMEOUT:-520} python bench/serving_bench.py --out "$OUT/serving.json" --work "$WORK" \
    --levels ${LEVELS:-1,64,256} --core-levels ${CORE_LEVELS:-1,64} --seconds ${SECONDS_PER_RUN:-3} \
    --mixed-seconds ${MIXED_SECONDS:-8} --max-trials ${MAX_TRIALS:-6} --bs1-reps 20 > "$OUT/bench.log" 2>&1
fi
echo "bench rc=$? in $(( $(date +%s) - start )) s" >> "$OUT/bench.log"
tail -c 400000 "$WORK/raw/server.log" > "$OUT/server_tail.log" 2>/dev/null || true
ls "$WORK" >> "$OUT/bench.log" 2>&1
# The device tool brings back only the first few files of $OUT (8 in a session of 2026-12-02: serving.png and the
# TTFT timeline were left out): everything again in one archive.
tar czf "$OUT/all.tgz" -C "$OUT" --exclude all.tgz . 2>/dev/null || true
