# Run as one command line on the warm host right after call 4 (its ~/.cache kept the checkpoint and repositories).
source docs/gpu/runs-2026-12-04/common.sh; W=~/.cache/gpt-triton-bench/serving-bench-fp8; mkdir -p $W/res; F8="--render-option kv_cache_dtype=fp8"
step bs1.log 130 python bench/serving_bench.py --out $W/res/classic_bs1.json --work $W --levels 1 --skip-streamed --skip-not-streamed --skip-core --skip-mixed --bs1-reps 12 $F8
step bs1.log 120 python bench/serving_bench.py --out $OUT/text_bs1.json --work $W --levels 1 --skip-streamed --skip-not-streamed --skip-core --skip-mixed --bs1-reps 12 $F8 --render-option text_in_core=true --baseline $W/res/classic_bs1.json
cp $W/res/classic_bs1.json $OUT/
