# Call 3 (issue 17): the full serving run with the kit's tiktoken and the text core's streamed responses made
# straight from the tokens (text_core._TextStream): the classic ensemble's batch-1 baseline, then the text core, fp8 KV.
source docs/gpu/runs-2026-12-04/common.sh
W=~/.cache/gpt-triton-bench/serving-bench-fp8
F8="--render-option kv_cache_dtype=fp8"; TC="--render-option text_in_core=true"
mkdir -p $W/res
lscpu | grep -i "model name\|mhz" > $OUT/cpu.txt
step serving.log 170 python bench/serving_bench.py --out $W/res/classic_bs1.json --work $W --levels 1 --skip-streamed --skip-not-streamed --skip-core --skip-mixed --bs1-reps 12 $F8
echo "--- classic_bs1.json ---" >> $OUT/serving.log; cat $W/res/classic_bs1.json >> $OUT/serving.log
step serving.log 380 python bench/serving_bench.py --out $OUT/serving_text_fp8.json --work $W --levels 1,64,256 --skip-core --seconds 3 --mixed-seconds 8 --max-trials 4 --bs1-reps 12 $F8 $TC --baseline $W/res/classic_bs1.json
echo "--- engine timeline (server log) ---" >> $OUT/serving.log
grep -h "in-flight scheduler, last" $W/raw/server.log | cut -c1-900 >> $OUT/serving.log
