"""asyncio counterpart of `TextClient`: HTTP through `httpx.AsyncClient`, gRPC through tritonclient's grpc.aio.

Each `stream()` opens its own gRPC stream / HTTP request, so many streams can run concurrently on one client.
Request building, answer reading and the retry policy come from `transport`, shared with the sync client.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

import httpx

from .connection import ConnectionConfig, timed_out, translate_error
from .errors import TextClientError
from .request import GenerationResult, ModelInfo, SamplingParams, TextRequest, empty_results, parse_results
from .sse import SseParser
from .transport import (DEFAULT_MAX_TOKENS, Attempts, HttpRequest, batches, check_batching, generate_stream_request,
                        infer_inputs, infer_request, infer_result, is_final, model_config_request, read_json,
                        rows_per_request, stream_events)

T = TypeVar("T")


class AsyncTextClient:
    """Same arguments and methods as `TextClient`; methods are coroutines and `stream()` an async iterator."""

    def __init__(self, url: str | None = None, protocol: str = "http", model: str = "ensemble",
                 timeout_s: float = 60.0, retries: int = 3, backoff_s: float = 0.25):
        self.config = ConnectionConfig.create(url, protocol, model, timeout_s, retries, backoff_s)
        self._http_client: httpx.AsyncClient | None = None
        self._grpc_client: Any = None
        self._info: ModelInfo | None = None
        self._info_lock: asyncio.Lock | None = None

    # Both are created lazily: the aio clients want a running event loop.
    @property
    def _http(self) -> httpx.AsyncClient:
        if self._http_client is None:
            # No pool limit: the callers' concurrency is the bound, and waiting for a pooled connection past the
            # timeout would surface as httpx.PoolTimeout instead of queueing.
            self._http_client = httpx.AsyncClient(base_url=f"http://{self.config.url}", timeout=self.config.timeout_s,
                                                  limits=httpx.Limits(max_connections=None))
        return self._http_client

    @property
    def _grpc(self) -> Any:
        if self._grpc_client is None:
            import tritonclient.grpc.aio as triton_grpc  # heavy: only the chosen protocol
            self._grpc_client = triton_grpc.InferenceServerClient(self.config.url)
        return self._grpc_client

    async def _send(self, request: HttpRequest) -> httpx.Response:
        return await self._http.request(request.method, request.path, content=request.body, headers=request.headers)

    async def _call(self, action: Callable[[], Awaitable[T]]) -> T:
        """Await an idempotent call under the timeout, retrying connection failures (see `Attempts`)."""
        attempts = Attempts(self.config)
        while True:
            try:
                return await asyncio.wait_for(action(), self.config.timeout_s)
            except Exception as raw:  # noqa: BLE001  (every transport error is translated by Attempts)
                await asyncio.sleep(attempts.after(raw))

    async def model_info(self) -> ModelInfo:
        if self._info is None:
            self._info_lock = self._info_lock or asyncio.Lock()
            async with self._info_lock:
                if self._info is None:
                    cfg = self.config
                    if cfg.protocol == "http":
                        async def fetch() -> Any:
                            response = await self._send(model_config_request(cfg))
                            return read_json(cfg, response.status_code, response.content)
                        config = await self._call(fetch)
                    else:
                        config = await self._call(lambda: self._grpc.get_model_config(cfg.model, as_json=True))
                    info = ModelInfo.from_config(config)
                    check_batching(info)
                    self._info = info
        assert self._info is not None  # set above, under the lock
        return self._info

    async def _infer(self, request: TextRequest) -> list[GenerationResult]:
        cfg = self.config
        tensors = request.tensors(await self.model_info())
        if cfg.protocol == "http":
            http_request = infer_request(cfg, tensors)

            async def infer() -> Any:
                response = await self._send(http_request)
                return infer_result(cfg, response.status_code, response.headers, response.content)
            result = await self._call(infer)
        else:
            inputs = infer_inputs(cfg.protocol, tensors)
            result = await self._call(lambda: self._grpc.infer(cfg.model, inputs))
        return parse_results(request.prompts, result.as_numpy)

    async def _stream_request(self, request: TextRequest) -> AsyncIterator[list[GenerationResult]]:
        if self.config.protocol == "http":
            async for deltas in self._http_stream(request):
                yield deltas
        else:
            async for deltas in self._grpc_stream(request):
                yield deltas

    async def _http_stream(self, request: TextRequest) -> AsyncIterator[list[GenerationResult]]:
        cfg = self.config
        http_request = generate_stream_request(cfg, request.generate_body(await self.model_info()))

        async def open_stream() -> httpx.Response:
            response = await self._http.send(self._http.build_request(
                http_request.method, http_request.path, content=http_request.body, headers=http_request.headers),
                stream=True)
            try:
                if response.status_code != 200:
                    read_json(cfg, response.status_code, await response.aread())
            except BaseException:
                await response.aclose()
                raise
            return response

        response = await self._call(open_stream)
        parser = SseParser()
        try:
            async for line in response.aiter_lines():
                event = parser.feed(line)
                if event is not None:
                    yield parse_results(request.prompts, event.get)
            event = parser.close()
            if event is not None:
                yield parse_results(request.prompts, event.get)
        except httpx.HTTPError as err:  # a stream that has begun is never retried: its text would repeat
            raise translate_error(err, cfg) from err
        finally:
            await response.aclose()

    async def _grpc_stream(self, request: TextRequest) -> AsyncIterator[list[GenerationResult]]:
        cfg = self.config
        inputs = infer_inputs(cfg.protocol, request.tensors(await self.model_info()))
        attempts = Attempts(cfg)
        while True:
            async def requests() -> AsyncIterator[dict[str, Any]]:
                yield {"model_name": cfg.model, "inputs": inputs, "enable_empty_final_response": True}

            responses = self._grpc.stream_infer(requests())
            received = 0
            retry_delay = 0.0
            try:
                while True:
                    try:
                        result, error = await asyncio.wait_for(responses.__anext__(), cfg.timeout_s)
                    except StopAsyncIteration:
                        return
                    except asyncio.TimeoutError:
                        raise timed_out(cfg) from None
                    except Exception as raw:  # noqa: BLE001  (handled as the stream's error below)
                        result, error = None, raw
                    if error is not None:
                        retry_delay = attempts.after(error, received)  # raises unless the stream may start again
                        break
                    received += 1
                    deltas = stream_events(result, request.prompts)
                    if deltas is not None:
                        yield deltas
                    if is_final(result):
                        return
            finally:
                # Ends the call; the server then cancels whatever is still running (no-op once it is complete).
                responses.cancel()
            await asyncio.sleep(retry_delay)

    # -- public API --------------------------------------------------------------------------------------------
    async def generate(self, prompt: str | Sequence[str], max_tokens: int = DEFAULT_MAX_TOKENS,
                       **sampling: Any) -> GenerationResult | list[GenerationResult]:
        """See `TextClient.generate`."""
        single = isinstance(prompt, str)
        prompts: tuple[str, ...] = (prompt,) if isinstance(prompt, str) else tuple(prompt)
        params = SamplingParams.from_kwargs(**sampling)
        info = await self.model_info()
        results: list[GenerationResult] = []
        for rows in batches(prompts, rows_per_request(info, self.config.protocol, params)):
            request = TextRequest(rows, max_tokens, params, stream=False)
            if info.decoupled:
                merged = empty_results(rows)
                async for deltas in self._stream_request(request):
                    merged = [total.merged(delta) for total, delta in zip(merged, deltas)]
                results += merged
            else:
                results += await self._infer(request)
        return results[0] if single else results

    async def stream(self, prompt: str, max_tokens: int = DEFAULT_MAX_TOKENS, **sampling: Any) -> AsyncIterator[str]:
        """See `TextClient.stream`."""
        if not isinstance(prompt, str):
            raise TypeError("stream() takes one prompt (a str)")
        request = TextRequest((prompt,), max_tokens, SamplingParams.from_kwargs(**sampling), stream=True)
        async for deltas in self._stream_request(request):
            if deltas[0].text:
                yield deltas[0].text

    async def generate_many(self, prompts: Sequence[str], max_tokens: int = DEFAULT_MAX_TOKENS, concurrency: int = 4,
                            return_exceptions: bool = False,
                            **sampling: Any) -> list[GenerationResult | TextClientError]:
        """See `TextClient.generate_many`."""
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        SamplingParams.from_kwargs(**sampling)  # fail fast on a bad option, before any request
        await self.model_info()
        gate = asyncio.Semaphore(concurrency)

        async def one(prompt: str) -> GenerationResult:
            async with gate:
                return await self.generate(prompt, max_tokens, **sampling)  # type: ignore[return-value]  # one prompt

        tasks = [asyncio.ensure_future(one(prompt)) for prompt in prompts]
        try:
            outcomes = await asyncio.gather(*tasks, return_exceptions=return_exceptions)
        finally:
            for task in tasks:
                task.cancel()
        results: list[GenerationResult | TextClientError] = []
        for outcome in outcomes:
            if isinstance(outcome, TextClientError) or not isinstance(outcome, BaseException):
                results.append(outcome)
            else:  # not the client's own error (only with return_exceptions: gather raises them otherwise)
                raise outcome
        return results

    async def close(self) -> None:
        if self._http_client is not None:
            await self._http_client.aclose()
            self._http_client = None
        if self._grpc_client is not None:
            await self._grpc_client.close()
            self._grpc_client = None

    async def __aenter__(self) -> AsyncTextClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
