"""The OpenAI-compatible API with the official `openai` client against the served demo repository (real tritonserver).

Oracle: the demo model counts, so "1 2 3 4 5 6" continues greedily with " 7 8 ... 36"; token counts are checked
against the GPT-2 tokenizer the repository uses.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from builder import GPT2_TOKENIZER_DIR
from builder.demo import build_demo_repository
from builder.openai_api import ApiServerError, ApiSettings, OpenAIServer, check_binding
from builder.openai_api.backend import StreamStats
from builder.runtime.tokenizer import GptTokenizer
from builder.serve import TritonServer, free_port, free_ports
from servers import server_on_free_ports

pytestmark = pytest.mark.server

COUNTED = "".join(f" {n}" for n in range(7, 37))
KEY = "test-key-0123456789abcdef"
TOKENIZER = GptTokenizer.from_directory(GPT2_TOKENIZER_DIR)


@pytest.fixture(scope="module", params=["plain", "streaming"])
def triton(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    repository = build_demo_repository(tmp_path_factory.mktemp("demo") / "repo", streaming=request.param == "streaming")
    with server_on_free_ports(repository) as server:
        yield server


@pytest.fixture(scope="module")
def api(triton: TritonServer) -> Iterator[OpenAIServer]:
    with OpenAIServer(ApiSettings(triton.grpc_url), port=free_port()) as server:
        yield server


@pytest.fixture(scope="module")
def client(api: OpenAIServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=api.url, api_key="unused", max_retries=0, timeout=60)


def is_streaming(triton: TritonServer) -> bool:
    # Every repository declares `stream` (issue 13); the render's manifest says which one streams.
    return bool(json.loads((triton.config.model_repository / ".gpt-triton-repository").read_text())["streaming"])


def test_models_lists_the_ensemble(client: openai.OpenAI) -> None:
    assert [model.id for model in client.models.list()] == ["ensemble"]


def test_completion_counts_with_finish_reason_and_usage(client: openai.OpenAI) -> None:
    answer = client.completions.create(model="ensemble", prompt="1 2 3 4 5 6", max_tokens=30, temperature=0)
    [choice] = answer.choices
    assert choice.text == COUNTED
    assert choice.finish_reason == "length"
    assert answer.usage is not None
    assert answer.usage.prompt_tokens == len(TOKENIZER.encode("1 2 3 4 5 6"))
    assert answer.usage.completion_tokens == 30
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + 30


def test_streamed_chunks_concatenate_to_the_same_text(client: openai.OpenAI, triton: TritonServer) -> None:
    chunks = list(client.completions.create(model="ensemble", prompt="1 2 3 4 5 6", max_tokens=30, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    texts = [chunk.choices[0].text for chunk in chunks if chunk.choices and chunk.choices[0].text]
    assert "".join(texts) == COUNTED
    # A streaming repository sends deltas (one per token while the server keeps up, several tokens each when its
    # sender lags on a busy machine: then only a few); a plain one answers once, which becomes one chunk.
    assert len(texts) > 1 if is_streaming(triton) else len(texts) == 1
    reasons = [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices]
    assert reasons[-1] == "length" and not any(reasons[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (6, 30)


def test_raw_sse_ends_with_done(api: OpenAIServer) -> None:
    body = {"model": "ensemble", "prompt": "1 2 3", "max_tokens": 3, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{api.url}/completions", json=body, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)


def test_a_stop_word_ends_the_answer_with_finish_reason_stop(client: openai.OpenAI) -> None:
    answer = client.completions.create(model="ensemble", prompt="1 2 3 4 5 6", max_tokens=30, temperature=0,
                                       stop=[" 12"])
    assert answer.choices[0].text == " 7 8 9 10 11"
    assert answer.choices[0].finish_reason == "stop"


def test_several_prompts_are_answered_as_indexed_choices(client: openai.OpenAI) -> None:
    answer = client.completions.create(model="ensemble", prompt=["1 2 3", "20 21 22"], max_tokens=4, temperature=0)
    assert [(c.index, c.text) for c in answer.choices] == [(0, " 4 5 6 7"), (1, " 23 24 25 26")]
    assert answer.usage is not None and answer.usage.completion_tokens == 8


def test_sampling_with_a_seed_repeats_and_logprobs_come_per_token(client: openai.OpenAI) -> None:
    def sample() -> str:
        return client.completions.create(model="ensemble", prompt="Hello", max_tokens=12, temperature=1.0,
                                         top_p=0.95, seed=7).choices[0].text

    assert sample() == sample()
    answer = client.completions.create(model="ensemble", prompt="1 2 3", max_tokens=5, temperature=0, logprobs=0)
    logprobs = answer.choices[0].logprobs
    assert logprobs is not None and logprobs.token_logprobs is not None
    assert len(logprobs.token_logprobs) == 5 and all(value <= 0 for value in logprobs.token_logprobs)


def test_chat_completion_answers_with_the_default_template(client: openai.OpenAI) -> None:
    messages = [{"role": "system", "content": "Count."}, {"role": "user", "content": "1 2 3"}]
    answer = client.chat.completions.create(model="ensemble", messages=messages, max_tokens=5, temperature=0)
    [choice] = answer.choices
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    # The default template is the plain transcript the base model continues.
    prompt = "System: Count.\nUser: 1 2 3\nAssistant:"
    assert answer.usage is not None and answer.usage.prompt_tokens == len(TOKENIZER.encode(prompt))
    plain = client.completions.create(model="ensemble", prompt=prompt, max_tokens=5, temperature=0)
    assert choice.message.content == plain.choices[0].text
    streamed = client.chat.completions.create(model="ensemble", messages=messages, max_tokens=5, temperature=0,
                                              stream=True)
    deltas = list(streamed)
    assert deltas[0].choices[0].delta.role == "assistant"
    assert "".join(d.choices[0].delta.content or "" for d in deltas) == choice.message.content
    assert deltas[-1].choices[0].finish_reason == choice.finish_reason


def test_chat_template_override_is_used(triton: TritonServer, tmp_path: Path) -> None:
    template = tmp_path / "last_message.jinja"
    template.write_text("{{ messages[-1].content }}")
    with OpenAIServer(ApiSettings(triton.grpc_url, chat_template=template), port=free_port()) as api:
        chat = openai.OpenAI(base_url=api.url, api_key="unused", max_retries=0)
        answer = chat.chat.completions.create(model="ensemble", max_tokens=30, temperature=0,
                                              messages=[{"role": "user", "content": "1 2 3 4 5 6"}])
    assert answer.choices[0].message.content == COUNTED


@pytest.mark.parametrize(("options", "field"), [
    ({"n": 2}, "n"),
    ({"temperature": 3.0}, "temperature"),
    ({"echo": True}, "echo"),
    ({"logprobs": 2}, "logprobs"),
    ({"frequency_penalty": 2.5}, "frequency_penalty"),  # OpenAI's range is [-2, 2]
    ({"max_tokens": 100000}, "max_tokens"),  # refused by the ensemble itself (its sequence limit)
    ({"extra_body": {"best_of": 3}}, "best_of"),
    ({"extra_body": {"tools": []}}, "tools"),
])
def test_a_bad_request_is_a_bad_request_error_naming_the_field(client: openai.OpenAI, options: dict,
                                                               field: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="ensemble", prompt="1 2 3", **{"max_tokens": 4, **options})
    error = caught.value.body
    assert isinstance(error, dict) and error["param"] == field and field in error["message"]


def test_chat_bad_role_and_unknown_model(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="ensemble", messages=[{"role": "robot", "content": "x"}])
    assert caught.value.body["param"] == "messages.0.role"
    with pytest.raises(openai.NotFoundError) as missing:
        client.completions.create(model="gpt-4", prompt="x", max_tokens=1)
    assert missing.value.body["param"] == "model"


def test_body_size_limit_and_malformed_json(api: OpenAIServer) -> None:
    big = {"model": "ensemble", "prompt": "x" * (2 << 20)}
    response = httpx.post(f"{api.url}/completions", json=big, timeout=30)
    assert response.status_code == 413 and "body larger than" in response.json()["error"]["message"]
    response = httpx.post(f"{api.url}/completions", content=b"{not json", timeout=30,
                          headers={"content-type": "application/json"})
    assert response.status_code == 400 and "JSON" in response.json()["error"]["message"]


def test_the_api_key_is_enforced_when_set(triton: TritonServer) -> None:
    with OpenAIServer(ApiSettings(triton.grpc_url, api_key=KEY), port=free_port()) as api:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=api.url, api_key="wrong-key-0123456789", max_retries=0).models.list()
        response = httpx.get(f"{api.url}/models", timeout=10)
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
        keyed = openai.OpenAI(base_url=api.url, api_key=KEY, max_retries=0)
        assert keyed.completions.create(model="ensemble", prompt="1 2 3", max_tokens=3,
                                        temperature=0).choices[0].text == " 4 5 6"


def test_binding_beyond_loopback_needs_a_key() -> None:
    with pytest.raises(ApiServerError, match="without an API key"):
        check_binding("0.0.0.0", None)
    with pytest.raises(ApiServerError, match="at least 16"):
        check_binding("0.0.0.0", "short")
    check_binding("0.0.0.0", KEY)
    check_binding("127.0.0.1", None)
    check_binding("::1", None)


def ended_streams(stats: StreamStats, before: tuple[int, int, int], opened: int) -> tuple[int, int, int]:
    """(opened, completed, cancelled) since `before`, once every opened stream has ended (or after 10 s)."""
    deadline = time.monotonic() + 10
    while stats.completed + stats.cancelled - before[1] - before[2] < opened and time.monotonic() < deadline:
        time.sleep(0.05)
    now = (stats.opened, stats.completed, stats.cancelled)
    return now[0] - before[0], now[1] - before[1], now[2] - before[2]


@pytest.mark.parametrize("triton", ["streaming"], indirect=True)  # a plain repository has no stream to cancel
def test_a_client_that_disconnects_cancels_its_triton_stream(api: OpenAIServer) -> None:
    stats = api.backend.stats
    before = (stats.opened, stats.completed, stats.cancelled)
    # 64 prompts of 120 tokens each: seconds of work on a CPU, and the client leaves at the first token.
    body = {"model": "ensemble", "prompt": [str(n) for n in range(64)], "max_tokens": 120, "stream": True,
            "temperature": 0}
    with httpx.stream("POST", f"{api.url}/completions", json=body, timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                break  # leaving the block closes the connection mid-stream
    finished_before_the_cut = stats.completed - before[1]
    opened, completed, cancelled = ended_streams(stats, before, 64)
    # Every stream ended: ran to its end before the server saw the client leave (on a loaded machine some do), or
    # cut short while live (cancelled). A server that ignored the disconnect would run all 64 to their end.
    assert opened == 64 and completed + cancelled == 64, (opened, completed, cancelled)
    assert cancelled >= 1, f"no live Triton stream was cancelled ({finished_before_the_cut} had ended at the cut)"
    # The server goes on answering.
    answer = openai.OpenAI(base_url=api.url, api_key="x", max_retries=0).completions.create(
        model="ensemble", prompt="1 2 3", max_tokens=3, temperature=0)
    assert answer.choices[0].text == " 4 5 6"


def test_serve_cli_starts_the_api_beside_tritonserver_and_stops_it(tmp_path: Path) -> None:
    repository = build_demo_repository(tmp_path / "repo")
    http, grpc, metrics, port = free_ports(4)
    command = [sys.executable, "-m", "builder", "serve", str(repository), "--http-port", str(http), "--grpc-port",
               str(grpc), "--metrics-port", str(metrics), "--openai-port", str(port)]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "GPT_TRITON_API_KEY": KEY})
    try:
        lines = []
        for line in process.stderr:
            lines.append(line)
            if line.startswith("OpenAI API:") or process.poll() is not None:
                break
        assert lines and lines[-1].strip() == f"OpenAI API: http://127.0.0.1:{port}/v1  (Bearer key required)", lines
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0)
        answer = client.completions.create(model="ensemble", prompt="1 2 3 4 5 6", max_tokens=30, temperature=0)
        assert answer.choices[0].text == COUNTED
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)


def test_serve_cli_refuses_a_keyless_api_beyond_loopback_before_starting_triton(tmp_path: Path) -> None:
    started = time.monotonic()
    env = {k: v for k, v in os.environ.items() if k != "GPT_TRITON_API_KEY"}
    result = subprocess.run([sys.executable, "-m", "builder", "serve", str(tmp_path), "--address", "0.0.0.0",
                             "--openai-port", str(free_port())], capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode != 0
    assert "without an API key" in result.stderr and "--api-key" in result.stderr
    assert "starting tritonserver" not in result.stderr and time.monotonic() - started < 30


@pytest.mark.parametrize("triton", ["streaming"], indirect=True)
def test_a_client_that_gives_up_on_a_non_streaming_request_cancels_it_too(api: OpenAIServer) -> None:
    stats = api.backend.stats
    before = (stats.opened, stats.completed, stats.cancelled)
    body = {"model": "ensemble", "prompt": [str(n) for n in range(64)], "max_tokens": 120, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):  # the client stops waiting and closes the connection
        httpx.post(f"{api.url}/completions", json=body, timeout=httpx.Timeout(60, read=0.5))
    opened, completed, cancelled = ended_streams(stats, before, 64)
    assert opened == 64 and completed + cancelled == 64 and cancelled >= 1, (opened, completed, cancelled)
