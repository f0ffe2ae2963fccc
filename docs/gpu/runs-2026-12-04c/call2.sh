# Call 2 (issue 17): the full serving run of this change (a pass's tokens sent after the next step's launch under load):
# the classic ensemble's batch-1 baseline, then the text core with an fp8 KV cache (as call 5 of runs-2026-12-04b).
source docs/gpu/runs-2026-12-04/common.sh
W=~/.cache/gpt-triton-bench/serving-bench-fp8
F8="--render-option kv_cache_dtype=fp8"; TC="--render-option text_in_core=true"
mkdir -p $W/res
step serving.log 170 python bench/serving_bench.py --out $W/res/classic_bs1.json --work $W --levels 1 --skip-streamed --skip-not-streamed --skip-core --skip-mixed --bs1-reps 12 $F8
echo "--- classic_bs1.json ---" >> $OUT/serving.log; cat $W/res/classic_bs1.json >> $OUT/serving.log
step serving.log 360 python bench/serving_bench.py --out $OUT/serving_text_fp8.json --work $W --levels 1,64,256 --skip-core --seconds 3 --mixed-seconds 8 --max-trials 4 --bs1-reps 12 $F8 $TC --baseline $W/res/classic_bs1.json
echo "--- engine timeline (server log) ---" >> $OUT/serving.log
grep -h "in-flight scheduler, last" $W/raw/server.log | cut -c1-900 >> $OUT/serving.log
