"""The text ensemble over gRPC (tritonclient's asyncio client), one Triton request per prompt.

Requests are built and responses parsed by the project's client library (`client.request`): the tensor contract has
one home. A streaming (decoupled) repository is read through a gRPC stream, whose `stream` input decides whether
deltas come back; a plain repository answers one infer call, which an OpenAI stream then sends as one chunk.
Closing a stream early (the HTTP client went away) cancels the gRPC call, and Triton then cancels the request.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from dataclasses import dataclass, replace
from typing import Any

from client.connection import ConnectionConfig, timed_out, translate_error
from client.errors import RequestError, ServerUnavailableError, TextClientError
from client.request import GenerationResult, ModelInfo, SamplingParams, TextRequest, parse_results
from client.text_client import is_final, stream_events

from .protocol import ApiError

# Ensemble inputs that may be missing from a repository, by the OpenAI field that needs them.
OPTIONAL_INPUTS = {"presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty",
                   "top_k": "top_k", "seed": "random_seed", "stop": "stop_words", "logprobs": "return_log_probs",
                   "temperature": "temperature", "top_p": "top_p"}
# Words of the ensemble's error messages -> the OpenAI field they are about.
INPUT_TO_FIELD = {"text_input": None, "max_tokens": "max_tokens", "random_seed": "seed", "stop_words": "stop",
                  "top_k": "top_k", "top_p": "top_p", "temperature": "temperature",
                  "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty"}


@dataclass
class StreamStats:
    """Streams opened, finished, and cancelled while live (the HTTP client left or the request was abandoned)."""

    opened: int = 0
    completed: int = 0
    cancelled: int = 0


class TritonBackend:
    def __init__(self, grpc_url: str, model: str = "ensemble", timeout_s: float = 300.0) -> None:
        self.config = ConnectionConfig.create(grpc_url, "grpc", model, timeout_s, retries=0)
        self.stats = StreamStats()
        self._client: Any = None
        self._info: ModelInfo | None = None

    @property
    def model(self) -> str:
        return self.config.model

    def _grpc(self) -> Any:
        if self._client is None:  # created on the serving event loop
            import tritonclient.grpc.aio as triton_grpc
            self._client = triton_grpc.InferenceServerClient(self.config.url)
        return self._client

    async def model_info(self) -> ModelInfo:
        if self._info is None:
            try:
                config = await asyncio.wait_for(self._grpc().get_model_config(self.model, as_json=True),
                                                self.config.timeout_s)
            except Exception as raw:
                raise to_api_error(translate_error(raw, self.config), "") from raw
            self._info = ModelInfo.from_config(config)
        return self._info

    async def check_supported(self, fields: Mapping[str, object]) -> None:
        """400 naming the first OpenAI field whose ensemble input this repository lacks."""
        inputs = (await self.model_info()).inputs
        for name in fields:
            needed = OPTIONAL_INPUTS.get(name)
            if needed is not None and needed not in inputs:
                raise ApiError(400, f"{name}: not supported by model '{self.model}' (its ensemble has no "
                                    f"'{needed}' input)", param=name, code="unsupported_parameter")

    async def generate(self, prompt: str, max_tokens: int, inputs: Mapping[str, object], stream: bool,
                       prompt_field: str) -> AsyncGenerator[GenerationResult, None]:
        """Deltas of one prompt's answer (one item when not streaming or on a plain repository); the last one
        carries the counts and finish reason. `inputs` maps ensemble input names to values."""
        info = await self.model_info()
        params = SamplingParams(**inputs)  # type: ignore[arg-type]  # app._inputs built them from the typed body
        request = TextRequest((prompt,), max_tokens, params, stream=stream)
        try:
            tensors = request.tensors(info)
        except TextClientError as err:
            raise to_api_error(err, prompt_field) from err
        import tritonclient.grpc as grpc_module
        grpc_inputs = []
        for tensor in tensors:
            item = grpc_module.InferInput(tensor.name, list(tensor.data.shape), tensor.datatype)
            item.set_data_from_numpy(tensor.data)
            grpc_inputs.append(item)
        if not info.decoupled:
            try:
                result = await asyncio.wait_for(self._grpc().infer(self.model, grpc_inputs), self.config.timeout_s)
            except Exception as raw:
                raise to_api_error(translate_error(raw, self.config), prompt_field) from raw
            yield parse_results(request.prompts, result.as_numpy)[0]
            return
        answer = self._stream(request, grpc_inputs, prompt_field)
        if params.stop_words:
            answer = without_stop_word(answer, params.stop_words)
        async with contextlib.aclosing(answer) as deltas:
            async for delta in deltas:
                yield delta

    async def _stream(self, request: TextRequest, grpc_inputs: list[Any],
                      prompt_field: str) -> AsyncGenerator[GenerationResult, None]:
        async def requests() -> AsyncIterator[dict[str, Any]]:
            yield {"model_name": self.model, "inputs": grpc_inputs, "enable_empty_final_response": True}

        responses = self._grpc().stream_infer(requests())
        self.stats.opened += 1
        finished = False
        try:
            while True:
                try:
                    result, error = await asyncio.wait_for(responses.__anext__(), self.config.timeout_s)
                except StopAsyncIteration:
                    finished = True
                    return
                except asyncio.TimeoutError:
                    raise to_api_error(timed_out(self.config), prompt_field) from None
                except asyncio.CancelledError:
                    raise
                except Exception as raw:  # noqa: BLE001  (handled with the server's own errors below)
                    result, error = None, raw
                if error is not None:
                    finished = True  # the server ended the call
                    raise to_api_error(translate_error(error, self.config), prompt_field)
                deltas = stream_events(result, request.prompts)
                if deltas is not None:
                    yield deltas[0]
                if is_final(result):
                    finished = True
                    return
        finally:
            # Ends the call; Triton then cancels the request if it is still generating. A cancelled asyncio task
            # has usually cancelled the call already (grpc.aio does that when a pending read is cancelled), so
            # cancel() returns False then and the call reports cancelled(): either way the RPC was cut short.
            live = responses.cancel()
            call = getattr(responses, "_grpc_call", None)  # tritonclient keeps the grpc.aio call here
            if finished:
                self.stats.completed += 1
            elif live or (call is not None and call.cancelled()):
                self.stats.cancelled += 1

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None


async def without_stop_word(stream: AsyncGenerator[GenerationResult, None],
                            stops: tuple[str, ...]) -> AsyncGenerator[GenerationResult, None]:
    """A streaming repository's deltas with the matched stop word left out, as OpenAI does (the ensemble streams its
    text before the engine matches it). Text that could still become a stop word is held back until the end."""
    holdback = max(len(word) for word in stops) + 1  # the ensemble also matches " " + word
    held = ""
    last: GenerationResult | None = None
    async with contextlib.aclosing(stream) as deltas:
        async for delta in deltas:
            held += delta.text
            last = delta
            cut = max(len(held) - holdback, 0)
            ready, held = held[:cut], held[cut:]
            yield replace(delta, text=ready, finish_reason=None)
    if last is not None:
        if last.finish_reason != "length":  # also when the repository reports no reason
            for word in sorted({*stops, *(" " + w for w in stops)}, key=len, reverse=True):
                if held.endswith(word):
                    held = held[:-len(word)]
                    break
        yield replace(last, text=held)


def to_api_error(err: TextClientError, prompt_field: str) -> ApiError:
    """A client-library error as the OpenAI error the HTTP caller gets; the field is read off the ensemble's
    message, which starts with (or names) the input it refuses."""
    if isinstance(err, ServerUnavailableError):
        return ApiError(503, f"the inference server is unavailable: {err}", code="triton_unavailable")
    if isinstance(err, RequestError) and err.status in (None, "StatusCode.INVALID_ARGUMENT"):
        message = str(err)
        param = None
        for word in message.replace(":", " ").replace("'", " ").split()[:6]:
            if word in INPUT_TO_FIELD:
                param = INPUT_TO_FIELD[word] or prompt_field
                break
        return ApiError(400, message, param=param, code="invalid_value")
    if isinstance(err, RequestError) and err.status == "StatusCode.CANCELLED":
        return ApiError(499, str(err), code="cancelled")
    return ApiError(500 if not str(err).startswith("no answer") else 504, str(err), code="triton_error")
