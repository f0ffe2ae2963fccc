# Call 3 (issue 17): (1) the text core's cost over token ids, paired in one server (bench/text_paths.py, 100
# interleaved repetitions, fp8 KV cache as the serving runs); (2) a busy host: one busy-looping process per core
# beside the server while 256 streams of the text core run, sends after the launch (16, the default) against always
# before it (100000), ABBA.
source docs/gpu/runs-2026-12-04/common.sh
W=~/.cache/gpt-triton-bench/serving-bench-fp8
F8="--render-option kv_cache_dtype=fp8"; TC="--render-option text_in_core=true"
step text_paths.log 170 python bench/text_paths.py --out $OUT/text_paths.json --work $W --reps 100 $F8
A="--levels 256 --skip-bs1 --skip-not-streamed --skip-core --skip-mixed --seconds 3 --max-trials 4 $F8 $TC"
for i in $(seq $(nproc)); do python3 -c "while True: pass" & done
echo "busy loops: $(jobs -p | wc -l) on $(nproc) cores" >> $OUT/ab.log
for v in 16 100000 100000 16; do
  n=$(ls $OUT/ab_${v}_*.json 2>/dev/null | wc -l); n=$((n + 1))
  echo "=== GPT_TRITON_SEND_AFTER_LAUNCH_MIN_ROWS=$v (run $n) ===" >> $OUT/ab.log
  step ab.log 100 env GPT_TRITON_SEND_AFTER_LAUNCH_MIN_ROWS=$v python bench/serving_bench.py --out $OUT/ab_${v}_$n.json --work $W $A
  grep -h "in-flight scheduler, last" $W/raw/server.log | grep -v " [0-9]\.[0-9] rows" | cut -c1-480 >> $OUT/ab.log
done
kill $(jobs -p) 2>/dev/null
rm -f $OUT/ab_*.md $OUT/ab_*.png
