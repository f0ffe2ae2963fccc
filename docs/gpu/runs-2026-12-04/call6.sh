# GpuSampler (bench/serving_bench.py) on the host: a dense fp16 8192^3 matmul loop for 3 s, then 1.5 s idle.
source docs/gpu/runs-2026-12-04/common.sh; python - <<'PY' 2>&1 | tail -8
import sys, time; sys.path[:0] = ["bench", "."]
import serving_bench, torch
from pathlib import Path
x = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
with serving_bench.GpuSampler(Path("/tmp/load.gpu.csv")) as g:
    end = time.time() + 3
    while time.time() < end:
        for _ in range(20): x @ x
        torch.cuda.synchronize()
print("under load", g.summary())
print(open("/tmp/load.gpu.csv").read()[:200])
with serving_bench.GpuSampler(Path("/tmp/idle.gpu.csv")) as g:
    time.sleep(1.5)
print("idle", g.summary())
PY
