"""Turn perf_analyzer's outputs (`-f` CSV, `--profile-export-file` JSON) into metrics, and write the report folder.

Definitions follow genai-perf: TTFT = first non-empty response - send; request latency = last response - send;
inter-token latency = (last text response - first text response) / (output tokens - 1), per request; output
tokens are counted by re-tokenizing the concatenated text_output; output tokens/s = all output tokens / (last
response - first send). Only the requests sent inside the last three measurement windows count: those are the
windows perf_analyzer found stable and reported; less, in concurrency mode, perf_analyzer's opening wave (its first N
requests at concurrency N: every client sends its first request at the same instant, a burst that a steady load never
sends; `opening_wave` finds them so a report can show them on their own).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

STABLE_WINDOWS = 3
NS_PER_MS = 1e6


@dataclass(frozen=True)
class Percentiles:
    avg: float
    p50: float
    p90: float
    p95: float
    p99: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Percentiles | None:
        if not values:
            return None
        data = np.asarray(values, dtype=np.float64)
        p50, p90, p95, p99 = np.percentile(data, [50, 90, 95, 99])
        return cls(avg=float(data.mean()), p50=float(p50), p90=float(p90), p95=float(p95), p99=float(p99))


@dataclass(frozen=True)
class LevelResult:
    """One model at one concurrency level."""

    model: str
    concurrency: int
    requests: int
    throughput_rps: float  # perf_analyzer's Inferences/Second (requests/s)
    latency_ms: Percentiles | None  # request latency (send -> last response)
    ttft_ms: Percentiles | None = None  # streaming only
    itl_ms: Percentiles | None = None  # streaming only
    output_tokens_per_s: float | None = None
    output_tokens_per_request: float | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class UnstableLevel:
    """A level perf_analyzer measured but never found stable: it reports no numbers, so none are invented here."""

    model: str
    concurrency: int
    detail: str  # perf_analyzer's own words

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def read_csv_row(path: Path) -> dict[str, str]:
    """The single data row of perf_analyzer's `-f` CSV (one concurrency level per run)."""
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        raise ValueError(f"{path} has no measurement rows")
    return rows[-1]


def opening_wave(experiment: dict[str, Any]) -> list[dict[str, Any]]:
    """Concurrency mode at N: the first N requests sent, one per client, all at once as the run starts (perf_analyzer
    has no warm-up); none in other modes. At 64 clients of the mixed workload on an H200 they were 43 of the 44
    requests whose first token took over 200 ms, in a run of 861 (docs/benchmarks.md)."""
    setting = experiment.get("experiment") or {}
    if setting.get("mode") != "concurrency":
        return []
    sent = sorted(experiment.get("requests", []), key=lambda request: int(request["timestamp"]))
    return sent[:int(setting.get("value") or 0)]


def stable_requests(experiment: dict[str, Any]) -> list[dict[str, Any]]:
    """Answered requests sent inside the last STABLE_WINDOWS measurement windows (all of them if windows are
    unknown), less the opening wave (if that leaves any)."""
    requests = [r for r in experiment.get("requests", []) if r.get("response_timestamps")]
    bounds = experiment.get("window_boundaries") or []
    if len(bounds) >= STABLE_WINDOWS + 1:
        start, end = bounds[-(STABLE_WINDOWS + 1)], bounds[-1]
        requests = [r for r in requests if start <= r["timestamp"] < end] or requests
    opening = {id(request) for request in opening_wave(experiment)}
    return [r for r in requests if id(r) not in opening] or requests


def _texts(request: dict[str, Any]) -> list[tuple[int, str]]:
    """(timestamp, text) of each response that carried text."""
    outputs = request.get("response_outputs") or []
    pairs = []
    for stamp, output in zip(request["response_timestamps"], outputs):
        text = output.get("text_output") if isinstance(output, dict) else None
        if isinstance(text, list):
            text = "".join(str(t) for t in text)
        if isinstance(text, str) and text:
            pairs.append((int(stamp), text))
    return pairs


def level_from_export(model: str, concurrency: int, throughput_rps: float, experiment: dict[str, Any],
                      count_tokens: Callable[[list[str]], list[int]] | None, streaming: bool) -> LevelResult:
    """Metrics of one level from its profile-export experiment."""
    requests = stable_requests(experiment)
    latencies = [(r["response_timestamps"][-1] - r["timestamp"]) / NS_PER_MS for r in requests]
    texts = [_texts(r) for r in requests]
    tokens: list[int] | None = None
    if count_tokens is not None and any(texts):
        tokens = count_tokens(["".join(text for _, text in pieces) for pieces in texts])
    ttft, itl = [], []
    if streaming:
        for request, pieces, index in zip(requests, texts, range(len(requests))):
            first = pieces[0][0] if pieces else request["response_timestamps"][0]
            ttft.append((first - request["timestamp"]) / NS_PER_MS)
            if tokens is not None and pieces and tokens[index] > 1:
                itl.append((pieces[-1][0] - pieces[0][0]) / NS_PER_MS / (tokens[index] - 1))
    tokens_per_s = per_request = None
    if tokens is not None and requests:
        duration_s = (max(r["response_timestamps"][-1] for r in requests) -
                      min(r["timestamp"] for r in requests)) / 1e9
        tokens_per_s = sum(tokens) / duration_s if duration_s > 0 else None
        per_request = sum(tokens) / len(tokens)
    return LevelResult(model=model, concurrency=concurrency, requests=len(requests), throughput_rps=throughput_rps,
                       latency_ms=Percentiles.of(latencies),
                       ttft_ms=Percentiles.of(ttft) if streaming else None,
                       itl_ms=Percentiles.of(itl) if streaming else None,
                       output_tokens_per_s=tokens_per_s, output_tokens_per_request=per_request)


def added_latency(ensemble: Sequence[LevelResult], core: Sequence[LevelResult]) -> list[dict[str, Any]]:
    """What the ensemble (tokenize + detokenize + scheduling) adds over the core model, per concurrency."""
    by_level = {result.concurrency: result for result in core}
    rows = []
    for result in ensemble:
        other = by_level.get(result.concurrency)
        if other is None or result.latency_ms is None or other.latency_ms is None:
            continue
        row: dict[str, Any] = {"concurrency": result.concurrency,
                               "p50_ms": result.latency_ms.p50 - other.latency_ms.p50,
                               "p99_ms": result.latency_ms.p99 - other.latency_ms.p99}
        if result.ttft_ms is not None and other.ttft_ms is not None:
            row["ttft_p50_ms"] = result.ttft_ms.p50 - other.ttft_ms.p50
            row["ttft_p99_ms"] = result.ttft_ms.p99 - other.ttft_ms.p99
        rows.append(row)
    return rows


def added_latency_warnings(added: Sequence[dict[str, Any]]) -> list[str]:
    """One line per level where the ensemble measured faster than the core model alone.

    The ensemble runs the core model plus tokenization, so a negative difference is measurement noise: at latencies
    of a few ms the spread between perf_analyzer's windows is larger than what the ensemble adds.
    """
    lines = []
    for row in added:
        negative = [f"{key.removesuffix('_ms').replace('_', ' ')} {row[key]:.2f} ms" for key in
                    ("p50_ms", "p99_ms", "ttft_p50_ms", "ttft_p99_ms") if row.get(key) is not None and row[key] < 0]
        if negative:
            lines.append(f"warning: negative added latency at concurrency {row['concurrency']} "
                         f"({', '.join(negative)}): the ensemble cannot be faster than the core model it runs, so "
                         "this is noise, which at such low latencies exceeds the ensemble's overhead; lengthen "
                         "--measurement-interval, lower --stability-percentage or repeat the run")
    return lines


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown_table(title: str, settings: dict[str, Any], ensemble: Sequence[LevelResult],
                   core: Sequence[LevelResult], added: Sequence[dict[str, Any]],
                   unstable: Sequence[UnstableLevel] = (), notes: Sequence[str] = ()) -> str:
    lines = [f"# {title}", "", "| setting | value |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in settings.items()]
    streaming = any(result.ttft_ms is not None for result in ensemble)
    header = ["model", "concurrency", "requests/s", "p50 latency ms", "p99 latency ms"]
    if streaming:
        header += ["TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms", "ITL p99 ms"]
    header += ["output tok/s"]
    lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    everything: list[LevelResult | UnstableLevel] = [*ensemble, *core, *unstable]
    models = list(dict.fromkeys(item.model for item in everything))
    rows = sorted(everything, key=lambda item: (models.index(item.model), item.concurrency))
    for result in rows:
        if isinstance(result, UnstableLevel):
            lines.append("| " + " | ".join([result.model, str(result.concurrency), "unstable",
                                            *["-"] * (len(header) - 3)]) + " |")
            continue
        cells = [result.model, str(result.concurrency), _fmt(result.throughput_rps),
                 _fmt(result.latency_ms.p50 if result.latency_ms else None),
                 _fmt(result.latency_ms.p99 if result.latency_ms else None)]
        if streaming:
            cells += [_fmt(result.ttft_ms.p50 if result.ttft_ms else None),
                      _fmt(result.ttft_ms.p99 if result.ttft_ms else None),
                      _fmt(result.itl_ms.p50 if result.itl_ms else None, 3),
                      _fmt(result.itl_ms.p99 if result.itl_ms else None, 3)]
        cells += [_fmt(result.output_tokens_per_s, 1)]
        lines.append("| " + " | ".join(cells) + " |")
    if added:
        lines += ["", "Latency the ensemble adds over the core model (ensemble - core):", "",
                  "| concurrency | p50 ms | p99 ms |" + (" TTFT p50 ms | TTFT p99 ms |" if streaming else ""),
                  "|---|---|---|" + ("---|---|" if streaming else "")]
        for row in added:
            cells = [str(row["concurrency"]), _fmt(row["p50_ms"]), _fmt(row["p99_ms"])]
            if streaming:
                cells += [_fmt(row.get("ttft_p50_ms")), _fmt(row.get("ttft_p99_ms"))]
            lines.append("| " + " | ".join(cells) + " |")
    if unstable:
        lines += ["", "Unstable levels (no numbers: perf_analyzer found no stable run of measurement windows; "
                  "lengthen --measurement-interval or raise --stability-percentage):", ""]
        lines += [f"- {item.model} at concurrency {item.concurrency}: {item.detail}" for item in unstable]
    if notes:
        lines += ["", *notes]
    return "\n".join(lines) + "\n"


def plot(path: Path, ensemble: Sequence[LevelResult], core: Sequence[LevelResult]) -> None:
    """Throughput vs latency (one line per model, points labelled by concurrency); TTFT and ITL when streaming."""
    import matplotlib  # heavy; only when a report is written

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    streaming = any(result.ttft_ms is not None for result in ensemble)
    panels = 3 if streaming else 1
    figure, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4.2), squeeze=False)
    groups = [results for results in (ensemble, core) if results]
    ax = axes[0][0]
    for results in groups:
        points = [(r.throughput_rps, r.latency_ms.p50, r.concurrency) for r in results if r.latency_ms]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=f"{results[0].model} p50")
        for x, y, level in points:
            ax.annotate(str(level), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("throughput (requests/s)")
    ax.set_ylabel("request latency p50 (ms)")
    ax.set_title("throughput vs latency (labels: concurrency)")
    ax.grid(alpha=0.3)
    if groups:
        ax.legend()
    else:  # every level was unstable: an empty plot that says so
        ax.text(0.5, 0.5, "no stable level", ha="center", va="center", transform=ax.transAxes)
    if streaming:
        for ax, attr, label in ((axes[0][1], "ttft_ms", "time to first token (ms)"),
                                (axes[0][2], "itl_ms", "inter-token latency (ms)")):
            for results in groups:
                levels = [(r.concurrency, getattr(r, attr)) for r in results if getattr(r, attr)]
                for quantile in ("p50", "p99"):
                    ax.plot([p[0] for p in levels], [getattr(p[1], quantile) for p in levels], marker="o",
                            label=f"{results[0].model} {quantile}")
            ax.set_xlabel("concurrency")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
            ax.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def load_export(path: Path) -> dict[str, Any]:
    """The (single) experiment of a per-level profile export."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read perf_analyzer's profile export {path}: {err}") from err
    experiments = data.get("experiments") or []
    if not experiments:
        raise ValueError(f"{path} holds no experiments")
    return experiments[-1]
