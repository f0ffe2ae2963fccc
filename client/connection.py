"""Connection settings shared by the sync and asyncio clients: URL defaults, retry policy, error translation."""

from __future__ import annotations

import asyncio
import logging
import socket
from dataclasses import dataclass
from typing import Literal
from urllib.parse import quote

from tritonclient.utils import InferenceServerException

from .errors import (RequestError, RequestTimeoutError, ServerUnavailableError, TextClientError,
                     WrongEndpointError, clean_server_message)

Protocol = Literal["http", "grpc"]
DEFAULT_PORTS: dict[str, int] = {"http": 8000, "grpc": 8001}
# What an HTTP client raises when the port speaks something else: HTTP/2 frames of the gRPC port
# (geventhttpclient's HTTPParseError, http.client's BadStatusLine, aiohttp's BadHttpMessage) or the metrics port's
# empty 404 body where Triton always sends JSON (JSONDecodeError, from rapidjson or json).
NOT_TRITON_HTTP = frozenset({"HTTPParseError", "JSONDecodeError", "BadStatusLine", "BadHttpMessage",
                             "BadStatusLineError", "ContentTypeError"})
logger = logging.getLogger("client")


@dataclass(frozen=True)
class ConnectionConfig:
    """Where and how to reach the model; validated once."""

    url: str
    protocol: Protocol
    model: str
    timeout_s: float
    retries: int
    backoff_s: float = 0.25
    max_backoff_s: float = 4.0

    @classmethod
    def create(cls, url: str | None, protocol: str, model: str, timeout_s: float, retries: int,
               backoff_s: float = 0.25) -> "ConnectionConfig":
        if protocol not in DEFAULT_PORTS:
            raise ValueError(f"protocol must be 'http' or 'grpc', got {protocol!r}")
        if not model:
            raise ValueError("model name must not be empty")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries}")
        if backoff_s < 0:
            raise ValueError(f"backoff_s must be >= 0, got {backoff_s}")
        return cls(url=normalize_url(url, protocol), protocol=protocol, model=model,  # type: ignore[arg-type]
                   timeout_s=float(timeout_s), retries=int(retries), backoff_s=float(backoff_s))

    @property
    def host(self) -> str:
        return self.url.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.url.rpartition(":")[2])

    @property
    def generate_stream_path(self) -> str:
        return f"/v2/models/{quote(self.model, safe='')}/generate_stream"

    def backoff(self, attempt: int) -> float:
        """Delay before retry number `attempt` (1-based): exponential, capped."""
        return min(self.backoff_s * 2 ** (attempt - 1), self.max_backoff_s)

    def describe(self) -> str:
        return f"{self.url} ({self.protocol})"


def normalize_url(url: str | None, protocol: str) -> str:
    """'host:port' as tritonclient wants it; the protocol's default port when none is given."""
    if not url:
        return f"localhost:{DEFAULT_PORTS[protocol]}"
    for scheme in ("http://", "https://", "grpc://"):
        if url.startswith(scheme):
            url = url[len(scheme):]
    url = url.rstrip("/")
    if "/" in url:
        raise ValueError(f"server must be host[:port], got {url!r}")
    host, sep, port = url.rpartition(":")
    if not sep or host.endswith(":") or not port.isdigit():  # no port (IPv6 literals need [brackets])
        return f"{url}:{DEFAULT_PORTS[protocol]}"
    return url


def _reason(text: str) -> str:
    lowered = text.lower()
    if "connection refused" in lowered or "connect call failed" in lowered:
        return "connection refused"
    if "name or service not known" in lowered or "dns" in lowered:
        return "unknown host"
    return clean_server_message(text)


def port_hint(config: ConnectionConfig) -> str:
    name = {"http": "HTTP", "grpc": "gRPC"}[config.protocol]
    return (f"is this the {name} port? Triton listens for HTTP on 8000, gRPC on 8001 and "
            "metrics on 8002 by default; --protocol must match the port")


def timed_out(config: ConnectionConfig) -> RequestTimeoutError:
    return RequestTimeoutError(f"no answer from Triton at {config.describe()} within {config.timeout_s:g} s")


def translate_error(err: BaseException, config: ConnectionConfig) -> TextClientError:
    """Any transport exception as one of the client's errors, with one readable line."""
    if isinstance(err, TextClientError):
        return err
    where = config.describe()
    if isinstance(err, InferenceServerException):
        status = str(err.status() or "")
        message = str(err.message() or err)
        if status == "StatusCode.UNAVAILABLE":
            # "Socket closed": something accepted the connection but does not speak gRPC (the HTTP or metrics port).
            hint = f" ({port_hint(config)})" if "socket closed" in message.lower() else ""
            return ServerUnavailableError(f"cannot reach Triton at {where}: {_reason(message)}{hint}")
        if status == "StatusCode.DEADLINE_EXCEEDED" or "timed out" in message.lower():
            return timed_out(config)
        return RequestError(clean_server_message(message), status=status or None)
    if config.protocol == "http" and (any(kind.__name__ in NOT_TRITON_HTTP for kind in type(err).__mro__)
                                      or "bad status line" in str(err).lower()):  # aiohttp's ClientResponseError
        # Not the raw text: past its first words it is binary HTTP/2 framing.
        said = "bad status line" if "bad status line" in str(err).lower() else " ".join(str(err).split())[:80]
        return WrongEndpointError(f"{where} did not answer as Triton's HTTP endpoint ({type(err).__name__}: "
                                  f"{said}); {port_hint(config)}")
    code = getattr(err, "code", None)
    if callable(code) and type(err).__module__.startswith("grpc"):  # a raw grpc.RpcError (aio streams)
        status_name = str(code())
        details = str(getattr(err, "details", lambda: "")() or err)
        if status_name == "StatusCode.UNAVAILABLE":
            hint = f" ({port_hint(config)})" if "socket closed" in details.lower() else ""
            return ServerUnavailableError(f"cannot reach Triton at {where}: {_reason(details)}{hint}")
        if status_name == "StatusCode.DEADLINE_EXCEEDED":
            return timed_out(config)
        if status_name == "StatusCode.CANCELLED":
            return RequestError("the request was cancelled", status=status_name)
        return RequestError(clean_server_message(details), status=status_name)
    if isinstance(err, (TimeoutError, socket.timeout, asyncio.TimeoutError)) or type(err).__name__ == "Timeout":
        return timed_out(config)
    if isinstance(err, (ConnectionError, OSError)):
        return ServerUnavailableError(f"cannot reach Triton at {where}: {_reason(str(err) or type(err).__name__)}")
    try:
        import aiohttp  # noqa: PLC0415  (only the asyncio HTTP client brings it in)
    except ImportError:  # pragma: no cover
        aiohttp = None  # type: ignore[assignment]
    if aiohttp is not None and isinstance(err, aiohttp.ClientError):
        return ServerUnavailableError(f"cannot reach Triton at {where}: {_reason(str(err))}")
    return TextClientError(f"{type(err).__name__}: {err}")


def log_retry(config: ConnectionConfig, attempt: int, err: TextClientError) -> float:
    """Log a retry of a connection failure and return how long to wait before it."""
    delay = config.backoff(attempt)
    logger.warning("attempt %d/%d failed: %s; retrying in %.2f s", attempt, config.retries + 1, err, delay)
    return delay


def stream_failure(error: BaseException, config: ConnectionConfig, received: int, attempt: int
                   ) -> tuple[bool, TextClientError]:
    """An error event of a stream -> (retry it?, the client error). Only a stream that never got an answer may be
    retried (nothing was generated yet), and only for a connection failure, while attempts remain."""
    err = translate_error(error, config)
    if isinstance(err, ServerUnavailableError):
        if received == 0 and attempt < config.retries:
            return True, err
        return False, gave_up(config, err)
    return False, err


def gave_up(config: ConnectionConfig, err: ServerUnavailableError) -> ServerUnavailableError:
    if config.retries == 0:
        return err
    return ServerUnavailableError(f"{err} (gave up after {config.retries + 1} attempts)")

