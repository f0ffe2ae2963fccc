"""Triton's request trace (TIMESTAMPS level) read into the stages of a streamed ensemble request's first response.

Used by bench/ttft_timeline.py (one request at a time: the median of each stage) and bench/serving_bench.py
`--trace-rate` (a sample of the requests of a loaded run: each stage's percentiles, and where the slowest first
responses spent their time). Trace timestamps are the server's steady clock (CLOCK_MONOTONIC on Linux, Python's
time.monotonic_ns on the same host).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

# (label, model, event): the ensemble request's stages, in the order a request meets them. A Python model's outputs are
# ready at COMPUTE_OUTPUT_START: its response is sent on (and the next step starts) before its COMPUTE_END.
STAGES = (
    ("preprocessing queued", "preprocessing", "QUEUE_START"),
    ("preprocessing computing", "preprocessing", "COMPUTE_START"),
    ("preprocessing's outputs ready", "preprocessing", "COMPUTE_OUTPUT_START"),
    ("core queued", "core", "QUEUE_START"),
    ("core computing", "core", "COMPUTE_START"),
    ("core execute returned", "core", "COMPUTE_END"),
    ("first response reaches postprocessing", "postprocessing", "REQUEST_START"),
    ("postprocessing computing", "postprocessing", "COMPUTE_START"),
    ("postprocessing's outputs ready", "postprocessing", "COMPUTE_OUTPUT_START"),
    ("ensemble's first response to gRPC", "ensemble", "GRPC_SEND_START"),
)

Models = dict[int, dict[str, Any]]  # trace id -> its model entry (model_name, parent_id for an ensemble's steps)
Events = dict[int, dict[str, list[int]]]  # trace id -> event name -> timestamps (ns), in order


def server_args(folder: Path, rate: int, log_every: int) -> list[str]:
    """tritonserver options that trace one request in `rate` (their ensemble steps too) into folder/trace.json*.

    Triton writes a file every `log_every` traces and drops what is left at shutdown. The folder holds request data:
    keep it private (0700)."""
    return [f"--trace-config=triton,file={folder / 'trace.json'}", "--trace-config=level=TIMESTAMPS",
            f"--trace-config=rate={rate}", "--trace-config=count=-1",
            f"--trace-config=triton,log-frequency={log_every}"]


def read_traces(folder: Path) -> tuple[Models, Events]:
    """Triton's trace files -> (id -> its model entry, id -> event name -> timestamps in ns, in order)."""
    models: Models = {}
    events: Events = defaultdict(lambda: defaultdict(list))
    for path in sorted(folder.glob("trace.json*")):
        for entry in json.loads(path.read_text()):
            if "model_name" in entry:
                models[entry["id"]] = entry
            for stamp in entry.get("timestamps", []):
                events[entry["id"]][stamp["name"]].append(stamp["ns"])
    return models, events


def first_responses(models: Models, events: Events, core: str) -> list[tuple[int, dict[str, float]]]:
    """Every traced streamed ensemble request, in arrival order: (its REQUEST_START ns, each STAGES label -> ms after
    it). Streamed: at least two postprocessing steps (one per response); its first is the first response's."""
    children: dict[int, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for trace_id, entry in models.items():
        if "parent_id" in entry:
            name = "core" if entry["model_name"] == core else entry["model_name"]
            children[entry["parent_id"]][name].append(trace_id)
    found = []
    for trace_id, entry in models.items():
        own = events[trace_id]
        steps = children.get(trace_id, {})
        if ("parent_id" in entry or entry["model_name"] == core or not own["GRPC_SEND_START"]
                or len(steps.get("postprocessing", [])) < 2 or not steps.get("preprocessing") or not steps.get("core")):
            continue
        start = own["REQUEST_START"][0]
        first_post = min(steps["postprocessing"], key=lambda child: events[child]["REQUEST_START"][0])
        chosen = {"preprocessing": steps["preprocessing"][0], "core": steps["core"][0],
                  "postprocessing": first_post, "ensemble": trace_id}
        if all(events[chosen[model]][event] for _, model, event in STAGES):
            found.append((start, {label: (events[chosen[model]][event][0] - start) / 1e6
                                  for label, model, event in STAGES}))
    return sorted(found, key=lambda item: item[0])


def step_percentiles(requests: list[dict[str, float]], slowest: float = 0.05) -> dict[str, Any]:
    """Each step of the first response (the time from the previous stage to this one) over the requests: p50, p90,
    p99; and the mean of each step over the `slowest` share of them by their whole time to the first response (which
    step a tail is made of)."""
    labels = [label for label, _, _ in STAGES]
    at = np.array([[request[label] for label in labels] for request in requests])  # [requests, stages] ms
    steps = np.diff(np.concatenate([np.zeros((len(requests), 1)), at], axis=1), axis=1)  # [requests, stages]
    total = at[:, -1]
    slow = total >= np.quantile(total, 1 - slowest)
    tail = steps[slow]
    return {"requests": len(requests), "slowest_share": slowest,
            "steps_ms": {label: {"p50": float(np.percentile(steps[:, i], 50)),
                                 "p90": float(np.percentile(steps[:, i], 90)),
                                 "p99": float(np.percentile(steps[:, i], 99)),
                                 "mean_of_slowest": float(tail[:, i].mean())}
                         for i, label in enumerate(labels)},
            "first_response_ms": {"p50": float(np.percentile(total, 50)), "p90": float(np.percentile(total, 90)),
                                  "p99": float(np.percentile(total, 99)), "mean_of_slowest": float(total[slow].mean())}}
