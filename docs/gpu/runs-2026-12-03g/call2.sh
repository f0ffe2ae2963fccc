source .gpu/common.sh
W=~/.cache/gpt-triton-bench/serving-bench-fp8; mkdir -p $W/res
tp() {  # $1 label, $2 script dir
  step text_paths.log 150 python $2/bench/text_paths.py --out $W/res/tp_$1.json --work $W --reps 30
  python - $W/res/tp_$1.json $1 >> $OUT/ab.txt <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
for n, f in r["prompts"].items():
    print(sys.argv[2], n, "ttft ms text_core/ids/ensemble", *(round(f[f"ttft_ms_{p}"]["p50"], 2) for p in ("text_core", "gpt3_1.3b", "ensemble")),
          "text_core_over_ids", round(f["ttft_text_core_over_ids_ms"], 3), "latency over", round(f["latency_text_core_over_ids_ms"], 3), flush=True)
PY
}
tp old .gpu/old
tp new .
step prefill.txt 100 python bench/profile_prefill.py --shapes 1x128 1x512 4x128 1x1024 1x2048 --attention kernel --gelu-epilogue on off --profile
tp old2 .gpu/old
tp new2 .
