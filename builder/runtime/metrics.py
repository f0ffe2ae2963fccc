"""Engine metrics on Triton's metrics port (`/metrics`), through the Python backend's custom metrics API.

Families (labels `model`, `instance`):

    gpt_kv_slots_in_use / gpt_kv_slots_total        gauges: KV-cache slots (sequences) held / available
    gpt_requests_waiting / gpt_requests_running     gauges: queued for a slot / generating
    gpt_prompt_tokens_total                         counter: prompt tokens admitted
    gpt_generated_tokens_total                      counter: tokens generated
    gpt_time_to_first_token_seconds                 histogram: arrival -> first generated token, per request
    gpt_queue_time_seconds                          histogram: arrival -> admission (first prompt chunk scheduled)
    gpt_inter_token_latency_seconds                 histogram: time between decode steps

Triton 2.51's Python backend has histograms (`pb_utils.MetricFamily.HISTOGRAM`, buckets given per metric; r24.10).

Every metric call of the Python backend is a round trip to the Triton process over shared memory. Calling it per
token would cost more than the decode step on a GPU host, so the engine's calls here only update numbers under a lock;
`flush()` (from a daemon thread, every `flush_interval_s`) sends counters as one increment, gauges as their last
value, and the buffered observations. Inter-token latency is observed once per decode step: every running request
gets one token per step, so the step interval is each one's inter-token latency, and the cost does not grow with the
batch. Observations beyond `max_pending` between two flushes are dropped and counted (`dropped_observations`).

`pb_utils` is passed in (tests pass a fake), so this module imports without Triton.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

TTFT_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
ITL_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)

GAUGES = {
    "slots_in_use": ("gpt_kv_slots_in_use", "KV-cache slots (sequences) holding a request"),
    "slots_total": ("gpt_kv_slots_total", "KV-cache slots (sequences) the engine has"),
    "waiting": ("gpt_requests_waiting", "Requests queued for a KV-cache slot"),
    "running": ("gpt_requests_running", "Requests generating"),
}
COUNTERS = {
    "prompt_tokens": ("gpt_prompt_tokens_total", "Prompt tokens admitted"),
    "generated_tokens": ("gpt_generated_tokens_total", "Tokens generated"),
}
HISTOGRAMS = {
    "ttft": ("gpt_time_to_first_token_seconds", "Seconds from a request's arrival to its first generated token",
             TTFT_BUCKETS_S),
    # In-flight batching: the part of the time to first token a request waits for admission (the rest is its prefill
    # and the step that selects its first token).
    "queue": ("gpt_queue_time_seconds", "Seconds from a request's arrival to its admission (its first prompt chunk "
                                        "scheduled)", TTFT_BUCKETS_S),
    "itl": ("gpt_inter_token_latency_seconds", "Seconds between decode steps (each running request's inter-token "
                                               "latency)", ITL_BUCKETS_S),
}


@dataclass
class PendingMetrics:
    """What changed since the last flush (or `take`)."""

    gauges: dict[str, int] = field(default_factory=dict)
    counters: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTERS, 0))
    observations: dict[str, list[float]] = field(default_factory=lambda: {name: [] for name in HISTOGRAMS})

    def __bool__(self) -> bool:
        return bool(self.gauges or any(self.counters.values()) or any(self.observations.values()))


class MetricsRecorder:
    """The cheap recorders the scheduler calls from any thread: numbers under a lock, taken by whoever delivers them
    (EngineMetrics' flush; in an engine process, engine_process.py forwards them to the stub's EngineMetrics)."""

    def __init__(self, max_pending: int = 10_000) -> None:
        self.max_pending = max_pending
        self.dropped_observations = 0
        self._lock = threading.Lock()
        self._pending = PendingMetrics()

    def set_load(self, *, slots_in_use: int | None = None, waiting: int | None = None,
                 running: int | None = None, slots_total: int | None = None) -> None:
        """Gauges to their current values (only those given)."""
        values = {"slots_in_use": slots_in_use, "waiting": waiting, "running": running, "slots_total": slots_total}
        with self._lock:
            self._pending.gauges.update({key: int(value) for key, value in values.items() if value is not None})

    def add_prompt_tokens(self, count: int) -> None:
        self._add("prompt_tokens", count)

    def add_generated_tokens(self, count: int) -> None:
        self._add("generated_tokens", count)

    def observe_time_to_first_token(self, seconds: float) -> None:
        self._observe("ttft", seconds)

    def observe_queue_time(self, seconds: float) -> None:
        self._observe("queue", seconds)

    def observe_inter_token(self, seconds: float) -> None:
        self._observe("itl", seconds)

    def _add(self, key: str, count: int) -> None:
        if count < 0:
            raise ValueError(f"{key} must not decrease, got {count}")
        with self._lock:
            self._pending.counters[key] += int(count)

    def _observe(self, key: str, seconds: float) -> None:
        with self._lock:
            values = self._pending.observations[key]
            if len(values) >= self.max_pending:
                self.dropped_observations += 1
                return
            values.append(max(float(seconds), 0.0))

    def take(self) -> PendingMetrics:
        """What changed since the previous take, and start afresh."""
        with self._lock:
            pending, self._pending = self._pending, PendingMetrics()
        return pending

    def merge(self, other: PendingMetrics) -> None:
        """Add what another recorder took (gauges: its last values)."""
        with self._lock:
            self._pending.gauges.update(other.gauges)
            for key, count in other.counters.items():
                self._pending.counters[key] += count
        for key, values in other.observations.items():
            for seconds in values:
                self._observe(key, seconds)


class EngineMetrics(MetricsRecorder):
    """`EngineMetrics(pb_utils, model_name, instance, slots_total=N).start()` in `initialize`, `stop()` in
    `finalize`; the scheduler calls the cheap recorders from any thread."""

    def __init__(self, pb_utils: Any, model_name: str, instance: str = "", *, slots_total: int,
                 flush_interval_s: float = 1.0, max_pending: int = 10_000) -> None:
        super().__init__(max_pending)
        if slots_total < 0:
            raise ValueError(f"slots_total must be >= 0, got {slots_total}")
        if not flush_interval_s > 0:
            raise ValueError(f"flush_interval_s must be > 0, got {flush_interval_s}")
        labels = {"model": model_name, "instance": instance}
        kinds = pb_utils.MetricFamily
        # The families must outlive their metrics: a Metric does not keep its MetricFamily alive, and once the
        # family is garbage-collected every call fails ("the corresponding 'MetricFamily' has been deleted").
        self._families: list[Any] = []

        def family(name: str, text: str, kind: Any) -> Any:
            self._families.append(kinds(name=name, description=text, kind=kind))
            return self._families[-1]

        self._gauges = {key: family(name, text, kinds.GAUGE).Metric(labels=labels)
                        for key, (name, text) in GAUGES.items()}
        self._counters = {key: family(name, text, kinds.COUNTER).Metric(labels=labels)
                          for key, (name, text) in COUNTERS.items()}
        self._histograms = {key: family(name, text, kinds.HISTOGRAM).Metric(labels=labels, buckets=list(buckets))
                            for key, (name, text, buckets) in HISTOGRAMS.items()}
        self.flush_interval_s = flush_interval_s
        self._flush_lock = threading.Lock()  # one flush at a time: the thread's and stop()'s
        self.set_load(slots_total=slots_total, slots_in_use=0, waiting=0, running=0)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- delivery ---------------------------------------------------------------------------------------------
    def flush(self) -> None:
        """Send what changed since the last flush to Triton."""
        with self._flush_lock:
            pending = self.take()
            for key, value in pending.gauges.items():
                self._gauges[key].set(value)
            for key, count in pending.counters.items():
                if count:
                    self._counters[key].increment(count)
            for key, values in pending.observations.items():
                for seconds in values:
                    self._histograms[key].observe(seconds)

    def start(self) -> EngineMetrics:
        self.flush()  # the totals are visible from the first scrape
        self._thread = threading.Thread(target=self._run, name="engine-metrics", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Last flush, then the metrics are released before their families (Triton's required order)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        self.flush()
        self._gauges, self._counters, self._histograms = {}, {}, {}
        self._families = []

    def _run(self) -> None:
        while not self._stop.wait(self.flush_interval_s):
            self.flush()


class RequestClock:
    """Per-request timing for the time-to-first-token histogram: `arrived` when the request is received,
    `first_token(metrics)` on each step that produced tokens for it (observes once)."""

    __slots__ = ("arrived", "_seen_first")

    def __init__(self, arrived: float | None = None) -> None:
        self.arrived = time.monotonic() if arrived is None else arrived
        self._seen_first = False

    def first_token(self, metrics: MetricsRecorder | None, now: float | None = None) -> None:
        if self._seen_first:
            return
        self._seen_first = True
        if metrics is not None:
            metrics.observe_time_to_first_token((time.monotonic() if now is None else now) - self.arrived)


class StepClock:
    """Decode-step timing for the inter-token histogram: `tick(metrics)` after each decode step; the first tick
    after an idle engine only starts the clock (the gap spent idle is no token's latency)."""

    __slots__ = ("_last",)

    def __init__(self) -> None:
        self._last: float | None = None

    def tick(self, metrics: MetricsRecorder | None, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        if self._last is not None and metrics is not None:
            metrics.observe_inter_token(now - self._last)
        self._last = now

    def idle(self) -> None:
        self._last = None
