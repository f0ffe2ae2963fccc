#!/usr/bin/env bash
# Idempotent setup of a fresh machine for this project: Debian packages, a virtual environment at .venv, and the
# project installed into it (editable). Re-running is quick: it skips what is already in place.
#   - perf_analyzer (from the tritonclient wheel) needs Debian's libb64-0d and a libcudart.so.12 (pip package
#     nvidia-cuda-runtime-cu12; client/perf.py puts it on the library path).
#   - The Python-backend stub of the pip tritonserver links the system libpython3.X.
#   - Without a GPU, torch must be the CPU build: `pip install torch==2.13.0` takes the local CPU wheel on these
#     machines; an unpinned torch pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
pyver=$("$PYTHON" -c 'import sys; print(f"{sys.version_info.major}.{sys.version_info.minor}")')

need_apt=()
ldconfig -p | grep -q 'libb64.so.0d' || need_apt+=(libb64-0d)
ldconfig -p | grep -q "libpython${pyver}.so.1.0" || need_apt+=("libpython${pyver}")
# HAProxy: the balancer of `builder deploy local` and of the failover test (tests/test_failover.py).
command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ] || need_apt+=(haproxy)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${need_apt[*]}" >&2
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get install -y -q "${need_apt[@]}" >/dev/null 2>&1 || {
    $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q "${need_apt[@]}" >/dev/null; }
fi

# genai-perf 0.0.16 (tests/test_real_clients.py runs it unchanged) gets a venv of its own: it pulls numpy 2 and
# transformers 5, and this project pins numpy<2 (~45 s and ~950 MB from a warm pip cache). It drives the
# perf_analyzer of .venv (tritonclient's; its `perf-analyzer` pip dependency is an empty placeholder).
if [ ! -x .venv-genai-perf/bin/genai-perf ]; then
  echo "setup: installing genai-perf 0.0.16 into .venv-genai-perf" >&2
  rm -rf .venv-genai-perf
  "$PYTHON" -m venv .venv-genai-perf
  PIP_DISABLE_PIP_VERSION_CHECK=1 .venv-genai-perf/bin/pip install -q genai-perf==0.0.16
fi

stamp=.venv/.setup-stamp
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x .venv/bin/python ]; then
  exit 0
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! .venv/bin/python -c 'import torch' 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    .venv/bin/pip install -q torch
  else
    .venv/bin/pip install -q torch==2.13.0
  fi
fi
.venv/bin/pip install -q -e '.[dev]'
echo "$want" > "$stamp"
echo "setup: ready (.venv, Python ${pyver})" >&2
