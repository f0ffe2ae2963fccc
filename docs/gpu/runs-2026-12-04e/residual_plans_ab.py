"""Launch shapes of the GEMVs into the residual under `DecodeKernels.norm_in_gemv` (issue 12): the model's plans
(split over K into 4, 32-column blocks) against other splits and block widths, one process, alternated in rounds, at
1 and 8 rows. Fewer column blocks also mean fewer block sums for the next GEMV to read.

    python docs/gpu/runs-2026-12-04e/residual_plans_ab.py
"""

from __future__ import annotations

import statistics
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from bench.profile_decode import greedy_run, random_model
from builder.checkpoints.presets import PRESETS

with torch.inference_mode():
    model = random_model(PRESETS["gpt3-1.3b"], torch.device("cuda:0"), torch.float16)
    model.allocate_cache(16, 1024)
    plans = dict(model.skinny_plans)
    out, fc2 = plans["out"], plans["fc2"]
    assert out is not None and fc2 is not None
    variants = {f"model's (out split {out.split_k}, fc2 split {fc2.split_k}, 32 columns)": plans,
                "split 2, 32 columns": {**plans, "out": replace(out, split_k=2), "fc2": replace(fc2, split_k=2)},
                "fc2 split 8, 32 columns": {**plans, "fc2": replace(fc2, split_k=8)},
                "64 columns, out split 4, fc2 split 8": {**plans, "out": replace(out, block_n=64),
                                                         "fc2": replace(fc2, block_n=64, split_k=8)},
                "64 columns, 4 warps": {**plans, "out": replace(out, block_n=64, num_warps=4),
                                        "fc2": replace(fc2, block_n=64, split_k=8, num_warps=4)}}
    for batch in (1, 8):
        prompt = torch.randint(100, 50000, (batch, 128), device=model.device)
        times: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(3):
            for name, chosen in variants.items():
                model.skinny_plans = chosen
                times[name].append(greedy_run(model, prompt, 64, timed=True)[0])
        for name, t in times.items():
            print(f"batch {batch}: {name}: {statistics.median(t):.3f} ms/step ({' '.join(f'{x:.3f}' for x in t)})",
                  flush=True)
