"""`python -m builder serve REPO`: tritonserver in the foreground until Ctrl-C / SIGTERM."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import click

from .serve import ServerConfig, ServerError, TritonServer


def port_option(name: str, default: int, what: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return click.option(f"--{name}-port", default=default, show_default=True, type=click.IntRange(1, 65535),
                        help=f"{what} port.")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("repository", type=click.Path(exists=True, file_okay=False, path_type=Path))
@port_option("http", 8000, "HTTP/REST (KServe v2, /generate)")
@port_option("grpc", 8001, "gRPC")
@port_option("metrics", 8002, "Prometheus metrics")
@click.option("--address", default="127.0.0.1", show_default=True,
              help="Bind address of the HTTP, gRPC and metrics endpoints. On every address the model-repository, "
                   "shared-memory, trace and logging APIs are closed, or open only to callers sending the header "
                   "`triton-admin: $TRITON_ADMIN_TOKEN` (gRPC: `triton-grpc-protocol-triton-admin`) when that "
                   "variable is set.")
@click.option("--tritonserver", "tritonserver", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              envvar="TRITONSERVER_BIN", help="tritonserver binary [env TRITONSERVER_BIN; default: nvidia-pytriton's].")
@click.option("--backend-directory", type=click.Path(exists=True, file_okay=False, path_type=Path),
              envvar="TRITON_BACKEND_DIR",
              help="Backends folder [env TRITON_BACKEND_DIR; default: nvidia-pytriton's Python backend + stub].")
@click.option("--startup-timeout", default=300.0, show_default=True, type=click.FloatRange(1),
              help="Seconds to wait for every model to be ready.")
@click.option("--exit-timeout", default=10, show_default=True, type=click.IntRange(0),
              help="Seconds in-flight requests get to finish on shutdown.")
@click.option("--log-verbose", default=0, show_default=True, type=click.IntRange(0), help="tritonserver verbosity.")
@click.option("--log-file", type=click.Path(dir_okay=False, path_type=Path), help="Server log file (default: temp).")
@click.option("--openai-port", type=click.IntRange(1, 65535), default=None,
              help="Also serve the OpenAI-compatible API (/v1/completions, /v1/chat/completions, /v1/models) on "
                   "this port, bound to --address; off by default.")
@click.option("--api-key", envvar="GPT_TRITON_API_KEY", default=None, show_envvar=True,
              help="Bearer key the OpenAI API requires (16+ characters); required when --address is not loopback. "
                   "Prefer the variable: other local users can read command lines.")
@click.option("--chat-template", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Jinja chat template for /v1/chat/completions [default: a plain 'Role: text' transcript].")
def serve_command(repository: Path, http_port: int, grpc_port: int, metrics_port: int, address: str,
                  tritonserver: Path | None, backend_directory: Path | None, startup_timeout: float,
                  exit_timeout: int, log_verbose: int, log_file: Path | None, openai_port: int | None,
                  api_key: str | None, chat_template: Path | None) -> None:
    """Start tritonserver on REPOSITORY and keep it in the foreground until Ctrl-C or SIGTERM.

    Exits non-zero, naming the failing model and the server's own error lines, if a model fails to load, and
    with "port N is in use" if another process holds one of the ports.

    \b
    Example:
      python -m builder serve model_repository
      python -m client "1 2 3 4 5 6"              # in another shell
    """
    # SIGTERM is handled from the start: tritonserver runs in its own session, so a SIGTERM that killed us while it
    # loads would leave it running.
    signal.signal(signal.SIGTERM, stop_on_signal)
    server: TritonServer | None = None
    api = None
    try:
        if openai_port is not None:  # FastAPI is imported only when asked for
            from .openai_api import ApiServerError, OpenAIServer, api_settings
            try:  # before tritonserver starts: a refused setting fails fast
                api_config = api_settings(address, api_key, chat_template)
            except ApiServerError as err:
                raise click.ClickException(str(err)) from err
        config = ServerConfig(repository, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port,
                              address=address, tritonserver=tritonserver, backend_directory=backend_directory,
                              startup_timeout_s=startup_timeout, exit_timeout_s=exit_timeout,
                              log_verbose=log_verbose, log_file=log_file)
        server = TritonServer(config)
        click.echo(f"starting tritonserver on {repository} ...", err=True)
        server.start()
        click.echo(f"ready: HTTP http://{server.http_url}  gRPC {server.grpc_url}  metrics {server.metrics_url}",
                   err=True)
        click.echo(f"server log: {server.log_path}   (Ctrl-C to stop)", err=True)
        if openai_port is not None:
            try:
                api = OpenAIServer(api_config(server.grpc_url), host=address, port=openai_port).start()
            except ApiServerError as err:
                server.stop()
                raise click.ClickException(str(err)) from err
            click.echo(f"OpenAI API: {api.url}" + ("  (Bearer key required)" if api_key else ""), err=True)
    except ServerError as err:
        raise click.ClickException(str(err)) from err
    except KeyboardInterrupt:
        click.echo("stopping tritonserver (letting in-flight requests finish) ...", err=True)
        if server is not None:
            server.stop()
        sys.exit(0)
    code = serve_until_signal(server)
    if api is not None:
        api.stop()
    sys.exit(code)


def stop_on_signal(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # SIGTERM takes the same graceful path as Ctrl-C


STUB_DIED_EXIT_CODE = 3
STUB_CHECK_INTERVAL_S = 1.0


def serve_until_signal(server: TritonServer) -> int:
    """Block until SIGINT/SIGTERM, the server dies or one of its Python stubs dies; shut down gracefully.

    Returns the exit code to use: 0 after a signal, the server's code (or 1) if it died, STUB_DIED_EXIT_CODE if a
    model's Python stub died (Triton 2.51 would keep failing that model's requests while reporting ready, so we stop
    and let the supervisor restart the whole server).
    """
    if server.process is None:
        raise ServerError("serve_until_signal needs a started server")
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        for sig in previous:
            signal.signal(sig, stop_on_signal)
        while True:
            try:
                code = server.process.wait(timeout=STUB_CHECK_INTERVAL_S)
                break
            except subprocess.TimeoutExpired:
                dead = server.dead_stubs()
            if dead:
                click.echo(f"the Python stub of model instance {', '.join(dead)} died; tritonserver does not restart "
                           "it (its requests would all fail while /v2/health/ready stays 200), so the server is "
                           f"stopped; restart it. Server log: {server.log_path}", err=True)
                server.stop()
                return STUB_DIED_EXIT_CODE
        click.echo(f"tritonserver exited unexpectedly with code {code}; see {server.log_path}", err=True)
        return code or 1
    except KeyboardInterrupt:
        click.echo("stopping tritonserver (letting in-flight requests finish) ...", err=True)
        server.stop()
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
