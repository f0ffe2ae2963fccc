"""What the sync and asyncio clients share: request building, answer reading, batching rules and the retry policy.

Both clients speak HTTP through httpx (`httpx.Client` / `httpx.AsyncClient`) and gRPC through tritonclient
(`tritonclient.grpc` / `tritonclient.grpc.aio`). For HTTP, tritonclient only builds the KServe v2 binary infer body
and parses its answer; httpx carries the bytes. Everything here is free of I/O, so neither client imports the other.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from .connection import ConnectionConfig, not_triton_http, translate_error
from .errors import RequestError, ServerUnavailableError, TextClientError
from .request import GenerationResult, InputTensor, ModelInfo, SamplingParams, parse_results
from .sse import error_from_body, triton_error

DEFAULT_MAX_TOKENS = 16
# Triton's infer answer: a JSON header followed by the binary tensors; this header gives the JSON part's length.
HEADER_LENGTH = "Inference-Header-Content-Length"
logger = logging.getLogger("client")


# -- batching rules ---------------------------------------------------------------------------------------------
def batches(prompts: Sequence[str], max_batch_size: int) -> list[tuple[str, ...]]:
    """Prompts split into requests of at most the model's max_batch_size rows."""
    return [tuple(prompts[i:i + max_batch_size]) for i in range(0, len(prompts), max_batch_size)]


def rows_per_request(info: ModelInfo, protocol: str, params: SamplingParams) -> int:
    """Rows per request: the model's max_batch_size, but 1 where HTTP /generate_stream cannot shape word lists."""
    if protocol == "http" and info.decoupled and (params.stop_words or params.bad_words):
        return 1
    return info.max_batch_size


def check_batching(info: ModelInfo) -> None:
    if info.max_batch_size < 1:
        raise RequestError(f"model '{info.name}' has max_batch_size {info.max_batch_size}; the text ensemble "
                           "contract needs a batch dimension (max_batch_size > 0)")


# -- HTTP (httpx carries these) ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class HttpRequest:
    method: str
    path: str
    body: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)


def _model_path(config: ConnectionConfig) -> str:
    return f"/v2/models/{quote(config.model, safe='')}"


def model_config_request(config: ConnectionConfig) -> HttpRequest:
    return HttpRequest("GET", f"{_model_path(config)}/config")


def infer_request(config: ConnectionConfig, tensors: list[InputTensor]) -> HttpRequest:
    """POST /infer with the tensors in Triton's binary extension (tritonclient lays out the body)."""
    import tritonclient.http as triton_http  # only HTTP clients need it

    body, json_size = triton_http.InferenceServerClient.generate_request_body(infer_inputs("http", tensors))
    # Uncompressed answers, as tritonclient asks for by default (httpx would otherwise offer gzip).
    headers = {"Content-Type": "application/octet-stream", "Accept-Encoding": "identity"}
    if json_size is not None:
        headers[HEADER_LENGTH] = str(json_size)
    return HttpRequest("POST", f"{_model_path(config)}/infer", body, headers)


def generate_stream_request(config: ConnectionConfig, body: dict[str, object]) -> HttpRequest:
    return HttpRequest("POST", config.generate_stream_path, json.dumps(body).encode("utf-8"),
                       {"Content-Type": "application/json", "Accept": "text/event-stream"})


def check_answer(config: ConnectionConfig, status: int, body: bytes) -> None:
    """Raise the error of a non-200 answer (Triton's JSON `{"error"}`, or a wrong endpoint for a bare 404)."""
    if status == 200:
        return
    err = triton_error(status, body)
    if err is None and status == 404:
        # Triton answers every error with JSON: a bare 404 comes from another endpoint (the metrics port).
        # Other statuses without it (a balancer's 502/503 page) keep their own words.
        raise not_triton_http(config, "HTTP 404 without Triton's JSON error body")
    raise err or error_from_body(status, body)


def read_json(config: ConnectionConfig, status: int, body: bytes) -> Any:
    check_answer(config, status, body)
    try:
        return json.loads(body)
    except json.JSONDecodeError as err:
        raise not_triton_http(config, f"JSONDecodeError: {err}") from err


def infer_result(config: ConnectionConfig, status: int, headers: Any, body: bytes) -> Any:
    """A tritonclient `InferResult` (its `as_numpy` reads the binary tensors) from an /infer answer."""
    import tritonclient.http as triton_http

    check_answer(config, status, body)
    length = headers.get(HEADER_LENGTH)
    try:
        # httpx has already undone any Content-Encoding.
        return triton_http.InferResult.from_response_body(body, header_length=int(length) if length else None)
    except (ValueError, KeyError) as err:  # rapidjson's JSONDecodeError is a ValueError
        raise not_triton_http(config, f"{type(err).__name__}: {err}") from err


# -- gRPC (tritonclient carries these) --------------------------------------------------------------------------
def infer_inputs(protocol: str, tensors: list[InputTensor]) -> list[Any]:
    """tritonclient `InferInput`s of the protocol's module."""
    if protocol == "http":
        import tritonclient.http as module  # heavy: only the chosen protocol
    else:
        import tritonclient.grpc as module  # same module API
    inputs = []
    for tensor in tensors:
        item = module.InferInput(tensor.name, list(tensor.data.shape), tensor.datatype)
        item.set_data_from_numpy(tensor.data)
        inputs.append(item)
    return inputs


def stream_events(response: Any, prompts: Sequence[str]) -> list[GenerationResult] | None:
    """A gRPC stream result as per-row deltas; None for the empty response that only marks the end."""
    if not response.get_response().outputs:
        return None
    return parse_results(prompts, response.as_numpy)


def is_final(response: Any) -> bool:
    flag = response.get_response().parameters.get("triton_final_response")
    return flag is not None and flag.bool_param


# -- retry policy -----------------------------------------------------------------------------------------------
class Attempts:
    """The retry policy of one call: connection failures are retried with capped exponential backoff while
    attempts remain; every other error (a server's answer, a timeout, a wrong endpoint) is raised at once.

    `after(raw)` is called in an `except` block: it raises the client error, or returns the delay before the
    next attempt (the caller sleeps, with `time.sleep` or `asyncio.sleep`)."""

    def __init__(self, config: ConnectionConfig):
        self.config = config
        self.failed = 0

    def after(self, raw: BaseException, received: int = 0) -> float:
        """`received`: responses a stream already delivered; a stream that got any is never retried (its text
        would repeat)."""
        err = translate_error(raw, self.config)
        if not isinstance(err, ServerUnavailableError):
            raise err from raw
        if received or self.failed >= self.config.retries:
            raise self._gave_up(err) from raw
        self.failed += 1
        delay = self.config.backoff(self.failed)
        logger.warning("attempt %d/%d failed: %s; retrying in %.2f s", self.failed, self.config.retries + 1, err,
                       delay)
        return delay

    def _gave_up(self, err: ServerUnavailableError) -> TextClientError:
        if self.config.retries == 0:
            return err
        return ServerUnavailableError(f"{err} (gave up after {self.config.retries + 1} attempts)")
