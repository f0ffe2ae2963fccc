# Call 6 (issue 17): the engine process's end of pass (PassSender + _Outbox) leaner, A/B in one call: f91865e's
# scheduler.py and engine_process.py (.gpu/ab_old, `git show f91865e:builder/runtime/...`) against this change's
# (.gpu/ab_new), alternated, 64 and 256 streams of the text core (fp8 KV cache); each run renders its own repository.
source scripts/gpu/setup.sh > $OUT/setup.log 2>&1
START=$(date +%s)
left() { echo $(( 380 - ($(date +%s) - START) )); }
step() { local out=$1 limit=$2; shift 2; local l=$(left); [ $l -lt 20 ] && { echo "skipped: no time" >> $OUT/$out; return; }
  [ $limit -gt $l ] && limit=$l; timeout $limit "$@" >> $OUT/$out 2>&1; echo "rc=$? at $(( $(date +%s) - START )) s" >> $OUT/$out; }
W=~/.cache/gpt-triton-bench/serving-bench-fp8
for round in 1 2; do
  for v in old new; do
    cp .gpu/ab_$v/scheduler.py .gpu/ab_$v/engine_process.py builder/runtime/
    echo "=== round $round: $v ===" >> $OUT/ab.log
    step ab.log 150 python bench/serving_bench.py --out $OUT/ab_${v}_$round.json --work $W --levels 64,256 --skip-bs1 --skip-not-streamed --skip-core --skip-mixed --seconds 3 --max-trials 4 --render-option kv_cache_dtype=fp8 --render-option text_in_core=true
    grep -h "in-flight scheduler, last" $W/raw/server.log | grep -v " 0\.[0-9] rows" | cut -c1-420 >> $OUT/ab.log
  done
done
