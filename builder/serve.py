"""Launch a real `tritonserver` on a model repository.

By default the server is the one shipped in the `nvidia-pytriton` wheel (tritonserver 2.51 + Python backend). That
wheel keeps the Python-backend stubs apart from the backend, so we assemble a backend directory holding the stub that
matches the running Python. The stub embeds the first `python3` it finds on PATH (it ignores PYTHONPATH), so the
running environment's `bin/` goes first on PATH: the models then import this environment's numpy, torch, tokenizers.
An NGC container's server is used with `--tritonserver /opt/tritonserver/bin/tritonserver --backend-directory
/opt/tritonserver/backends`.

Other local users are untrusted: the backend directory is a fresh private folder per server (a predictable shared
path could be pre-created by someone else, whose stub tritonserver would then run as us), the admin APIs are closed
on every bind address, and the ports are checked to be ours before the server is announced ready.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import psutil

LOCALHOST = "127.0.0.1"
PYTHON_STUB = "triton_python_backend_stub"
# Log lines after which a model can never become ready (tritonserver would leave it "loading" until our timeout).
FATAL_LOG_PATTERN = re.compile(r"error while loading shared libraries.*|failed to load '[^']+'.*|"
                               rf"\S*{PYTHON_STUB}: (?:cannot execute|Permission denied|No such file).*")
NO_GPU_MESSAGE = "KIND_GPU but no GPUs are available"
# Restricted on every bind address, loopback included: with them a local user could map any file the server can read
# as a shared-memory input (and read it back through error messages), load models or redirect logs and traces.
# Inference, health, metadata, model config and statistics stay open (our client reads the model config).
ADMIN_APIS = "model-repository,shared-memory,trace,logging"
ADMIN_HEADER = "triton-admin"
# tritonserver prefixes the key of --grpc-restricted-protocol with this to make the gRPC metadata key.
GRPC_ADMIN_PREFIX = "triton-grpc-protocol-"
ADMIN_TOKEN_PATTERN = re.compile(r"[A-Za-z0-9._~+/-]{16,256}")
SHM_DIR = Path("/dev/shm")


class ServerError(RuntimeError):
    """tritonserver could not be found, did not start, or a model failed to load."""


def free_ports(count: int) -> list[int]:
    """`count` distinct ports free on loopback right now (the sockets stay open until all are picked)."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind((LOCALHOST, 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def free_port() -> int:
    return free_ports(1)[0]


def _pytriton_root() -> Path:
    try:
        import pytriton  # optional dependency: only needed for the bundled server
    except ImportError as err:
        raise ServerError("nvidia-pytriton is not installed: install it, or pass --tritonserver and "
                          "--backend-directory (env TRITONSERVER_BIN / TRITON_BACKEND_DIR)") from err
    return Path(pytriton.__file__).parent / "tritonserver"


def bundled_tritonserver() -> Path:
    binary = _pytriton_root() / "bin" / "tritonserver"
    if not binary.is_file():
        raise ServerError(f"{binary} is missing from the nvidia-pytriton package")
    return binary


def bundled_backend_directory(parent: Path | None = None) -> Path:
    """A new private folder (0700, ours) holding pytriton's Python backend plus the stub for this Python version.

    One per server, removed by `TritonServer.stop()`: a shared or predictable folder could be pre-created, or its
    links swapped, by another local user, and two checkouts would re-link each other's stub there.
    """
    root = _pytriton_root()
    py_version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / py_version / PYTHON_STUB
    if not stub.is_file():
        raise ServerError(f"nvidia-pytriton has no Python-backend stub for Python {py_version} ({stub})")
    backends = Path(tempfile.mkdtemp(prefix=f"gpt-triton-backends-py{py_version}-", dir=parent))  # 0700, O_EXCL
    try:
        python_dir = backends / "python"
        python_dir.mkdir(mode=0o700)
        # Links, not copies: the stub finds its bundled libcudart through an $ORIGIN-relative RPATH, which the
        # loader resolves from the link's target.
        for source in (*(root / "backends" / "python").glob("*.so"), root / "backends" / "python" /
                       "triton_python_backend_utils.py", stub):
            (python_dir / source.name).symlink_to(source.resolve())
    except OSError as err:
        shutil.rmtree(backends, ignore_errors=True)
        raise ServerError(f"cannot prepare the backend folder {backends}: {err}") from err
    return backends


def server_ready(http_url: str, timeout_s: float = 2.0) -> bool:
    """Whether the tritonserver at `http_url` ("host:port") answers /v2/health/ready with 200.

    The standard library on purpose, not tritonclient: this launcher also runs in the server image `deploy k8s`
    renders (NGC tritonserver plus LAUNCHER_REQUIREMENTS, no tritonclient) and on the GPU host, whose kit carries only
    tritonclient's gRPC client (tritonclient.http needs geventhttpclient).
    """
    try:
        with urllib.request.urlopen(f"http://{http_url}/v2/health/ready", timeout=timeout_s) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError, ValueError):
        return False


def ports_in_use(address: str, ports: list[int]) -> list[int]:
    """Those of `ports` that something already listens on at `address` (a bind test, as tritonserver will bind)."""
    busy = []
    for port in ports:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT leftovers are no conflict
            try:
                sock.bind((address, port))
            except OSError as err:
                if err.errno != errno.EADDRINUSE:
                    raise ServerError(f"cannot bind {address}:{port}: {err}") from err
                busy.append(port)
    return busy


def port_owners(port: int) -> str:
    """Who listens on `port`, as far as we may see (other users' processes need root): 'pid 12 (name)'."""
    owners = set()
    try:
        for conn in psutil.net_connections(kind="inet"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
                try:
                    owners.add(f"pid {conn.pid} ({psutil.Process(conn.pid).name()})")
                except psutil.Error:
                    owners.add(f"pid {conn.pid}")
    except psutil.Error:
        pass
    return ", ".join(sorted(owners)) or "another process"


@dataclass
class ServerConfig:
    model_repository: Path
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    address: str = LOCALHOST
    tritonserver: Path | None = None  # default: env TRITONSERVER_BIN, else the nvidia-pytriton server
    backend_directory: Path | None = None  # default: env TRITON_BACKEND_DIR, else prepared from nvidia-pytriton
    model_control_mode: str = "none"
    startup_timeout_s: float = 300.0
    exit_timeout_s: int = 10
    log_verbose: int = 0
    log_file: Path | None = None  # default: a temporary file, printed on failure
    # Opens the admin APIs (ADMIN_APIS) to callers sending it; default: env TRITON_ADMIN_TOKEN, else they stay closed.
    admin_token: str | None = None
    extra_args: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.model_repository = Path(self.model_repository).resolve()
        if not self.model_repository.is_dir():
            raise ServerError(f"model repository {self.model_repository} is not a directory")
        for name in ("http_port", "grpc_port", "metrics_port"):
            port = getattr(self, name)
            if not 0 < port < 65536:
                raise ServerError(f"{name} must be in 1..65535, got {port}")
        if self.model_control_mode not in ("none", "explicit", "poll"):
            raise ServerError(f"model control mode must be none, explicit or poll, got {self.model_control_mode!r}")
        if len({self.http_port, self.grpc_port, self.metrics_port}) != 3:
            raise ServerError(f"the HTTP, gRPC and metrics ports must differ, got {self.http_port}, "
                              f"{self.grpc_port}, {self.metrics_port}")
        if self.admin_token is None:
            self.admin_token = os.environ.get("TRITON_ADMIN_TOKEN") or None
        if self.admin_token is not None and not ADMIN_TOKEN_PATTERN.fullmatch(self.admin_token):
            raise ServerError("the admin token (TRITON_ADMIN_TOKEN) must be 16..256 characters of A-Z a-z 0-9 . _ ~ "
                              "+ / - (it travels in an HTTP header and gRPC metadata)")

    @property
    def is_loopback(self) -> bool:
        return self.address in (LOCALHOST, "localhost", "::1") or self.address.startswith("127.")


class TritonServer:
    """A tritonserver child process. Use as a context manager; `start()` returns once every model is ready."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.process: subprocess.Popen[bytes] | None = None
        self._own_log = config.log_file is None
        self._own_backends: Path | None = None  # the private backend folder we made (removed at stop)
        self._stubs: dict[int, str] = {}  # Python-backend stubs at start-up: pid -> model instance name
        self._shm_regions: set[str] = set()  # their shared-memory regions (names in /dev/shm)
        self.log_path = config.log_file or Path(tempfile.mkstemp(prefix="tritonserver-", suffix=".log")[1])

    @classmethod
    def on_free_ports(cls, model_repository: Path | str, **kwargs: Any) -> TritonServer:
        http_port, grpc_port, metrics_port = free_ports(3)
        return cls(ServerConfig(Path(model_repository), http_port=http_port, grpc_port=grpc_port,
                                metrics_port=metrics_port, **kwargs))

    @property
    def http_url(self) -> str:
        return f"{self._host()}:{self.config.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self._host()}:{self.config.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self._host()}:{self.config.metrics_port}/metrics"

    def _host(self) -> str:
        return LOCALHOST if self.config.address in ("0.0.0.0", "::") else self.config.address

    def admin_headers(self, protocol: str = "http") -> dict[str, str]:
        """The header that opens the admin APIs (empty when no token is configured: they are closed)."""
        if self.config.admin_token is None:
            return {}
        key = ADMIN_HEADER if protocol == "http" else GRPC_ADMIN_PREFIX + ADMIN_HEADER
        return {key: self.config.admin_token}

    @property
    def backend_directory(self) -> Path:
        cfg = self.config
        chosen = cfg.backend_directory or os.environ.get("TRITON_BACKEND_DIR")
        if chosen:
            return Path(chosen)
        if self._own_backends is None:
            self._own_backends = bundled_backend_directory()
        return self._own_backends

    def command(self) -> list[str]:
        cfg = self.config
        binary = cfg.tritonserver or os.environ.get("TRITONSERVER_BIN") or bundled_tritonserver()
        # Without a token the value holds a line break, which neither an HTTP header nor gRPC metadata can carry:
        # the admin APIs are then closed to everyone. (A token is visible on our command line to local users.)
        token = cfg.admin_token or f"closed\n{os.urandom(16).hex()}"
        return [str(binary), f"--model-repository={cfg.model_repository}",
                f"--backend-directory={self.backend_directory}",
                f"--model-control-mode={cfg.model_control_mode}", f"--http-address={cfg.address}",
                f"--http-port={cfg.http_port}", f"--grpc-address={cfg.address}", f"--grpc-port={cfg.grpc_port}",
                f"--metrics-address={cfg.address}", f"--metrics-port={cfg.metrics_port}",
                f"--exit-timeout-secs={cfg.exit_timeout_s}", f"--log-verbose={cfg.log_verbose}",
                "--strict-readiness=true",
                f"--http-restricted-api={ADMIN_APIS}:{ADMIN_HEADER}={token}",
                f"--grpc-restricted-protocol={ADMIN_APIS}:{ADMIN_HEADER}={token}",
                *cfg.extra_args]

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env_bin = str(Path(sys.executable).parent)
        env["PATH"] = env_bin + os.pathsep + env.get("PATH", "")
        # The stub's embedded interpreter must find this environment's site-packages, not the system ones.
        env.setdefault("PYTHONNOUSERSITE", "1")
        return env

    @property
    def ports(self) -> dict[str, int]:
        return {"HTTP": self.config.http_port, "gRPC": self.config.grpc_port, "metrics": self.config.metrics_port}

    def _check_ports_free(self) -> None:
        busy = ports_in_use(self.config.address, list(self.ports.values()))
        if busy:
            raise ServerError("; ".join(f"{name} port {port} is in use on {self.config.address} by "
                                        f"{port_owners(port)}" for name, port in self.ports.items() if port in busy)
                              + ": stop it or choose other ports (--http-port, --grpc-port, --metrics-port)")

    def start(self) -> TritonServer:
        if self.process is not None:
            raise ServerError("server already started")
        # Bound before we start, not after: otherwise our readiness probe would be answered by whoever holds the
        # HTTP port and we would announce a server that is about to exit.
        self._check_ports_free()
        try:
            command = self.command()
            log = open(self.log_path, "wb")
            try:
                self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                                env=self.environment(), start_new_session=True)
            except OSError as err:
                raise ServerError(f"cannot start tritonserver: {err}") from err
            finally:
                log.close()
            self._wait_ready()
            self._check_ports_ours()
        except BaseException:
            self.stop()
            raise
        self._stubs = self.python_stubs()
        return self

    def _stub_processes(self) -> list[psutil.Process]:
        """The server's live Python-backend stubs (a killed stub stays a zombie: Triton never reaps it)."""
        if self.process is None:
            return []
        try:
            children = psutil.Process(self.process.pid).children()
        except psutil.Error:
            return []
        stubs = []
        for child in children:
            try:
                if child.status() != psutil.STATUS_ZOMBIE and child.cmdline()[0].endswith(PYTHON_STUB):
                    stubs.append(child)
            except (psutil.Error, IndexError):
                continue
        return stubs

    def python_stubs(self) -> dict[int, str]:
        """The server's live Python-backend stub processes (pid -> model instance name)."""
        stubs: dict[int, str] = {}
        for process in self._stub_processes():
            try:
                # argv: stub model.py shm-region shm-size shm-growth parent-pid backend-dir ipc instance ...
                argv = process.cmdline()
            except psutil.Error:
                continue
            stubs[process.pid] = argv[8] if len(argv) > 8 else Path(argv[1]).parent.parent.name
            if len(argv) > 2:
                self._shm_regions.add(argv[2].lstrip("/"))
        return stubs

    def stub_memory(self) -> dict[str, tuple[int, int]]:
        """Model instance -> (resident bytes of its stub, bytes its shared-memory region holds in /dev/shm)."""
        usage: dict[str, tuple[int, int]] = {}
        for process in self._stub_processes():
            try:
                argv = process.cmdline()
                rss = process.memory_info().rss
                region = SHM_DIR / argv[2].lstrip("/")
                usage[argv[8] if len(argv) > 8 else str(process.pid)] = (rss, region.stat().st_blocks * 512)
            except (psutil.Error, OSError, IndexError):
                continue
        return usage

    def dead_stubs(self) -> list[str]:
        """Model instances whose Python stub died after start-up.

        tritonserver 2.51 neither restarts such a stub nor marks its model unready: /v2/health/ready stays 200 and
        every request routed to that instance fails with "Stub process '<instance>' is not healthy.". Whoever
        supervises the server should therefore restart it (`serve_until_signal` does so by exiting).
        """
        alive = set(self.python_stubs()) if self.process is not None else set()
        return sorted(name for pid, name in self._stubs.items() if pid not in alive)

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.config.startup_timeout_s
        while time.monotonic() < deadline:
            assert self.process is not None
            code = self.process.poll()
            if code is not None:  # a model that failed to load ends start-up here (--exit-on-error, the default)
                raise ServerError(self.failure_report(f"tritonserver exited with code {code} during start-up"))
            # A stub that cannot start leaves its model "loading" forever: fail now rather than at the timeout.
            # Only the log tells: the repository index, which would show the model's state, is one of the admin
            # APIs we close.
            fatal = FATAL_LOG_PATTERN.search(self.log_text())
            if fatal:
                raise ServerError(self.failure_report(f"a model failed to load: {fatal.group(0).strip()}"))
            if server_ready(self.http_url):  # --strict-readiness: every model is ready too
                return
            time.sleep(0.25)
        raise ServerError(self.failure_report(f"tritonserver not ready after {self.config.startup_timeout_s:.0f} s"))

    def _check_ports_ours(self, timeout_s: float = 10.0) -> None:
        """Every port is listened on by our tritonserver (someone may have bound one since our check)."""
        assert self.process is not None
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                listening = {conn.laddr.port for conn in psutil.Process(self.process.pid).net_connections("inet")
                             if conn.status == psutil.CONN_LISTEN}
            except psutil.Error:
                listening = set()
            missing = {name: port for name, port in self.ports.items() if port not in listening}
            if not missing:
                return
            code = self.process.poll()
            if code is not None or time.monotonic() > deadline:
                # The metrics endpoint starts just after HTTP reports ready; a port still missing is someone else's.
                raise ServerError(self.failure_report(
                    "; ".join(f"{name} port {port} is in use by {port_owners(port)}" for name, port in missing.items())
                    + (f" (tritonserver exited with code {code})" if code is not None else "")))
            time.sleep(0.1)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def failure_report(self, headline: str) -> str:
        """The headline, the models that failed to load, and the server log lines that say why."""
        text = self.log_text()
        failed = sorted(set(re.findall(r"failed to load '([^']+)'", text)) |
                        set(re.findall(r"\|\s*(\S+)\s*\|\s*\d+\s*\|\s*UNAVAILABLE", text)))
        loading = sorted(set(re.findall(r'"loading: ([^:"]+):\d+"', text)) -
                         set(re.findall(r"successfully loaded '([^']+)'", text)) - set(failed))
        relevant = [line for line in text.splitlines()
                    if re.search(r"^E\d|error|failed|UNAVAILABLE|Traceback|Exception|cannot execute|denied", line,
                                 re.IGNORECASE) and "CudaDriverHelper has not been initialized" not in line]
        lines = [headline]
        if failed:
            lines.append("models that failed to load: " + ", ".join(failed))
        if loading and not failed and FATAL_LOG_PATTERN.search(text):
            # A stub that cannot exec names no model in the log: the ones that never finished loading are the victims.
            lines.append("models still loading when it failed: " + ", ".join(loading))
        if NO_GPU_MESSAGE in text:
            lines.append("fix: this machine has no GPU but the repository was rendered for one (KIND_GPU); render it "
                         "again for the CPU: python -m builder render ... --device cpu")
        lines += relevant[-40:] or text.splitlines()[-40:]
        lines.append(f"(full server log: {self.log_path})")
        return "\n".join(lines)

    def stop(self) -> int | None:
        """SIGTERM, then wait the exit timeout (in-flight requests finish), then SIGKILL. Returns the exit code."""
        process, self.process = self.process, None
        code = None
        if process is not None:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=self.config.exit_timeout_s + 5)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
            # Python-backend stubs live in the server's process group; never leave one behind.
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            code = process.returncode
        # A killed server leaves its stubs' shared-memory regions behind (hundreds of MB after big requests).
        for region in self._shm_regions:
            (SHM_DIR / region).unlink(missing_ok=True)
        self._shm_regions.clear()
        if self._own_backends is not None:
            shutil.rmtree(self._own_backends, ignore_errors=True)
            self._own_backends = None
        return code

    def wait(self) -> int:
        assert self.process is not None
        return self.process.wait()

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
        if self._own_log and exc_type is None:
            self.log_path.unlink(missing_ok=True)
