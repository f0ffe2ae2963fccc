"""Where the first streamed token's time goes, stage by stage, from Triton's own request trace (issue 17).

    python bench/ttft_timeline.py --out docs/perf/ttft_timeline_cpu.json        # the CPU demo, streaming variant
    python bench/ttft_timeline.py --repository R --prompt-tokens 512 --out OUT/ttft_timeline.json   # a --streaming repo

Starts tritonserver on a streaming repository with request tracing at TIMESTAMPS level for every request (the trace
files go to a private temporary folder), then sends `--requests` measured pairs (after 10 warm-up pairs, before 20
trailing ones that push the last traces into a written file) over one gRPC stream, one request at a time:
a streamed ensemble request (a prompt of exactly --prompt-tokens tokens, --new-tokens new tokens), then the same token
ids to the core model, streamed. From the trace, per stage, the median time after the ensemble request arrived
(its REQUEST_START): preprocessing queued / computing / outputs ready, the core queued / computing (a decoupled
core's execute only queues the request) / its first response reaching postprocessing / postprocessing's outputs
ready / the ensemble's first response handed to gRPC; and for the core alone, its arrival to its first response
handed to gRPC. Client side: the medians of the first response's arrival, ensemble and core, and of the pairs'
differences. Writes the JSON and a markdown table beside it (same name, .md).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import gpu_bench  # bench/gpu_bench.py: the gRPC client over one stream
from builder.demo import build_demo_repository
from builder.serve import TritonServer
from client.perf import DEFAULT_TOKENIZER_DIR, load_tokenizer, token_length_prompts
from serving_bench import core_call_times  # bench/serving_bench.py: the core model's streamed call
from triton_trace import STAGES, Events, Models, first_responses, read_traces, server_args  # bench/triton_trace.py

WARMUP = 10  # pairs sent first and left out of every median
# Triton writes the trace file every LOG_EVERY traces and drops what is left at shutdown: TRAILING pairs after the
# measured ones push those into a written file.
LOG_EVERY, TRAILING = 10, 20


def stage_times(models: Models, events: Events, core: str, skip: int,
                count: int) -> tuple[dict[str, list[float]], list[float]]:
    """Per stage, ms after each streamed ensemble request's REQUEST_START; and the core-alone requests' ms from
    arrival to their first response handed to gRPC: `count` requests of each kind after the first `skip` (warm-up)."""
    stages: dict[str, list[float]] = defaultdict(list)
    for _, request in first_responses(models, events, core)[skip:skip + count]:
        for label, value in request.items():
            stages[label].append(value)
    core_alone: list[float] = []
    alone = sorted((events[trace_id]["REQUEST_START"][0], trace_id) for trace_id, entry in models.items()
                   if entry["model_name"] == core and "parent_id" not in entry and events[trace_id]["GRPC_SEND_START"])
    for start, trace_id in alone[skip:skip + count]:
        core_alone.append((events[trace_id]["GRPC_SEND_START"][0] - start) / 1e6)
    return stages, core_alone


def markdown(result: dict[str, Any]) -> str:
    lines = [f"# Time to the first streamed response, stage by stage ({result['machine']})", "",
             f"Repository `{result['repository']}`, {result['prompt_tokens']}-token prompt, {result['new_tokens']} "
             f"new tokens, {result['requests']} pairs (ensemble, then core alone), one at a time over a gRPC stream.",
             f"Command: `{result['command']}`", "",
             "| stage (ensemble request) | median ms after it arrived | step |", "|---|---|---|"]
    previous = 0.0
    for label, value in result["ensemble_stages_ms"].items():
        lines.append(f"| {label} | {value:.3f} | {value - previous:+.3f} |")
        previous = value
    client = result["client_ms"]
    core_alone = result["core_alone_first_response_ms"]
    lines += ["", f"Core alone: arrival to its first response handed to gRPC {core_alone:.3f} ms (median).", "",
              f"Client: first response through the ensemble {client['ensemble_first_response']:.3f} ms, from the core "
              f"alone {client['core_first_response']:.3f} ms; median of the pairs' differences "
              f"{client['ensemble_adds']:.3f} ms.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", type=Path, help="a rendered --streaming repository (default: the CPU demo's)")
    parser.add_argument("--core", default=gpu_bench.MODEL, help="the core model's name in the repository")
    parser.add_argument("--prompt-tokens", type=int, default=50)
    parser.add_argument("--new-tokens", type=int, default=4)
    parser.add_argument("--requests", type=int, default=100, help=f"pairs measured (after {WARMUP} warm-up pairs)")
    parser.add_argument("--machine", default="this project's 2-core CPU machine", help="named in the results")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.new_tokens < 2:
        parser.error("--new-tokens must be >= 2: a streamed request then has a first response before its last")

    repository = args.repository or build_demo_repository(Path("demo_repository_streaming"), streaming=True)
    (text, ids), = token_length_prompts(load_tokenizer(DEFAULT_TOKENIZER_DIR), args.prompt_tokens, 1, seed=5)
    with tempfile.TemporaryDirectory(prefix="ttft-trace-") as folder:  # private (0700): traces hold request data
        trace_args = server_args(Path(folder), rate=1, log_every=LOG_EVERY)
        with TritonServer.on_free_ports(repository, extra_args=trace_args) as server:
            triton = gpu_bench.Triton(server.grpc_url, streaming=True)

            ensemble_ms, core_ms = [], []
            for index in range(WARMUP + args.requests + TRAILING):
                first = triton.text(text, args.new_tokens, stream=True)[0] * 1e3
                alone = core_call_times(triton, args.core, ids, args.new_tokens, stream=True)[0] * 1e3
                if WARMUP <= index < WARMUP + args.requests:
                    ensemble_ms.append(first)
                    core_ms.append(alone)
        # The server has stopped, so the last trace file is complete.
        models, events = read_traces(Path(folder))
        stages, core_alone = stage_times(models, events, args.core, skip=WARMUP, count=args.requests)
    if not stages or not core_alone:
        raise SystemExit("the trace holds no streamed ensemble request or core request: is the repository streaming?")
    result = {
        "machine": args.machine, "repository": str(repository), "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens, "requests": args.requests, "command": " ".join(["python", *sys.argv]),
        "ensemble_stages_ms": {label: statistics.median(stages[label]) for label, _, _ in STAGES},
        "traced_ensemble_requests": len(stages[STAGES[0][0]]),
        "core_alone_first_response_ms": statistics.median(core_alone),
        "client_ms": {"ensemble_first_response": statistics.median(ensemble_ms),
                      "core_first_response": statistics.median(core_ms),
                      "ensemble_adds": float(np.median(np.subtract(ensemble_ms, core_ms)))},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
