# Call 4 (issue 17): call 3's busy-host A/B again (ABBA, 256 streams, one busy loop per core), on a fresh host.
source docs/gpu/runs-2026-12-04/common.sh
W=~/.cache/gpt-triton-bench/serving-bench-fp8
F8="--render-option kv_cache_dtype=fp8"; TC="--render-option text_in_core=true"
A="--levels 256 --skip-bs1 --skip-not-streamed --skip-core --skip-mixed --seconds 3 --max-trials 4 $F8 $TC"
echo "=== no busy loops (makes the checkpoint; a reference), default ===" >> $OUT/ab.log
step ab.log 120 python bench/serving_bench.py --out $OUT/ref.json --work $W $A
for i in $(seq $(nproc)); do python3 -c "while True: pass" & done
echo "busy loops: $(jobs -p | wc -l) on $(nproc) cores" >> $OUT/ab.log
for v in 16 100000 100000 16; do
  n=$(ls $OUT/ab_${v}_*.json 2>/dev/null | wc -l); n=$((n + 1))
  echo "=== GPT_TRITON_SEND_AFTER_LAUNCH_MIN_ROWS=$v (run $n) ===" >> $OUT/ab.log
  step ab.log 100 env GPT_TRITON_SEND_AFTER_LAUNCH_MIN_ROWS=$v python bench/serving_bench.py --out $OUT/ab_${v}_$n.json --work $W $A
  grep -h "in-flight scheduler, last" $W/raw/server.log | grep -v " [0-9]\.[0-9] rows" | cut -c1-480 >> $OUT/ab.log
done
kill $(jobs -p) 2>/dev/null
rm -f $OUT/ab_*.md $OUT/ab_*.png $OUT/ref.md $OUT/ref.png
