source docs/gpu/runs-2026-12-04/common.sh
W=~/.cache/gpt-triton-bench/text-paths-fp8
step stages.txt 420 python docs/gpu/runs-2026-12-04/text_core_stages.py --work $W --out $OUT/text_core_stages.json --prompt-tokens 512 --reps 150 --render-option kv_cache_dtype=fp8
grep -v "^\[\|weights ->" $OUT/stages.txt > $OUT/stages_short.txt
