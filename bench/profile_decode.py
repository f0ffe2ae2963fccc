"""Profile the model's decode step at the 1.3B shape (random fp16 weights, CUDA graphs, no engine, no Triton server).

    python bench/profile_decode.py --batch 1 64 --steps 64             # ms/step per kernel choice, then a profile
    python bench/profile_decode.py --batch 1 --gemm                     # also: skinny GEMM launch shapes vs cuBLAS
    python bench/profile_decode.py --batch 1 64 --timeline              # only: what each kernel adds to the step

Drives `GptModel` + `DecodeGraphs` directly (greedy argmax loop, every row at the same position) so it measures the
model step itself. For each `DecodeKernels` choice (eager = the plain PyTorch ops; then each fused kernel alone; then
all of them) it prints the GPU time per step, and how far the logits and greedy tokens of "all" are from eager's.
Then a torch.profiler table of the top CUDA kernels with every kernel on, and the prefill time of one prompt.
"""

from __future__ import annotations

import argparse
from collections import Counter
import itertools
import statistics
import sys
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.gpu_bench import copy_bandwidth_gbps, weight_bytes_per_step
from builder.checkpoints.presets import PRESETS
from builder.runtime.gpt import (WIDE_SPLIT_ROWS, DecodeGraphs, DecodeKernels, GptModel, _skinny_plan,
                                 expected_shapes)
from builder.runtime.model_config import KV_CACHE_DTYPES, GptModelConfig


def random_model(config: GptModelConfig, device: torch.device, dtype: torch.dtype, seed: int = 0,
                 kv_cache_dtype: str = "auto", weight_quantization: str = "none") -> GptModel:
    """Random weights made on the device (fast at 1.3B): N(0, 0.02) matrices, unit LayerNorm gains, zero biases."""
    generator = torch.Generator(device=device).manual_seed(seed)
    weights = {}
    for name, shape in expected_shapes(config).items():
        if name.endswith("layernorm.weight"):
            weights[name] = torch.ones(shape, device=device, dtype=dtype)
        elif name.endswith("bias"):
            weights[name] = torch.zeros(shape, device=device, dtype=dtype)
        else:
            weights[name] = torch.randn(shape, device=device, dtype=dtype, generator=generator) * 0.02
    return GptModel(config, weights, device=device, dtype=dtype, kv_cache_dtype=kv_cache_dtype,
                    weight_quantization=weight_quantization)


Run = tuple[float, torch.Tensor, torch.Tensor, torch.Tensor]  # greedy_run's (ms, tokens, first logits, inputs)


def greedy_run(model: GptModel, prompt: torch.Tensor, steps: int, *, timed: bool,
               feed: torch.Tensor | None = None) -> Run:
    """Prefill `prompt` [n, T] (eager ops whatever the kernels: every choice decodes from the same first token),
    then `steps` graph-replayed greedy decode steps; returns (GPU ms per decode step, tokens [n, steps], first
    decode step's logits [n, V], the tokens it decoded [n, 1 + steps]: the first token, then each step's input).
    feed (such a last item): teacher forcing, step s decodes feed[:, s] whatever this run predicted; the tokens
    returned are still this run's own argmax."""
    n, t = prompt.shape
    graphs = DecodeGraphs(model)
    lengths = torch.full((n,), t, device=prompt.device)
    chosen = model.kernels

    def eager_prefill() -> torch.Tensor:
        # With kernels.attention the prefill runs the Triton attention; its fp16 rounding flips a near-tie first
        # token in some row of 256 random-weight prompts, and that row's decode then differs by a whole token.
        model.kernels = DecodeKernels()
        try:
            return model.prefill(prompt, lengths)
        finally:
            model.kernels = chosen

    first_token = eager_prefill().argmax(-1)  # the prompt's K/V in the cache, teacher-forced or not
    if feed is not None:
        first_token = feed[:, 0]
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    tokens, first_logits = [], None
    for run in range(2 if timed else 1):  # run 0 captures the graphs; run 1 replays them only
        token, tokens, inputs = first_token, [], [first_token]
        if run == 1:
            eager_prefill()  # the same K/V again
            start.record()
        for step in range(steps):
            positions = torch.full((n,), t + step, device=prompt.device)
            logits = graphs.decode(token, positions, t + step + 1)
            if first_logits is None:
                first_logits = logits.float().clone()
            tokens.append(logits.argmax(-1))
            token = tokens[-1] if feed is None else feed[:, step + 1]
            inputs.append(token)
        if run == 1:
            end.record()
    torch.cuda.synchronize()
    ms = start.elapsed_time(end) / steps if timed else float("nan")
    return ms, torch.stack(tokens, 1), first_logits, torch.stack(inputs[:steps + 1], 1)


def kernel_choices(best: DecodeKernels) -> dict[str, DecodeKernels]:
    eager = DecodeKernels()
    return {"eager": eager, "+fused_norm": replace(eager, fused_norm=best.fused_norm),
            "+attention": replace(eager, attention=best.attention),
            "+gemm_epilogue": replace(eager, gemm_epilogue=best.gemm_epilogue),
            "+skinny_gemm": replace(eager, skinny_rows=best.skinny_rows),
            "all but skinny": replace(best, skinny_rows=0, skinny_residual_rows=0),
            "all, no split residual": replace(best, skinny_residual_rows=0),
            "all, plain launches": replace(best, pdl=False),
            "all, add + LayerNorm kernels": replace(best, norm_in_gemv=False),
            "all, skinny <= 64": replace(best, skinny_rows=64), "all": best}


def floor_ms(model: GptModel, batch: int, mean_kv: float, bandwidth_gbps: float) -> float:
    """The step's bandwidth floor: the weights once plus each row's cached keys and values, at copy bandwidth."""
    kv = batch * mean_kv * model.config.kv_cache_bytes_per_token(model.k_cache[0].element_size())
    weights = weight_bytes_per_step(model.config, model.weight_quantization)
    return (weights + kv) / (bandwidth_gbps * 1e9) * 1000


def compare_choices(model: GptModel, batches: list[int], steps: int, prompt_len: int,
                    bandwidth_gbps: float, only_all: bool = False) -> dict[int, Run]:
    """Each kernel choice (only_all: the model's own) per batch, against the eager ops; returns the model's own run
    per batch."""
    best = model.kernels
    generator = torch.Generator(device=model.device).manual_seed(1)
    own: dict[int, Run] = {}
    for batch in batches:
        prompt = torch.randint(100, 50000, (batch, prompt_len), device=model.device, generator=generator)
        results: dict[str, Run] = {}
        choices = kernel_choices(best)
        for name, kernels in ((n, k) for n, k in choices.items() if not only_all or n in ("eager", "all")):
            model.kernels = kernels
            results[name] = greedy_run(model, prompt, steps, timed=True)
            torch.cuda.empty_cache()
        base_tokens, base_logits = results["eager"][1], results["eager"][2]
        for name, (ms, tokens, logits, _) in results.items():
            same = (tokens == base_tokens).float().mean().item()
            first_diff = (tokens != base_tokens).int().argmax(1)
            agree = torch.where((tokens != base_tokens).any(1), first_diff, steps).float().mean().item()
            err = (logits - base_logits).abs().max().item()
            floor = floor_ms(model, batch, prompt_len + steps / 2, bandwidth_gbps)
            print(f"batch {batch:3d} {name:22s} {ms:7.3f} ms/step ({floor / ms:4.0%} of floor {floor:.3f}) | "
                  f"vs eager: max |dlogit| {err:.4f} "
                  f"(logit std {base_logits.std().item():.3f}), tokens equal {same:.3f}, "
                  f"mean greedy-agreement prefix {agree:.1f}/{steps}", flush=True)
        own[batch] = results["all"]
    model.kernels = best
    return own


def teacher_forced(model: GptModel, base: dict[int, Run], steps: int, prompt_len: int) -> dict[int, Run]:
    """The model's run on compare_choices's prompts, fed what `base` decoded (the same batches)."""
    generator = torch.Generator(device=model.device).manual_seed(1)  # compare_choices's prompts, in its order
    out: dict[int, Run] = {}
    for batch, (*_, base_inputs) in base.items():
        prompt = torch.randint(100, 50000, (batch, prompt_len), device=model.device, generator=generator)
        out[batch] = greedy_run(model, prompt, steps, timed=False, feed=base_inputs)
    return out


def compare_caches(runs: dict[str, dict[int, Run]], forced: dict[str, dict[int, Run]], steps: int) -> None:
    """Each KV-cache dtype's run (every kernel on) against the first dtype's, on the same weights and prompts: free
    running (greedy sequences part at the first near tie: random weights have many) and teacher-forced (fed the first
    dtype's tokens: the share of steps predicting the same next token, and the logits' largest difference)."""
    (base_name, base), *_ = runs.items()
    for name, forced_runs in forced.items():
        if name in runs:
            continue
        for batch, (_, tokens, logits, _) in forced_runs.items():
            _, base_tokens, base_logits, _ = base[batch]
            print(f"batch {batch:3d} {name} vs kernels, kv cache {base_name}, teacher-forced: next token equal "
                  f"{(tokens == base_tokens).float().mean().item():.4f}, first step's max |dlogit| "
                  f"{(logits - base_logits).abs().max().item():.4f}", flush=True)
    for name, by_batch in ((n, r) for n, r in runs.items() if n != base_name):
        for batch, (ms, tokens, *_) in by_batch.items():
            base_ms, base_tokens, base_logits, _ = base[batch]
            differ = tokens != base_tokens
            agree = torch.where(differ.any(1), differ.int().argmax(1), steps).float().mean().item()
            _, forced_tokens, forced_logits, _ = forced[name][batch]
            print(f"batch {batch:3d} kv cache {name} vs {base_name}: {ms:.3f} vs {base_ms:.3f} ms/step "
                  f"({ms / base_ms - 1:+.1%}) | free running: tokens equal {1 - differ.float().mean().item():.3f}, "
                  f"mean greedy-agreement prefix {agree:.1f}/{steps} | teacher-forced: next token equal "
                  f"{(forced_tokens == base_tokens).float().mean().item():.4f}, first step's max |dlogit| "
                  f"{(forced_logits - base_logits).abs().max().item():.4f} (logit std "
                  f"{base_logits.std().item():.3f})", flush=True)


def profile(model: GptModel, batch: int, steps: int, prompt_len: int) -> None:
    prompt = torch.randint(100, 50000, (batch, prompt_len), device=model.device)
    greedy_run(model, prompt, steps, timed=False)  # capture
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        greedy_run(model, prompt, steps, timed=False)
    print(f"-- top CUDA kernels, batch {batch}, {steps} steps (incl. prefill and capture's warm-up step) --")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=70))


def kernel_timeline(model: GptModel, batch: int, steps: int, prompt_len: int) -> None:
    """Per kernel of the decode step, from a CUDA trace of graph-replayed steps: how many a step runs, their mean
    duration, and what each adds to the step (its end minus the previous kernel's end: under PDL a kernel starts
    before its predecessor ends, so durations overlap while these increments add up to the step). The GEMVs also
    get the bandwidth their increment implies. Steps are split at the greedy loop's argmax (outside the graph)."""
    import json
    import tempfile

    prompt = torch.randint(100, 50000, (batch, prompt_len), device=model.device)
    greedy_run(model, prompt, steps, timed=False)  # capture
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        greedy_run(model, prompt, steps, timed=False)
    with tempfile.NamedTemporaryFile(suffix=".json") as trace:
        prof.export_chrome_trace(trace.name)
        events = json.loads(Path(trace.name).read_text())["traceEvents"]
    kernels = sorted((e for e in events if e.get("cat") == "kernel"), key=lambda e: e["ts"])
    layer = model.layers[0]
    gemv_bytes = {name: weight.numel() * weight.element_size() for name, weight in (
        ("qkv", layer.qkv_weight), ("out", layer.attn_out_weight), ("fc1", layer.fc1_weight),
        ("fc2", layer.fc2_weight), ("lm_head", model.lm_head))}
    print(f"-- kernel timeline, batch {batch} --\n" + summarize_timeline(kernels, gemv_bytes), flush=True)


def summarize_timeline(kernels: list[dict], gemv_bytes: dict[str, int]) -> str:
    """kernel_timeline's table from trace events ({"name", "ts", "dur"} in us, in start order)."""
    step_kernels: list[list[dict]] = [[]]
    for event in kernels:
        if "reduce_kernel" in event["name"]:  # the loop's argmax ends a step
            step_kernels.append([])
        else:
            step_kernels[-1].append(event)
    steps = step_kernels[2:-1]  # past the prefill and the first (warm-up) step
    if not steps:
        return "no steps"
    # Steps whose attention splits its keys run one more kernel per layer (the combine): the commonest kind only.
    counts = Counter(len(step) for step in steps)
    common = counts.most_common(1)[0][0]
    steps = [step for step in steps if len(step) == common]
    rows: dict[str, list[float]] = {}  # kind -> [count, duration us, increment us]
    spans = []
    for step in steps:
        gemvs = [i for i, e in enumerate(step) if "skinny_linear" in e["name"] or "nvjet" in e["name"]
                 or "gemm" in e["name"].lower()]
        names = {i: ("qkv", "out", "fc1", "fc2")[n % 4] for n, i in enumerate(gemvs[:-1])}
        if gemvs:
            names[gemvs[-1]] = "lm_head"
        previous_end = step[0]["ts"]
        spans.append(step[-1]["ts"] + step[-1]["dur"] - step[0]["ts"])
        for i, event in enumerate(step):
            kind = names.get(i) or event["name"].split("(")[0].split("<")[0].replace("void ", "")[:40]
            end = event["ts"] + event["dur"]
            row = rows.setdefault(kind, [0.0, 0.0, 0.0])
            row[0] += 1
            row[1] += event["dur"]
            row[2] += max(0.0, end - previous_end)
            previous_end = max(previous_end, end)
    n = len(steps)
    lines = [f"{n} steps of {common} kernels (all steps: {dict(counts)}); first kernel's start to last kernel's end "
             f"{statistics.median(spans):.1f} us (median)",
             f"{'kernel':42s} {'per step':>8s} {'mean us':>8s} {'adds us/step':>12s} {'GB/s of its adds':>16s}"]
    for kind, (count, duration, increment) in sorted(rows.items(), key=lambda item: -item[1][2]):
        bandwidth = (f"{gemv_bytes[kind] * count / n / (increment / n * 1e-6) / 1e9:16.0f}"
                     if kind in gemv_bytes and increment else "")
        lines.append(f"{kind:42s} {count / n:8.0f} {duration / count:8.2f} {increment / n:12.1f} {bandwidth}")
    return "\n".join(lines)


def time_prefill(model: GptModel, prompt_len: int) -> None:
    prompt = torch.randint(100, 50000, (1, prompt_len), device=model.device)
    lengths = torch.tensor([prompt_len], device=model.device)
    best = model.kernels
    for name, kernels in (("eager", DecodeKernels()), ("all", best)):
        model.kernels = kernels
        times = []
        for _ in range(12):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            model.prefill(prompt, lengths)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        print(f"prefill 1 x {prompt_len} tokens, {name}: median {statistics.median(times[2:]):.2f} ms "
              f"(min {min(times[2:]):.2f})")
    model.kernels = best


def check_gelu_epilogue(device: torch.device) -> None:
    """cuBLASLt's GELU epilogue vs F.gelu(tanh) and F.gelu(erf), fp16, a 2048 -> 8192 layer."""
    generator = torch.Generator(device=device).manual_seed(2)
    w = torch.randn(8192, 2048, device=device, dtype=torch.float16, generator=generator) * 0.02
    b = torch.randn(8192, device=device, dtype=torch.float16, generator=generator) * 0.1
    for rows in (1, 2, 16, 64, 512):
        x = torch.randn(rows, 2048, device=device, dtype=torch.float16, generator=generator)
        fused = torch._addmm_activation(b, x, w.t(), use_gelu=True).float()
        exact = F.linear(x.float(), w.float(), b.float())
        tanh, erf = F.gelu(exact, approximate="tanh"), F.gelu(exact)
        eager = F.gelu(F.linear(x, w, b), approximate="tanh").float()
        print(f"gelu epilogue rows {rows:3d}: |fused - tanh(fp32)| {(fused - tanh).abs().max():.2e}, "
              f"|fused - erf(fp32)| {(fused - erf).abs().max():.2e}, |eager fp16 - tanh(fp32)| "
              f"{(eager - tanh).abs().max():.2e}")


def bench_gemm(device: torch.device, rows_list: list[int]) -> None:
    """Skinny GEMM launch shapes vs cuBLAS (F.linear) on the 1.3B matrices; L2 flushed between runs (do_bench)."""
    import triton

    from builder.runtime import gpt_kernels

    shapes = {"qkv": (6144, 2048), "out": (2048, 2048), "fc1": (8192, 2048), "fc2": (2048, 8192),
              "lm_head": (50304, 2048)}
    configs = [dict(block_n=bn, block_k=128, split_k=s, num_warps=nw, num_stages=4)
               for bn in (16, 32, 64) for s in (1, 2, 4) for nw in (4, 8)]
    for rows in rows_list:
        for name, (n, k) in shapes.items():
            w = torch.randn(n, k, device=device, dtype=torch.float16) * 0.02
            x = torch.randn(rows, k, device=device, dtype=torch.float16)
            cublas = triton.testing.do_bench(lambda: F.linear(x, w), warmup=10, rep=30)
            timings = []
            for config in configs:
                if k % (config["split_k"] * config["block_k"]):
                    continue
                us = triton.testing.do_bench(lambda: gpt_kernels.skinny_linear(x, w, **config), warmup=10,
                                             rep=30) * 1000
                timings.append((us, config))
            timings.sort(key=lambda item: item[0])
            gbps = n * k * 2 / (timings[0][0] * 1e-6) / 1e9
            print(f"rows {rows:2d} {name:8s} cuBLAS {cublas * 1000:6.1f} us ({n * k * 2 / cublas / 1e6:5.0f} GB/s) | "
                  f"skinny best {timings[0][0]:6.1f} us ({gbps:5.0f} GB/s) {timings[0][1]} | next "
                  + ", ".join(f"{us:.1f} {c}" for us, c in timings[1:3]), flush=True)


def bench_attention(device: torch.device) -> None:
    """Decode attention launch shapes vs the eager ops (index_copy_ of K/V + masked SDPA), ragged positions."""
    import triton

    from builder.runtime import gpt_kernels

    heads, d = 16, 128
    launches = [(bn, bps, nw) for bn in (16, 32, 64, 128) for bps in (1, 2, 4) for nw in (2, 4, 8)]
    for rows, kv in ((1, 256), (8, 256), (64, 256), (256, 256), (1, 1024), (16, 1024), (64, 1024), (256, 1024)):
        k_cache = torch.randn(rows, heads, kv, d, device=device, dtype=torch.float16)
        v_cache = torch.randn_like(k_cache)
        qkv = torch.randn(rows, 3 * heads * d, device=device, dtype=torch.float16)
        positions = torch.randint(kv // 2, kv, (rows,), device=device)
        mask = (torch.arange(kv, device=device)[None, :] <= positions[:, None]).view(rows, 1, 1, kv)
        write_rows = ((torch.arange(rows, device=device)[:, None] * heads + torch.arange(heads, device=device))
                      * kv + positions[:, None]).reshape(-1)

        def eager() -> torch.Tensor:
            q, k, v = qkv.view(rows, 3, heads, d).unbind(1)
            k_cache.view(-1, d).index_copy_(0, write_rows, k.reshape(-1, d))
            v_cache.view(-1, d).index_copy_(0, write_rows, v.reshape(-1, d))
            return F.scaled_dot_product_attention(q[:, :, None], k_cache, v_cache, attn_mask=mask)

        reference = eager().reshape(rows, heads * d).float()
        eager_us = triton.testing.do_bench(eager) * 1000
        timings = []
        for launch in launches:
            out = gpt_kernels.decode_attention(qkv, k_cache, v_cache, positions, kv, launch=launch)
            err = (out.float() - reference).abs().max().item()
            us = triton.testing.do_bench(
                lambda: gpt_kernels.decode_attention(qkv, k_cache, v_cache, positions, kv, launch=launch)) * 1000
            timings.append((us, launch, err))
        timings.sort()
        default = gpt_kernels.attention_launch(rows, heads, kv, torch.cuda.get_device_properties(device)
                                               .multi_processor_count)
        default_us = next(us for us, launch, _ in timings if launch == default)
        read_gb = float((positions + 1).sum()) * heads * d * 2 * 2 / 1e9  # each row's keys and values, fp16
        print(f"attention rows {rows:3d} kv {kv:4d} ({read_gb * 1e3:.0f} MB): eager {eager_us:6.1f} us | default "
              f"{default} {default_us:6.1f} us ({read_gb / (default_us * 1e-6):.0f} GB/s)"
              f" | best " + ", ".join(f"{us:.1f} us {launch} (err {err:.1e})" for us, launch, err in timings[:3]),
              flush=True)


def parse_launch(text: str) -> tuple[int, int, int] | None:
    """"default" -> None; "64,4,2" -> (keys per block, blocks per program, warps)."""
    if text == "default":
        return None
    block, blocks, warps = (int(value) for value in text.split(","))
    return block, blocks, warps


def sweep_attention(model: GptModel, batches: list[int], steps: int, prompt_len: int,
                    launches: list[tuple[int, int, int] | None]) -> None:
    """The decode step's time (CUDA graphs, every other kernel as chosen) per attention launch shape.

    The shape's own timing (`bench_attention`, do_bench) includes a Python launch per call, which at a few rows
    outlasts the kernel, and cannot see a combine kernel hidden behind PDL: this times them where they run."""
    from builder.runtime import gpt_kernels

    default = gpt_kernels.attention_launch
    generator = torch.Generator(device=model.device).manual_seed(2)
    for batch in batches:
        prompt = torch.randint(100, 50000, (batch, prompt_len), device=model.device, generator=generator)
        timings = []
        for launch in launches:
            if launch is not None:
                gpt_kernels.attention_launch = lambda *_, launch=launch: launch
            try:
                ms = greedy_run(model, prompt, steps, timed=True)[0]
            finally:
                gpt_kernels.attention_launch = default
            timings.append((ms, "default" if launch is None else str(launch)))
            torch.cuda.empty_cache()
        base = timings[0][0]
        print(f"attention in the step, batch {batch:3d}, keys {prompt_len}-{prompt_len + steps}: "
              + ", ".join(f"{name} {ms:.3f} ms ({ms / base - 1:+.1%})" for ms, name in timings), flush=True)


def tune_skinny(model: GptModel, batches: list[int], steps: int, prompt_len: int) -> None:
    """Skinny GEMM launch shapes in the real decode step (CUDA graphs, the model's other kernels as chosen):
    block_n, pipeline stages, warps and split-K target."""
    saved = dict(model.skinny_plans)
    config = model.config
    h, f = config.hidden_size, config.inter_size
    for batch in batches:
        prompt = torch.randint(100, 50000, (batch, prompt_len), device=model.device)
        results = []
        used = (("qkv", "out", "fc1", "fc2", "lm_head") if batch <= model.kernels.skinny_rows
                else ("out_wide", "fc2_wide") if batch > WIDE_SPLIT_ROWS else ("out", "fc2"))
        for block_n, stages, warps, target in itertools.product((16, 32, 64), (3, 5), (2, 4), (128, 256, 512)):
            plans = {"qkv": _skinny_plan(3 * h, h, may_split=False, block_n=block_n),
                     "out": _skinny_plan(h, h, may_split=True, block_n=block_n, target_programs=target),
                     "fc1": _skinny_plan(f, h, may_split=False, block_n=block_n),
                     "fc2": _skinny_plan(h, f, may_split=True, block_n=block_n, target_programs=target),
                     "lm_head": _skinny_plan(config.vocab_size, h, may_split=False, block_n=block_n)}
            plans.update(out_wide=plans["out"], fc2_wide=plans["fc2"])  # past WIDE_SPLIT_ROWS: the same trial
            model.skinny_plans = {name: replace(plan, num_stages=stages, num_warps=warps)
                                  for name, plan in plans.items() if plan is not None}
            ms = greedy_run(model, prompt, steps, timed=True)[0]
            results.append((ms, f"block_n {block_n} stages {stages} warps {warps} split-K target {target} "
                                f"(out split {plans['out'].split_k}, fc2 split "
                                f"{plans['fc2'].split_k})"
                                + (" = the model's plan" if all(model.skinny_plans[name] == saved[name]
                                                                for name in used) else "")))
        results.sort()
        for ms, what in results[:6] + [result for result in results[6:] if result[1].endswith("plan")]:
            print(f"skinny batch {batch:2d} {ms:.3f} ms/step: {what}", flush=True)
        print(f"skinny batch {batch:2d} worst {results[-1][0]:.3f} ms/step: {results[-1][1]}", flush=True)
    model.skinny_plans = saved


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--prefill", type=int, default=512, help="prompt length of the prefill timing (0: skip)")
    parser.add_argument("--gemm", action="store_true", help="benchmark the skinny GEMM's launch shapes")
    parser.add_argument("--tune", action="store_true", help="benchmark attention and skinny GEMM launch shapes")
    parser.add_argument("--tune-skinny", action="store_true", help="only the skinny GEMM's launch shapes")
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--kv-cache-dtype", nargs="+", default=["auto"], choices=KV_CACHE_DTYPES,
                        help="KV-cache dtypes to run (several: the model's own kernels only, each dtype against the "
                             "first: step time, logits, greedy tokens)")
    parser.add_argument("--attention-sweep", action="store_true",
                        help="the decode step's time per attention launch shape, in place of the kernel choices")
    parser.add_argument("--split-residual-rows", type=int,
                        help="DecodeKernels.skinny_residual_rows for the run (default: the model's)")
    parser.add_argument("--timeline", action="store_true",
                        help="only the per-kernel timeline of the decode step (durations and what each adds)")
    parser.add_argument("--launches", nargs="+", default=["default", "64,1,2", "64,2,2", "32,1,2", "128,1,4"],
                        help="attention launch shapes of --attention-sweep: keys per block,blocks per program,warps")
    args = parser.parse_args()
    device = torch.device("cuda:0")
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = True  # PyTorch's default, stated
    with torch.inference_mode():
        config = PRESETS["gpt3-1.3b"]
        if len(args.kv_cache_dtype) > 1:
            runs: dict[str, dict[int, Run]] = {}
            forced: dict[str, dict[int, Run]] = {}
            for cache_dtype in args.kv_cache_dtype:
                model = random_model(config, device, torch.float16, kv_cache_dtype=cache_dtype)
                model.allocate_cache(max(args.batch), max(1024, args.prompt + args.steps))
                print(f"kv cache {cache_dtype} ({model.cache_dtype})", flush=True)
                runs[cache_dtype] = compare_choices(model, args.batch, args.steps, args.prompt,
                                                    copy_bandwidth_gbps(), only_all=True)
                base = runs[args.kv_cache_dtype[0]]
                if cache_dtype != args.kv_cache_dtype[0]:  # fed the first dtype's tokens
                    forced[cache_dtype] = teacher_forced(model, base, args.steps, args.prompt)
                else:  # the noise floor: the eager ops against the kernels, the same cache dtype
                    chosen, model.kernels = model.kernels, DecodeKernels()
                    forced["eager ops"] = teacher_forced(model, base, args.steps, args.prompt)
                    model.kernels = chosen
                del model
                torch.cuda.empty_cache()
            compare_caches(runs, forced, args.steps)
            return
        model = random_model(config, device, torch.float16, kv_cache_dtype=args.kv_cache_dtype[0])
        model.allocate_cache(max(args.batch), max(1024, args.prompt + args.steps))
        if args.split_residual_rows is not None:
            model.kernels = replace(model.kernels, skinny_residual_rows=args.split_residual_rows)
        bandwidth = copy_bandwidth_gbps()
        print(f"kernels for this model: {model.kernels}; copy bandwidth {bandwidth:.0f} GB/s, weights "
              f"{weight_bytes_per_step(config) / 1e9:.2f} GB per step", flush=True)
        if args.timeline:
            for batch in args.batch:
                kernel_timeline(model, batch, args.steps, args.prompt)
            return
        if args.attention_sweep:
            sweep_attention(model, args.batch, args.steps, args.prompt, [parse_launch(text) for text in args.launches])
            return
        check_gelu_epilogue(device)
        compare_choices(model, args.batch, args.steps, args.prompt, bandwidth)
        if args.prefill:
            time_prefill(model, args.prefill)
        if not args.no_profile:
            for batch in args.batch:
                profile(model, batch, args.steps, args.prompt)
        if args.gemm:
            bench_gemm(device, [1, 8, 32, 64])
        # The skinny kernel runs every GEMM up to skinny_rows rows, and the two into the residual (split-K) up to
        # skinny_residual_rows.
        skinny_limit = max(model.kernels.skinny_rows, model.kernels.skinny_residual_rows)
        if args.tune:
            bench_attention(device)
            tune_skinny(model, [b for b in args.batch if b <= skinny_limit], args.steps, args.prompt)
        elif args.tune_skinny:
            tune_skinny(model, [b for b in args.batch if b <= skinny_limit], args.steps, args.prompt)


if __name__ == "__main__":
    main()
