"""A/B of the decode step (issue 12): this checkout's kernels and launch plans (weights, biases and positions read
before the PDL wait; 2 warps per skinny GEMM program up to 32 rows) against 648e485's (its gpt_kernels.py loaded
from a copy of that file, path as the first argument, and 4 warps), alternated in rounds at 1, 8, 32 and 64 rows.

    python docs/gpu/runs-2026-12-04b/kernels_ab.py .gpu/gpt_kernels_648e485.py
"""

from __future__ import annotations

import importlib.util
import statistics
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from bench.profile_decode import greedy_run, random_model
from builder.checkpoints.presets import PRESETS
from builder.runtime import gpt_kernels

spec = importlib.util.spec_from_file_location("gpt_kernels_before", sys.argv[1])
assert spec is not None and spec.loader is not None
before = importlib.util.module_from_spec(spec)
spec.loader.exec_module(before)
NAMES = ("add_layer_norm", "skinny_linear", "decode_attention")
variants = {"648e485": {name: getattr(before, name) for name in NAMES},
            "this": {name: getattr(gpt_kernels, name) for name in NAMES}}

with torch.inference_mode():
    model = random_model(PRESETS["gpt3-1.3b"], torch.device("cuda:0"), torch.float16)
    model.allocate_cache(64, 1024)
    plans = {"this": dict(model.skinny_plans),
             "648e485": {name: plan if plan is None or plan.num_warps == 4 else replace(plan, num_warps=4)
                         for name, plan in model.skinny_plans.items()}}
    for batch in (1, 8, 32, 64):
        prompt = torch.randint(100, 50000, (batch, 128), device=model.device)
        times: dict[str, list[float]] = {name: [] for name in variants}
        tokens = {}
        for _ in range(4):
            for name, functions in variants.items():
                for function, value in functions.items():
                    setattr(gpt_kernels, function, value)
                model.skinny_plans = plans[name]
                ms, tokens[name], _, _ = greedy_run(model, prompt, 64, timed=True)
                times[name].append(ms)
        same = (tokens["648e485"] == tokens["this"]).float().mean().item()
        print(f"batch {batch:3d}: " + ", ".join(
            f"{name} {statistics.median(t):.3f} ms/step ({' '.join(f'{x:.3f}' for x in t)})"
            for name, t in times.items())
            + f" | change {statistics.median(times['this']) / statistics.median(times['648e485']) - 1:+.2%}"
            + f", tokens equal {same:.3f}", flush=True)
