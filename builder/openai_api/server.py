"""Run the OpenAI-compatible API beside tritonserver: uvicorn in a thread of the `serve` process.

Binding policy: the API binds where Triton binds (127.0.0.1 by default). Anything beyond loopback needs an API key,
and `check_binding` refuses to start without one: the text ensemble would otherwise be open to the network through a
second door. Prefer the environment variable for the key (GPT_TRITON_API_KEY): other local users can read command
lines.
"""

from __future__ import annotations

import ipaddress
import threading
import time
from collections.abc import Callable
from pathlib import Path

import uvicorn

from .app import ApiSettings, create_app
from .chat_template import ChatTemplate, ChatTemplateError
from .backend import TritonBackend

API_KEY_ENV = "GPT_TRITON_API_KEY"


class ApiServerError(RuntimeError):
    """The OpenAI API server could not start (bad settings, port in use)."""


def is_loopback(address: str) -> bool:
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def check_binding(address: str, api_key: str | None) -> None:
    if api_key is not None and len(api_key) < 16:
        raise ApiServerError("--api-key must be at least 16 characters")
    if api_key is None and not is_loopback(address):
        raise ApiServerError(f"the OpenAI API would listen on {address} without an API key: set --api-key (or "
                             f"{API_KEY_ENV}), or bind to 127.0.0.1")


def api_settings(address: str, api_key: str | None, chat_template: Path | None) -> Callable[[str], ApiSettings]:
    """Checks what can be checked before tritonserver starts (binding policy, the template compiles); returns the
    settings for a Triton gRPC URL."""
    check_binding(address, api_key)
    try:
        ChatTemplate.load(chat_template)
    except ChatTemplateError as err:
        raise ApiServerError(str(err)) from err
    return lambda grpc_url: ApiSettings(grpc_url, api_key=api_key, chat_template=chat_template)


class OpenAIServer:
    """`start()` binds and serves in a daemon thread, returning once the port accepts connections; `stop()` ends it
    (in-flight streams are cancelled, and with them their Triton requests)."""

    def __init__(self, settings: ApiSettings, host: str = "127.0.0.1", port: int = 9000,
                 startup_timeout_s: float = 30.0) -> None:
        check_binding(host, settings.api_key)
        self.settings, self.host, self.port = settings, host, port
        self.backend = TritonBackend(settings.triton_grpc_url, settings.model, settings.timeout_s)
        try:
            app = create_app(settings, self.backend)
        except ChatTemplateError as err:
            raise ApiServerError(str(err)) from err
        config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                                timeout_graceful_shutdown=2, lifespan="on")
        self._server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None
        self.startup_timeout_s = startup_timeout_s

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/v1"

    def start(self) -> OpenAIServer:
        self._thread = threading.Thread(target=self._server.run, name="openai-api", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + self.startup_timeout_s
        while not self._server.started:
            if not self._thread.is_alive():
                raise ApiServerError(f"the OpenAI API could not listen on {self.host}:{self.port} (port in use?)")
            if time.monotonic() > deadline:
                self.stop()
                raise ApiServerError(f"the OpenAI API did not start within {self.startup_timeout_s:g} s")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def __enter__(self) -> OpenAIServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
