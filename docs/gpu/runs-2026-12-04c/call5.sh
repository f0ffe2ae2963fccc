# Call 5 (issue 17): call 1's A/B again without busy loops (ABBA, 64 and 256 streams: long enough for the scheduler's
# 10 s timeline in the server log), on whatever host this is; with the host's CPU model and clock beside it.
source docs/gpu/runs-2026-12-04/common.sh
{ lscpu | grep -E "Model name|^CPU\(s\)|MHz"; grep -m3 MHz /proc/cpuinfo; } > $OUT/cpu.txt 2>&1
W=~/.cache/gpt-triton-bench/serving-bench-fp8
A="--levels 64,256 --skip-bs1 --skip-not-streamed --skip-core --skip-mixed --seconds 3 --max-trials 4"
A="$A --render-option kv_cache_dtype=fp8 --render-option text_in_core=true"
for v in 16 100000 100000 16; do
  n=$(ls $OUT/ab_${v}_*.json 2>/dev/null | wc -l); n=$((n + 1))
  echo "=== GPT_TRITON_SEND_AFTER_LAUNCH_MIN_ROWS=$v (run $n) ===" >> $OUT/ab.log
  step ab.log 110 env GPT_TRITON_SEND_AFTER_LAUNCH_MIN_ROWS=$v python bench/serving_bench.py --out $OUT/ab_${v}_$n.json --work $W $A
  grep -h "in-flight scheduler, last" $W/raw/server.log | cut -c1-700 >> $OUT/ab.log
done
rm -f $OUT/ab_*.md $OUT/ab_*.png
