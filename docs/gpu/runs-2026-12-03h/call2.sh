source .gpu/common.sh
W=~/.cache/gpt-triton-bench/serving-bench-fp8
step probe.txt 300 python docs/gpu/runs-2026-12-03h/first_response_clients.py --work $W --render-option kv_cache_dtype=fp8 --render-option text_in_core=true
grep -v "^\[\|weights ->" $OUT/probe.txt > $OUT/probe_short.txt
