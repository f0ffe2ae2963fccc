source .gpu/common.sh
step tail.txt 150 "$GPU_HOST_PYTHON" .gpu/tail.py
step cuda_tests.txt 300 "$GPU_HOST_PYTHON" -m pytest -q -p no:cacheprovider tests/test_engine_cuda.py tests/test_step_graphs.py tests/test_chunked_prefill.py tests/test_scheduler.py tests/test_engine_process.py -k "not render and not ensemble"
