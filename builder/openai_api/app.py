"""The OpenAI-compatible HTTP API (FastAPI): /v1/models, /v1/completions, /v1/chat/completions.

Every error, ours or FastAPI's, leaves in OpenAI's shape `{"error": {"message", "type", "param", "code"}}`; a bad
field is a 400 naming it (FastAPI's 422 would surface as UnprocessableEntityError in OpenAI's clients).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from client.request import GenerationResult

from .backend import TritonBackend
from .chat_template import ChatTemplate
from .protocol import DEFAULT_MAX_TOKENS, ApiError, ChatCompletionRequest, CompletionRequest, _Sampling

T = TypeVar("T")
DEFAULT_MAX_BODY_BYTES = 1 << 20
# pydantic's names for the branches of a union, which are not part of the field's path.
_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


@dataclass(frozen=True)
class ApiSettings:
    """What the API server needs; validated by the caller (serve_cli) before it binds anything."""

    triton_grpc_url: str
    model: str = "ensemble"
    api_key: str | None = None
    chat_template: Path | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    timeout_s: float = 300.0


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes gets a 413 before any handler sees it. The body is read
    here (bounded) and replayed, so neither a lying Content-Length nor a chunked upload gets past it."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            await self._refuse(send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left while uploading
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await self._refuse(send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # after the body: http.disconnect when the client goes away

        await self.app(scope, replay, send)

    async def _refuse(self, send: Send) -> None:
        error = ApiError(413, f"request body larger than {self.limit} bytes", code="request_too_large")
        await JSONResponse(error.body(), status_code=413)({"type": "http"}, _no_receive, send)


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}


def _validation_error(err: RequestValidationError) -> ApiError:
    first = err.errors()[0]
    path = [str(p) for p in first.get("loc", ()) if p != "body" and str(p) not in _TYPE_TAGS
            and "[" not in str(p) and not str(p)[:1].isupper() and not str(p).startswith("function-")]
    param = ".".join(path) or None
    message = str(first.get("msg", "invalid value"))
    kind = first.get("type")
    if kind == "extra_forbidden":
        message = "unknown or unsupported field"
    elif kind == "json_invalid":
        param, message = None, f"the body is not valid JSON ({first.get('ctx', {}).get('error', message)})"
    elif message.startswith("Value error, "):
        message = message[len("Value error, "):]
        field, sep, rest = message.partition(": ")
        if sep and " " not in field:  # our own validators say "field: reason"
            param, message = field, rest
    return ApiError(400, f"{param}: {message}" if param else message, param=param, code="invalid_value")


def create_app(settings: ApiSettings, backend: TritonBackend | None = None) -> FastAPI:
    backend = backend or TritonBackend(settings.triton_grpc_url, settings.model, settings.timeout_s)
    template = ChatTemplate.load(settings.chat_template)
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await backend.close()  # the gRPC channel belongs to the serving event loop

    app = FastAPI(title="gpt-triton OpenAI-compatible API", docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=lifespan)
    app.state.backend = backend
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)

    @app.exception_handler(ApiError)
    async def api_error(_: Request, err: ApiError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, err: RequestValidationError) -> JSONResponse:
        error = _validation_error(err)
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, err: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code)
        return JSONResponse(ApiError(err.status_code, str(err.detail), code=code).body(), status_code=err.status_code)

    async def authorized(request: Request) -> None:
        if settings.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), settings.api_key.encode()):
            raise ApiError(401, "missing or wrong API key (send 'Authorization: Bearer <key>')",
                           code="invalid_api_key")

    def check_model(name: str) -> None:
        if name != backend.model:
            raise ApiError(404, f"model: '{name}' does not exist; this server serves '{backend.model}'",
                           param="model", code="model_not_found")

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(backend.model, created)]}

    @app.get("/v1/models/{name}", dependencies=[Depends(authorized)])
    async def model(name: str) -> dict[str, Any]:
        check_model(name)
        return _model_card(name, created)

    @app.post("/v1/completions", dependencies=[Depends(authorized)], response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> Any:
        check_model(body.model)
        inputs = await _inputs(backend, body, want_log_probs=body.logprobs is not None)
        job = _Job(backend, body.prompts, body.max_tokens or DEFAULT_MAX_TOKENS, inputs, "prompt", body.stream)
        ids = ("cmpl-" + uuid.uuid4().hex, int(time.time()))
        if body.stream:
            return await _stream(job, lambda i, text, reason: _completion_chunk(ids, body.model, i, text, reason),
                                 lambda usage: _chunk_base(ids, body.model, "text_completion") | {"choices": [],
                                                                                                   "usage": usage},
                                 body.include_usage)
        results = await _until_disconnected(request, job.collect())
        choices = [{"index": i, "text": r.text, "finish_reason": job.finish_reason(r),
                    "logprobs": _logprobs(r) if body.logprobs is not None else None} for i, r in enumerate(results)]
        return _chunk_base(ids, body.model, "text_completion") | {"choices": choices, "usage": _usage(results)}

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)], response_model=None)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        check_model(body.model)
        prompt = template.render(body.messages)
        inputs = await _inputs(backend, body, want_log_probs=False)
        job = _Job(backend, (prompt,), body.token_limit, inputs, "messages", body.stream)
        ids = ("chatcmpl-" + uuid.uuid4().hex, int(time.time()))
        if body.stream:
            return await _stream(job, lambda i, text, reason: _chat_chunk(ids, body.model, text, reason),
                                 lambda usage: _chunk_base(ids, body.model, "chat.completion.chunk") | {
                                     "choices": [], "usage": usage},
                                 body.include_usage, first=_chat_chunk(ids, body.model, None, None))
        [result] = await _until_disconnected(request, job.collect())
        message = {"role": "assistant", "content": result.text}
        return _chunk_base(ids, body.model, "chat.completion") | {
            "choices": [{"index": 0, "message": message, "finish_reason": job.finish_reason(result), "logprobs": None}],
            "usage": _usage([result])}

    return app


async def _inputs(backend: TritonBackend, body: _Sampling, want_log_probs: bool) -> dict[str, object]:
    """Ensemble input -> value, after refusing fields this repository has no input for."""
    fields = body.sampling()
    if want_log_probs:
        fields["logprobs"] = ("return_log_probs", True)
    await backend.check_supported(fields)
    return dict(fields.values())


class _Job:
    """One OpenAI request: a Triton request per prompt, run concurrently."""

    def __init__(self, backend: TritonBackend, prompts: tuple[str, ...], max_tokens: int,
                 inputs: dict[str, object], prompt_field: str, stream: bool) -> None:
        self.backend, self.prompts, self.max_tokens = backend, prompts, max_tokens
        self.inputs, self.prompt_field, self.stream = inputs, prompt_field, stream

    def finish_reason(self, result: GenerationResult) -> str:
        if result.finish_reason in ("stop", "length"):
            return result.finish_reason
        # Repositories that do not report it: the token budget tells.
        return "length" if (result.num_output_tokens or 0) >= self.max_tokens else "stop"

    def deltas(self, index: int) -> AsyncGenerator[GenerationResult, None]:
        return self.backend.generate(self.prompts[index], self.max_tokens, self.inputs, self.stream,
                                     self.prompt_field if len(self.prompts) == 1 else f"{self.prompt_field}")

    async def collect(self) -> list[GenerationResult]:
        async def one(index: int) -> GenerationResult:
            total = GenerationResult(prompt=self.prompts[index], text="")
            async with contextlib.aclosing(self.deltas(index)) as deltas:
                async for delta in deltas:
                    total = total.merged(delta)
            return total

        tasks = [asyncio.ensure_future(one(i)) for i in range(len(self.prompts))]
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            for task in tasks:
                task.cancel()


async def _until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """`work`, cancelled (and with it its Triton requests) if the HTTP client goes away first."""
    task = asyncio.ensure_future(work)

    async def client_left() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(client_left())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            task.cancel()
            raise ApiError(499, "the client closed the connection", code="client_closed")
        return task.result()
    finally:
        watcher.cancel()
        task.cancel()


_DONE = object()


async def _stream(job: _Job, chunk: Callable[[int, str | None, str | None], dict[str, Any]],
                  usage_chunk: Callable[[dict[str, int]], dict[str, Any]], include_usage: bool,
                  first: dict[str, Any] | None = None) -> StreamingResponse:
    """SSE response: a chunk per delta of every prompt, a last chunk per prompt with its finish reason, the usage
    chunk when asked, then `data: [DONE]`. The first event is awaited before answering, so a refused request still
    gets its 4xx status; a later error becomes an `error` event."""
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()

    async def pump(index: int) -> None:
        try:
            # aclosing: a cancellation that lands in put() must still close the Triton stream (an abandoned async
            # generator is only closed whenever the garbage collector gets to it).
            async with contextlib.aclosing(job.deltas(index)) as deltas:
                async for delta in deltas:
                    await queue.put((index, delta))
            await queue.put((index, _DONE))
        except Exception as err:  # noqa: BLE001  (handed to the consumer)
            await queue.put((index, err))

    tasks = [asyncio.ensure_future(pump(i)) for i in range(len(job.prompts))]
    try:
        head = await queue.get()
    except BaseException:
        for task in tasks:
            task.cancel()
        raise
    if isinstance(head[1], ApiError):
        for task in tasks:
            task.cancel()
        raise head[1]

    async def events() -> AsyncIterator[str]:
        totals = [GenerationResult(prompt=p, text="") for p in job.prompts]
        open_rows = len(job.prompts)
        item: tuple[int, Any] | None = head
        try:
            if first is not None:
                yield _sse(first)
            while open_rows:
                index, value = item if item is not None else await queue.get()
                item = None
                if isinstance(value, Exception):
                    error = value if isinstance(value, ApiError) else ApiError(500, str(value), code="internal")
                    yield _sse(error.body())
                    break
                if value is _DONE:
                    open_rows -= 1
                    yield _sse(chunk(index, None, job.finish_reason(totals[index])))
                    continue
                totals[index] = totals[index].merged(value)
                if value.text:
                    yield _sse(chunk(index, value.text, None))
            else:
                if include_usage:
                    yield _sse(usage_chunk(_usage(totals)))
                yield "data: [DONE]\n\n"
        finally:
            # Runs on a client disconnect too (Starlette cancels this generator): stops every Triton stream.
            for task in tasks:
                task.cancel()

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _chunk_base(ids: tuple[str, int], model: str, kind: str) -> dict[str, Any]:
    return {"id": ids[0], "object": kind, "created": ids[1], "model": model}


def _completion_chunk(ids: tuple[str, int], model: str, index: int, text: str | None,
                      reason: str | None) -> dict[str, Any]:
    return _chunk_base(ids, model, "text_completion") | {
        "choices": [{"index": index, "text": text or "", "logprobs": None, "finish_reason": reason}]}


def _chat_chunk(ids: tuple[str, int], model: str, text: str | None, reason: str | None) -> dict[str, Any]:
    # The first chunk announces the role; content chunks carry text; the last one only the finish reason.
    delta: dict[str, Any] = {}
    if text is None and reason is None:
        delta = {"role": "assistant", "content": ""}
    elif text is not None:
        delta = {"content": text}
    return _chunk_base(ids, model, "chat.completion.chunk") | {
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}]}


def _usage(results: list[GenerationResult]) -> dict[str, int]:
    prompt = sum(r.num_input_tokens or 0 for r in results)
    completion = sum(r.num_output_tokens or 0 for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _logprobs(result: GenerationResult) -> dict[str, Any]:
    # The engine returns the chosen tokens' log probs only: no token strings, offsets or alternatives.
    values = list(result.output_log_probs or ())[: result.num_output_tokens or None]
    return {"token_logprobs": values, "tokens": None, "top_logprobs": None, "text_offset": None}


def _model_card(name: str, created: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "gpt-triton"}
