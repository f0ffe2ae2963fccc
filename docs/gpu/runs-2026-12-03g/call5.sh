source scripts/gpu/setup.sh > $OUT/setup.log 2>&1
W=~/.cache/gpt-triton-bench/serving-bench-fp8; mkdir -p $W/res
for slots in 256 8; do
  timeout 90 python bench/text_paths.py --out $W/res/tp_$slots.json --work $W --reps 20 --kv-slots $slots --prompt-tokens 512 --render-option kv_cache_dtype=fp8 > /dev/null 2>&1
  echo "kv_slots $slots rc=$?" >> $OUT/slots.txt; tail -6 $W/res/tp_$slots.md >> $OUT/slots.txt
done
