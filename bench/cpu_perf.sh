#!/usr/bin/env bash
# CPU perf report of the demo repository (issue: client + perf_analyzer): throughput/latency for concurrency 1-16 and
# the latency the text ensemble adds over the token-id core model. Writes docs/perf/cpu-demo/.
# Usage (from the project root, after `bash scripts/setup.sh`):  bash bench/cpu_perf.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
OUT=${OUT:-docs/perf/cpu-demo}
$PY -c 'from pathlib import Path; from builder.demo import build_demo_repository; build_demo_repository(Path("demo_repository"))'
$PY -m builder serve demo_repository --http-port 18000 --grpc-port 18001 --metrics-port 18002 &
server=$!
trap 'kill -TERM $server; wait $server' EXIT
for _ in $(seq 120); do curl -sf localhost:18000/v2/health/ready && break; sleep 1; done
$PY -m client perf --server localhost:18000 --protocol http --prompt-tokens 16 --max-tokens 16 \
  --concurrency 1,2,4,8,16 --measurement-interval 5000 --stability-percentage 50 --compare-core gpt3_1.3b --output "$OUT"
