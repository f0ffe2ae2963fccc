# Call 2 (issue 12): the decode step's per-kernel timeline at 1 and 8 rows (with PDL, as served, and with plain
# launches, whose kernel durations do not overlap).
source scripts/gpu/setup.sh > $OUT/setup.log 2>&1
START=$(date +%s)
left() { echo $(( 585 - ($(date +%s) - START) )); }
step() { local out=$1 limit=$2; shift 2; local l=$(left); [ $l -lt 20 ] && { echo "skipped: no time" >> $OUT/$out; return; }
  [ $limit -gt $l ] && limit=$l; timeout $limit "$@" >> $OUT/$out 2>&1; echo "rc=$? at $(( $(date +%s) - START )) s" >> $OUT/$out; }
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,clocks.sm,power.limit --format=csv > $OUT/gpu.txt
echo "== PDL (default) ==" >> $OUT/timeline.txt
step timeline.txt 90 python bench/profile_decode.py --batch 1 8 --steps 32 --timeline
echo "== GPT_TRITON_PDL=0 ==" >> $OUT/timeline.txt
GPT_TRITON_PDL=0 step timeline.txt 90 python bench/profile_decode.py --batch 1 8 --steps 32 --timeline
