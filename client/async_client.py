"""asyncio twin of `TextClient`, on tritonclient's aio modules (HTTP via aiohttp, gRPC via grpc.aio).

Each `stream()` opens its own gRPC stream / HTTP request, so many streams can run concurrently on one client.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

from .connection import ConnectionConfig, gave_up, log_retry, stream_failure, timed_out, translate_error
from .errors import ServerUnavailableError, TextClientError
from .request import GenerationResult, InputTensor, ModelInfo, SamplingParams, TextRequest, empty_results, \
    parse_results
from .sse import SseParser, error_from_body
from .text_client import DEFAULT_MAX_TOKENS, batches, check_batching, is_final, rows_per_request, stream_events

T = TypeVar("T")


class AsyncTextClient:
    """Same arguments and methods as `TextClient`; methods are coroutines and `stream()` an async iterator."""

    def __init__(self, url: str | None = None, protocol: str = "http", model: str = "ensemble",
                 timeout_s: float = 60.0, retries: int = 3, backoff_s: float = 0.25):
        self.config = ConnectionConfig.create(url, protocol, model, timeout_s, retries, backoff_s)
        self._backend: Any = None
        self._session: Any = None  # aiohttp session for /generate_stream
        self._info: ModelInfo | None = None
        self._info_lock: asyncio.Lock | None = None

    @property
    def _client(self) -> Any:
        # Created lazily: the aio clients want a running event loop.
        if self._backend is None:
            cfg = self.config
            if cfg.protocol == "http":
                import tritonclient.http.aio as triton_http  # noqa: PLC0415
                self._backend = triton_http.InferenceServerClient(cfg.url, conn_timeout=cfg.timeout_s)
            else:
                import tritonclient.grpc.aio as triton_grpc  # noqa: PLC0415
                self._backend = triton_grpc.InferenceServerClient(cfg.url)
        return self._backend

    async def _call(self, action: Callable[[], Awaitable[T]]) -> T:
        """Await an idempotent call under the timeout, retrying connection failures with exponential backoff."""
        attempt = 0
        while True:
            try:
                return await asyncio.wait_for(action(), self.config.timeout_s)
            except Exception as raw:  # noqa: BLE001  (every transport error is translated below)
                err = translate_error(raw, self.config)
                if not isinstance(err, ServerUnavailableError):
                    raise err from raw
                attempt += 1
                if attempt > self.config.retries:
                    raise gave_up(self.config, err) from raw
                await asyncio.sleep(log_retry(self.config, attempt, err))

    async def model_info(self) -> ModelInfo:
        if self._info is None:
            self._info_lock = self._info_lock or asyncio.Lock()
            async with self._info_lock:
                if self._info is None:
                    cfg = self.config
                    if cfg.protocol == "http":
                        config = await self._call(lambda: self._client.get_model_config(cfg.model))
                    else:
                        config = await self._call(lambda: self._client.get_model_config(cfg.model, as_json=True))
                    info = ModelInfo.from_config(config)
                    check_batching(info)
                    self._info = info
        return self._info  # type: ignore[return-value]

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

    async def _infer(self, request: TextRequest) -> list[GenerationResult]:
        inputs = self._infer_inputs(request.tensors(await self.model_info()))
        result = await self._call(lambda: self._client.infer(self.config.model, inputs))
        return parse_results(request.prompts, result.as_numpy)

    async def _stream_request(self, request: TextRequest) -> AsyncIterator[list[GenerationResult]]:
        if self.config.protocol == "http":
            async for deltas in self._http_stream(request):
                yield deltas
        else:
            async for deltas in self._grpc_stream(request):
                yield deltas

    async def _http_stream(self, request: TextRequest) -> AsyncIterator[list[GenerationResult]]:
        import aiohttp  # noqa: PLC0415

        cfg = self.config
        body = request.generate_body(await self.model_info())
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(
                sock_connect=cfg.timeout_s, sock_read=cfg.timeout_s))

        async def open_stream() -> Any:
            response = await self._session.post(f"http://{cfg.url}{cfg.generate_stream_path}", data=json.dumps(body),
                                                headers={"Content-Type": "application/json",
                                                         "Accept": "text/event-stream"})
            if response.status != 200:
                payload = await response.read()
                response.release()
                raise error_from_body(response.status, payload)
            return response

        response = await self._call(open_stream)
        parser = SseParser()
        try:
            async for raw_line in response.content:
                event = parser.feed(raw_line.decode("utf-8", errors="replace"))
                if event is not None:
                    yield parse_results(request.prompts, event.get)
            event = parser.close()
            if event is not None:
                yield parse_results(request.prompts, event.get)
        except (OSError, asyncio.TimeoutError, aiohttp.ClientError) as err:
            raise translate_error(err, cfg) from err
        finally:
            response.release()

    async def _grpc_stream(self, request: TextRequest) -> AsyncIterator[list[GenerationResult]]:
        cfg = self.config
        inputs = self._infer_inputs(request.tensors(await self.model_info()))
        attempt = 0
        while True:
            async def requests() -> AsyncIterator[dict[str, Any]]:
                yield {"model_name": cfg.model, "inputs": inputs, "enable_empty_final_response": True}

            responses = self._client.stream_infer(requests())
            received = 0
            retry_delay = None
            try:
                while True:
                    try:
                        result, error = await asyncio.wait_for(responses.__anext__(), cfg.timeout_s)
                    except StopAsyncIteration:
                        return
                    except asyncio.TimeoutError:
                        raise timed_out(cfg) from None
                    except Exception as raw:  # noqa: BLE001
                        result, error = None, raw
                    if error is not None:
                        retry, err = stream_failure(error, cfg, received, attempt)
                        if not retry:
                            raise err
                        attempt += 1
                        retry_delay = log_retry(cfg, attempt, err)
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
        prompts: tuple[str, ...] = (prompt,) if single else tuple(prompt)
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
                return await self.generate(prompt, max_tokens, **sampling)  # type: ignore[return-value]

        tasks = [asyncio.ensure_future(one(prompt)) for prompt in prompts]
        try:
            outcomes = await asyncio.gather(*tasks, return_exceptions=return_exceptions)
        finally:
            for task in tasks:
                task.cancel()
        if return_exceptions:
            for outcome in outcomes:
                if isinstance(outcome, BaseException) and not isinstance(outcome, TextClientError):
                    raise outcome
        return list(outcomes)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._backend is not None:
            await self._backend.close()
            self._backend = None

    async def __aenter__(self) -> "AsyncTextClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
