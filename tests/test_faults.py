"""Faults around the served demo ensemble (torch engine, CPU): a dying model process, an unreachable or slow server,
and shutdown with a request in flight.

What tritonserver 2.51 does when a Python-backend stub dies (found here, and upstream: server issues #7347, #8604):
it does NOT restart the stub, and it keeps reporting the server and the model ready. The request in flight fails with
"Stub process '<instance>' is not healthy." (HTTP 400 / gRPC INVALID_ARGUMENT), and so does every later request routed
to that instance. Our side: `TritonServer.dead_stubs()` names the dead instance and `serve_until_signal` (what
`python -m builder serve` and the demo run) stops the server and exits with STUB_DIED_EXIT_CODE so a supervisor restarts
it.

The faults hit a long request mid-way, once the core stub is seen computing: LONG_ROWS prompts of LONG_TOKENS new
tokens each, ~1 s on the demo model (2 CPU cores; one row alone takes ~0.4 s, which left ~0.2 s between seeing the
stub compute and the request's end: too little on a busy CI machine). The shutdown tests allow 30 s for it: a loaded
machine slows it down (with 2 torch threads and one busy core it took 17 s; docs/perf/cpu_threads.md). The
client-timeout test does not race the model: a forwarder holds the answer.
"""

from __future__ import annotations

import logging
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import psutil
import pytest
import tritonclient.http as httpclient

from builder.render import render_repository
from builder.render_config import RenderConfig
from builder.runtime.model_config import GptModelConfig
from builder.serve import PYTHON_STUB, TritonServer, free_port, free_ports
from builder.serve_cli import STUB_DIED_EXIT_CODE, serve_until_signal
from client import RequestError, RequestTimeoutError, TextClient
from servers import serve_command, server_on_free_ports

pytestmark = pytest.mark.server

CORE_MODEL = "gpt3_1.3b"
PROMPT = "1 2 3 4 5 6"
LONG_TOKENS = 120  # + 6 prompt tokens fits max_pos_seq_len 128
LONG_ROWS = 16  # rows of the long request (the demo's max_batch_size is 64)
EXIT_TIMEOUT_S = 30  # for the shutdown tests: the request in flight must finish within it


@pytest.fixture(scope="module")
def repository(demo_repository: Path) -> Path:
    return demo_repository


@pytest.fixture(scope="module")
def server(repository: Path) -> Iterator[TritonServer]:
    with server_on_free_ports(repository) as running:
        yield running


def url_of(server: TritonServer, protocol: str) -> str:
    return server.http_url if protocol == "http" else server.grpc_url


def http_status(url: str) -> int | str:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code
    except (urllib.error.URLError, OSError) as err:
        return type(err).__name__


def in_background(action: Callable[[], object]) -> tuple[threading.Thread, dict[str, object]]:
    """Run `action` in a thread; the dict gets "result" or "error"."""
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["result"] = action()
        except Exception as err:  # noqa: BLE001  (the test inspects it)
            outcome["error"] = err

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def generate_in_background(url: str) -> tuple[threading.Thread, dict[str, object]]:
    """The long request (LONG_ROWS prompts, one request) from a thread with its own client (a TextClient is not
    shared between threads); "result" is the list of its rows' results."""
    def generate() -> object:
        with TextClient(url) as client:
            return client.generate([PROMPT] * LONG_ROWS, max_tokens=LONG_TOKENS)
    return in_background(generate)


def all_long(results: object) -> bool:
    """Every row of the long request generated LONG_TOKENS tokens and stopped for length."""
    assert isinstance(results, list) and len(results) == LONG_ROWS, results
    return all(r.num_output_tokens == LONG_TOKENS and r.finish_reason == "length" for r in results)


def core_stub(root_pid: int) -> psutil.Process:
    """The core model's Python-backend stub: a descendant of `root_pid` (tritonserver, or the serve CLI above it)
    running the stub on gpt3_1.3b's model.py."""
    found = []
    for process in psutil.Process(root_pid).children(recursive=True):
        try:
            argv = " ".join(process.cmdline())
        except psutil.Error:
            continue
        if PYTHON_STUB in argv and f"/{CORE_MODEL}/" in argv:
            found.append(process)
    assert len(found) == 1, f"expected one {CORE_MODEL} stub, found {found}"
    return found[0]


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Return once `condition()` holds; fail the test naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.01)


def generating(stub: psutil.Process) -> Callable[[], bool]:
    """A condition: the core stub has spent 0.1 s of CPU since it was last idle, so the long request (~1 s of its
    CPU) sent after this call is in flight inside the core model. Call it before sending. The baseline waits until the
    stub's CPU time stands still for 0.1 s: on a busy machine the tail of an earlier request's work (the warm-up's)
    once passed a 0.05 s threshold before the long request had even connected."""
    def cpu_s() -> float:
        times = stub.cpu_times()
        return times.user + times.system

    idle, deadline = cpu_s(), time.monotonic() + 10
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = cpu_s()
        if now - idle < 0.005:
            break
        idle = now
    return lambda: cpu_s() - idle >= 0.1


# -- (b) the client against the real ensemble ----------------------------------------------------------------------
class LateForwarder:
    """A loopback TCP port that refuses connections until `open()`, then forwards them to `target` ("host:port").
    Setting `reply_delay_s` holds every later chunk of the server's answers that long (a slow server, without racing
    the model's speed)."""

    def __init__(self, target: str):
        self.host, port = target.rsplit(":", 1)
        self.target_port = int(port)
        self.port = free_port()
        self.reply_delay_s = 0.0
        self._listener: socket.socket | None = None

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    def open(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        if self._listener is not None:
            self._listener.close()

    def _accept(self) -> None:
        assert self._listener is not None
        while True:
            try:
                downstream, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection((self.host, self.target_port))
            for source, sink, held in ((downstream, upstream, False), (upstream, downstream, True)):
                threading.Thread(target=self._pipe, args=(source, sink, held), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, held: bool) -> None:
        try:
            while data := source.recv(65536):
                if held and self.reply_delay_s:
                    time.sleep(self.reply_delay_s)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                try:
                    end.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_client_retries_connection_errors_until_the_server_answers(server: TritonServer, protocol: str,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    with TextClient(url_of(server, protocol), protocol=protocol) as direct:
        expected = direct.generate(PROMPT, max_tokens=5)
    forwarder = LateForwarder(url_of(server, protocol))
    timer = threading.Timer(1.0, forwarder.open)  # refused for the first second: retries at 0.1, 0.3, 0.7, 1.5 s
    timer.start()
    try:
        with caplog.at_level(logging.WARNING, logger="client"), \
                TextClient(forwarder.url, protocol=protocol, retries=6, backoff_s=0.1) as client:
            started = time.monotonic()
            result = client.generate(PROMPT, max_tokens=5)
            elapsed = time.monotonic() - started
    finally:
        timer.cancel()
        forwarder.close()
    assert result.text == expected.text and result.num_output_tokens == 5
    retries = [record.getMessage() for record in caplog.records if "retrying" in record.getMessage()]
    assert retries and all("connection refused" in message.lower() for message in retries), retries
    assert 1.0 <= elapsed < 10, elapsed


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_client_timeout_is_honoured_and_the_server_carries_on(server: TritonServer, protocol: str) -> None:
    forwarder = LateForwarder(url_of(server, protocol))
    forwarder.open()
    try:
        with TextClient(forwarder.url, protocol=protocol, timeout_s=0.3, retries=3) as client:
            _ = client.model_info  # read the config first: the timeout under test is the generation's
            forwarder.reply_delay_s = 3.0  # the answer arrives 3 s late, whatever the model's speed
            started = time.monotonic()
            with pytest.raises(RequestTimeoutError, match="within 0.3 s"):
                client.generate(PROMPT, max_tokens=LONG_TOKENS)
            assert time.monotonic() - started < 1.2  # not retried: a timeout is not a connection failure
    finally:
        forwarder.close()
    with TextClient(url_of(server, protocol), protocol=protocol) as client:
        assert client.generate(PROMPT, max_tokens=3).num_output_tokens == 3


# -- (a) the core model's stub dies ----------------------------------------------------------------------------------
def test_core_stub_killed_mid_request(repository: Path, start_server: Callable[..., TritonServer],
                                      capsys: pytest.CaptureFixture[str]) -> None:
    server = start_server(repository)
    assert server.process is not None
    stub = core_stub(server.process.pid)
    assert server.dead_stubs() == []
    with TextClient(server.http_url) as client:
        assert client.generate(PROMPT, max_tokens=3).num_output_tokens == 3
        started = generating(stub)
        thread, outcome = generate_in_background(server.http_url)
        wait_until(started, 10, "the core model to start generating")
        stub.send_signal(signal.SIGKILL)
        thread.join(timeout=30)
    # The request in flight fails with a clear error naming the instance.
    error = outcome.get("error")
    assert isinstance(error, RequestError), outcome
    assert f"Stub process '{CORE_MODEL}_0_0' is not healthy" in str(error)

    # Triton 2.51 does not restart the stub and still reports ready (upstream behaviour, pinned here): later requests
    # to the core fail the same way, while the other models keep working.
    assert http_status(f"http://{server.http_url}/v2/health/ready") == 200
    assert http_status(f"http://{server.http_url}/v2/models/{CORE_MODEL}/ready") == 200
    for protocol in ("http", "grpc"):
        with TextClient(url_of(server, protocol), protocol=protocol) as client, \
                pytest.raises(RequestError, match=f"Stub process '{CORE_MODEL}_0_0' is not healthy"):
            client.generate(PROMPT, max_tokens=3)
    preprocessing = httpclient.InferenceServerClient(server.http_url)
    inputs = [httpclient.InferInput("text_input", [1, 1], "BYTES"),
              httpclient.InferInput("max_tokens", [1, 1], "INT32")]
    inputs[0].set_data_from_numpy(np.array([[PROMPT.encode()]], dtype=np.object_))
    inputs[1].set_data_from_numpy(np.array([[3]], dtype=np.int32))
    assert preprocessing.infer("preprocessing", inputs).as_numpy("input_lengths").tolist() == [[6]]
    preprocessing.close()  # an idle keep-alive connection would hold up the shutdown below (see test (c))
    assert server.dead_stubs() == [f"{CORE_MODEL}_0_0"]

    # Our serve loop notices within a second, stops the server and exits non-zero for its supervisor.
    pid = server.process.pid
    started = time.monotonic()
    code = serve_until_signal(server)
    assert code == STUB_DIED_EXIT_CODE
    assert time.monotonic() - started < 20
    assert server.process is None and not psutil.pid_exists(pid)  # stopped and reaped
    assert f"{CORE_MODEL}_0_0 died" in capsys.readouterr().err


# -- (c) graceful shutdown ---------------------------------------------------------------------------------------------
def wait_ready(http_url: str, timeout_s: float = 120) -> None:
    wait_until(lambda: http_status(f"http://{http_url}/v2/health/ready") == 200, timeout_s,
               f"the server at {http_url} to be ready")


# Triton's HTTP frontend also waits, within the same exit timeout, for idle keep-alive connections to close: a client
# left open makes shutdown take the whole timeout (then tritonserver exits 1, "Exit timeout expired"). The warm-up
# clients below are therefore closed before the signal; the in-flight request's client closes once answered.
def test_stop_lets_the_request_in_flight_finish(repository: Path, start_server: Callable[..., TritonServer]) -> None:
    server = start_server(repository, exit_timeout_s=EXIT_TIMEOUT_S)
    with TextClient(server.http_url) as client:
        client.generate(PROMPT, max_tokens=3)  # warm
    assert server.process is not None
    in_core = generating(core_stub(server.process.pid))
    thread, outcome = generate_in_background(server.http_url)
    wait_until(in_core, 10, "the core model to start generating")
    started = time.monotonic()
    code = server.stop()  # SIGTERM, then waits up to the exit timeout
    stopped_after = time.monotonic() - started
    thread.join(timeout=30)
    assert "error" not in outcome, outcome.get("error")
    assert all_long(outcome["result"])
    assert code == 0  # tritonserver's own verdict: everything finished within the exit timeout
    assert stopped_after < EXIT_TIMEOUT_S


def test_serve_cli_sigterm_lets_the_request_in_flight_finish(repository: Path) -> None:
    command, http_port = serve_command(repository, "--exit-timeout", str(EXIT_TIMEOUT_S))
    url = f"127.0.0.1:{http_port}"
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_ready(url)
        with TextClient(url) as client:
            client.generate(PROMPT, max_tokens=3)  # warm
        in_core = generating(core_stub(process.pid))
        thread, outcome = generate_in_background(url)
        wait_until(in_core, 10, "the core model to start generating")
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        # New connections are refused once shutdown begins, while the request in flight goes on.
        wait_until(lambda: http_status(f"http://{url}/v2/health/live") != 200, 5,
                   "the HTTP frontend to refuse new connections")
        thread.join(timeout=30)
        _, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert "error" not in outcome, outcome.get("error")
    assert all_long(outcome["result"])
    assert process.returncode == 0, stderr
    assert "letting in-flight requests finish" in stderr
    assert time.monotonic() - started < EXIT_TIMEOUT_S


# -- (d) what a new user trips on ------------------------------------------------------------------------------------
def test_demo_no_wait_refuses_a_port_held_by_another_server(server: TritonServer, tmp_path: Path) -> None:
    # Another demo already serves on the HTTP port: its answer must not pass for ours.
    grpc_port, metrics_port = free_ports(2)
    result = subprocess.run(
        [sys.executable, "-m", "builder", "demo", "--no-wait", "--output", str(tmp_path / "demo"),
         "--http-port", str(server.config.http_port), "--grpc-port", str(grpc_port),
         "--metrics-port", str(metrics_port)],
        capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert f"port {server.config.http_port} is in use" in result.stderr, result.stderr
    assert PROMPT not in result.stdout  # no answer printed
    with TextClient(server.http_url) as client:  # the other server is left alone
        assert client.generate(PROMPT, max_tokens=2).num_output_tokens == 2


def test_serve_names_the_fix_for_a_gpu_repository_without_a_gpu(repository: Path, tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: a KIND_GPU repository loads")
    weights = repository / CORE_MODEL / "1" / "1-gpu"
    gpu_repository = render_repository(RenderConfig(
        engine="torch", device="gpu", data_type="fp32", checkpoint=weights,
        model=GptModelConfig.from_ini(weights / "config.ini"), max_batch_size=8, output=tmp_path / "gpu_repository",
        force=True))
    command, _ = serve_command(gpu_repository, "--startup-timeout", "120")
    started = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert result.returncode != 0
    assert time.monotonic() - started < 60
    assert CORE_MODEL in result.stderr and "no GPUs are available" in result.stderr
    assert "--device cpu" in result.stderr, result.stderr
