# Call 1 again with the GPU kit packed by scripts/gpu/pack.sh (tiktoken among its wheels): call 1's kit lacked it.
# (call 7, a one-line check: the host's own site-packages hold tiktoken 0.14.0, which the kit's venv reads after its
# wheels, so call 1 encoded with tiktoken too: the two calls differ by their hosts only.)
source docs/gpu/runs-2026-12-04/common.sh
W=~/.cache/gpt-triton-bench/text-paths-fp8
python -c "import tiktoken, sys; print('tiktoken', tiktoken.__version__, sys.executable)" > $OUT/encoder.txt 2>&1
for n in 512 128; do
  step stages_$n.txt 250 python docs/gpu/runs-2026-12-04c/text_core_stages.py --work $W --out $OUT/stages_$n.json --prompt-tokens $n --reps 150 --instrument --render-option kv_cache_dtype=fp8
  grep -v "^\[\|weights ->" $OUT/stages_$n.txt > $OUT/stages_${n}_short.txt; rm $OUT/stages_$n.txt
done
