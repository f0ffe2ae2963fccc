#!/usr/bin/env bash
# Packs what a GPU host without a package index needs to run this project's Triton stack, into .gpu/ (git-ignored):
#   triton.tar.xz     tritonserver 2.51 + Python backend + the Python-backend stub for $GPU_PYTHON_VERSION + its libs,
#                     from the nvidia-pytriton 0.7.0 wheel
#   perf_analyzer.xz  perf_analyzer 2.51, from the tritonclient 2.51.0 manylinux wheel
#   whl/              wheels for the GPU host's Python: numpy 1.26.4 (the 2.51 Python backend mis-reads BYTES tensors
#                     under numpy 2), tritonclient + python-rapidjson (the gRPC client; grpcio and protobuf are the
#                     host's), psutil (builder/serve.py), httpx and its pure-Python dependencies (client/), tiktoken
#                     (the prompt encoder, builder/runtime/tokenizer.py)
# On the GPU host, `source scripts/gpu/setup.sh` unpacks and exports them.
# Usage, on a machine with pip access to a package index:
#   bash scripts/gpu/pack.sh            # then copy the checkout (with .gpu/) to the GPU host
# About 60 MB. GPU_PYTHON_VERSION (default 3.12) is the GPU host's `python3 --version`.
set -euo pipefail
cd "$(dirname "$0")/../.."
DEST=.gpu
PYV=${GPU_PYTHON_VERSION:-3.12}
PIP=(python3 -m pip)
[ -x .venv/bin/python ] && PIP=(.venv/bin/python -m pip)
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
rm -rf "$DEST/whl" && mkdir -p "$DEST/whl"
# Wheels for another Python than ours: only binary wheels, for the GPU host's interpreter and platform.
# (tiktoken >= 0.13 ships manylinux_2_28 wheels only: the GPU host's glibc must be >= 2.28.)
for_host=(--no-deps --only-binary=:all: --python-version "$PYV" --implementation cp --platform manylinux_2_17_x86_64
          --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 --platform any)

"${PIP[@]}" download -q --no-deps -d "$tmp/w" nvidia-pytriton==0.7.0
"${PIP[@]}" download -q --no-deps --only-binary=:all: --platform manylinux1_x86_64 -d "$tmp/w" tritonclient==2.51.0
(cd "$tmp" && mkdir x && cd x && unzip -q ../w/nvidia_pytriton-*.whl &&
  tar cf - pytriton/tritonserver/bin pytriton/tritonserver/backends pytriton/tritonserver/caches \
    "pytriton/tritonserver/python_backend_stubs/$PYV" --exclude=__pycache__ \
    $(ls nvidia_pytriton.libs/* | grep -v libpython3)) | xz -T0 -6 > "$DEST/triton.tar.xz"
(cd "$tmp" && unzip -q -o w/tritonclient-2.51.0-*.whl 'tritonclient-2.51.0.data/data/bin/perf_analyzer' -d pa)
xz -T0 -6 -c "$tmp"/pa/tritonclient-2.51.0.data/data/bin/perf_analyzer > "$DEST/perf_analyzer.xz"

"${PIP[@]}" download -q "${for_host[@]}" -d "$DEST/whl" numpy==1.26.4 tritonclient==2.73.0 python-rapidjson \
  psutil==6.1.0 httpx==0.28.1 httpcore==1.0.9 h11==0.16.0 anyio==4.16.0 sniffio==1.3.1 idna==3.20 certifi \
  typing_extensions==4.16.0 tiktoken==0.14.0
du -sh "$DEST"; ls -la "$DEST" "$DEST/whl"
