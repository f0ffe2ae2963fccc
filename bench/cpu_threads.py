"""The CPU core model's torch threads: all cores (torch's default) vs one core left to Triton (the stub's default).

    python bench/cpu_threads.py --out docs/perf/cpu_threads.json

Serves the CPU demo repository twice: with the core model's torch threads = every core (torch's default, what the
stub used before; GPT_TRITON_CPU_THREADS) and with the stub's own default (cores - 1; core_adapter.cpu_threads), and
times non-streamed requests of 1 and 16 rows × 120 new
tokens, --reps times each, first on a quiet machine, then with one busy-looping process per --busy core (what a
shared host or a parallel test run adds). Writes the JSON, a markdown table and a bar plot beside it.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from builder.demo import build_demo_repository
from builder.serve import TritonServer
from client import TextClient

PROMPT = "1 2 3 4 5 6"
NEW_TOKENS = 120  # + 6 prompt tokens fits the demo's 128 positions


def spin(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def time_requests(repository: Path, threads: int | None, rows: list[int], reps: int) -> dict[str, float]:
    """Median seconds per request of each row count, with the core model's torch threads = `threads` (None: the
    stub's default). Only the core stub reads GPT_TRITON_CPU_THREADS."""
    saved = os.environ.pop("GPT_TRITON_CPU_THREADS", None)
    if threads is not None:
        os.environ["GPT_TRITON_CPU_THREADS"] = str(threads)
    try:
        with TritonServer.on_free_ports(repository) as server, TextClient(server.http_url, timeout_s=300) as client:
            client.generate(PROMPT, max_tokens=3)  # warm
            medians = {}
            for count in rows:
                times = []
                for _ in range(reps):
                    started = time.monotonic()
                    client.generate([PROMPT] * count, max_tokens=NEW_TOKENS)
                    times.append(time.monotonic() - started)
                medians[f"{count}_rows_s"] = statistics.median(times)
            return medians
    finally:
        os.environ.pop("GPT_TRITON_CPU_THREADS", None)
        if saved is not None:
            os.environ["GPT_TRITON_CPU_THREADS"] = saved


def markdown(result: dict[str, Any]) -> str:
    lines = [f"# CPU core model: torch threads ({result['machine']}, {result['cores']} cores)", "",
             f"Command: `{result['command']}`. Median of {result['reps']} non-streamed requests of {NEW_TOKENS} new "
             f"tokens per row through the demo ensemble (HTTP).", "",
             "| load | torch threads | " + " | ".join(f"{rows} rows (s)" for rows in result["rows"]) + " |",
             "|---|---|" + "---|" * len(result["rows"])]
    for run in result["runs"]:
        cells = " | ".join(f"{run[f'{rows}_rows_s']:.2f}" for rows in result["rows"])
        lines.append(f"| {run['load']} | {run['threads']} | {cells} |")
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(result["rows"]), figsize=(5 * len(result["rows"]), 3.5))
    for axis, rows in zip(figure.axes, result["rows"]):
        labels = [f"{run['load']}\n{run['threads']}" for run in result["runs"]]
        axis.bar(labels, [run[f"{rows}_rows_s"] for run in result["runs"]])
        axis.set_title(f"{rows} rows x {NEW_TOKENS} tokens")
        axis.set_ylabel("seconds per request (median)")
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--busy", type=int, default=1, help="busy-looping processes for the loaded runs")
    parser.add_argument("--machine", default="this project's 2-core CPU machine")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    repository = build_demo_repository(Path("demo_repository"))
    cores = os.cpu_count() or 1
    runs = []
    for load in ("quiet", f"{args.busy} busy core(s)"):
        busy = [multiprocessing.Process(target=spin, args=(3600,), daemon=True)
                for _ in range(args.busy if load != "quiet" else 0)]
        for process in busy:
            process.start()
        try:
            settings = ((cores, f"{cores} (torch's default)"), (None, f"{max(1, cores - 1)} (stub default)"))
            for threads, label in settings:
                timed = time_requests(repository, threads, args.rows, args.reps)
                runs.append({"load": load, "threads": label, **timed})
                print(runs[-1], flush=True)
        finally:
            for process in busy:
                process.terminate()
    result = {"machine": args.machine, "cores": cores, "rows": args.rows, "reps": args.reps,
              "command": " ".join(["python", *sys.argv]), "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result))
    plot(result, args.out.with_suffix(".png"))
    print(markdown(result))


if __name__ == "__main__":
    main()
