"""Where the server is (URL defaults, validated settings) and what its failures mean (one client error each)."""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass
from typing import Literal
from urllib.parse import quote

import httpx
from tritonclient.utils import InferenceServerException

from .errors import (RequestError, RequestTimeoutError, ServerUnavailableError, TextClientError,
                     WrongEndpointError, clean_server_message)

Protocol = Literal["http", "grpc"]
DEFAULT_PORTS: dict[str, int] = {"http": 8000, "grpc": 8001}
# Exception types that mean the port speaks something else: HTTP/2 frames of the gRPC port, or a body that is not
# the JSON Triton always sends (JSONDecodeError, from rapidjson or json). Besides httpx's (below), the names of the
# other HTTP stacks' parse errors (geventhttpclient's HTTPParseError, http.client's BadStatusLine, aiohttp's), for
# callers that translate errors of tritonclient.http.
NOT_TRITON_HTTP = frozenset({"HTTPParseError", "JSONDecodeError", "BadStatusLine", "BadHttpMessage",
                             "BadStatusLineError", "ContentTypeError"})
# Words of a parser that got bytes which are not HTTP/1.1 at all (h11, under httpx, says "illegal request line" for
# the gRPC port's HTTP/2 frames).
NOT_HTTP1_WORDS = ("illegal request line", "illegal status line", "bad status line", "invalid http", "malformed")
# httpx's RemoteProtocolError also means that the server closed the connection (a restart): retried, not a wrong port.
CLOSED_WORDS = ("disconnected", "peer closed", "connection closed")


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
               backoff_s: float = 0.25) -> ConnectionConfig:
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
        return cls(url=normalize_url(url, protocol), protocol=protocol, model=model,  # type: ignore[arg-type]  # protocol: checked
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


def _root_cause(err: BaseException) -> BaseException:
    for _ in range(8):  # chains are short; the bound only guards against a cycle
        inner = err.__cause__ or err.__context__
        if inner is None:
            break
        err = inner
    return err


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
    text = str(err).lower()
    garbled = isinstance(err, httpx.RemoteProtocolError) and not any(words in text for words in CLOSED_WORDS)
    if config.protocol == "http" and (garbled or any(kind.__name__ in NOT_TRITON_HTTP for kind in type(err).__mro__)
                                      or any(words in text for words in NOT_HTTP1_WORDS)):
        # Not the raw text: past its first words it is binary HTTP/2 framing.
        said = next((words for words in NOT_HTTP1_WORDS if words in text), " ".join(str(err).split())[:80])
        return not_triton_http(config, f"{type(err).__name__}: {said}")
    if isinstance(err, httpx.TimeoutException):
        return timed_out(config)
    if isinstance(err, httpx.TransportError):  # refused, reset, closed by a restarting server, DNS
        # The words are in the innermost cause: asyncio's "Connect call failed" under anyio's "All connection
        # attempts failed".
        cause = _root_cause(err)
        return ServerUnavailableError(f"cannot reach Triton at {where}: {_reason(str(cause) or type(cause).__name__)}")
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
    return TextClientError(f"{type(err).__name__}: {err}")


def not_triton_http(config: ConnectionConfig, said: str) -> WrongEndpointError:
    """Something answered at the address, but not as Triton's HTTP endpoint."""
    return WrongEndpointError(f"{config.describe()} did not answer as Triton's HTTP endpoint ({said}); "
                              f"{port_hint(config)}")
