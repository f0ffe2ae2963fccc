#!/usr/bin/env bash
# On the GPU host (after `source scripts/gpu/setup.sh`): which of our dependencies exist, the engine's CUDA tests, and the
# raw engine (no Triton) at the 1.3B shape. Output goes to $OUT (or a new private folder from mktemp -d).
set -uo pipefail
OUT=${OUT:-$(mktemp -d)}; mkdir -p "$OUT"  # the device sets $OUT; elsewhere a private new folder
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python - <<'PY' 2>&1 | tee "$OUT/imports.txt"
import importlib
for name in ["torch", "numpy", "transformers", "tokenizers", "click", "jinja2", "tqdm", "yaml", "pytest",
             "tritonclient.grpc", "google.protobuf", "matplotlib", "safetensors"]:
    try:
        module = importlib.import_module(name)
        print(name, getattr(module, "__version__", "ok"))
    except Exception as err:
        print(name, "MISSING", repr(err)[:120])
PY
"$GPU_HOST_PYTHON" -m pytest -q tests/test_engine_cuda.py -p no:cacheprovider 2>&1 | tail -15 | tee "$OUT/cuda_tests.txt"
python bench/engine_cpu.py --preset gpt3-1.3b --device cuda:0 --dtype fp16 --batch-sizes 1 64 2>&1 | tail -20 | tee "$OUT/engine_bench.txt"
