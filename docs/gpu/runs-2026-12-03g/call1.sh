source .gpu/common.sh
W=~/.cache/gpt-triton-bench/serving-bench-fp8; mkdir -p $W/res
step text_paths.log 200 python bench/text_paths.py --out $W/res/text_paths.json --work $W --reps 30
cp $W/res/text_paths.json $W/res/text_paths.md $OUT/ 2>/dev/null
step prefill_profile.txt 130 python bench/profile_prefill.py --shapes 1x512 1x128 --attention kernel --profile 1x512
step gemm_shapes.txt 70 python .gpu/gemm_shapes.py 512
