"""builder/runtime/metrics.py with a fake pb_utils that records every (costly) Triton call."""

from __future__ import annotations

import time
from typing import Any

import pytest

from builder.runtime.metrics import COUNTERS, GAUGES, HISTOGRAMS, EngineMetrics, RequestClock, StepClock


class FakeMetric:
    def __init__(self, family: FakeFamily, labels: dict[str, str], buckets: list[float] | None) -> None:
        self.family, self.labels, self.buckets = family, labels, buckets
        self.value = 0.0
        self.observed: list[float] = []

    def set(self, value: float) -> None:
        assert self.family.kind == "gauge"
        FakePbUtils.calls += 1
        self.value = value

    def increment(self, value: float) -> None:
        assert self.family.kind == "counter" and value >= 0
        FakePbUtils.calls += 1
        self.value += value

    def observe(self, value: float) -> None:
        assert self.family.kind == "histogram"
        FakePbUtils.calls += 1
        self.observed.append(value)


class FakeFamily:
    COUNTER, GAUGE, HISTOGRAM = "counter", "gauge", "histogram"
    created: dict[str, FakeFamily] = {}

    def __init__(self, name: str, description: str, kind: str) -> None:
        assert description
        self.name, self.kind = name, kind
        self.metrics: list[FakeMetric] = []
        FakeFamily.created[name] = self

    def Metric(self, labels: dict[str, str] | None = None, buckets: list[float] | None = None) -> FakeMetric:
        assert (buckets is not None) == (self.kind == "histogram"), "histograms (only) need buckets"
        assert buckets is None or buckets == sorted(buckets)
        metric = FakeMetric(self, dict(labels or {}), buckets)
        self.metrics.append(metric)
        return metric


class FakePbUtils:
    MetricFamily = FakeFamily
    calls = 0


def metric(name: str) -> FakeMetric:
    [only] = FakeFamily.created[name].metrics
    return only


@pytest.fixture
def metrics() -> Any:
    FakeFamily.created.clear()
    FakePbUtils.calls = 0
    return EngineMetrics(FakePbUtils, "gpt", "gpt_0", slots_total=8, flush_interval_s=0.05)


def test_families_kinds_and_labels(metrics: EngineMetrics) -> None:
    kinds = {name: family.kind for name, family in FakeFamily.created.items()}
    assert kinds == {**{n: "gauge" for n, _ in GAUGES.values()}, **{n: "counter" for n, _ in COUNTERS.values()},
                     **{n: "histogram" for n, _, _ in HISTOGRAMS.values()}}
    assert all(m.labels == {"model": "gpt", "instance": "gpt_0"} for f in FakeFamily.created.values()
               for m in f.metrics)


def test_recording_makes_no_triton_call_and_flush_sends_the_aggregate(metrics: EngineMetrics) -> None:
    metrics.set_load(slots_in_use=3, waiting=2, running=3)
    for _ in range(100):
        metrics.add_generated_tokens(3)
    metrics.add_prompt_tokens(17)
    metrics.observe_time_to_first_token(0.2)
    metrics.observe_queue_time(0.05)
    for step in range(5):
        metrics.observe_inter_token(0.01 * (step + 1))
    assert FakePbUtils.calls == 0
    metrics.flush()
    assert metric("gpt_generated_tokens_total").value == 300 and metric("gpt_prompt_tokens_total").value == 17
    assert (metric("gpt_kv_slots_in_use").value, metric("gpt_kv_slots_total").value) == (3, 8)
    assert (metric("gpt_requests_waiting").value, metric("gpt_requests_running").value) == (2, 3)
    assert metric("gpt_time_to_first_token_seconds").observed == [0.2]
    assert metric("gpt_queue_time_seconds").observed == [0.05]
    assert metric("gpt_inter_token_latency_seconds").observed == pytest.approx([0.01, 0.02, 0.03, 0.04, 0.05])
    assert FakePbUtils.calls == 4 + 2 + 1 + 1 + 5  # gauges, one increment per counter, observations
    calls = FakePbUtils.calls
    metrics.flush()  # nothing changed: nothing sent
    assert FakePbUtils.calls == calls
    metrics.add_generated_tokens(5)
    metrics.set_load(running=1)
    metrics.flush()
    assert metric("gpt_generated_tokens_total").value == 305 and metric("gpt_requests_running").value == 1
    assert metric("gpt_requests_waiting").value == 2 and FakePbUtils.calls == calls + 2


def test_the_thread_flushes_and_stop_sends_the_rest(metrics: EngineMetrics) -> None:
    metrics.start()
    assert metric("gpt_kv_slots_total").value == 8  # visible from the first scrape
    metrics.add_generated_tokens(7)
    deadline = time.monotonic() + 5
    while metric("gpt_generated_tokens_total").value != 7 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert metric("gpt_generated_tokens_total").value == 7
    metrics.flush_interval_s = 3600.0  # the next periodic flush would come too late: stop() must send it
    time.sleep(0.1)
    metrics.add_prompt_tokens(4)
    metrics.stop()
    assert metric("gpt_prompt_tokens_total").value == 4


def test_observations_are_bounded_between_flushes() -> None:
    FakeFamily.created.clear()
    bounded = EngineMetrics(FakePbUtils, "gpt", slots_total=1, max_pending=10)
    for _ in range(25):
        bounded.observe_inter_token(0.001)
    bounded.flush()
    assert len(metric("gpt_inter_token_latency_seconds").observed) == 10 and bounded.dropped_observations == 15


def test_bad_values_are_refused(metrics: EngineMetrics) -> None:
    with pytest.raises(ValueError, match="generated_tokens must not decrease"):
        metrics.add_generated_tokens(-1)
    with pytest.raises(ValueError, match="slots_total"):
        EngineMetrics(FakePbUtils, "gpt", slots_total=-1)


def test_clocks(metrics: EngineMetrics) -> None:
    clock = RequestClock(arrived=10.0)
    clock.first_token(metrics, now=10.25)
    clock.first_token(metrics, now=11.0)  # only the first counts
    steps = StepClock()
    steps.tick(metrics, now=1.0)  # starts the clock
    steps.tick(metrics, now=1.002)
    steps.idle()
    steps.tick(metrics, now=5.0)  # after idle: starts again, the idle gap is nobody's latency
    steps.tick(metrics, now=5.003)
    metrics.flush()
    assert metric("gpt_time_to_first_token_seconds").observed == [0.25]
    assert metric("gpt_inter_token_latency_seconds").observed == pytest.approx([0.002, 0.003])
