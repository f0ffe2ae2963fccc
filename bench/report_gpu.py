"""Turn bench/gpu_bench.py's results.json into docs/benchmarks.md's table and a throughput/latency plot.

    python bench/report_gpu.py docs/gpu_results.json --plot docs/gpu_throughput.png
Prints the markdown table (goals from the GPU performance issue beside each measured value).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# key -> (label, goal text, goal check)
GOALS = {
    "decode_ms_per_token_bs1": ("decode, batch 1 (ms/token)", "<= 1.3 (stretch 1.1)", lambda v: v <= 1.3),
    "ttft_ms_prompt512_bs1": ("time to first token, 512-token prompt, batch 1 (ms)", "<= 10", lambda v: v <= 10),
    "tokens_per_s_concurrency64": ("output tokens/s, 64 concurrent clients", ">= 20000", lambda v: v >= 20000),
    "speedup_vs_hf_static_bs1": ("speed-up vs HF static cache, batch 1", ">= 2.5", lambda v: v >= 2.5),
    "greedy_agreement_vs_hf_fp16": ("greedy agreement vs HF fp16 (teacher-forced)", ">= 0.99", lambda v: v >= 0.99),
}
CONTEXT = {
    "floor_ms_per_token": "bandwidth floor, batch 1 (ms/token)",
    "copy_bandwidth_gbps": "device copy bandwidth (GB/s, read + write)",
    "hf_static_ms_per_token_bs1": "HF transformers, static cache, batch 1 (ms/token)",
    "hf_eager_ms_per_token_bs1": "HF transformers, eager, batch 1 (ms/token)",
    "speedup_vs_hf_eager_bs1": "speed-up vs HF eager, batch 1",
    "fraction_of_floor": "floor / measured decode (bandwidth utilisation)",
    "tokens_per_s_concurrency1": "output tokens/s, 1 client",
    "tokens_per_s_concurrency8": "output tokens/s, 8 clients",
    "tokens_per_s_concurrency32": "output tokens/s, 32 clients",
    "greedy_exact_token_agreement_vs_hf_fp16": "greedy tokens equal to HF fp16, position by position",
}


def fmt(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"


def table(result: dict) -> str:
    lines = ["| metric | measured | goal | met |", "|---|---|---|---|"]
    for key, (label, goal, check) in GOALS.items():
        if key in result:
            lines.append(f"| {label} | {fmt(result[key])} | {goal} | {'yes' if check(result[key]) else 'no'} |")
    lines += ["", "| context | value |", "|---|---|"]
    for key, label in CONTEXT.items():
        if key in result:
            lines.append(f"| {label} | {fmt(result[key])} |")
    if "greedy_identical_sequences" in result:
        lines.append(f"| greedy sequences identical to HF fp16 | {result['greedy_identical_sequences']} of "
                     f"{result.get('greedy_sequences', 32)} |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = result["concurrency_sweep"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([p["latency_p50_ms"] for p in sweep], [p["tokens_per_s"] for p in sweep], "o-", label="ours, via Triton")
    for p in sweep:
        ax.annotate(f"{p['clients']}", (p["latency_p50_ms"], p["tokens_per_s"]), textcoords="offset points",
                    xytext=(4, -10))
    ax.set_xlabel("request latency p50 (ms), 128-token prompt, 128 new tokens")
    ax.set_ylabel("output tokens/s")
    ax.set_title(f"1.3B fp16 on {result['gpu']} (labels: concurrent clients)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("results", type=Path)
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args()
    result = json.loads(args.results.read_text())
    print(table(result))
    if args.plot and "concurrency_sweep" in result:
        plot(result, args.plot)


if __name__ == "__main__":
    main()
