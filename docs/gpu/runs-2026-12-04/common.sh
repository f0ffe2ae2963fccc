# CALL_S (default 585): the seconds this call may use, less where the session has less device time left.
source scripts/gpu/setup.sh > $OUT/setup.log 2>&1
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,clocks.sm --format=csv > $OUT/gpu.txt
START=$(date +%s)
left() { echo $(( ${CALL_S:-585} - ($(date +%s) - START) )); }
step() { local out=$1 limit=$2; shift 2; local l=$(left); [ $l -lt 20 ] && { echo "skipped: no time" >> $OUT/$out; return; }
  [ $limit -gt $l ] && limit=$l; timeout $limit "$@" >> $OUT/$out 2>&1; echo "rc=$? at $(( $(date +%s) - START )) s" >> $OUT/$out; }
serving() {  # $1: work folder, rest: extra serving_bench options
  local W=$1; shift
  step serving.log 300 python bench/serving_bench.py --out $OUT/serving.json --work $W --levels 1,64,256 --skip-core --seconds 3 --mixed-seconds 8 --max-trials 4 --bs1-reps 20 "$@"
  echo "--- engine timeline (server log) ---" >> $OUT/serving.log
  grep -h "in-flight scheduler, last" $W/raw/server.log | cut -c1-900 >> $OUT/serving.log
}
