"""Engine metrics through a real tritonserver: a small Python model of this test's own records through
builder/runtime/metrics.py (copied next to it, as `render` copies the runtime), and Triton's /metrics shows the
families and their values changing as requests run."""

from __future__ import annotations

import re
import shutil
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient

from builder.serve import TritonServer
from servers import server_on_free_ports

pytestmark = pytest.mark.server

METRICS_MODULE = Path(__file__).resolve().parents[1] / "builder" / "runtime" / "metrics.py"
CONFIG = """
name: "toy"
backend: "python"
max_batch_size: 0
input [ { name: "prompt_tokens" data_type: TYPE_INT32 dims: [ 1 ] },
        { name: "generate" data_type: TYPE_INT32 dims: [ 1 ] } ]
output [ { name: "ipc_us" data_type: TYPE_FP32 dims: [ 1 ] } ]
instance_group [ { kind: KIND_CPU count: 1 } ]
"""
# A stand-in engine: "generates" a token every 2 ms and records what the scheduler would record.
MODEL = '''
import sys
import time
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

sys.path.insert(0, str(Path(__file__).resolve().parent))
from metrics import EngineMetrics, RequestClock, StepClock


class TritonPythonModel:
    def initialize(self, args):
        self.metrics = EngineMetrics(pb_utils, args["model_name"], args["model_instance_name"], slots_total=4,
                                     flush_interval_s=0.1).start()
        self.steps = StepClock()
        self.family = pb_utils.MetricFamily(name="toy_scratch", description="round-trip timing",
                                            kind=pb_utils.MetricFamily.GAUGE)
        self.scratch = self.family.Metric(labels={"model": "toy"})

    def execute(self, requests):
        responses = []
        for request in requests:
            clock = RequestClock()
            prompt = int(pb_utils.get_input_tensor_by_name(request, "prompt_tokens").as_numpy()[0])
            count = int(pb_utils.get_input_tensor_by_name(request, "generate").as_numpy()[0])
            self.metrics.set_load(slots_in_use=1, running=1, waiting=0)
            self.metrics.add_prompt_tokens(prompt)
            for _ in range(count):
                time.sleep(0.002)
                clock.first_token(self.metrics)
                self.metrics.add_generated_tokens(1)
                self.steps.tick(self.metrics)
            self.steps.idle()
            self.metrics.set_load(slots_in_use=0, running=0)
            start = time.perf_counter()
            for _ in range(200):
                self.scratch.set(1.0)
            ipc_us = (time.perf_counter() - start) / 200 * 1e6
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("ipc_us", np.array([ipc_us], np.float32))]))
        return responses

    def finalize(self):
        self.metrics.stop()
'''
SAMPLE = re.compile(r'^(\w+)\{([^}]*)\} (\S+)$')


@pytest.fixture(scope="module")
def toy_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    repository = tmp_path_factory.mktemp("metrics_repo")
    version = repository / "toy" / "1"
    version.mkdir(parents=True)
    (repository / "toy" / "config.pbtxt").write_text(CONFIG)
    (version / "model.py").write_text(MODEL)
    shutil.copy(METRICS_MODULE, version / "metrics.py")
    with server_on_free_ports(repository, startup_timeout_s=120) as server:
        yield server


def scrape(server: TritonServer, model: str = "toy") -> dict[str, float]:
    """Samples labelled with `model`, by name (histograms: _sum and _count; buckets by le)."""
    with urllib.request.urlopen(server.metrics_url, timeout=10) as response:
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        match = SAMPLE.match(line)
        if match and f'model="{model}"' in match.group(2):
            le = re.search(r'le="([^"]+)"', match.group(2))
            samples[match.group(1) + (f"[{le.group(1)}]" if le else "")] = float(match.group(3))
    return samples


def wait_for(server: TritonServer, done: Callable[[dict[str, float]], bool], timeout_s: float = 10,
             model: str = "toy") -> dict[str, float]:
    deadline = time.monotonic() + timeout_s
    while True:
        samples = scrape(server, model)
        if done(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(0.05)


def infer(server: TritonServer, prompt_tokens: int, generate: int) -> float:
    client = httpclient.InferenceServerClient(server.http_url, network_timeout=60)
    inputs = [httpclient.InferInput("prompt_tokens", [1], "INT32"), httpclient.InferInput("generate", [1], "INT32")]
    inputs[0].set_data_from_numpy(np.array([prompt_tokens], np.int32))
    inputs[1].set_data_from_numpy(np.array([generate], np.int32))
    return float(client.infer("toy", inputs).as_numpy("ipc_us")[0])


def test_engine_metrics_appear_at_metrics_and_change_as_requests_run(toy_server: TritonServer) -> None:
    before = wait_for(toy_server, lambda s: "gpt_kv_slots_total" in s)
    assert before["gpt_kv_slots_total"] == 4 and before["gpt_kv_slots_in_use"] == 0
    assert before["gpt_requests_running"] == 0 and before["gpt_requests_waiting"] == 0
    assert before["gpt_prompt_tokens_total"] == 0 and before["gpt_generated_tokens_total"] == 0
    assert before["gpt_time_to_first_token_seconds_count"] == 0
    assert before["gpt_inter_token_latency_seconds_count"] == 0

    ipc_us = infer(toy_server, prompt_tokens=5, generate=20)
    # A flush sends the counters, then each histogram observation (one call each): wait until it is all there.
    after = wait_for(toy_server, lambda s: s["gpt_generated_tokens_total"] == 20
                     and s["gpt_inter_token_latency_seconds_count"] >= 19)
    assert after["gpt_generated_tokens_total"] == 20 and after["gpt_prompt_tokens_total"] == 5
    assert after["gpt_time_to_first_token_seconds_count"] == 1
    assert 0.002 <= after["gpt_time_to_first_token_seconds_sum"] < 1.0
    assert after["gpt_inter_token_latency_seconds_count"] == 19  # one per step after the first
    assert after["gpt_inter_token_latency_seconds_sum"] >= 19 * 0.002
    # Buckets are cumulative and end with +Inf = count.
    assert after["gpt_inter_token_latency_seconds_bucket[+Inf]"] == 19
    assert after["gpt_inter_token_latency_seconds_bucket[0.0005]"] == 0
    print(f"one metric call from the Python backend: {ipc_us:.1f} us")

    # While a long request runs, the gauges say so; afterwards they return to idle.
    worker = threading.Thread(target=infer, args=(toy_server, 3, 1500))  # ~3 s of "generation"
    worker.start()
    during = wait_for(toy_server, lambda s: s["gpt_requests_running"] == 1)
    assert during["gpt_requests_running"] == 1 and during["gpt_kv_slots_in_use"] == 1
    assert 20 < during["gpt_generated_tokens_total"] < 1520  # counters move mid-request, not only at the end
    worker.join(timeout=60)
    final = wait_for(toy_server, lambda s: s["gpt_generated_tokens_total"] == 1520
                     and s["gpt_time_to_first_token_seconds_count"] >= 2)
    assert final["gpt_generated_tokens_total"] == 1520 and final["gpt_prompt_tokens_total"] == 8
    assert final["gpt_requests_running"] == 0 and final["gpt_kv_slots_in_use"] == 0
    assert final["gpt_time_to_first_token_seconds_count"] == 2


@pytest.mark.parametrize("streaming", [True, False], ids=["in-flight", "static"])
def test_the_torch_core_reports_engine_metrics(tmp_path: Path, streaming: bool) -> None:
    from builder.demo import build_demo_repository
    from client import TextClient

    repository = build_demo_repository(tmp_path / "repo", streaming=streaming)
    core = "gpt3_1.3b"  # the demo's core model name
    with server_on_free_ports(repository) as server:
        before = wait_for(server, lambda s: "gpt_kv_slots_total" in s, model=core)
        assert before["gpt_kv_slots_total"] > 0 and before["gpt_generated_tokens_total"] == 0
        with TextClient(server.grpc_url, protocol="grpc") as client:
            assert client.generate("1 2 3 4 5 6", max_tokens=30).num_output_tokens == 30
        # The histogram observations follow the counters within a flush (see the test above).
        after = wait_for(server, lambda s: s["gpt_generated_tokens_total"] == 30 and s["gpt_requests_running"] == 0
                         and (not streaming or s["gpt_inter_token_latency_seconds_count"] >= 29), model=core)
        assert after["gpt_generated_tokens_total"] == 30 and after["gpt_prompt_tokens_total"] == 6
        if streaming:  # latencies come from the in-flight scheduler's steps; the static path has none
            assert after["gpt_time_to_first_token_seconds_count"] == 1
            assert 29 <= after["gpt_inter_token_latency_seconds_count"] <= 30
            # Its wait for admission, a part of its time to first token.
            assert after["gpt_queue_time_seconds_count"] == 1
            assert 0 <= after["gpt_queue_time_seconds_sum"] <= after["gpt_time_to_first_token_seconds_sum"]
        assert after["gpt_requests_running"] == 0 and after["gpt_kv_slots_in_use"] == 0
