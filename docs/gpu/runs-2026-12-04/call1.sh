source docs/gpu/runs-2026-12-04/common.sh
W=~/.cache/gpt-triton-bench/serving-bench-fp8
F8="--render-option kv_cache_dtype=fp8"; TC="--render-option text_in_core=true"
mkdir -p $W/res
step cuda_tests.txt 150 "$GPU_HOST_PYTHON" -m pytest -q -x -p no:cacheprovider tests/test_select_kernels.py tests/test_engine_cuda.py tests/test_step_graphs.py tests/test_chunked_prefill.py tests/test_scheduler.py tests/test_engine_process.py -k "not render and not ensemble"
if grep -q "failed\|error" $OUT/cuda_tests.txt; then echo "CUDA tests failed: stopping"; exit 1; fi
step sel_ab.txt 80 "$GPU_HOST_PYTHON" docs/gpu/runs-2026-12-04/sel_ab.py
step serving.log 100 python bench/serving_bench.py --out $W/res/classic_bs1.json --work $W --levels 1 --skip-streamed --skip-not-streamed --skip-core --skip-mixed --bs1-reps 12 $F8
echo "--- classic_bs1.json ---" >> $OUT/serving.log; cat $W/res/classic_bs1.json >> $OUT/serving.log
step serving.log 300 python bench/serving_bench.py --out $OUT/serving_text_fp8.json --work $W --levels 1,64,256 --skip-core --seconds 3 --mixed-seconds 8 --max-trials 4 --bs1-reps 12 $F8 $TC --baseline $W/res/classic_bs1.json
echo "--- engine timeline (server log) ---" >> $OUT/serving.log
grep -h "in-flight scheduler, last" $W/raw/server.log | cut -c1-900 >> $OUT/serving.log
