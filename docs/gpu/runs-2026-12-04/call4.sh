source docs/gpu/runs-2026-12-04/common.sh
W=~/.cache/gpt-triton-bench/serving-bench-fp8
F8="--render-option kv_cache_dtype=fp8"; TC="--render-option text_in_core=true"
mkdir -p $W/res
step serving.log 100 python bench/serving_bench.py --out $W/res/classic_bs1.json --work $W --levels 1 --skip-streamed --skip-not-streamed --skip-core --skip-mixed --bs1-reps 12 $F8
echo "--- classic_bs1.json ---" >> $OUT/serving.log; cat $W/res/classic_bs1.json >> $OUT/serving.log
step serving.log 260 python bench/serving_bench.py --out $OUT/serving_text_fp8.json --work $W --levels 1,64,256 --skip-core --seconds 3 --mixed-seconds 8 --max-trials 4 --bs1-reps 12 $F8 $TC --baseline $W/res/classic_bs1.json
echo "--- engine timeline (server log) ---" >> $OUT/serving.log
grep -h "in-flight scheduler, last" $W/raw/server.log | cut -c1-900 >> $OUT/serving.log
step stages.txt 150 python docs/gpu/runs-2026-12-04/text_core_stages.py --work ~/.cache/gpt-triton-bench/text-paths-fp8 --out $OUT/text_core_stages.json --prompt-tokens 512 --reps 150 --instrument $F8
grep -v "^\[\|weights ->" $OUT/stages.txt > $OUT/stages_short.txt
