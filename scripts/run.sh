#!/usr/bin/env bash
# The README's two commands:
#   bash scripts/run.sh demo   set up (first time), then serve the demo model through tritonserver and answer
#                              "1 2 3 4 5 6"; keeps serving until Ctrl-C (extra args go to `builder demo`)
#   bash scripts/run.sh test   set up (first time), then run the whole test suite (extra args go to pytest)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
what=${1:-}; shift || true
case "$what" in
  demo) exec .venv/bin/python -m builder demo "$@" ;;
  test) exec .venv/bin/python -m pytest -q "$@" ;;
  *) echo "usage: bash scripts/run.sh demo|test [args]" >&2; exit 2 ;;
esac
