"""Profile the engine's decode loop at the 1.3B shape (random fp16 weights, no Triton): where a step's time goes.

    python bench/profile_decode.py --batch 1 --steps 64
Prints the top CUDA kernels by total time, the GPU time per step, and the wall time per step.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.engine_cpu import random_weights  # noqa: E402
from builder.checkpoints.presets import PRESETS  # noqa: E402
from builder.runtime.core_io import GenerationRequest  # noqa: E402
from builder.runtime.generation import GptEngine  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--prompt", type=int, default=128)
    args = parser.parse_args()
    config = PRESETS["gpt3-1.3b"]
    engine = GptEngine(config, random_weights(config), device="cuda:0", dtype=torch.float16, max_batch_size=64,
                       max_seq_len=1024, vocab_limit=50257)
    requests = [GenerationRequest(input_ids=tuple(range(100, 100 + args.prompt)), output_len=args.steps,
                                  end_id=50256, min_length=args.steps) for _ in range(args.batch)]
    for _ in range(3):
        engine.generate(requests)
    torch.cuda.synchronize()
    start = time.perf_counter()
    engine.generate(requests)
    torch.cuda.synchronize()
    wall = time.perf_counter() - start
    print(f"wall {wall * 1000:.1f} ms for {args.steps} steps -> {wall / args.steps * 1000:.3f} ms/step (incl. prefill)")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        engine.generate(requests)
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60)
    print(table)
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=15, max_name_column_width=60))


if __name__ == "__main__":
    main()
