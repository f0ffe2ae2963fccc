source docs/gpu/runs-2026-12-04/common.sh
W=~/.cache/gpt-triton-bench/text-paths-fp8
lscpu | grep -i "model name\|mhz" > $OUT/cpu.txt
for n in 512 128; do
  step stages_$n.txt 250 python docs/gpu/runs-2026-12-04c/text_core_stages.py --work $W --out $OUT/stages_$n.json --prompt-tokens $n --reps 150 --instrument --render-option kv_cache_dtype=fp8
  grep -v "^\[\|weights ->" $OUT/stages_$n.txt > $OUT/stages_${n}_short.txt; rm $OUT/stages_$n.txt
done
