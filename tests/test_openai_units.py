"""The OpenAI API's plain parts without Triton: request validation and its errors, the chat template, the body
limit, stop-word trimming of streamed text, Triton errors as OpenAI errors (a fake backend stands in for gRPC)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from builder.openai_api.app import ApiSettings, create_app
from builder.openai_api.backend import StreamStats, to_api_error, without_stop_word
from builder.openai_api.chat_template import ChatTemplate, ChatTemplateError
from builder.openai_api.protocol import ApiError, ChatMessage
from client.errors import RequestError, ServerUnavailableError
from client.request import GenerationResult


class FakeBackend:
    """Answers every prompt with its reversed text, in two deltas; records what it was asked."""

    model = "ensemble"

    def __init__(self, inputs: frozenset[str] = frozenset({"temperature", "top_p", "stop_words", "random_seed"})):
        self.inputs = inputs
        self.calls: list[tuple[str, int, dict[str, object], bool]] = []
        self.stats = StreamStats()

    async def check_supported(self, fields: Mapping[str, tuple[str, object]]) -> None:
        for name, (needed, _) in fields.items():
            if needed not in self.inputs:
                raise ApiError(400, f"{name}: not supported", param=name)

    async def generate(self, prompt: str, max_tokens: int, inputs: Mapping[str, object], stream: bool,
                       prompt_field: str) -> AsyncIterator[GenerationResult]:
        self.calls.append((prompt, max_tokens, dict(inputs), stream))
        answer = prompt[::-1]
        half = len(answer) // 2
        yield GenerationResult(prompt, answer[:half])
        yield GenerationResult(prompt, answer[half:], finish_reason=None, num_input_tokens=len(prompt.split()),
                               num_output_tokens=max_tokens)

    async def close(self) -> None:
        pass


@pytest.fixture
def backend() -> FakeBackend:
    return FakeBackend()


@pytest.fixture
def api(backend: FakeBackend) -> TestClient:
    return TestClient(create_app(ApiSettings("unused:1", max_body_bytes=4096), backend))


def test_sampling_fields_map_to_ensemble_inputs(api: TestClient, backend: FakeBackend) -> None:
    body = {"model": "ensemble", "prompt": "abc", "max_tokens": 5, "temperature": 0.7, "seed": 3, "stop": "x"}
    answer = api.post("/v1/completions", json=body).json()
    assert answer["choices"][0]["text"] == "cba"
    assert answer["choices"][0]["finish_reason"] == "length"  # no reason reported: the budget was used up
    assert answer["usage"] == {"prompt_tokens": 1, "completion_tokens": 5, "total_tokens": 6}
    assert backend.calls == [("abc", 5, {"temperature": 0.7, "top_p": 1.0, "random_seed": 3, "stop_words": ("x",)},
                              False)]
    backend.calls.clear()
    api.post("/v1/completions", json={"model": "ensemble", "prompt": "abc", "temperature": 0})
    assert backend.calls == [("abc", 16, {"temperature": 0.0}, False)]  # greedy: no top_p; OpenAI's default length


@pytest.mark.parametrize(("body", "param", "words"), [
    ({"prompt": "a", "n": 3}, "n", "only n = 1"),
    ({"prompt": "a", "top_p": 1.5}, "top_p", "less than or equal to 1"),
    ({"prompt": "a", "max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
    ({"prompt": "a", "max_tokens": 2**31}, "max_tokens", "less than or equal to"),
    ({"prompt": "a", "seed": -1}, "seed", "greater than or equal to 0"),
    ({"prompt": [1, 2]}, "prompt", "valid string"),
    ({"prompt": ["a"] * 65}, "prompt", "1 to 64"),
    ({"prompt": "a", "stop": ["x"] * 17}, "stop", "at most 16"),
    ({"prompt": "a", "stop": [""]}, "stop", "must not be empty"),
    ({"prompt": "a", "stream_options": {"include_usage": True}}, "stream_options", "only allowed when stream"),
    ({"prompt": "a", "logprobs": 0, "stream": True}, "logprobs", "stream"),
    ({"prompt": "a", "presence_penalty": 1.0}, "presence_penalty", "not supported"),  # the fake lacks the input
    ({"prompt": "a", "logit_bias": {"50256": -100}}, "logit_bias", "not supported"),
    ({"prompt": "a", "temperature": "hot"}, "temperature", "valid number"),
    ({"prompt": "a", "functions": []}, "functions", "unknown or unsupported field"),
    ({}, "prompt", "Field required"),
])
def test_bad_fields_are_400s_in_openai_shape(api: TestClient, body: dict, param: str, words: str) -> None:
    response = api.post("/v1/completions", json={"model": "ensemble", **body})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == param and words in error["message"] and error["message"].startswith(param)
    assert error["type"] == "invalid_request_error"


def test_chat_fields_and_message_paths(api: TestClient) -> None:
    response = api.post("/v1/chat/completions", json={"model": "ensemble", "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]})
    assert response.status_code == 400 and response.json()["error"]["param"].startswith("messages.0.content")
    response = api.post("/v1/chat/completions", json={"model": "ensemble", "messages": []})
    assert response.json()["error"]["param"] == "messages"
    response = api.post("/v1/chat/completions", json={"model": "ensemble", "max_tokens": 3, "max_completion_tokens": 4,
                                                      "messages": [{"role": "user", "content": "hi"}]})
    assert response.json()["error"]["param"] == "max_completion_tokens"
    response = api.post("/v1/chat/completions", json={"model": "ensemble", "tools": [],
                                                      "messages": [{"role": "user", "content": "hi"}]})
    assert response.json()["error"]["param"] == "tools"


def test_chat_renders_the_default_template_and_streams_deltas(api: TestClient, backend: FakeBackend) -> None:
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]}]
    answer = api.post("/v1/chat/completions", json={"model": "ensemble", "messages": messages, "max_tokens": 4}).json()
    prompt = "System: Be brief.\nUser: Hi there\nAssistant:"
    assert backend.calls[-1][0] == prompt
    assert answer["choices"][0]["message"] == {"role": "assistant", "content": prompt[::-1]}
    with api.stream("POST", "/v1/chat/completions", json={"model": "ensemble", "messages": messages, "stream": True,
                                                          "stream_options": {"include_usage": True}}) as response:
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    import json
    events = [json.loads(line[6:]) for line in lines[:-1]]
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"]) == prompt[::-1]
    assert events[-2]["choices"][0]["finish_reason"] == "length" and events[-1]["usage"]["completion_tokens"] == 16


def test_models_unknown_model_and_unknown_route(api: TestClient) -> None:
    assert [m["id"] for m in api.get("/v1/models").json()["data"]] == ["ensemble"]
    assert api.get("/v1/models/ensemble").json()["id"] == "ensemble"
    response = api.post("/v1/completions", json={"model": "gpt-4", "prompt": "a"})
    assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"
    response = api.get("/v1/embeddings")
    assert response.status_code == 404 and "error" in response.json()


def test_body_limit_counts_bytes_even_without_a_content_length(api: TestClient) -> None:
    def chunks():  # chunked transfer: no Content-Length header
        for _ in range(10):
            yield b" " * 1000

    response = api.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413 and "4096 bytes" in response.json()["error"]["message"]
    response = api.post("/v1/completions", content=b"{}", headers={"content-length": "99999",
                                                                 "content-type": "application/json"})
    assert response.status_code == 413


def test_api_key_compared_as_a_bearer_token(backend: FakeBackend) -> None:
    keyed = TestClient(create_app(ApiSettings("unused:1", api_key="k" * 20), backend))
    assert keyed.get("/v1/models").status_code == 401
    assert keyed.get("/v1/models", headers={"Authorization": "Basic " + "k" * 20}).status_code == 401
    assert keyed.get("/v1/models", headers={"Authorization": "Bearer " + "k" * 20}).status_code == 200
    assert keyed.get("/health").status_code == 200  # reveals nothing; for probes


def test_chat_template_file_errors(tmp_path: Path) -> None:
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}")
    with pytest.raises(ChatTemplateError, match="broken.jinja"):
        ChatTemplate.load(broken)
    strict = tmp_path / "strict.jinja"
    strict.write_text("{{ messages[0].nope }}")
    with pytest.raises(ApiError, match="messages: the chat template"):
        ChatTemplate.load(strict).render([ChatMessage(role="user", content="x")])
    sandboxed = tmp_path / "sandboxed.jinja"
    sandboxed.write_text("{{ messages.__class__.__mro__ }}")
    with pytest.raises(ApiError):
        ChatTemplate.load(sandboxed).render([ChatMessage(role="user", content="x")])


async def _deltas(*pieces: str, reason: str | None) -> AsyncIterator[GenerationResult]:
    for index, piece in enumerate(pieces):
        yield GenerationResult("p", piece, finish_reason=reason if index == len(pieces) - 1 else None)


async def _collect(stream: AsyncIterator[GenerationResult]) -> list[GenerationResult]:
    return [item async for item in stream]


@pytest.mark.parametrize(("pieces", "reason", "expected"), [
    ((" 7", " 8", " 9", " 10", " 11", " 12"), "stop", " 7 8 9 10 11"),  # " " + word matched
    ((" a", "b", "STOP"), "stop", " abSTOP"[:-4]),
    ((" 7", " 8"), "length", " 7 8"),
    ((" 7 12",), "length", " 7 12"),  # the budget ended it: nothing is trimmed
    (("",), "stop", ""),
])
def test_stop_word_is_trimmed_from_streamed_text(pieces: tuple[str, ...], reason: str, expected: str) -> None:
    out = asyncio.run(_collect(without_stop_word(_deltas(*pieces, reason=reason), ("12", "STOP"))))
    assert "".join(item.text for item in out) == expected
    assert out[-1].finish_reason == reason and all(item.finish_reason is None for item in out[:-1])


def test_triton_errors_become_openai_errors() -> None:
    refused = to_api_error(RequestError("invalid input 'max_tokens': must be in [1, 127]",
                                        status="StatusCode.INVALID_ARGUMENT"), "prompt")
    assert (refused.status, refused.param) == (400, "max_tokens")
    prompt = to_api_error(RequestError("text_input: row 0 has 9000 tokens, the limit is 127",
                                       status="StatusCode.INVALID_ARGUMENT"), "messages")
    assert prompt.param == "messages"
    assert to_api_error(ServerUnavailableError("cannot reach Triton"), "prompt").status == 503
    assert to_api_error(RequestError("boom", status="StatusCode.INTERNAL"), "prompt").status == 500
