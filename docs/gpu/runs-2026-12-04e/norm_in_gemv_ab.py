"""A/B of the decode step (issue 12): LayerNorms applied inside the skinny GEMVs and residual adds inside the GEMVs into
the residual (`DecodeKernels.norm_in_gemv`, 5 kernels a layer) against the add + LayerNorm kernels (7 a layer), one
process, alternated in rounds, at 1, 8, 16 and 64 rows (64 runs neither: a control for drift). Also the greedy tokens
of both (64 steps), and each step's bandwidth floor (weights + KV at the measured copy bandwidth). Call 2 ran this
script as of 8b8dd54, with two more variants (the GEMVs into the residual whole, the norm's sums before the loop).

    python docs/gpu/runs-2026-12-04e/norm_in_gemv_ab.py
"""

from __future__ import annotations

import statistics
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from bench.profile_decode import floor_ms, greedy_run, random_model
from builder.checkpoints.presets import PRESETS

COPY_GBPS = 4240.0  # H200, measured (docs/benchmarks.md)
PROMPT, STEPS = 128, 64

with torch.inference_mode():
    model = random_model(PRESETS["gpt3-1.3b"], torch.device("cuda:0"), torch.float16)
    model.allocate_cache(64, 1024)
    assert model.kernels.norm_in_gemv, "the default for an fp16 model on CUDA"
    variants = {"norms kernels": replace(model.kernels, norm_in_gemv=False), "norms in GEMVs": model.kernels}
    for batch in (1, 8, 16, 64):
        prompt = torch.randint(100, 50000, (batch, PROMPT), device=model.device)
        times: dict[str, list[float]] = {name: [] for name in variants}
        tokens = {}
        for _ in range(4):
            for name, kernels in variants.items():
                model.kernels = kernels
                ms, tokens[name], _, _ = greedy_run(model, prompt, STEPS, timed=True)
                times[name].append(ms)
        floor = floor_ms(model, batch, PROMPT + STEPS / 2, COPY_GBPS)
        base = statistics.median(times["norms kernels"])
        print(f"batch {batch:3d} (floor {floor:.3f} ms): " + "; ".join(
            f"{name} {statistics.median(t):.3f} ms/step ({' '.join(f'{x:.3f}' for x in t)}, "
            f"{statistics.median(t) / base - 1:+.2%}, fraction of floor {floor / statistics.median(t):.3f}, "
            f"tokens equal {(tokens[name] == tokens['norms kernels']).float().mean().item():.3f})"
            for name, t in times.items()), flush=True)
