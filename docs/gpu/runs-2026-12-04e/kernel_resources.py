"""The host's Triton version, and registers / spills / shared memory of the skinny GEMM's variants as the decode step
launches them at batch 1 (1.3B shapes): plain (QKV), norm applied to the product (FC1), into the residual whole and
split over K.

    python docs/gpu/runs-2026-12-04e/kernel_resources.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from builder.runtime import gpt_kernels

print("triton", triton.__version__, "torch", torch.__version__, flush=True)
launched = []
original = gpt_kernels._skinny_linear_kernel


class Recorder:
    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            kernel = original[grid](*args, **kwargs)
            launched.append((grid, {k: v for k, v in kwargs.items() if k.isupper()}, kernel))
            return kernel
        return launch


gpt_kernels._skinny_linear_kernel = Recorder()
device, h, f = torch.device("cuda:0"), 2048, 8192
x = torch.randn(1, h, device=device, dtype=torch.float16)
up = torch.randn(1, f, device=device, dtype=torch.float16)
w = torch.randn(f, h, device=device, dtype=torch.float16) * 0.02
w2 = torch.randn(h, f, device=device, dtype=torch.float16) * 0.02
b = torch.zeros(f, device=device, dtype=torch.float16)
counters = torch.zeros(256, dtype=torch.int32, device=device)
stats = torch.zeros(1, 128, 2, device=device)
gpt_kernels.skinny_linear(x, w, b, num_warps=2)
gpt_kernels.skinny_linear(x, w, b, num_warps=2, activation="gelu_tanh",
                          norm=gpt_kernels.LayerNormIn(stats, w.float().sum(1), 1e-5))
gpt_kernels.skinny_linear_residual(up, w2, b[:h], x, counters, split_k=1, block_n=16, num_warps=2)
gpt_kernels.skinny_linear_residual(up, w2, b[:h], x, counters, split_k=4, block_n=32, num_warps=2)
gpt_kernels.skinny_linear(up, w2, split_k=4, num_warps=2)
for grid, constants, kernel in launched:
    print(f"grid {grid} {constants}: registers {kernel.n_regs}, spills {kernel.n_spills}, "
          f"shared {kernel.metadata.shared} B", flush=True)
