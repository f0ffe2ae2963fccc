"""The tritonserver launcher: a real server, a Python-backend model, BYTES over HTTP and gRPC, failure reporting."""

from __future__ import annotations

import http.server
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from click.testing import CliRunner

from builder.cli import main as builder_main
import builder.serve as serve_module
from builder.serve import PYTHON_STUB, ServerError, TritonServer, bundled_backend_directory, free_ports
from servers import ECHO_MODEL, serve_command, server_on_free_ports, write_model

pytestmark = pytest.mark.server

BROKEN_MODEL = """
raise ImportError("this model is broken on purpose")
"""


def test_bytes_round_trip_over_http_and_grpc(echo_repo: Path, start_server) -> None:
    server = start_server(echo_repo)
    texts = ["héllo wörld", "数字 1 2 3", "emoji 🚀 ok"]
    data = np.array([[t.encode()] for t in texts], dtype=object)

    http = httpclient.InferenceServerClient(server.http_url)
    http_input = httpclient.InferInput("INPUT", list(data.shape), "BYTES")
    http_input.set_data_from_numpy(data)
    http_out = http.infer("echo", [http_input]).as_numpy("OUTPUT")

    grpc = grpcclient.InferenceServerClient(server.grpc_url)
    grpc_input = grpcclient.InferInput("INPUT", list(data.shape), "BYTES")
    grpc_input.set_data_from_numpy(data)
    grpc_out = grpc.infer("echo", [grpc_input]).as_numpy("OUTPUT")

    expected = [t[::-1] for t in texts]
    assert [row[0].decode() for row in http_out] == expected
    assert [row[0].decode() for row in grpc_out] == expected
    assert http.is_server_ready() and grpc.is_model_ready("echo")


def test_server_binds_loopback_by_default_and_closes_the_admin_apis(echo_repo: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_ADMIN_TOKEN", raising=False)
    server = server_on_free_ports(echo_repo)
    try:
        command = server.command()
    finally:
        server.stop()
    joined = " ".join(command)
    assert "--http-address=127.0.0.1" in joined and "--grpc-address=127.0.0.1" in joined
    # Restricted on loopback too; without a token the expected value holds a line break no client can send.
    restricted = [arg for arg in command if arg.startswith(("--http-restricted-api=", "--grpc-restricted-protocol="))]
    assert len(restricted) == 2
    assert all("model-repository,shared-memory,trace,logging:triton-admin=" in arg and "\n" in arg
               for arg in restricted)
    assert server.admin_headers() == {}


def test_non_loopback_bind_restricts_admin_apis(echo_repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_ADMIN_TOKEN", "s3cret-token-0123456789")
    server = server_on_free_ports(echo_repo, address="0.0.0.0")
    try:
        command = server.command()
    finally:
        server.stop()
    admin = "model-repository,shared-memory,trace,logging:triton-admin=s3cret-token-0123456789"
    assert f"--http-restricted-api={admin}" in command
    assert f"--grpc-restricted-protocol={admin}" in command


def test_admin_token_is_checked(echo_repo: Path) -> None:
    with pytest.raises(ServerError, match="TRITON_ADMIN_TOKEN"):
        TritonServer.on_free_ports(echo_repo, admin_token="short")
    with pytest.raises(ServerError, match="TRITON_ADMIN_TOKEN"):
        TritonServer.on_free_ports(echo_repo, admin_token="a token with spaces")


def test_failing_model_is_named_and_start_fails_fast(tmp_path: Path) -> None:
    write_model(tmp_path, "echo", ECHO_MODEL)
    write_model(tmp_path, "broken_model", BROKEN_MODEL)
    server = server_on_free_ports(tmp_path, startup_timeout_s=120)
    started = time.monotonic()
    with pytest.raises(ServerError) as caught:
        server.start()
    assert time.monotonic() - started < 60
    message = str(caught.value)
    assert "broken_model" in message
    assert "broken on purpose" in message
    assert server.process is None  # stopped, nothing left behind


def test_serve_cli_exits_nonzero_naming_the_failing_model(tmp_path: Path) -> None:
    write_model(tmp_path, "broken_model", BROKEN_MODEL)
    command, _ = serve_command(tmp_path, "--startup-timeout", "60")
    started = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert time.monotonic() - started < 60
    assert "broken_model" in result.stderr


def test_serve_cli_runs_until_sigterm_then_stops_cleanly(echo_repo: Path) -> None:
    command, http_port = serve_command(echo_repo)
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        client = httpclient.InferenceServerClient(f"127.0.0.1:{http_port}")
        while time.monotonic() < deadline:
            try:
                if client.is_server_ready():
                    break
            except Exception:  # noqa: BLE001  (not listening yet)
                pass
            time.sleep(0.3)
        else:
            pytest.fail("serve did not become ready")
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, stderr
    assert "stopping tritonserver" in stderr
    with pytest.raises(Exception):  # noqa: B017  (the transport's own error, whichever: nothing listens any more)
        client.is_server_live()


@pytest.mark.parametrize("args", [["--help"], ["serve", "--help"], ["render", "--help"], ["validate", "--help"],
                                  ["convert", "--help"], ["checkpoint", "--help"], ["demo-checkpoint", "--help"]])
def test_builder_help_explains_itself(args: list[str]) -> None:
    result = CliRunner().invoke(builder_main, args)
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output
    assert len(result.output.splitlines()) > 5


def test_restricted_admin_apis_refuse_callers_without_the_token(echo_repo: Path, start_server) -> None:
    token = "s3cret-token-0123456789"
    server = start_server(echo_repo, admin_token=token)
    client = httpclient.InferenceServerClient(server.http_url)
    with pytest.raises(Exception, match="(?i)restricted|header|permission|403"):
        client.get_model_repository_index()
    with pytest.raises(Exception, match="(?i)restricted|header|permission|403"):
        client.get_model_repository_index(headers={"triton-admin": "wrong-token-0123456789"})
    assert client.get_model_repository_index(headers=server.admin_headers("http"))
    assert client.is_model_ready("echo")  # inference-side APIs stay open
    grpc = grpcclient.InferenceServerClient(server.grpc_url)
    with pytest.raises(Exception, match="(?i)restricted"):
        grpc.get_model_repository_index()
    assert server.admin_headers("grpc") == {"triton-grpc-protocol-triton-admin": token}
    assert grpc.get_model_repository_index(headers=server.admin_headers("grpc")).models


def test_perf_analyzer_measures_the_served_model(echo_repo: Path, start_server, tmp_path: Path) -> None:
    from client.perf import find_perf_analyzer, perf_analyzer_env

    server = start_server(echo_repo)
    data = tmp_path / "input.json"
    data.write_text('{"data": [{"INPUT": ["hello"]}, {"INPUT": ["wörld"]}]}')
    csv = tmp_path / "perf.csv"
    result = subprocess.run(
        [str(find_perf_analyzer()), "-m", "echo", "-u", server.http_url, "-i", "http", "--input-data", str(data),
         "--concurrency-range", "1:2", "--measurement-interval", "500", "--stability-percentage", "100",
         "--max-trials", "3", "-f", str(csv)],
        capture_output=True, text=True, timeout=120, env=perf_analyzer_env())
    assert result.returncode == 0, result.stdout + result.stderr
    rows = csv.read_text().splitlines()
    header = rows[0].split(",")
    throughputs = [float(row.split(",")[header.index("Inferences/Second")]) for row in rows[1:]]
    assert len(throughputs) == 2 and all(t > 0 for t in throughputs)


# -- a stub that cannot even start -------------------------------------------------------------------------------------
@pytest.mark.parametrize("broken", ["garbage", "not-executable"])
def test_stub_that_cannot_exec_fails_fast_naming_the_model(echo_repo: Path, tmp_path: Path, broken: str) -> None:
    backends = bundled_backend_directory(tmp_path)
    stub = backends / "python" / PYTHON_STUB
    stub.unlink()
    stub.write_bytes(b"\x7fELF but not really")
    stub.chmod(0o755 if broken == "garbage" else 0o644)
    server = server_on_free_ports(echo_repo, backend_directory=backends, startup_timeout_s=120)
    started = time.monotonic()
    with pytest.raises(ServerError) as caught:
        server.start()
    elapsed = time.monotonic() - started
    message = str(caught.value)
    assert elapsed < 20, elapsed  # not the startup timeout
    assert "echo" in message and PYTHON_STUB in message, message
    assert server.process is None


# -- ports held by someone else ----------------------------------------------------------------------------------------
class AlwaysReady(http.server.BaseHTTPRequestHandler):
    """Another HTTP server: answers 200 to everything, readiness probes included."""

    def do_GET(self) -> None:  # http.server's naming
        body = b"{}"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_GET

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def squatter() -> Iterator[callable]:
    """`squatter(port)` starts another HTTP server on loopback `port`; all are stopped at teardown."""
    servers: list[http.server.ThreadingHTTPServer] = []

    def start(port: int) -> http.server.ThreadingHTTPServer:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", port), AlwaysReady)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("which", ["http", "grpc", "metrics"])
def test_serve_cli_refuses_a_port_in_use(echo_repo: Path, squatter, which: str) -> None:
    ports = dict(zip(("http", "grpc", "metrics"), free_ports(3)))
    squatter(ports[which])
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "builder", "serve", str(echo_repo), "--http-port", str(ports["http"]),
         "--grpc-port", str(ports["grpc"]), "--metrics-port", str(ports["metrics"]), "--startup-timeout", "60"],
        capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert f"port {ports[which]} is in use" in result.stderr, result.stderr
    assert "ready:" not in result.stderr
    assert time.monotonic() - started < 30


def test_port_taken_after_the_check_is_still_caught(echo_repo: Path, squatter,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # Someone binds the HTTP port between our check and tritonserver's bind: the readiness probe is then answered by
    # them, so start() must also see that tritonserver itself listens on every port.
    monkeypatch.setattr(serve_module, "ports_in_use", lambda address, ports: [])
    server = server_on_free_ports(echo_repo, startup_timeout_s=60)
    squatter(server.config.http_port)
    with pytest.raises(ServerError, match=f"HTTP port {server.config.http_port} is in use"):
        server.start()
    assert server.process is None


def test_stop_leaves_no_backend_folder_or_stub_region_behind(echo_repo: Path) -> None:
    server = TritonServer.on_free_ports(echo_repo, exit_timeout_s=1).start()
    assert server.process is not None
    regions = [Path("/dev/shm") / child.cmdline()[2] for child in psutil.Process(server.process.pid).children()
               if child.cmdline()[0].endswith(PYTHON_STUB)]
    backends = Path(next(arg for arg in server.command() if arg.startswith("--backend-directory=")).split("=", 1)[1])
    assert regions and all(region.exists() for region in regions)
    # An idle keep-alive connection makes tritonserver wait out its exit timeout, so stop() ends up killing it.
    client = httpclient.InferenceServerClient(server.http_url)
    assert client.is_server_ready()
    server.stop()
    assert [region for region in regions if region.exists()] == []
    assert not backends.exists()
