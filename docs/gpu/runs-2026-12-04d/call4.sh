# Call 4: call 3's serving run again (it found call 3's host still warm), then call 2's instrumented stages on this code.
# What ran: the serving run only. `bash` gave call3.sh a shell of its own, so `step` was not defined for the stages
# below (call5.sh ran them).
bash docs/gpu/runs-2026-12-04d/call3.sh
W=~/.cache/gpt-triton-bench/text-paths-fp8
step stages_512.txt 200 python docs/gpu/runs-2026-12-04c/text_core_stages.py --work $W --out $OUT/stages_512.json --prompt-tokens 512 --reps 150 --instrument --render-option kv_cache_dtype=fp8
grep -v "^\[\|weights ->" $OUT/stages_512.txt > $OUT/stages_512_short.txt; rm $OUT/stages_512.txt
