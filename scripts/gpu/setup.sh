# Source on the GPU host, after `bash scripts/gpu/pack.sh` (on a machine with a package index) filled .gpu/:
#   source scripts/gpu/setup.sh
# Everything lands inside .gpu/ (private to the checkout; no shared /tmp path another local user could pre-create):
#   .gpu/runtime/      tritonserver, its Python backend and stub, perf_analyzer
#   .gpu/venv/         the host's python3 with the kit's wheels (numpy 1.26 first), then the host's own site-packages
#                      (torch, transformers, ...), then the repository: what Triton's Python-backend stub runs
#   .gpu/host-extras/  psutil only, for the host's own Python (see GPU_HOST_PYTHON)
# Exports: PATH (.gpu/venv/bin first, so `python` and the stub use the venv), TRITONSERVER_BIN, TRITON_BACKEND_DIR,
# PERF_ANALYZER (a wrapper that sets its library path), GPU_HOST_PYTHON (the host's own python3, which keeps its
# numpy 2 for transformers, with .gpu/host-extras and the repository on its path: the engine's CUDA tests and the
# HF peer run there). Idempotent: delete .gpu/runtime or .gpu/venv to rebuild them.
_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
_gpu_dir="$_root/.gpu"
_rt="$_gpu_dir/runtime"
_tritonserver="$_rt/pytriton/tritonserver"
if [ ! -x "$_tritonserver/bin/tritonserver" ] || [ ! -x "$_rt/perf_analyzer" ]; then
  rm -rf "$_rt" && mkdir -m 700 "$_rt" && tar xJf "$_gpu_dir/triton.tar.xz" -C "$_rt"
  _pyv=$(ls "$_tritonserver/python_backend_stubs")
  cp "$_tritonserver/python_backend_stubs/$_pyv/triton_python_backend_stub" "$_tritonserver/backends/python/"
  _L="$_rt/nvidia_pytriton.libs"
  ln -sf "$(ls "$_L"/libb64-*.so.0d)" "$_L/libb64.so.0d"
  ln -sf "$(ls "$_L"/libcudart-*.so.12*)" "$_L/libcudart.so.12"
  xz -dc "$_gpu_dir/perf_analyzer.xz" > "$_rt/perf_analyzer.bin" && chmod +x "$_rt/perf_analyzer.bin"
  printf '#!/bin/sh\nLD_LIBRARY_PATH="%s${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" exec "%s" "$@"\n' "$_L" \
    "$_rt/perf_analyzer.bin" > "$_rt/perf_analyzer" && chmod +x "$_rt/perf_analyzer"
fi
# The host's interpreter, found before our venv goes first on PATH (a second `source` finds it recorded).
_hostpy=$(cat "$_gpu_dir/host-python.txt" 2>/dev/null)
[ -x "$_hostpy" ] || _hostpy=$(command -v python3)
echo "$_hostpy" > "$_gpu_dir/host-python.txt"
# A venv carried from another machine points at an interpreter that is not here: rebuild it. Without a working
# venv, "$_sp" below would be empty and `pip install --target ""` would overwrite the host's own numpy.
if ! "$_gpu_dir/venv/bin/python" -c '' 2>/dev/null; then
  rm -rf "$_gpu_dir/venv"
  _hostsite=$("$_hostpy" -c 'import site; print(site.getsitepackages()[0])')
  _base=$("$_hostpy" -c 'import sys; print(sys.base_prefix)')/bin/python3
  "$_base" -m venv --without-pip "$_gpu_dir/venv"
  _sp=$("$_gpu_dir/venv/bin/python" -c 'import site; print(site.getsitepackages()[0])')
  [ -d "$_sp" ] || { echo "setup.sh: could not create $_gpu_dir/venv" >&2; return 1; }
  "$_hostpy" -m pip install -q --no-deps --no-index --target "$_sp" "$_gpu_dir"/whl/*.whl
  echo "$_hostsite" > "$_sp/zz_host_site.pth"
  echo "$_root" > "$_sp/zz_project.pth"
  rm -rf "$_gpu_dir/host-extras"
  "$_hostpy" -m pip install -q --no-deps --no-index --target "$_gpu_dir/host-extras" "$_gpu_dir"/whl/psutil-*.whl
  printf '#!/bin/sh\nPYTHONPATH="%s:%s${PYTHONPATH:+:$PYTHONPATH}" exec "%s" "$@"\n' "$_gpu_dir/host-extras" \
    "$_root" "$_hostpy" > "$_gpu_dir/host-python" && chmod +x "$_gpu_dir/host-python"
fi
export PATH="$_gpu_dir/venv/bin:$PATH"
export TRITONSERVER_BIN="$_tritonserver/bin/tritonserver"
export TRITON_BACKEND_DIR="$_tritonserver/backends"
export PERF_ANALYZER="$_rt/perf_analyzer"
export GPU_HOST_PYTHON="$_gpu_dir/host-python"
python -c 'import numpy, torch; print("gpu env: numpy", numpy.__version__, "torch", torch.__version__, "cuda", torch.cuda.is_available())'
# A kit packed without tiktoken still serves, with prompts encoded ~7x slower (README, troubleshooting): say so here.
python -c 'import tiktoken' 2>/dev/null || echo "setup.sh: WARNING: no tiktoken in .gpu/venv: prompts encode with tokenizers, ~7x slower; pack the kit with scripts/gpu/pack.sh" >&2
