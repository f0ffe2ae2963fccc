"""Synchronous text client for the ensemble: generate, stream, generate_many over HTTP or gRPC.

`generate()` on a streaming (decoupled) repository goes through the streaming transport and joins the deltas,
because Triton's plain infer endpoints reject decoupled models. Connection failures are retried with exponential
backoff; a server's answer (4xx, model error) never is. One client is not meant to be shared between threads; use
`generate_many` (or `AsyncTextClient`) for concurrency.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar, overload

from tritonclient.utils import InferenceServerException

from .connection import ConnectionConfig, gave_up, log_retry, stream_failure, timed_out, translate_error
from .errors import RequestError, ServerUnavailableError, TextClientError
from .request import GenerationResult, InputTensor, ModelInfo, SamplingParams, TextRequest, empty_results, \
    parse_results
from .sse import SseParser, error_from_body

T = TypeVar("T")
DEFAULT_MAX_TOKENS = 16


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


def stream_events(response: Any, prompts: Sequence[str]) -> list[GenerationResult] | None:
    """A gRPC stream result as per-row deltas; None for the empty response that only marks the end."""
    if not response.get_response().outputs:
        return None
    return parse_results(prompts, response.as_numpy)


def is_final(response: Any) -> bool:
    flag = response.get_response().parameters.get("triton_final_response")
    return flag is not None and flag.bool_param


class TextClient:
    """Raw text in, raw text out, against a Triton text ensemble.

    `url` is "host[:port]" (default localhost:8000 for http, localhost:8001 for grpc); `timeout_s` bounds each
    request (and, in a stream, the wait for each next response); `retries` extra attempts on connection errors.
    """

    def __init__(self, url: str | None = None, protocol: str = "http", model: str = "ensemble",
                 timeout_s: float = 60.0, retries: int = 3, backoff_s: float = 0.25):
        self.config = ConnectionConfig.create(url, protocol, model, timeout_s, retries, backoff_s)
        self._backend: Any = None
        self._info: ModelInfo | None = None

    # -- plumbing ----------------------------------------------------------------------------------------------
    @property
    def _client(self) -> Any:
        if self._backend is None:
            cfg = self.config
            if cfg.protocol == "http":
                import tritonclient.http as triton_http  # noqa: PLC0415  (heavy: only the chosen protocol)
                self._backend = triton_http.InferenceServerClient(cfg.url, connection_timeout=cfg.timeout_s,
                                                                  network_timeout=cfg.timeout_s)
            else:
                import tritonclient.grpc as triton_grpc  # noqa: PLC0415
                self._backend = triton_grpc.InferenceServerClient(cfg.url)
        return self._backend

    def _call(self, action: Callable[[], T]) -> T:
        """Run an idempotent call, retrying connection failures with exponential backoff."""
        attempt = 0
        while True:
            try:
                return action()
            except Exception as raw:  # noqa: BLE001  (every transport error is translated below)
                err = translate_error(raw, self.config)
                if not isinstance(err, ServerUnavailableError):
                    raise err from raw
                attempt += 1
                if attempt > self.config.retries:
                    raise gave_up(self.config, err) from raw
                time.sleep(log_retry(self.config, attempt, err))

    @property
    def model_info(self) -> ModelInfo:
        """The served model's inputs, batching and transaction policy (read once)."""
        if self._info is None:
            cfg = self.config
            if cfg.protocol == "http":
                config = self._call(lambda: self._client.get_model_config(cfg.model))
            else:
                config = self._call(lambda: self._client.get_model_config(cfg.model, as_json=True,
                                                                          client_timeout=cfg.timeout_s))
            self._info = ModelInfo.from_config(config)
            check_batching(self._info)
        return self._info

    def _infer_inputs(self, tensors: list[InputTensor]) -> list[Any]:
        if self.config.protocol == "http":
            import tritonclient.http as module  # noqa: PLC0415
        else:
            import tritonclient.grpc as module  # type: ignore[no-redef]  # noqa: PLC0415
        inputs = []
        for tensor in tensors:
            item = module.InferInput(tensor.name, list(tensor.data.shape), tensor.datatype)
            item.set_data_from_numpy(tensor.data)
            inputs.append(item)
        return inputs

    # -- one request -------------------------------------------------------------------------------------------
    def _infer(self, request: TextRequest) -> list[GenerationResult]:
        cfg = self.config
        inputs = self._infer_inputs(request.tensors(self.model_info))
        if cfg.protocol == "http":
            result = self._call(lambda: self._client.infer(cfg.model, inputs))
        else:
            result = self._call(lambda: self._client.infer(cfg.model, inputs, client_timeout=cfg.timeout_s))
        return parse_results(request.prompts, result.as_numpy)

    def _stream_request(self, request: TextRequest) -> Iterator[list[GenerationResult]]:
        """Per-row deltas of each response of one streamed request."""
        if self.config.protocol == "http":
            return self._http_stream(request)
        return self._grpc_stream(request)

    def _http_stream(self, request: TextRequest) -> Iterator[list[GenerationResult]]:
        cfg = self.config
        body = json.dumps(request.generate_body(self.model_info)).encode("utf-8")

        def open_stream() -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
            connection = http.client.HTTPConnection(cfg.host, cfg.port, timeout=cfg.timeout_s)
            try:
                connection.request("POST", cfg.generate_stream_path, body=body,
                                   headers={"Content-Type": "application/json", "Accept": "text/event-stream"})
                response = connection.getresponse()
                if response.status != 200:
                    raise error_from_body(response.status, response.read())
            except BaseException:
                connection.close()
                raise
            return connection, response

        connection, response = self._call(open_stream)
        parser = SseParser()
        try:
            for raw_line in response:
                event = parser.feed(raw_line.decode("utf-8", errors="replace"))
                if event is not None:
                    yield parse_results(request.prompts, event.get)
            event = parser.close()
            if event is not None:
                yield parse_results(request.prompts, event.get)
        except (OSError, http.client.HTTPException) as err:
            raise translate_error(err, cfg) from err
        finally:
            connection.close()

    def _grpc_stream(self, request: TextRequest) -> Iterator[list[GenerationResult]]:
        cfg = self.config
        inputs = self._infer_inputs(request.tensors(self.model_info))
        attempt = 0
        while True:
            events: queue.Queue[tuple[Any, Any]] = queue.Queue()
            self._client.start_stream(callback=lambda result, error: events.put((result, error)))
            finished, delay = False, 0.0
            try:
                try:
                    self._client.async_stream_infer(cfg.model, inputs, enable_empty_final_response=True)
                except InferenceServerException as err:
                    # A stream that failed to connect refuses the send; its callback already got the real error.
                    try:
                        events.put(events.get(timeout=1.0))
                    except queue.Empty:
                        events.put((None, err))
                received = 0
                while True:
                    try:
                        result, error = events.get(timeout=cfg.timeout_s)
                    except queue.Empty:
                        raise timed_out(cfg) from None
                    if error is not None:
                        retry, err = stream_failure(error, cfg, received, attempt)
                        if not retry:
                            raise err
                        attempt += 1
                        delay = log_retry(cfg, attempt, err)
                        break
                    received += 1
                    deltas = stream_events(result, request.prompts)
                    if deltas is not None:
                        yield deltas
                    if is_final(result):
                        finished = True
                        return
            finally:
                # Cancel what is still running when the consumer stops early or an error ends the stream.
                self._client.stop_stream(cancel_requests=not finished)
            time.sleep(delay)

    # -- public API --------------------------------------------------------------------------------------------
    @overload
    def generate(self, prompt: str, max_tokens: int = ..., **sampling: Any) -> GenerationResult: ...

    @overload
    def generate(self, prompt: Sequence[str], max_tokens: int = ..., **sampling: Any) -> list[GenerationResult]: ...

    def generate(self, prompt: str | Sequence[str], max_tokens: int = DEFAULT_MAX_TOKENS,
                 **sampling: Any) -> GenerationResult | list[GenerationResult]:
        """Complete one prompt, or a list of prompts sent as one request of B rows (split at max_batch_size).

        `sampling`: top_k, top_p, temperature, repetition_penalty, presence_penalty, min_tokens, len_penalty,
        beam_width, random_seed (or seed), end_id, pad_id, return_log_probs, exclude_input_in_output,
        stop_words (or stop), bad_words. Only the options given are sent.
        """
        single = isinstance(prompt, str)
        prompts: tuple[str, ...] = (prompt,) if single else tuple(prompt)
        params = SamplingParams.from_kwargs(**sampling)
        info = self.model_info
        results: list[GenerationResult] = []
        for rows in batches(prompts, rows_per_request(info, self.config.protocol, params)):
            request = TextRequest(rows, max_tokens, params, stream=False)
            if info.decoupled:
                merged = empty_results(rows)
                for deltas in self._stream_request(request):
                    merged = [total.merged(delta) for total, delta in zip(merged, deltas)]
                results += merged
            else:
                results += self._infer(request)
        return results[0] if single else results

    def stream(self, prompt: str, max_tokens: int = DEFAULT_MAX_TOKENS, **sampling: Any) -> Iterator[str]:
        """The continuation of one prompt, piece by piece as the server sends it (one piece if not streaming)."""
        if not isinstance(prompt, str):
            raise TypeError("stream() takes one prompt (a str)")
        request = TextRequest((prompt,), max_tokens, SamplingParams.from_kwargs(**sampling), stream=True)
        for deltas in self._stream_request(request):
            if deltas[0].text:
                yield deltas[0].text

    def generate_many(self, prompts: Sequence[str], max_tokens: int = DEFAULT_MAX_TOKENS, concurrency: int = 4,
                      return_exceptions: bool = False,
                      **sampling: Any) -> list[GenerationResult | TextClientError]:
        """One request per prompt, `concurrency` in flight at once; results in the order of `prompts`.

        With `return_exceptions`, a failed prompt's slot holds its `TextClientError` instead of raising.
        """
        from .async_client import AsyncTextClient  # noqa: PLC0415  (asyncio machinery only when needed)

        cfg = self.config

        async def run() -> list[GenerationResult | TextClientError]:
            async with AsyncTextClient(cfg.url, cfg.protocol, cfg.model, cfg.timeout_s, cfg.retries,
                                       cfg.backoff_s) as client:
                return await client.generate_many(prompts, max_tokens, concurrency, return_exceptions, **sampling)

        return run_coroutine_blocking(run)

    def close(self) -> None:
        if self._backend is not None:
            self._backend.close()
            self._backend = None

    def __enter__(self) -> "TextClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def run_coroutine_blocking(factory: Callable[[], Any]) -> Any:
    """asyncio.run, also from code that already runs inside an event loop (then on a helper thread)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(factory())
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = asyncio.run(factory())
        except BaseException as err:  # noqa: BLE001  (re-raised in the caller's thread)
            outcome["error"] = err

    thread = threading.Thread(target=target, name="client-generate-many")
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]
