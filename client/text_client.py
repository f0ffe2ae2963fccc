"""Synchronous text client for the ensemble: generate, stream, generate_many over HTTP or gRPC.

`generate()` on a streaming (decoupled) repository goes through the streaming transport and joins the deltas,
because Triton's plain infer endpoints reject decoupled models. Connection failures are retried with exponential
backoff; a server's answer (4xx, model error) never is. One client is not meant to be shared between threads; use
`generate_many` (or `AsyncTextClient`) for concurrency.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar, overload

import httpx
from tritonclient.utils import InferenceServerException

from .connection import ConnectionConfig, timed_out, translate_error
from .errors import TextClientError
from .request import GenerationResult, ModelInfo, SamplingParams, TextRequest, empty_results, parse_results
from .sse import SseParser
from .transport import (DEFAULT_MAX_TOKENS, Attempts, HttpRequest, batches, check_batching, generate_stream_request,
                        infer_inputs, infer_request, infer_result, is_final, model_config_request, read_json,
                        rows_per_request, stream_events)

T = TypeVar("T")


class TextClient:
    """Raw text in, raw text out, against a Triton text ensemble.

    `url` is "host[:port]" (default localhost:8000 for http, localhost:8001 for grpc); `timeout_s` bounds each
    request (and, in a stream, the wait for each next response); `retries` extra attempts on connection errors.
    """

    def __init__(self, url: str | None = None, protocol: str = "http", model: str = "ensemble",
                 timeout_s: float = 60.0, retries: int = 3, backoff_s: float = 0.25):
        self.config = ConnectionConfig.create(url, protocol, model, timeout_s, retries, backoff_s)
        self._http_client: httpx.Client | None = None
        self._grpc_client: Any = None
        self._info: ModelInfo | None = None

    # -- plumbing ----------------------------------------------------------------------------------------------
    @property
    def _http(self) -> httpx.Client:
        if self._http_client is None:
            self._http_client = httpx.Client(base_url=f"http://{self.config.url}", timeout=self.config.timeout_s)
        return self._http_client

    @property
    def _grpc(self) -> Any:
        if self._grpc_client is None:
            import tritonclient.grpc as triton_grpc  # heavy: only the chosen protocol
            self._grpc_client = triton_grpc.InferenceServerClient(self.config.url)
        return self._grpc_client

    def _send(self, request: HttpRequest) -> httpx.Response:
        return self._http.request(request.method, request.path, content=request.body, headers=request.headers)

    def _call(self, action: Callable[[], T]) -> T:
        """Run an idempotent call, retrying connection failures (see `Attempts`)."""
        attempts = Attempts(self.config)
        while True:
            try:
                return action()
            except Exception as raw:  # noqa: BLE001  (every transport error is translated by Attempts)
                time.sleep(attempts.after(raw))

    @property
    def model_info(self) -> ModelInfo:
        """The served model's inputs, batching and transaction policy (read once)."""
        if self._info is None:
            cfg = self.config
            if cfg.protocol == "http":
                def fetch() -> Any:
                    response = self._send(model_config_request(cfg))
                    return read_json(cfg, response.status_code, response.content)
                config = self._call(fetch)
            else:
                config = self._call(lambda: self._grpc.get_model_config(cfg.model, as_json=True,
                                                                        client_timeout=cfg.timeout_s))
            self._info = ModelInfo.from_config(config)
            check_batching(self._info)
        return self._info

    # -- one request -------------------------------------------------------------------------------------------
    def _infer(self, request: TextRequest) -> list[GenerationResult]:
        cfg = self.config
        tensors = request.tensors(self.model_info)
        if cfg.protocol == "http":
            http_request = infer_request(cfg, tensors)

            def infer() -> Any:
                response = self._send(http_request)
                return infer_result(cfg, response.status_code, response.headers, response.content)
            result = self._call(infer)
        else:
            inputs = infer_inputs(cfg.protocol, tensors)
            result = self._call(lambda: self._grpc.infer(cfg.model, inputs, client_timeout=cfg.timeout_s))
        return parse_results(request.prompts, result.as_numpy)

    def _stream_request(self, request: TextRequest) -> Iterator[list[GenerationResult]]:
        """Per-row deltas of each response of one streamed request."""
        if self.config.protocol == "http":
            return self._http_stream(request)
        return self._grpc_stream(request)

    def _http_stream(self, request: TextRequest) -> Iterator[list[GenerationResult]]:
        cfg = self.config
        http_request = generate_stream_request(cfg, request.generate_body(self.model_info))

        def open_stream() -> httpx.Response:
            response = self._http.send(self._http.build_request(
                http_request.method, http_request.path, content=http_request.body, headers=http_request.headers),
                stream=True)
            try:
                if response.status_code != 200:
                    read_json(cfg, response.status_code, response.read())
            except BaseException:
                response.close()
                raise
            return response

        response = self._call(open_stream)
        parser = SseParser()
        try:
            for line in response.iter_lines():
                event = parser.feed(line)
                if event is not None:
                    yield parse_results(request.prompts, event.get)
            event = parser.close()
            if event is not None:
                yield parse_results(request.prompts, event.get)
        except httpx.HTTPError as err:  # a stream that has begun is never retried: its text would repeat
            raise translate_error(err, cfg) from err
        finally:
            response.close()

    def _grpc_stream(self, request: TextRequest) -> Iterator[list[GenerationResult]]:
        cfg = self.config
        inputs = infer_inputs(cfg.protocol, request.tensors(self.model_info))
        attempts = Attempts(cfg)
        while True:
            events: queue.Queue[tuple[Any, Any]] = queue.Queue()
            self._grpc.start_stream(callback=lambda result, error, events=events: events.put((result, error)))
            finished, delay = False, 0.0
            try:
                try:
                    self._grpc.async_stream_infer(cfg.model, inputs, enable_empty_final_response=True)
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
                        delay = attempts.after(error, received)  # raises unless the stream may start again
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
                self._grpc.stop_stream(cancel_requests=not finished)
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
        prompts: tuple[str, ...] = (prompt,) if isinstance(prompt, str) else tuple(prompt)
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
        from .async_client import AsyncTextClient  # asyncio machinery only when needed

        cfg = self.config

        async def run() -> list[GenerationResult | TextClientError]:
            async with AsyncTextClient(cfg.url, cfg.protocol, cfg.model, cfg.timeout_s, cfg.retries,
                                       cfg.backoff_s) as client:
                return await client.generate_many(prompts, max_tokens, concurrency, return_exceptions, **sampling)

        return run_coroutine_blocking(run)

    def close(self) -> None:
        if self._http_client is not None:
            self._http_client.close()
            self._http_client = None
        if self._grpc_client is not None:
            self._grpc_client.close()
            self._grpc_client = None

    def __enter__(self) -> TextClient:
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
