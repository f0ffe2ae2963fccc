"""Prefill on one GPU: where the time of a prompt's pass goes (issue 17: time to first token, admission under load).

For each shape (rows x prompt tokens) it times GptModel.prefill eagerly and replayed from a CUDA graph (as the
in-flight scheduler runs it: generation.PrefillGraphs), reports the achieved TFLOP/s against the matmul FLOPs of the
pass, then prints a torch.profiler table of the CUDA kernels of one eager pass per `--profile` shape.

  source scripts/gpu/setup.sh && python bench/profile_prefill.py --shapes 1x128 1x512 4x128 1x1024 --profile 1x512
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.profile_decode import random_model
from builder.checkpoints.presets import PRESETS
from builder.runtime.gpt import GptModel


def parse_shape(text: str) -> tuple[int, int]:
    rows, tokens = text.lower().split("x")
    return int(rows), int(tokens)


def matmul_tflop(model: GptModel, rows: int, tokens: int) -> float:
    """The pass's matmul FLOPs (TFLOP): 2 x the layers' weights per token, causal attention, the last token's
    lm_head per row."""
    hidden, layers = model.hidden, len(model.layers)
    per_token = 2 * layers * 12 * hidden * hidden
    attention = 2 * layers * 2 * hidden * tokens * tokens / 2 * rows  # QK^T and PV, causal half
    lm_head = 2 * hidden * model.config.vocab_size * rows
    return (per_token * rows * tokens + attention + lm_head) / 1e12


def time_ms(run, reps: int = 20) -> float:
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times[3:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["1x128", "1x512", "4x128", "1x1024"])
    parser.add_argument("--profile", nargs="*", default=["1x512"], help="shapes to print a kernel table of")
    args = parser.parse_args()
    device = torch.device("cuda:0")
    shapes = [parse_shape(text) for text in args.shapes]
    with torch.inference_mode():
        model = random_model(PRESETS["gpt3-1.3b"], device, torch.float16)
        model.allocate_cache(max(rows for rows, _ in shapes), 2048)
        print(f"GPU: {torch.cuda.get_device_name(device)}")
        for rows, tokens in shapes:
            prompt = torch.randint(100, 50000, (rows, tokens), device=device)
            lengths = torch.full((rows,), tokens, device=device)
            eager = time_ms(lambda prompt=prompt, lengths=lengths: model.prefill(prompt, lengths))
            graph = torch.cuda.CUDAGraph()
            model.prefill(prompt, lengths)
            torch.cuda.synchronize()
            with torch.cuda.graph(graph):
                model.prefill(prompt, lengths)
            replay = time_ms(graph.replay)
            flop = matmul_tflop(model, rows, tokens)
            print(f"prefill {rows} x {tokens:4d}: eager {eager:6.2f} ms, graph {replay:6.2f} ms "
                  f"({flop * 1e3:.0f} GFLOP: {flop / replay * 1e3:5.0f} TFLOP/s in the graph)", flush=True)
            del graph
        for text in args.profile:
            rows, tokens = parse_shape(text)
            prompt = torch.randint(100, 50000, (rows, tokens), device=device)
            lengths = torch.full((rows,), tokens, device=device)
            model.prefill(prompt, lengths)
            torch.cuda.synchronize()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    model.prefill(prompt, lengths)
                torch.cuda.synchronize()
            print(f"-- CUDA kernels of 5 eager prefills, {rows} x {tokens} --")
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=20, max_name_column_width=80))


if __name__ == "__main__":
    main()
