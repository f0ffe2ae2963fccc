"""Metrics of the serving benchmark from perf_analyzer's outputs, the issue-17 goals, the markdown table and the plot.

Plain functions over perf_analyzer's profile export (one experiment per run), so tests can feed them hand-made
experiments. Definitions (every run goes through a gRPC stream: the repository is decoupled):
- tokens of a request: the largest `num_output_tokens` among its responses (the ensemble reports the cumulative
  count); for the core model (token ids, no such output) the request's own `request_output_len` input, which
  `min_length` pins. Requests are those SENT inside the last three measurement windows (the ones perf_analyzer found
  stable), less perf_analyzer's opening wave (every client's first request, all sent at once: recorded on its own,
  `opening_ttft_ms`), as client/perf_report.py does.
- output tokens/s = perf_analyzer's completed requests/s (CSV `Inferences/Second`) x mean tokens per request. For the
  mixed workload that mean is over the entries actually sent (perf_analyzer exports each request's inputs), i.e.
  the entries' lengths weighted by how often each was sent. `tokens_per_s_completed` (tokens of the requests whose
  last response fell inside the stable windows / their span) is kept as a cross-check.
- TTFT = first response carrying a token - send; latency = last response - send; inter-token latency (ITL) per
  request = (last response - first response) / (tokens - 1) (genai-perf's definition); inter-response gap = time
  between consecutive responses of a request, divided by the tokens the later one added (per-token pacing, also
  when responses carry several tokens).
- responses per token = all responses / all tokens (1.0: one response per token; < 1: coalesced).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from client.perf_report import STABLE_WINDOWS, Percentiles, opening_wave, stable_requests

NS_PER_MS = 1e6


@dataclass(frozen=True)
class RunMetrics:
    """One perf_analyzer run: one model, one workload, one concurrency."""

    name: str  # e.g. "streamed", "not_streamed", "core_streamed", "mixed_streamed"
    model: str
    concurrency: int
    streamed: bool
    requests: int
    throughput_rps: float
    tokens_per_request: float
    output_tokens_per_s: float
    tokens_per_s_completed: float | None
    latency_ms: Percentiles | None
    ttft_ms: Percentiles | None
    itl_ms: Percentiles | None
    inter_response_ms: Percentiles | None
    responses_per_request: float
    responses_per_token: float | None
    token_count_mismatches: int  # requests whose tokens differ from the max_tokens they asked for
    client_cpu_percent_max: float | None = None
    client_cpu_percent_mean: float | None = None
    server_cpu_percent_mean: float | None = None
    # The engine's own time to first token (its arrival in the engine -> first token; no client, no Python hops) and
    # its wait for admission, from its histograms over the run (bucket_quantiles): where a TTFT tail is made.
    engine_ttft_ms: dict[str, float | None] | None = None
    engine_queue_ms: dict[str, float | None] | None = None
    # perf_analyzer's opening wave (client/perf_report.opening_wave: every client's first request, all at once), left
    # out of every other figure: its size and, streamed, its TTFT (what a burst of that many arrivals gets).
    opening_requests: int = 0
    opening_ttft_ms: Percentiles | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# The torch engine's histograms (builder/runtime/metrics.py) a run records: its time to first token and the part of
# it spent waiting for admission.
ENGINE_HISTOGRAMS = {"engine_ttft_ms": "gpt_time_to_first_token_seconds", "engine_queue_ms": "gpt_queue_time_seconds"}


def histogram_buckets(text: str, name: str) -> dict[float, float]:
    """Cumulative bucket counts (upper bound in s -> count) of a Prometheus histogram in Triton's /metrics text,
    summed over its label sets (every model instance)."""
    counts: dict[float, float] = {}
    prefix = f"{name}_bucket{{"
    for line in text.splitlines():
        if line.startswith(prefix):
            labels, _, value = line[len(prefix):].rpartition("} ")
            bound = labels.split('le="', 1)[1].split('"', 1)[0]
            le = math.inf if bound == "+Inf" else float(bound)
            counts[le] = counts.get(le, 0.0) + float(value)
    return counts


def bucket_quantiles(before: dict[float, float], after: dict[float, float]) -> dict[str, float | None] | None:
    """The observations between two scrapes of a histogram: their count and, for p50 and p99, the upper bound (ms)
    of the bucket that holds that quantile (an "at most")."""
    bounds = sorted(after)
    cumulative = [after[b] - before.get(b, 0.0) for b in bounds]
    if not cumulative or cumulative[-1] <= 0:
        return None
    total = cumulative[-1]

    def upper_ms(q: float) -> float | None:
        bound = next(b for b, c in zip(bounds, cumulative) if c >= q * total)
        return None if math.isinf(bound) else bound * 1e3

    return {"count": total, "p50_at_most": upper_ms(0.5), "p99_at_most": upper_ms(0.99)}


def _scalar(value: Any) -> int | None:
    """A number as perf_analyzer exports it: bare, or a list of one (the largest of several)."""
    if isinstance(value, list):
        value = max(value) if value and all(isinstance(v, (int, float)) for v in value) else None
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _asked_tokens(request: dict[str, Any]) -> int | None:
    inputs = request.get("request_inputs") or {}
    for name in ("max_tokens", "request_output_len"):
        value = _scalar(inputs.get(name))
        if value is not None:
            return value
    return None


def _token_counts(request: dict[str, Any]) -> list[int] | None:
    """Cumulative token count after each response (None: the responses do not say). The ensemble says it in
    num_output_tokens; the core model in sequence_length (prompt included: minus the request's input_lengths)."""
    outputs = request.get("response_outputs") or []
    prompt = _scalar((request.get("request_inputs") or {}).get("input_lengths"))
    counts = []
    for output in outputs:
        output = output if isinstance(output, dict) else {}
        value = _scalar(output.get("num_output_tokens"))
        if value is None and prompt is not None:
            length = _scalar(output.get("sequence_length"))
            value = None if length is None else length - prompt
        if value is None:
            return None
        counts.append(value)
    return counts if len(counts) == len(request["response_timestamps"]) else None


def run_metrics(name: str, model: str, concurrency: int, streamed: bool, throughput_rps: float,
                experiment: dict[str, Any]) -> RunMetrics:
    requests = stable_requests(experiment)
    if not requests:
        raise ValueError(f"{name} at concurrency {concurrency}: the profile export holds no answered request")
    tokens, latency, ttft, itl, gaps = [], [], [], [], []
    responses = mismatches = 0
    for request in requests:
        stamps = [int(s) for s in request["response_timestamps"]]
        sent = int(request["timestamp"])
        asked = _asked_tokens(request)
        produced, carrying = _carrying(request, streamed)
        if produced is None:
            raise ValueError(f"{name}: a request has neither num_output_tokens nor max_tokens/request_output_len")
        if asked is not None and produced != asked:
            mismatches += 1
        tokens.append(produced)
        responses += len(stamps)
        latency.append((stamps[-1] - sent) / NS_PER_MS)
        first = carrying[0][0] if carrying else stamps[0]
        ttft.append((first - sent) / NS_PER_MS)
        if streamed and produced > 1 and len(carrying) > 1:
            itl.append((carrying[-1][0] - first) / NS_PER_MS / (produced - 1))
            for (before, had), (after, has) in zip(carrying, carrying[1:]):
                gaps.append((after - before) / NS_PER_MS / max(1, has - had))
    completed = None
    bounds = experiment.get("window_boundaries") or []
    if len(bounds) >= STABLE_WINDOWS + 1:
        start, end = int(bounds[-(STABLE_WINDOWS + 1)]), int(bounds[-1])
        done = sum(count for request, count in zip(experiment.get("requests", []), _all_tokens(experiment))
                   if request.get("response_timestamps") and start <= int(request["response_timestamps"][-1]) < end)
        completed = done / ((end - start) / 1e9) if end > start else None
    mean_tokens = float(np.mean(tokens))
    opening = [request for request in opening_wave(experiment) if request.get("response_timestamps")]
    opening_ttft = [_first_token_ms(request, streamed) for request in opening]
    return RunMetrics(
        name=name, model=model, concurrency=concurrency, streamed=streamed, requests=len(requests),
        throughput_rps=throughput_rps, tokens_per_request=mean_tokens,
        output_tokens_per_s=throughput_rps * mean_tokens, tokens_per_s_completed=completed,
        latency_ms=Percentiles.of(latency), ttft_ms=Percentiles.of(ttft) if streamed else None,
        itl_ms=Percentiles.of(itl) if streamed else None,
        inter_response_ms=Percentiles.of(gaps) if streamed else None,
        responses_per_request=responses / len(requests),
        responses_per_token=responses / sum(tokens) if sum(tokens) else None,
        token_count_mismatches=mismatches, opening_requests=len(opening),
        opening_ttft_ms=Percentiles.of(opening_ttft) if streamed and opening_ttft else None)


def _carrying(request: dict[str, Any], streamed: bool) -> tuple[int | None, list[tuple[int, int]]]:
    """(the request's tokens, or None when neither its responses nor its inputs say; (timestamp, cumulative tokens)
    of its responses that carry tokens)."""
    stamps = [int(s) for s in request["response_timestamps"]]
    counts = _token_counts(request)
    produced = max(counts) if counts else _asked_tokens(request)
    if counts is None:  # core model: every response of a stream is one step's token(s)
        counts = list(range(1, len(stamps) + 1)) if streamed else [produced or 0]
    return produced, [(stamp, count) for stamp, count in zip(stamps, counts) if count > 0]


def _first_token_ms(request: dict[str, Any], streamed: bool) -> float:
    carrying = _carrying(request, streamed)[1]
    first = carrying[0][0] if carrying else int(request["response_timestamps"][0])
    return (first - int(request["timestamp"])) / NS_PER_MS


def _all_tokens(experiment: dict[str, Any]) -> list[int]:
    """Tokens of every request of the experiment (0 where unknown), aligned with experiment['requests']."""
    result = []
    for request in experiment.get("requests", []):
        counts = _token_counts(request) if request.get("response_timestamps") else None
        result.append(max(counts) if counts else (_asked_tokens(request) or 0))
    return result


# -- goals (issue 17, one H200) ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Goal:
    text: str
    key: str  # the JSON key measured
    op: str  # ">=", "<=", "within"
    target: float


GOALS: tuple[Goal, ...] = (
    Goal("streamed tok/s at 64 streams >= 25,000", "streamed_tokens_per_s_c64", ">=", 25_000),
    Goal("streamed / not streamed tok/s at 64 >= 0.95", "streamed_over_not_streamed_c64", ">=", 0.95),
    Goal("streamed tok/s at 256 streams >= 50,000", "streamed_tokens_per_s_c256", ">=", 50_000),
    Goal("mixed workload tok/s at 64 clients >= 15,000", "mixed_tokens_per_s_c64", ">=", 15_000),
    Goal("mixed workload TTFT p99 <= 300 ms", "mixed_ttft_p99_ms", "<=", 300),
    Goal("1 stream: responses per token >= 0.9", "responses_per_token_c1", ">=", 0.9),
    Goal("1 stream: inter-token p50 within 10 % of batch-1 decode time", "itl_p50_over_decode_ms_c1", "within", 0.10),
    Goal("TTFT, 512-token prompt, batch 1, streamed, ensemble <= 6 ms", "ttft_ms_prompt512_bs1_streamed", "<=", 6),
    Goal("ensemble adds <= 0.5 ms over the core (batch 1, first streamed response)", "ensemble_overhead_ms_bs1",
         "<=", 0.5),
)


def goal_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for goal in GOALS:
        value = result.get(goal.key)
        met: bool | None = None
        if isinstance(value, (int, float)) and math.isfinite(value):
            if goal.op == ">=":
                met = value >= goal.target
            elif goal.op == "<=":
                met = value <= goal.target
            else:
                met = abs(value - 1.0) <= goal.target
        rows.append({"goal": goal.text, "key": goal.key, "target": f"{goal.op} {goal.target:g}", "measured": value,
                     "met": met})
    return rows


# -- report ------------------------------------------------------------------------------------------------------------
def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.{digits}f}"
    return str(value)


def markdown(result: dict[str, Any]) -> str:
    lines = [f"# Serving benchmark: {result.get('gpu', '?')}", ""]
    settings = result.get("settings", {})
    if settings:
        lines += ["| setting | value |", "|---|---|"] + [f"| {k} | {_fmt(v)} |" for k, v in settings.items()] + [""]
    lines += ["## Goals (issue 17)", "", "| goal | measured | met |", "|---|---|---|"]
    for row in result.get("goals", []):
        met = "-" if row["met"] is None else ("yes" if row["met"] else "**no**")
        lines.append(f"| {row['goal']} | {_fmt(row['measured'])} | {met} |")
    runs = [RunMetricsView(run) for run in result.get("runs", [])]
    if runs:
        lines += ["", "## Runs (perf_analyzer)", "",
                  "| run | model | concurrency | req/s | output tok/s | tok/request | latency p50 / p99 ms | "
                  "TTFT p50 / p99 ms | engine TTFT p50 / p99 ms, at most | engine queue p50 / p99 ms, at most | "
                  "ITL p50 / p99 ms | responses/token | client CPU % max | window s | opening wave: requests, "
                  "TTFT p50 / p99 ms |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for run in runs:
            lines.append(f"| {run.name} | {run.model} | {run.concurrency} | {_fmt(run.rps)} | {_fmt(run.tps)} | "
                         f"{_fmt(run.tokens, 1)} | {run.pair('latency_ms')} | {run.pair('ttft_ms')} | "
                         f"{run.at_most('engine_ttft_ms')} | {run.at_most('engine_queue_ms')} | "
                         f"{run.pair('itl_ms', 3)} | "
                         f"{_fmt(run.data.get('responses_per_token'), 3)} | "
                         f"{_fmt(run.data.get('client_cpu_percent_max'), 0)} | {_fmt(run.data.get('window_s'), 1)} | "
                         f"{run.data.get('opening_requests', 0)}, {run.pair('opening_ttft_ms')} |")
    for run in result.get("runs", []):
        traced = run.get("first_response_steps")
        if not traced:
            continue
        total = traced["first_response_ms"]
        lines += ["", f"## First response, step by step: {run['name']} at {run['concurrency']} (Triton's trace, "
                      f"{traced['requests']} sampled requests of the stable windows)", "",
                  f"Whole first response p50 {_fmt(total['p50'], 1)} / p90 {_fmt(total['p90'], 1)} / p99 "
                  f"{_fmt(total['p99'], 1)} ms; the slowest {traced['slowest_share']:.0%}: "
                  f"{_fmt(total['mean_of_slowest'], 1)} ms on average, made of:", "",
                  "| step (ms from the previous stage to this one) | p50 | p90 | p99 | mean of the slowest |",
                  "|---|---|---|---|---|"]
        lines += [f"| {label} | {_fmt(step['p50'], 2)} | {_fmt(step['p90'], 2)} | {_fmt(step['p99'], 2)} | "
                  f"{_fmt(step['mean_of_slowest'], 2)} |" for label, step in traced["steps_ms"].items()]
    failed = result.get("failed_runs", [])
    if failed:
        lines += ["", "## Failed runs", "", "| run | concurrency | error |", "|---|---|---|"]
        lines += [f"| {run['name']} | {run['concurrency']} | {run['error']} |" for run in failed]
    single = {k: v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if single:
        lines += ["", "## All scalar results", "", "| key | value |", "|---|---|"]
        lines += [f"| {key} | {_fmt(value, 3)} |" for key, value in single.items()]
    return "\n".join(lines) + "\n"


class RunMetricsView:
    """A run as stored in the JSON (a dict), for the table."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data
        self.name, self.model, self.concurrency = data["name"], data["model"], data["concurrency"]
        self.rps, self.tps = data["throughput_rps"], data["output_tokens_per_s"]
        self.tokens = data["tokens_per_request"]

    def pair(self, key: str, digits: int = 1) -> str:
        value = self.data.get(key)
        return "-" if not value else f"{_fmt(value['p50'], digits)} / {_fmt(value['p99'], digits)}"

    def at_most(self, key: str) -> str:
        value = self.data.get(key)
        if not value:
            return "-"
        return " / ".join("> 30 s" if value[key] is None else _fmt(value[key], 0) for key in ("p50_at_most",
                                                                                             "p99_at_most"))


def plot(path: Path, runs: Sequence[dict[str, Any]], title: str) -> bool:
    """tok/s vs concurrency (streamed, not streamed, core), TTFT and ITL percentiles vs concurrency. False: no
    matplotlib here (the JSON and the table are written anyway)."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import FuncFormatter

    figure, axes = plt.subplots(1, 3, figsize=(17, 4.6))
    series = sorted({run["name"] for run in runs})
    for index, name in enumerate(series):
        color = f"C{index}"  # one colour per series; line style per percentile
        points = sorted(((run["concurrency"], run) for run in runs if run["name"] == name), key=lambda p: p[0])
        xs = [c for c, _ in points]
        axes[0].plot(xs, [r["output_tokens_per_s"] for _, r in points], marker="o", color=color, label=name)
        for ax, key in ((axes[1], "ttft_ms"), (axes[2], "itl_ms")):
            for quantile, style in (("p50", "-"), ("p90", "--"), ("p99", ":")):
                values = [(c, r[key][quantile]) for c, r in points if r.get(key)]
                if values:
                    ax.plot([v[0] for v in values], [v[1] for v in values], style, marker="o", color=color,
                            label=f"{name} {quantile}")
    for ax, label in ((axes[0], "output tokens/s"), (axes[1], "time to first response (ms)"),
                      (axes[2], "inter-token latency (ms)")):
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))  # 1, 8, 64 (not 1.0)
        ax.set_xlabel("concurrent requests")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    axes[1].set_yscale("log")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True
