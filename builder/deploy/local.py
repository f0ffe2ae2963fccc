"""Several `python -m builder serve` replicas on this host behind HAProxy, each started again when it exits.

The same pattern as the Kubernetes manifests, on one machine: a balancer that health-checks /v2/health/ready and
re-sends a request whose replica died, and a supervisor that restarts a replica whose process exited (serve exits 3
when a Python stub dies, which Triton itself does not report). Everything binds to 127.0.0.1; HAProxy's
configuration and its stats socket live in a private temporary folder.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import jinja2
import psutil

from ..serve import LOCALHOST, free_ports, server_ready
from . import DEPLOY_TEMPLATES_DIR

RESTART_BACKOFF_S = (0.5, 1.0, 2.0, 5.0)  # a replica that keeps failing is retried ever more slowly


class LocalReplicasError(RuntimeError):
    """HAProxy is missing, or a replica or HAProxy did not start."""


def _children(pid: int) -> list[int]:
    try:
        return [child.pid for child in psutil.Process(pid).children()]
    except psutil.Error:
        return []


@dataclass
class Replica:
    name: str
    http_port: int
    grpc_port: int
    metrics_port: int
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    server_pid: int | None = None  # tritonserver, in a session of its own (its stubs share its process group)
    starts: int = 0
    exits: list[int] = field(default_factory=list)

    def find_server(self) -> int | None:
        if self.process is not None and self.process.poll() is None:
            children = _children(self.process.pid)
            if children:
                self.server_pid = children[0]
        return self.server_pid


def haproxy_binary() -> str:
    binary = shutil.which("haproxy") or next((p for p in ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy")
                                              if os.access(p, os.X_OK)), None)
    if binary is None:
        raise LocalReplicasError("haproxy not found: install it (Debian: apt-get install haproxy)")
    return binary


def render_haproxy_config(replicas: list[Replica], port: int, stats_socket: Path, timeout_s: int = 120,
                          check_interval_ms: int = 500, maxconn: int = 256) -> str:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(DEPLOY_TEMPLATES_DIR), undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True, autoescape=False)
    servers = [{"name": r.name, "http_port": r.http_port} for r in replicas]
    return env.get_template("haproxy.cfg.j2").render(servers=servers, port=port, stats_socket=stats_socket,
                                                     timeout_s=timeout_s, check_interval_ms=check_interval_ms,
                                                     maxconn=maxconn)


class LocalReplicas:
    """N serve replicas + HAProxy on loopback. `start()` returns once every replica is ready and HAProxy listens."""

    def __init__(self, repository: Path | str, replicas: int = 2, port: int | None = None,
                 startup_timeout_s: float = 300.0, exit_timeout_s: int = 10, check_interval_ms: int = 500):
        if not 1 <= replicas <= 16:
            raise LocalReplicasError(f"replicas must be in 1..16, got {replicas}")
        self.repository = Path(repository).resolve()
        self.startup_timeout_s = startup_timeout_s
        self.exit_timeout_s = exit_timeout_s
        self.check_interval_ms = check_interval_ms
        ports = free_ports(3 * replicas + (0 if port else 1))
        self.port = port or ports.pop()
        self.folder = Path(tempfile.mkdtemp(prefix="gpt-triton-replicas-"))  # 0700: the stats socket is private
        self.replicas = [Replica(f"r{i}", ports[3 * i], ports[3 * i + 1], ports[3 * i + 2],
                                 log_path=self.folder / f"r{i}.log") for i in range(replicas)]
        self.stats_socket = self.folder / "haproxy.sock"
        self.haproxy: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"{LOCALHOST}:{self.port}"

    @property
    def stats_url(self) -> str:
        return f"unix socket {self.stats_socket} (`show stat`)"

    # -- replicas ---------------------------------------------------------------------------------------------
    def _launch(self, replica: Replica) -> None:
        args = [sys.executable, "-m", "builder", "serve", str(self.repository), "--http-port", str(replica.http_port),
                "--grpc-port", str(replica.grpc_port), "--metrics-port", str(replica.metrics_port),
                "--startup-timeout", str(self.startup_timeout_s), "--exit-timeout", str(self.exit_timeout_s)]
        with open(replica.log_path, "ab") as log:
            replica.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                               start_new_session=True)
        replica.server_pid = None
        replica.starts += 1

    def _wait_ready(self, replica: Replica) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            assert replica.process is not None
            if replica.process.poll() is not None:
                raise LocalReplicasError(f"replica {replica.name} exited with {replica.process.returncode} while "
                                         f"starting; log: {replica.log_path}\n{tail(replica.log_path)}")
            if server_ready(f"{LOCALHOST}:{replica.http_port}"):
                replica.find_server()
                return
            time.sleep(0.2)
        raise LocalReplicasError(f"replica {replica.name} not ready after {self.startup_timeout_s:.0f} s; "
                                 f"log: {replica.log_path}")

    def kill(self, index: int, sig: int = signal.SIGKILL) -> None:
        """Kill replica `index` as a crash would: serve, tritonserver and its stubs at once."""
        replica = self.replicas[index]
        with self._lock:
            server = replica.find_server()
            if replica.process is not None and replica.process.poll() is None:
                os.kill(replica.process.pid, sig)
            if server is not None:
                try:
                    os.killpg(server, sig)
                except ProcessLookupError:
                    pass

    def restart_exited(self) -> list[str]:
        """Start again every replica whose process exited; the names restarted. HAProxy's checks bring them in."""
        restarted = []
        with self._lock:
            for replica in self.replicas:
                if replica.process is None or replica.process.poll() is None:
                    continue
                replica.exits.append(replica.process.returncode)
                self._reap_server(replica)
                time.sleep(RESTART_BACKOFF_S[min(len(replica.exits), len(RESTART_BACKOFF_S)) - 1])
                self._launch(replica)
                restarted.append(replica.name)
        return restarted

    def supervise(self, stop: threading.Event | None = None, interval_s: float = 0.5) -> None:
        """Restart exited replicas until `stop` is set (forever without one)."""
        stop = stop or threading.Event()
        while not stop.wait(interval_s):
            self.restart_exited()
            if self.haproxy is not None and self.haproxy.poll() is not None:
                raise LocalReplicasError(f"haproxy exited with {self.haproxy.returncode}; log: {self.folder}")
            for replica in self.replicas:
                if replica.server_pid is None:
                    replica.find_server()

    def _reap_server(self, replica: Replica) -> None:
        """serve died without stopping its tritonserver (SIGKILL): never leave that server or its stubs behind."""
        pid, replica.server_pid = replica.server_pid, None
        try:  # only while that pid is still our tritonserver: a recycled pid is someone else's process
            if pid is not None and "tritonserver" in " ".join(psutil.Process(pid).cmdline()):
                os.killpg(pid, signal.SIGKILL)
        except (psutil.Error, OSError):
            pass

    # -- HAProxy ----------------------------------------------------------------------------------------------
    def _start_haproxy(self) -> None:
        config = self.folder / "haproxy.cfg"
        config.write_text(render_haproxy_config(self.replicas, self.port, self.stats_socket,
                                                check_interval_ms=self.check_interval_ms))
        binary = haproxy_binary()
        check = subprocess.run([binary, "-c", "-q", "-f", str(config)], capture_output=True, text=True, check=False)
        if check.returncode != 0:
            raise LocalReplicasError(f"haproxy refused {config}: {check.stdout}{check.stderr}")
        with open(self.folder / "haproxy.log", "ab") as log:
            # -db: stay in the foreground, so this object owns the process.
            self.haproxy = subprocess.Popen([binary, "-db", "-f", str(config)], stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.haproxy.poll() is not None:
                raise LocalReplicasError(f"haproxy exited with {self.haproxy.returncode}:\n"
                                         f"{tail(self.folder / 'haproxy.log')}")
            try:
                if all(row["status"] == "UP" for row in self.server_stats().values()):
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise LocalReplicasError(f"haproxy did not report every replica UP within 10 s: {self.folder}")

    def _stats_csv(self) -> list[dict[str, str]]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            sock.connect(str(self.stats_socket))
            sock.sendall(b"show stat\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        text = b"".join(chunks).decode().lstrip("# ")
        return list(csv.DictReader(io.StringIO(text)))

    def server_stats(self) -> dict[str, dict[str, str]]:
        """HAProxy's counters for each replica: status (UP/DOWN), stot (requests sent), hrsp_2xx, chkdown, ..."""
        return {row["svname"]: row for row in self._stats_csv()
                if row["pxname"] == "replicas" and row["svname"] not in ("FRONTEND", "BACKEND")}

    def backend_stats(self) -> dict[str, str]:
        """The backend's totals, with wretr (retries) and wredis (redispatches)."""
        return next(row for row in self._stats_csv() if row["pxname"] == "replicas" and row["svname"] == "BACKEND")

    # -- lifecycle --------------------------------------------------------------------------------------------
    def start(self) -> LocalReplicas:
        try:
            haproxy_binary()
            for replica in self.replicas:
                self._launch(replica)
            for replica in self.replicas:
                self._wait_ready(replica)
            self._start_haproxy()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """HAProxy first (soft stop: it stops listening and finishes the requests it holds), then the replicas
        (SIGTERM: serve lets tritonserver finish in-flight requests). In this order no idle keep-alive connection
        from HAProxy holds a tritonserver for its whole exit timeout."""
        with self._lock:
            if self.haproxy is not None:
                if self.haproxy.poll() is None:
                    self.haproxy.send_signal(signal.SIGUSR1)
                try:
                    self.haproxy.wait(timeout=self.exit_timeout_s + 5)
                except subprocess.TimeoutExpired:
                    self.haproxy.kill()
                    self.haproxy.wait()
                self.haproxy = None
            for replica in self.replicas:
                if replica.process is not None and replica.process.poll() is None:
                    replica.find_server()
                    replica.process.send_signal(signal.SIGTERM)
            for replica in self.replicas:
                if replica.process is None:
                    continue
                try:
                    replica.process.wait(timeout=self.exit_timeout_s + 10)
                except subprocess.TimeoutExpired:
                    replica.process.kill()
                    replica.process.wait()
                self._reap_server(replica)

    def cleanup(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> LocalReplicas:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
        if exc_type is None or issubclass(exc_type, KeyboardInterrupt):  # keep the logs after a failure
            self.cleanup()


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
