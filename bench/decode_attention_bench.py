"""The decode attention kernel alone, per launch shape and variant, at the 1.3B shape (16 heads x 128) on CUDA.

    python bench/decode_attention_bench.py --cache auto fp8 --shapes 64x128 256x128 64x640 64x16-1536 \
        --launches default 64,4,2 32,8,2 p16,64,4,3 --json OUT/attention.json

A shape RxP runs R rows whose positions are ragged over P..P+63 (as 64 decode steps after a P-token prompt), RxA-B
rows at positions uniform in [A, B) (the mixed workload's spread), against the kv bucket the decode graphs would use.
Each launch is timed as a decode step runs it: 24 layers' worth of calls, each on its own layer's cache (so no layer
reads another's keys from L2), captured in one CUDA graph and replayed; the time is per layer. The bytes each layer
must read (its rows' keys and values, in the cache's dtype) over that time give the bandwidth, beside the GPU's
measured copy bandwidth. Each launch's output is checked against fp32 attention over the cache as the kernel left it
(its own K/V write included) before it is timed.

A launch is "keys per block,blocks per program,warps" (the one-query kernel: `gpt_kernels.decode_attention`'s
`launch`), "pM,N,W,S" (`gpt_kernels.prefill_attention` as a chunk of one query, with launch (M, N, W, S): queries
per program, keys per block, warps, pipeline stages), or "default": what `decode_attention` picks for the shape. A
suffix ":f16" or ":f32" forces the one-query kernel's products (default: fp16 with an fp8 cache, `half_products`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.gpu_bench import copy_bandwidth_gbps
from builder.runtime import gpt_kernels
from builder.runtime.gpt import CACHE_TORCH_DTYPES

HEADS, HEAD_DIM, LAYERS, KV_STEP = 16, 128, 24, 256


def parse_launch(text: str) -> tuple[int, ...] | None:
    shape = text.partition(":")[0]
    return None if shape == "default" else tuple(int(value) for value in shape.lstrip("p").split(","))


def products(text: str) -> str:
    """The one-query kernel's arithmetic a launch text asks for: its ":f16" / ":f32" suffix, else "auto"."""
    suffix = text.partition(":")[2] or "auto"
    if suffix not in ("auto", "f16", "f32"):
        raise SystemExit(f"launch {text!r}: the suffix after ':' must be f16 or f32")
    return suffix


def attend(text: str, qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, positions: torch.Tensor,
           kv_len: int) -> torch.Tensor:
    """One layer's decode attention by launch text; "pM,N,W,S": the prefill kernel as a chunk of one query."""
    if text.startswith("p"):
        rows = qkv.shape[0]
        return gpt_kernels.prefill_attention(qkv.view(rows, 1, -1), k_cache, v_cache, None, positions,
                                             launch=parse_launch(text), pdl=torch.cuda.is_available()).view(rows, -1)
    return gpt_kernels.decode_attention(qkv, k_cache, v_cache, positions, kv_len, launch=parse_launch(text),
                                        pdl=torch.cuda.is_available(), products=products(text))


def reference(qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """fp32 attention of each row's query over its cached keys 0..position (the kernel's write included)."""
    rows = qkv.shape[0]
    q = qkv.view(rows, 3, HEADS, HEAD_DIM)[:, 0].float()  # [rows, heads, d]
    kv_len = int(positions.max()) + 1
    k = k_cache[:rows, :, :kv_len].float()  # [rows, heads, keys, d]
    v = v_cache[:rows, :, :kv_len].float()
    scores = torch.einsum("rhd,rhkd->rhk", q, k) / HEAD_DIM ** 0.5
    hidden = torch.arange(kv_len, device=qkv.device)[None, None, :] > positions[:, None, None]
    weights = scores.masked_fill(hidden, float("-inf")).softmax(-1)
    return torch.einsum("rhk,rhkd->rhd", weights, v).reshape(rows, HEADS * HEAD_DIM)


def bench_shape(rows: int, prompt: int | tuple[int, int], cache: str, launches: list[str], copy_gbps: float,
                reps: int) -> list[dict]:
    device = torch.device("cuda")
    generator = torch.Generator(device=device).manual_seed(rows)
    low, high = prompt if isinstance(prompt, tuple) else (prompt, prompt + 64)
    kv_len = -(-high // KV_STEP) * KV_STEP
    cache_dtype = CACHE_TORCH_DTYPES[cache] or torch.float16
    positions = torch.randint(low, high, (rows,), device=device, generator=generator)
    qkv = torch.randn(rows, 3 * HEADS * HEAD_DIM, device=device, dtype=torch.float16, generator=generator)
    caches = []
    for _ in range(LAYERS):
        k = torch.randn(rows, HEADS, kv_len, HEAD_DIM, device=device, dtype=torch.float16, generator=generator)
        v = torch.randn(rows, HEADS, kv_len, HEAD_DIM, device=device, dtype=torch.float16, generator=generator)
        caches.append((k.to(cache_dtype), v.to(cache_dtype)))
    item = torch.empty((), dtype=cache_dtype).element_size()
    layer_bytes = float((positions + 1).sum()) * HEADS * HEAD_DIM * item * 2
    results = []
    for text in launches:
        launch = parse_launch(text)
        k_cache, v_cache = caches[0]
        out = attend(text, qkv, k_cache, v_cache, positions, kv_len)
        error = (out.float() - reference(qkv, k_cache, v_cache, positions)).abs().max().item()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm up (compile) outside the capture
            for k_cache, v_cache in caches[:2]:
                attend(text, qkv, k_cache, v_cache, positions, kv_len)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for k_cache, v_cache in caches:
                attend(text, qkv, k_cache, v_cache, positions, kv_len)
        graph.replay()
        torch.cuda.synchronize()
        begin, finish = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(3):
            begin.record()
            for _ in range(reps):
                graph.replay()
            finish.record()
            finish.synchronize()
            times.append(begin.elapsed_time(finish) / reps / LAYERS * 1000)  # us per layer
        us = min(times)
        if launch is not None:
            chosen = text
        elif gpt_kernels.tensor_core_attention(rows, kv_len, qkv.dtype, cache_dtype):
            chosen = "p" + ",".join(map(str, gpt_kernels.TENSOR_CORE_LAUNCH))
        else:
            chosen = ",".join(map(str, gpt_kernels.attention_launch(rows, HEADS, kv_len, 132, cache_dtype)))
        results.append({"rows": rows, "keys": f"{low}-{high - 1}", "kv_len": kv_len, "cache": cache,
                        "launch": text, "resolved": chosen, "us_per_layer": round(us, 2),
                        "gb_per_s": round(layer_bytes / us / 1e3, 0),
                        "fraction_of_copy": round(layer_bytes / us / 1e3 / copy_gbps, 3), "max_error": error})
        del graph
    base = results[0]["us_per_layer"]
    for result in sorted(results, key=lambda r: r["us_per_layer"]):
        print(f"{cache} rows {rows:3d} keys {result['keys']:>9} ({layer_bytes / 1e6:5.1f} MB/layer): "
              f"{result['launch']:>11} {result['us_per_layer']:7.2f} us ({result['us_per_layer'] / base - 1:+6.1%}) "
              f"{result['gb_per_s']:6.0f} GB/s = {result['fraction_of_copy']:.2f} of copy; "
              f"err {result['max_error']:.1e}",
              flush=True)
    del caches
    torch.cuda.empty_cache()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", nargs="+", default=["auto", "fp8"], choices=list(CACHE_TORCH_DTYPES),
                        help="KV-cache dtypes (auto: fp16)")
    parser.add_argument("--shapes", nargs="+", default=["1x128", "64x128", "256x128", "64x640"],
                        help="ROWSxPROMPT: rows at positions PROMPT..PROMPT+63; ROWSxLOW-HIGH: uniform in [LOW, HIGH)")
    parser.add_argument("--launches", nargs="+", default=["default"], help="launch shapes (the first is the base)")
    parser.add_argument("--reps", type=int, default=20, help="graph replays per timing (3 timings, the best kept)")
    parser.add_argument("--json", type=Path, help="write every result here")
    args = parser.parse_args()
    copy_gbps = copy_bandwidth_gbps()
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {copy_gbps:.0f} GB/s", flush=True)
    results = []
    with torch.inference_mode():
        for shape in args.shapes:
            rows, keys = shape.split("x")
            prompt = tuple(int(value) for value in keys.split("-")) if "-" in keys else int(keys)
            rows = int(rows)
            for cache in args.cache:
                results += bench_shape(rows, prompt, cache, args.launches, copy_gbps, args.reps)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"gpu": torch.cuda.get_device_name(), "copy_gb_per_s": round(copy_gbps),
                                         "results": results}, indent=1))


if __name__ == "__main__":
    main()
