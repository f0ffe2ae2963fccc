# Call 6: the text core's server tests with the engines on the GPU (streamed text = the classic ensemble's streamed
# and not-streamed text for the same seeds, the straight-from-tokens stream against the FT-arrays way, log-probs).
source docs/gpu/runs-2026-12-04/common.sh
GPT_TRITON_TEST_DEVICE=gpu step text_in_core_gpu.txt 400 python -m pytest -q -p no:cacheprovider tests/test_text_in_core.py -k "not hf and not openai and not render" -rA
