source .gpu/common.sh
W=~/.cache/gpt-triton-bench/serving-bench-fp8; mkdir -p $W/res
F8="--render-option kv_cache_dtype=fp8"; TC="--render-option text_in_core=true"
B1="--levels 1 --skip-streamed --skip-not-streamed --skip-core --skip-mixed --bs1-reps 30"
for v in "classic_auto" "classic_8 --render-option kv_slots=8" "text_auto $TC" "text_8 $TC --render-option kv_slots=8"; do
  set -- $v; name=$1; shift
  echo "=== $name" >> $OUT/bs1.log
  step bs1.log 110 python bench/serving_bench.py --out $W/res/$name.json --work $W $B1 $F8 "$@"
  grep -h "batch 1:" $W/res/$name.md >> $OUT/bs1.log 2>/dev/null
  python - $W/res/$name.json >> $OUT/bs1.log <<'PY'
import json, sys; d = json.load(open(sys.argv[1]))
print({k: round(v, 3) for k, v in d.items() if isinstance(v, float)}, d.get("render", {}).get("kv_slots"))
PY
done
step sft.txt 120 "$GPU_HOST_PYTHON" docs/gpu/runs-2026-12-03h/scheduler_slots.py
