"""Prefill on one GPU: where the time of a prompt's pass goes (issue 17: time to first token, admission under load).

For each shape (rows x prompt tokens) it times GptModel.prefill eagerly and replayed from a CUDA graph (as the
in-flight scheduler runs it: generation.PrefillGraphs), reports the achieved TFLOP/s against the matmul FLOPs of the
pass, then prints a torch.profiler table of the CUDA kernels of one eager pass per `--profile` shape. A shape
`RxT@S` is a chunk of T tokens per row at prompt position S (chunked prefill: the slot caches S tokens already).
Each shape runs with the Triton prefill attention (`gpt_kernels.prefill_attention`) and with PyTorch's SDPA
(`--attention`), in the same process.

  source scripts/gpu/setup.sh && python bench/profile_prefill.py --shapes 1x128 1x512 4x128 1x1024 1x256@768 \
      --profile 1x512
"""

from __future__ import annotations

import argparse
import functools
import itertools
import statistics
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.profile_decode import random_model
from builder.checkpoints.presets import PRESETS
from builder.runtime import gpt_kernels
from builder.runtime.gpt import GptModel


def parse_shape(text: str) -> tuple[int, int, int]:
    """"RxT" or "RxT@S" -> (rows, tokens, start)."""
    shape, _, start = text.lower().partition("@")
    rows, tokens = shape.split("x")
    return int(rows), int(tokens), int(start or 0)


def prefill_pass(model: GptModel, rows: int, tokens: int, start: int) -> Callable[[], torch.Tensor]:
    """One prefill of `rows` random prompts of `tokens` tokens into slots 0.., at prompt position `start` (a chunk
    over `start` cached keys, its kv bucket rounded up to 256 as `generation.PrefillGraphs` does)."""
    device = model.device
    prompt = torch.randint(100, 50000, (rows, tokens), device=device)
    lengths = torch.full((rows,), tokens, device=device)
    if start == 0:
        return lambda: model.prefill(prompt, lengths)
    starts, slots = torch.full((rows,), start, device=device), torch.arange(rows, device=device)
    kv_len = min(model.max_seq_len, -(-(start + tokens) // 256) * 256)
    return lambda: model.prefill(prompt, lengths, slot_index=slots, starts=starts, kv_len=kv_len)


def sweep_launches(model: GptModel, shapes: list[tuple[int, int, int]],
                   launches: list[tuple[int, int, int, int]]) -> None:
    """Each shape's prefill graph with the Triton attention at each launch shape (the kernel's default first)."""
    original = gpt_kernels.prefill_attention
    model.kernels = replace(model.kernels, attention=True)
    try:
        for rows, tokens, start in shapes:
            run, timings = prefill_pass(model, rows, tokens, start), []
            for launch in [None, *launches]:
                gpt_kernels.prefill_attention = functools.partial(original, launch=launch)  # what gpt.py calls
                timings.append(f"{'default' if launch is None else launch} {graph_ms(run):.3f} ms")
            print(f"attention launches, prefill {rows} x {tokens} at {start}: {', '.join(timings)}", flush=True)
    finally:
        gpt_kernels.prefill_attention = original


def matmul_tflop(model: GptModel, rows: int, tokens: int, start: int = 0) -> float:
    """The pass's matmul FLOPs (TFLOP): 2 x the layers' weights per token, causal attention (over `start` cached
    keys too), the last token's lm_head per row."""
    hidden, layers = model.hidden, len(model.layers)
    per_token = 2 * layers * 12 * hidden * hidden
    attention = 2 * layers * 2 * hidden * tokens * (tokens / 2 + start) * rows  # QK^T and PV, causal
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


def parse_launch(text: str) -> tuple[int, int, int, int]:
    """"64,64,4,3" -> (queries per program, keys per block, warps, pipeline stages)."""
    block_m, block_n, warps, stages = (int(value) for value in text.split(","))
    return block_m, block_n, warps, stages


def graph_ms(run: Callable[[], object]) -> float:
    """`run` captured in a CUDA graph (after one warm-up call): the median ms of its replays."""
    graph = torch.cuda.CUDAGraph()
    run()
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        run()
    return time_ms(graph.replay)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["1x128", "1x512", "4x128", "1x1024"])
    parser.add_argument("--profile", nargs="*", default=["1x512"], help="shapes to print a kernel table of")
    parser.add_argument("--attention", nargs="+", choices=["kernel", "sdpa"], default=["kernel", "sdpa"],
                        help="prefill attention(s) to time: the Triton kernel, PyTorch's SDPA (the profile: the first)")
    parser.add_argument("--attention-launches", nargs="*", default=[], metavar="M,N,WARPS,STAGES",
                        help="also time each shape's graph with these launch shapes of the Triton prefill attention "
                             "(queries per program, keys per block, warps, pipeline stages)")
    parser.add_argument("--gelu-epilogue", nargs="+", choices=["on", "off"], default=["on"],
                        help="the MLP's first GEMM with cuBLASLt's bias + GELU epilogue (on: what the engine runs on a "
                             "GPU), or GEMM + bias then GELU (off); each is timed, the profile takes the first")
    args = parser.parse_args()
    device = torch.device("cuda:0")
    shapes = [parse_shape(text) for text in args.shapes]
    with torch.inference_mode():
        model = random_model(PRESETS["gpt3-1.3b"], device, torch.float16)
        model.allocate_cache(max(rows for rows, _, _ in shapes), 2048)
        kernels = {(name, epilogue): replace(model.kernels, attention=name == "kernel", gemm_epilogue=epilogue == "on")
                   for name in ("kernel", "sdpa") for epilogue in ("on", "off")}
        print(f"GPU: {torch.cuda.get_device_name(device)}")
        for rows, tokens, start in shapes:
            run = prefill_pass(model, rows, tokens, start)
            for name, epilogue in itertools.product(args.attention, args.gelu_epilogue):
                model.kernels = kernels[name, epilogue]
                eager = time_ms(run)
                replay = graph_ms(run)
                flop = matmul_tflop(model, rows, tokens, start)
                print(f"prefill {rows} x {tokens:4d} at {start:4d}, attention {name:6s}, GELU epilogue {epilogue:3s}: "
                      f"eager {eager:6.2f} ms, graph {replay:6.2f} ms ({flop * 1e3:.0f} GFLOP: "
                      f"{flop / replay * 1e3:5.0f} TFLOP/s in the graph)", flush=True)
        if args.attention_launches:
            sweep_launches(model, shapes, [parse_launch(text) for text in args.attention_launches])
        model.kernels = kernels[args.attention[0], args.gelu_epilogue[0]]
        for text in args.profile:
            rows, tokens, start = parse_shape(text)
            run = prefill_pass(model, rows, tokens, start)
            run()
            torch.cuda.synchronize()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    run()
                torch.cuda.synchronize()
            print(f"-- CUDA kernels of 5 eager prefills, {rows} x {tokens} at {start}, attention "
                  f"{args.attention[0]} --")
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=20, max_name_column_width=80))


if __name__ == "__main__":
    main()
