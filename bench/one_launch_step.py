"""A/B of the batch-1 decode step (issue 12): the whole step as one persistent kernel (step_kernel.py) at several launch
shapes, against the per-op kernels the engine runs by default (gpt_kernels.py), at the 1.3B shape (random fp16
weights, 128-token prompts, CUDA graphs, no server). One process, the variants alternated in rounds so drift hits all
alike; batch 8 runs the per-op kernels only (the one-launch step is batch 1 only): a control.

    python bench/one_launch_step.py --out DIR                # JSON + markdown table in DIR
    python bench/one_launch_step.py --launches 16384,4,3,168,1 32768,16,1,0 --rounds 5
    python bench/one_launch_step.py --trace --out DIR        # also: one traced step of the first launch shape
    python bench/one_launch_step.py --weight-quantization int8 --launches 16384,4,3,168 32768,8,2,128

Then each launch shape's bound: the one-launch step alone (back-to-back launches at one position, no graph, no
sampling) with its waits and without them (`OneLaunchStep.__call__(wait=False)`: wrong logits, but what is left is
the shape's streaming of the weights, tickets and arithmetic included). The gap between the two is what the
dependency chains cost; the gap from the second to the floor is what the task structure (bytes in flight) costs.

The trace is the one-launch step's per-kernel profile: every task's multiprocessor and global-timer stamps (started,
inputs ready, done; `OneLaunchStep.__call__`), summed per stage (QKV, attention, attention output, FC1, FC2, LM head)
and per layer, and drawn (one_launch_trace.png: a line per task, a row per multiprocessor). The global timer ticks
coarsely (about a microsecond on some GPUs, a task lasts a few): read the per-stage means over thousands of tasks,
not one task's stamps.

Per variant: median GPU ms per step over the rounds, its fraction of the bandwidth floor (weights + KV at the measured
copy bandwidth), the greedy tokens' agreement with the per-op kernels over 64 steps (free-running) and the first
step's largest logit difference.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.gpu_bench import copy_bandwidth_gbps
from bench.profile_decode import floor_ms, greedy_run, random_model
from builder.checkpoints.presets import PRESETS
from builder.runtime import step_kernel
from builder.runtime.gpt import GptModel
from builder.runtime.model_config import WEIGHT_QUANTIZATIONS


# StepLaunch's default first; then L2 prefetches one to three rounds ahead (a round: ~13 MB at the default, so three
# rounds near the H200's 50 MB L2); then fewer or more programs, other tiles.
LAUNCHES = ["16384,4,3,168", "16384,4,3,168,1", "16384,4,3,168,2", "16384,4,3,168,3", "16384,4,2,0", "16384,4,4,128",
            "16384,4,4,128,1", "16384,8,2,128", "32768,8,2,128", "32768,16,1,0"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--launches", nargs="+", default=LAUNCHES,
                        help="one-launch shapes: 'tile elements,warps,programs per multiprocessor,register cap,"
                             "prefetch rounds' (step_kernel.StepLaunch.parse; --trace runs the first)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--out", type=Path, help="folder for one_launch_step.json and .md")
    parser.add_argument("--trace", action="store_true", help="trace one step of the first launch shape (see above)")
    parser.add_argument("--weight-quantization", choices=WEIGHT_QUANTIZATIONS, default="none",
                        help="int8: the layers' matrices int8 (render --weight-quantization) for both sides; the "
                             "floor is then that of their bytes")
    args = parser.parse_args()
    bandwidth = copy_bandwidth_gbps()
    with torch.inference_mode():
        model = random_model(PRESETS["gpt3-1.3b"], torch.device("cuda:0"), torch.float16,
                             weight_quantization=args.weight_quantization)
        model.allocate_cache(8, 1024)
        per_op = replace(model.kernels, one_launch_step=False)
        steps = {name: model.build_one_launch(step_kernel.StepLaunch.parse(name)) for name in args.launches}
        generator = torch.Generator(device=model.device).manual_seed(1)
        rows = []
        for batch in (1, 8):
            prompt = torch.randint(100, 50000, (batch, args.prompt), device=model.device, generator=generator)
            variants = ["per-op kernels"] + (list(steps) if batch == 1 else [])
            times: dict[str, list[float]] = {name: [] for name in variants}
            runs = {}
            for _ in range(args.rounds):
                for name in variants:
                    model.kernels = per_op if name not in steps else replace(per_op, one_launch_step=True)
                    model.one_launch = steps.get(name)
                    runs[name] = greedy_run(model, prompt, args.steps, timed=True)
                    times[name].append(runs[name][0])
            floor = floor_ms(model, batch, args.prompt + args.steps / 2, bandwidth)
            _, base_tokens, base_logits, _ = runs["per-op kernels"]
            base = statistics.median(times["per-op kernels"])
            for name in variants:
                ms = statistics.median(times[name])
                _, tokens, logits, _ = runs[name]
                row = {"batch": batch, "variant": name, "ms_per_step": ms, "rounds_ms": times[name],
                       "vs_per_op": ms / base - 1, "floor_ms": floor, "fraction_of_floor": floor / ms,
                       "tokens_equal": (tokens == base_tokens).float().mean().item(),
                       "max_abs_dlogit_step1": (logits - base_logits).abs().max().item()}
                if name in steps:  # waits that gave up (a lost signal: wrong logits, see step_kernel._wait_for)
                    row["programs"], row["stalls"] = steps[name].programs, int(steps[name].stalls)
                rows.append(row)
                print(f"batch {batch} {name:16s} {ms:.3f} ms/step ({row['vs_per_op']:+.1%}, fraction of floor "
                      f"{row['fraction_of_floor']:.3f}; rounds {' '.join(f'{t:.3f}' for t in times[name])}); tokens "
                      f"equal {row['tokens_equal']:.3f}, max |dlogit| {row['max_abs_dlogit_step1']:.4f}"
                      + (f", stalls {row['stalls']}" if "stalls" in row else ""), flush=True)
        # Saved after each part: a run cut short by its time limit still leaves what it measured.
        meta = {"gpu": torch.cuda.get_device_name(), "copy_bandwidth_gbps": bandwidth, "prompt": args.prompt,
                "steps": args.steps, "rounds": args.rounds, "command": " ".join(sys.argv)}
        floor = floor_ms(model, 1, args.prompt + args.steps / 2, bandwidth)
        save(args.out, meta, rows, [], floor)
        bounds = launch_bounds(model, steps, args.prompt + args.steps // 2, floor)
        save(args.out, meta, rows, bounds, floor)
        if args.trace:
            step = steps[args.launches[0]]
            summary = trace_step(model, step, args.prompt + args.steps // 2, args.out)
            print(summary, flush=True)


def save(out: Path | None, meta: dict, rows: list[dict], bounds: list[dict], floor: float) -> None:
    """one_launch_step.json and .md in out (None: nothing)."""
    if out is None:
        return
    out.mkdir(parents=True, exist_ok=True)
    (out / "one_launch_step.json").write_text(json.dumps({"meta": meta, "rows": rows, "bounds": bounds}, indent=1))
    lines = [f"Batch-1 decode step, one launch vs per-op kernels ({meta['gpu']}, copy "
             f"{meta['copy_bandwidth_gbps']:.0f} GB/s)", "",
             "| batch | variant | ms/step | vs per-op | fraction of floor | tokens equal |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['batch']} | {r['variant']} | {r['ms_per_step']:.3f} | {r['vs_per_op']:+.1%} | "
              f"{r['fraction_of_floor']:.3f} | {r['tokens_equal']:.3f} |" for r in rows]
    lines += ["", f"The one-launch step alone at one position, with and without its waits (batch-1 floor {floor:.3f} "
              "ms):", "", "| launch | ms with waits | ms without | waits cost ms | fraction of floor without waits |",
              "|---|---|---|---|---|"]
    lines += [f"| {b['launch']} | {b['ms_with_waits']:.3f} | {b['ms_without_waits']:.3f} | "
              f"{b['ms_with_waits'] - b['ms_without_waits']:.3f} | {floor / b['ms_without_waits']:.3f} |"
              for b in bounds]
    (out / "one_launch_step.md").write_text("\n".join(lines) + "\n")


def launch_bounds(model: GptModel, steps: dict[str, step_kernel.OneLaunchStep], position: int, floor: float,
                  rounds: int = 3, reps: int = 30) -> list[dict]:
    """Per launch shape: ms per step of the one-launch step alone at `position`, with its waits and without
    (`wait=False`), alternated in rounds (the first call of each compiles it)."""
    token, positions = torch.tensor([17], device=model.device), torch.tensor([position], device=model.device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    bounds = []
    for name, step in steps.items():
        times: dict[bool, list[float]] = {True: [], False: []}
        for wait in (True, False):
            step(token, positions, position + 1, wait=wait)
        for _ in range(rounds):
            for wait in (True, False):
                start.record()
                for _ in range(reps):
                    step(token, positions, position + 1, wait=wait)
                end.record()
                torch.cuda.synchronize()
                times[wait].append(start.elapsed_time(end) / reps)
        bound = {"launch": name, "ms_with_waits": statistics.median(times[True]),
                 "ms_without_waits": statistics.median(times[False]),
                 "rounds_ms": {"with_waits": times[True], "without_waits": times[False]}, "stalls": int(step.stalls)}
        bounds.append(bound)
        print(f"bound {name:16s} alone {bound['ms_with_waits']:.3f} ms/step, without waits "
              f"{bound['ms_without_waits']:.3f} (fraction of floor {floor / bound['ms_without_waits']:.3f}): the "
              f"waits cost {bound['ms_with_waits'] - bound['ms_without_waits']:.3f} ms; stalls {bound['stalls']}",
              flush=True)
    return bounds


def trace_step(model: GptModel, step: step_kernel.OneLaunchStep, position: int, out: Path | None) -> str:
    """One traced step at `position` (run twice: the first compiles the traced kernel) -> a text summary; with out,
    also one_launch_trace.json (per stage and layer) and .png."""
    kv_len = position + 1
    kinds = step.task_kinds(kv_len)
    trace = torch.zeros((len(kinds), 4), dtype=torch.int64, device=model.device)
    token, positions = torch.tensor([17], device=model.device), torch.tensor([position], device=model.device)
    step(token, positions, kv_len, trace=trace)
    step(token, positions, kv_len, trace=trace)
    torch.cuda.synchronize()
    sm, started, ready, done = (trace[:, i].cpu().double() for i in range(4))
    start = started.min()
    started, ready, done = (started - start) / 1000, (ready - start) / 1000, (done - start) / 1000  # us from the start
    span = float(done.max())
    stages = list(dict.fromkeys(kind for kind, _ in kinds))
    lines = [f"one traced step, launch {step.launch}, {step.programs} programs, kv_len {kv_len}: "
             f"{span:.1f} us first task started -> last done, {len(kinds)} tasks",
             f"{'stage':18s} {'tasks':>6s} {'wait us':>8s} {'after us':>9s} {'span/layer us':>14s} "
             f"{'done at (layer 0, mid, last) us':>32s}"]
    per_stage: dict[str, dict] = {}
    for stage in stages:
        rows = [i for i, (kind, _) in enumerate(kinds) if kind == stage]
        layers = sorted({kinds[i][1] for i in rows})
        per_layer = {layer: [i for i in rows if kinds[i][1] == layer] for layer in layers}
        spans = [float(done[idx].max() - started[idx].min()) for idx in per_layer.values()]
        ends = [float(done[idx].max()) for idx in per_layer.values()]
        wait = float((ready[rows] - started[rows]).mean())
        after = float((done[rows] - ready[rows]).mean())
        picks = [ends[0], ends[len(ends) // 2], ends[-1]]
        lines.append(f"{stage:18s} {len(rows):6d} {wait:8.2f} {after:9.2f} {statistics.median(spans):14.1f} "
                     f"{' '.join(f'{e:10.1f}' for e in picks):>32s}")
        per_stage[stage] = {"tasks": len(rows), "mean_wait_us": wait, "mean_after_ready_us": after,
                            "median_span_per_layer_us": statistics.median(spans), "done_per_layer_us": ends}
    fc2_ends = per_stage["fc2"]["done_per_layer_us"]
    layer_times = [b - a for a, b in zip(fc2_ends, fc2_ends[1:])]
    lines.append(f"a layer (FC2 done to FC2 done): median {statistics.median(layer_times):.1f} us, "
                 f"min {min(layer_times):.1f}, max {max(layer_times):.1f}")
    if out is not None:
        report = {"launch": str(step.launch), "programs": step.programs, "kv_len": kv_len, "span_us": span,
                  "tasks": len(kinds), "stages": per_stage}
        out.mkdir(parents=True, exist_ok=True)
        (out / "one_launch_trace.json").write_text(json.dumps(report, indent=1))
        draw_trace(kinds, sm, started, done, span, out / "one_launch_trace.png")
    return "\n".join(lines)


def draw_trace(kinds: list[tuple[str, int]], sm: torch.Tensor, started: torch.Tensor, done: torch.Tensor, span: float,
               path: Path) -> None:
    """A line per task from started to done, a row per multiprocessor, a colour per stage."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no trace plot", flush=True)
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.collections import LineCollection

    stages = list(dict.fromkeys(kind for kind, _ in kinds))
    colors = dict(zip(stages, plt.get_cmap("tab10").colors))
    figure, axes = plt.subplots(figsize=(14, 6))
    for stage in stages:
        idx = [i for i, (kind, _) in enumerate(kinds) if kind == stage]
        axes.add_collection(LineCollection([[(started[i], sm[i]), (done[i], sm[i])] for i in idx],
                                           colors=colors[stage], linewidths=0.6, label=stage))
    axes.set_xlim(0, span)
    axes.set_ylim(-1, float(sm.max()) + 1)
    axes.set_xlabel("us from the first task started")
    axes.set_ylabel("multiprocessor")
    axes.set_title(f"one-launch decode step, {torch.cuda.get_device_name()}: each task started -> done")
    axes.legend(loc="upper right", fontsize=7)
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
