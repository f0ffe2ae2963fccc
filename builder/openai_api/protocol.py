"""OpenAI request bodies (validated once, by pydantic) and the one error type every endpoint answers with.

Fields OpenAI defines but the text ensemble cannot honour are refused with a 400 that names the field, never silently
ignored: a client asking for n=3 or echo=true must not get something else. Unknown fields are refused the same way.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, model_validator

# OpenAI's default for /v1/completions; chat uses the same so a request without max_tokens stays short.
DEFAULT_MAX_TOKENS = 16
MAX_PROMPTS = 64  # prompts in one /v1/completions request (each becomes a concurrent Triton request)
MAX_STOP = 16
MAX_MESSAGES = 512
INT32_MAX = 2**31 - 1  # the ensemble's max_tokens and top_k are INT32


class ApiError(Exception):
    """An OpenAI-shaped error: `{"error": {"message", "type", "param", "code"}}` with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.kind = kind or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def bad_field(param: str, message: str) -> ApiError:
    return ApiError(400, f"{param}: {message}", param=param, code="invalid_value")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: StrictBool = False


class _Sampling(_Strict):
    """Fields both endpoints share."""

    model: StrictStr
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(None, ge=0, le=1, allow_inf_nan=False)
    top_k: StrictInt | None = Field(None, ge=0, le=INT32_MAX)  # extension (as in vLLM); 0 = off
    stop: StrictStr | list[StrictStr] | None = None
    seed: StrictInt | None = Field(None, ge=0, lt=2**64)
    presence_penalty: float | None = Field(None, ge=-2, le=2, allow_inf_nan=False)
    frequency_penalty: float | None = Field(None, ge=-2, le=2, allow_inf_nan=False)
    n: StrictInt = 1
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: StrictStr | None = None  # accepted, unused (OpenAI uses it for abuse monitoring)
    logit_bias: dict[str, float] | None = None

    @model_validator(mode="after")
    def _supported(self) -> _Sampling:
        if self.n != 1:
            raise ValueError("n: only n = 1 is supported (one choice per prompt)")
        if self.logit_bias:
            raise ValueError("logit_bias: not supported")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: only allowed when stream is true")
        stops = self.stop_words
        if len(stops) > MAX_STOP:
            raise ValueError(f"stop: at most {MAX_STOP} sequences, got {len(stops)}")
        if any(not word for word in stops):
            raise ValueError("stop: sequences must not be empty")
        return self

    @property
    def stop_words(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def sampling(self) -> dict[str, tuple[str, object]]:
        """OpenAI field -> (ensemble input, value) for every field the request sets to something that matters.

        OpenAI samples by default (temperature 1, top_p 1) while the ensemble is greedy unless top_k or top_p is
        set, so top_p 1 is sent whenever temperature is not 0. Penalties of 0 are the no-op and are not sent, so
        clients that always send them work on engines without those inputs.
        """
        values: dict[str, tuple[str, object]] = {}
        if self.temperature is not None:
            values["temperature"] = ("temperature", float(self.temperature))
        if self.temperature != 0:
            values["top_p"] = ("top_p", float(1.0 if self.top_p is None else self.top_p))
        if self.top_k:
            values["top_k"] = ("top_k", int(self.top_k))
        if self.seed is not None:
            values["seed"] = ("random_seed", int(self.seed))
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if value:
                values[name] = (name, float(value))
        if self.stop_words:
            values["stop"] = ("stop_words", self.stop_words)
        return values


class CompletionRequest(_Sampling):
    prompt: StrictStr | list[StrictStr]
    max_tokens: StrictInt | None = Field(None, ge=1, le=INT32_MAX)
    logprobs: StrictInt | None = Field(None, ge=0, le=5)
    echo: StrictBool = False
    best_of: StrictInt | None = None
    suffix: StrictStr | None = None

    @model_validator(mode="after")
    def _completion_supported(self) -> CompletionRequest:
        if self.echo:
            raise ValueError("echo: only echo = false is supported")
        if self.best_of not in (None, 1):
            raise ValueError("best_of: only best_of = 1 is supported")
        if self.suffix:
            raise ValueError("suffix: not supported")
        if self.logprobs:
            raise ValueError("logprobs: only logprobs = 0 is supported (the engine returns the log probability of "
                             "each chosen token, not alternatives)")
        if self.logprobs is not None and self.stream:
            raise ValueError("logprobs: not supported with stream = true")
        if isinstance(self.prompt, list) and not 1 <= len(self.prompt) <= MAX_PROMPTS:
            raise ValueError(f"prompt: a list needs 1 to {MAX_PROMPTS} strings, got {len(self.prompt)}")
        return self

    @property
    def prompts(self) -> tuple[str, ...]:
        return (self.prompt,) if isinstance(self.prompt, str) else tuple(self.prompt)


class TextPart(_Strict):
    type: Literal["text"]
    text: StrictStr


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | list[TextPart] | None = None
    name: StrictStr | None = None

    @property
    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: StrictInt | None = Field(None, ge=1, le=INT32_MAX)
    max_completion_tokens: StrictInt | None = Field(None, ge=1, le=INT32_MAX)
    logprobs: StrictBool | None = None
    top_logprobs: StrictInt | None = None

    @model_validator(mode="after")
    def _chat_supported(self) -> ChatCompletionRequest:
        if self.logprobs:
            raise ValueError("logprobs: not supported for chat completions (use /v1/completions with logprobs=0)")
        if self.top_logprobs is not None:
            raise ValueError("top_logprobs: not supported")
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise ValueError("max_completion_tokens: give either max_tokens or max_completion_tokens, not both")
        return self

    @property
    def token_limit(self) -> int:
        return self.max_completion_tokens or self.max_tokens or DEFAULT_MAX_TOKENS
