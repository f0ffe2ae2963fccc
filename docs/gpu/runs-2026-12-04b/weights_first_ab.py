"""A/B of the decode step (issue 12): the add + LayerNorm kernel's weights and the skinny GEMM's bias loaded before
the PDL wait (this checkout's gpt_kernels.py) against 648e485's kernels (loaded from a copy of that file, path as the
first argument), alternated in rounds at 1, 8 and 64 rows; the same tokens expected.

    python docs/gpu/runs-2026-12-04b/weights_first_ab.py .gpu/gpt_kernels_648e485.py
"""

from __future__ import annotations

import importlib.util
import statistics
import sys
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
variants = {"before": (before.add_layer_norm, before.skinny_linear),
            "weights first": (gpt_kernels.add_layer_norm, gpt_kernels.skinny_linear)}

with torch.inference_mode():
    model = random_model(PRESETS["gpt3-1.3b"], torch.device("cuda:0"), torch.float16)
    model.allocate_cache(64, 1024)
    for batch in (1, 8, 64):
        prompt = torch.randint(100, 50000, (batch, 128), device=model.device)
        times: dict[str, list[float]] = {name: [] for name in variants}
        tokens = {}
        for _ in range(4):
            for name, (add_norm, linear) in variants.items():
                gpt_kernels.add_layer_norm, gpt_kernels.skinny_linear = add_norm, linear
                ms, tokens[name], _, _ = greedy_run(model, prompt, 64, timed=True)
                times[name].append(ms)
        same = (tokens["before"] == tokens["weights first"]).float().mean().item()
        print(f"batch {batch:3d}: " + ", ".join(
            f"{name} {statistics.median(t):.3f} ms/step ({' '.join(f'{x:.3f}' for x in t)})"
            for name, t in times.items())
            + f" | change {statistics.median(times['weights first']) / statistics.median(times['before']) - 1:+.2%}"
            + f", tokens equal {same:.3f}", flush=True)
