"""Launch a real `tritonserver` on a model repository.

By default the server is the one shipped in the `nvidia-pytriton` wheel (tritonserver 2.51 + Python backend). That
wheel keeps the Python-backend stubs apart from the backend, so we assemble a backend directory holding the stub that
matches the running Python. The stub embeds the first `python3` it finds on PATH (it ignores PYTHONPATH), so the
running environment's `bin/` goes first on PATH: the models then import this environment's numpy, torch, tokenizers.
An NGC container's server is used with `--tritonserver /opt/tritonserver/bin/tritonserver --backend-directory
/opt/tritonserver/backends`.
"""

from __future__ import annotations

import os
import re
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

LOCALHOST = "127.0.0.1"
PYTHON_STUB = "triton_python_backend_stub"
FATAL_LOG_PATTERN = re.compile(r"error while loading shared libraries.*|failed to load '[^']+'.*")


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
        import pytriton  # noqa: PLC0415  (optional dependency: only needed for the bundled server)
    except ImportError as err:
        raise ServerError("nvidia-pytriton is not installed: install it, or pass --tritonserver and "
                          "--backend-directory (env TRITONSERVER_BIN / TRITON_BACKEND_DIR)") from err
    return Path(pytriton.__file__).parent / "tritonserver"


def bundled_tritonserver() -> Path:
    binary = _pytriton_root() / "bin" / "tritonserver"
    if not binary.is_file():
        raise ServerError(f"{binary} is missing from the nvidia-pytriton package")
    return binary


def bundled_backend_directory(cache_dir: Path | None = None) -> Path:
    """A backend directory with pytriton's Python backend plus the stub for this Python version."""
    root = _pytriton_root()
    py_version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / py_version / "triton_python_backend_stub"
    if not stub.is_file():
        raise ServerError(f"nvidia-pytriton has no Python-backend stub for Python {py_version} ({stub})")
    cache_dir = cache_dir or Path(tempfile.gettempdir()) / f"gpt-triton-backends-{os.getuid()}-py{py_version}"
    python_dir = cache_dir / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    # Links, not copies: the stub finds its bundled libcudart through an $ORIGIN-relative RPATH, which the loader
    # resolves from the link's target.
    for source in (*(root / "backends" / "python").glob("*.so"), root / "backends" / "python" /
                   "triton_python_backend_utils.py", stub):
        target = python_dir / source.name
        if not (target.is_symlink() and target.resolve() == source.resolve()):
            tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
            tmp.unlink(missing_ok=True)
            tmp.symlink_to(source.resolve())
            os.replace(tmp, target)  # atomic: concurrent launches never see a half-made backend directory
    return cache_dir


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

    @property
    def is_loopback(self) -> bool:
        return self.address in (LOCALHOST, "localhost", "::1") or self.address.startswith("127.")


def _live_cmdline(pid: int) -> list[str]:
    """The process's argv, or [] when it is gone or a zombie (a killed stub stays a zombie: Triton never reaps it)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, IndexError):
        return []
    if state in ("Z", "X"):
        return []
    return [arg.decode(errors="replace") for arg in argv if arg]


class TritonServer:
    """A tritonserver child process. Use as a context manager; `start()` returns once every model is ready."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.process: subprocess.Popen[bytes] | None = None
        self._own_log = config.log_file is None
        self._stubs: dict[int, str] = {}  # Python-backend stubs at start-up: pid -> model instance name
        self.log_path = config.log_file or Path(tempfile.mkstemp(prefix="tritonserver-", suffix=".log")[1])

    @classmethod
    def on_free_ports(cls, model_repository: Path | str, **kwargs: object) -> "TritonServer":
        http_port, grpc_port, metrics_port = free_ports(3)
        return cls(ServerConfig(Path(model_repository), http_port=http_port, grpc_port=grpc_port,
                                metrics_port=metrics_port, **kwargs))  # type: ignore[arg-type]

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

    def command(self) -> list[str]:
        cfg = self.config
        binary = cfg.tritonserver or os.environ.get("TRITONSERVER_BIN") or bundled_tritonserver()
        backends = cfg.backend_directory or os.environ.get("TRITON_BACKEND_DIR") or bundled_backend_directory()
        args = [str(binary), f"--model-repository={cfg.model_repository}", f"--backend-directory={backends}",
                f"--model-control-mode={cfg.model_control_mode}", f"--http-address={cfg.address}",
                f"--http-port={cfg.http_port}", f"--grpc-address={cfg.address}", f"--grpc-port={cfg.grpc_port}",
                f"--metrics-address={cfg.address}", f"--metrics-port={cfg.metrics_port}",
                f"--exit-timeout-secs={cfg.exit_timeout_s}", f"--log-verbose={cfg.log_verbose}",
                "--strict-readiness=true"]
        if not cfg.is_loopback:
            # Reachable from other hosts: only inference and health stay open to everyone; loading models and
            # registering shared memory need the header `triton-admin: <token>` (env TRITON_ADMIN_TOKEN).
            token = os.environ.get("TRITON_ADMIN_TOKEN") or os.urandom(16).hex()
            admin = f"triton-admin={token}"
            args += [f"--http-restricted-api=model-repository,shared-memory,trace,logging:{admin}",
                     f"--grpc-restricted-protocol=model-repository,shared-memory,trace,logging:{admin}"]
        return args + list(cfg.extra_args)

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env_bin = str(Path(sys.executable).parent)
        env["PATH"] = env_bin + os.pathsep + env.get("PATH", "")
        # The stub's embedded interpreter must find this environment's site-packages, not the system ones.
        env.setdefault("PYTHONNOUSERSITE", "1")
        return env

    def start(self) -> "TritonServer":
        if self.process is not None:
            raise ServerError("server already started")
        log = open(self.log_path, "wb")
        try:
            self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                            env=self.environment(), start_new_session=True)
        except OSError as err:
            raise ServerError(f"cannot start tritonserver: {err}") from err
        finally:
            log.close()
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        self._stubs = self.python_stubs()
        return self

    def python_stubs(self) -> dict[int, str]:
        """The server's live Python-backend stub processes (pid -> model instance name), read from /proc (Linux)."""
        if self.process is None:
            return {}
        stubs: dict[int, str] = {}
        for children in Path(f"/proc/{self.process.pid}/task").glob("*/children"):
            try:
                pids = [int(pid) for pid in children.read_text().split()]
            except OSError:
                continue
            for pid in pids:
                argv = _live_cmdline(pid)
                if argv and argv[0].endswith(PYTHON_STUB):
                    # argv: stub model.py shm-region shm-size shm-growth parent-pid backend-dir ipc instance ...
                    stubs[pid] = argv[8] if len(argv) > 8 else Path(argv[1]).parent.parent.name
        return stubs

    def dead_stubs(self) -> list[str]:
        """Model instances whose Python stub died after start-up.

        tritonserver 2.51 neither restarts such a stub nor marks its model unready: /v2/health/ready stays 200 and
        every request routed to that instance fails with "Stub process '<instance>' is not healthy.". Whoever
        supervises the server should therefore restart it (`serve_until_signal` does so by exiting).
        """
        return sorted(name for pid, name in self._stubs.items()
                      if not (_live_cmdline(pid) or [""])[0].endswith(PYTHON_STUB))

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.config.startup_timeout_s
        url = f"http://{self.http_url}/v2/health/ready"
        while time.monotonic() < deadline:
            assert self.process is not None
            code = self.process.poll()
            if code is not None:
                raise ServerError(self.failure_report(f"tritonserver exited with code {code} during start-up"))
            # A stub that cannot start leaves its model "loading" forever: fail now rather than at the timeout.
            fatal = FATAL_LOG_PATTERN.search(self.log_text())
            if fatal:
                raise ServerError(self.failure_report(f"a model failed to load: {fatal.group(0).strip()}"))
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(0.25)
        raise ServerError(self.failure_report(f"tritonserver not ready after {self.config.startup_timeout_s:.0f} s"))

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
        relevant = [line for line in text.splitlines()
                    if re.search(r"^E\d|error|failed|UNAVAILABLE|Traceback|Exception", line, re.IGNORECASE)]
        lines = [headline]
        if failed:
            lines.append("models that failed to load: " + ", ".join(failed))
        lines += relevant[-40:] or text.splitlines()[-40:]
        lines.append(f"(full server log: {self.log_path})")
        return "\n".join(lines)

    def stop(self) -> int | None:
        """SIGTERM, then wait the exit timeout (in-flight requests finish), then SIGKILL. Returns the exit code."""
        process, self.process = self.process, None
        if process is None:
            return None
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
        return process.returncode

    def wait(self) -> int:
        assert self.process is not None
        return self.process.wait()

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
        if self._own_log and exc_type is None:
            self.log_path.unlink(missing_ok=True)
