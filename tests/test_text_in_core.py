"""`render --text-in-core`: the torch core model takes text and answers text itself, under the ensemble's name.

Oracles: HF transformers' greedy continuation on the same weights, and the classic ensemble (preprocessing -> core ->
postprocessing) on the same weights and seeds: every text, count and finish reason must be the same.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
import urllib.error
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from builder.render import render_repository
from builder.render_config import RenderConfig, RenderError
from builder.runtime import contract
from builder.runtime.model_config import GptModelConfig
from builder.serve import TritonServer
from builder.validate import check_repository
from client import TextClient
from servers import generate_json, server_on_free_ports

pytestmark = pytest.mark.server

# gpu: the same tests with the engines on the GPU host's GPU (GPT_TRITON_TEST_DEVICE=gpu there; CI has no GPU).
DEVICE = os.environ.get("GPT_TRITON_TEST_DEVICE", "cpu")
PROMPTS = ["Hello", "The quick brown fox jumps over", "数字と絵文字 🚀", "a", "naïve café", "x" * 40]
SAMPLING = {"top_k": 20, "top_p": 0.9, "temperature": 0.8, "random_seed": 1234}


def render_tiny(output: Path, ft_dir: Path, *, streaming: bool, text_in_core: bool) -> Path:
    model = GptModelConfig.from_ini(ft_dir / "config.ini")
    return render_repository(RenderConfig(engine="torch", device=DEVICE, data_type="fp32", checkpoint=ft_dir,
                                          model=model, streaming=streaming, max_batch_size=16,
                                          text_in_core=text_in_core, output=output))


def serve(repository: Path, **options: object) -> Iterator[TritonServer]:
    with server_on_free_ports(repository, **options) as server:
        yield server


@pytest.fixture(scope="module")
def fused(tiny_ft_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    yield from serve(render_tiny(tmp_path_factory.mktemp("fused"), tiny_ft_dir, streaming=False, text_in_core=True))


@pytest.fixture(scope="module")
def fused_streaming(tiny_ft_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    yield from serve(render_tiny(tmp_path_factory.mktemp("fused_stream"), tiny_ft_dir, streaming=True,
                                 text_in_core=True), log_verbose=1)  # verbose: the engine logs each cancellation


@pytest.fixture(scope="module")
def classic_streaming(tiny_ft_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    yield from serve(render_tiny(tmp_path_factory.mktemp("classic"), tiny_ft_dir, streaming=True,
                                 text_in_core=False))


def test_render_writes_one_model_with_the_ensembles_tensors(tiny_ft_dir: Path, tmp_path: Path) -> None:
    fused_repo = render_tiny(tmp_path / "fused", tiny_ft_dir, streaming=True, text_in_core=True)
    classic_repo = render_tiny(tmp_path / "classic", tiny_ft_dir, streaming=True, text_in_core=False)
    assert sorted(p.name for p in fused_repo.iterdir() if p.is_dir()) == ["ensemble"]
    version = fused_repo / "ensemble" / "1"
    assert {"model.py", "gpt_runtime", "vocab.json", "merges.txt", "1-gpu"} <= {p.name for p in version.iterdir()}

    def tensors(repo: Path, kind: str) -> list[tuple[str, str, str]]:
        text = (repo / "ensemble" / "config.pbtxt").read_text()
        block = text[text.index(f"{kind} ["):]
        block = block[:block.index("\n]")]
        return re.findall(r'name: "(\w+)"\s+data_type: (\w+)\s+dims: (\[[^\]]*\])', block)

    for kind in ("input", "output"):  # clients cannot tell the two repositories apart
        assert tensors(fused_repo, kind) == tensors(classic_repo, kind), kind
    config = (fused_repo / "ensemble" / "config.pbtxt").read_text()
    assert 'backend: "python"' in config and "decoupled: true" in config and 'key: "text_io"' in config
    findings = check_repository(fused_repo, has_gpu=lambda: True)
    assert findings.problems == [] and findings.warnings == []
    (version / "1-gpu" / "config.ini").unlink()  # the weights are checked as a core model's
    assert any("no FT weights" in p for p in check_repository(fused_repo, has_gpu=lambda: True).problems)


def test_render_refuses_text_in_core_on_the_fastertransformer_engine() -> None:
    with pytest.raises(RenderError, match="--text-in-core needs --engine torch"):
        RenderConfig(engine="fastertransformer", text_in_core=True)


def test_preprocessing_errors_become_replies_of_their_kind() -> None:
    """A bad request is refused on its own (INVALID, naming the input); a bug in preprocessing fails every request of
    the call (INTERNAL) instead of the stub's thread."""
    from builder.runtime.contract import RequestError
    from builder.runtime.core_adapter import INTERNAL, INVALID
    from builder.runtime.text_core import _or_replies

    ok, bad = {"input_ids": np.array([[1]])}, RequestError("max_tokens", "is required")
    first, second = _or_replies(2, lambda: [ok, bad])
    assert first is ok and second.kind == INVALID and "max_tokens" in second.error

    def broken() -> list:
        raise KeyError("oops")

    replies = _or_replies(3, broken)
    assert len(replies) == 3 and all(r.kind == INTERNAL and "preprocessing failed" in r.error for r in replies)


@pytest.mark.parametrize("count_per_response", [False, True])
def test_streamed_text_straight_from_tokens_equals_the_ft_arrays_way(count_per_response: bool) -> None:
    """A streamed request of one beam (text_core._TextStream) answers exactly what StreamState's tail arrays become
    through the text codec (the way every other request goes), response by response: rows of different lengths,
    characters split across byte tokens, random ids (invalid UTF-8), several tokens per response, and each way a
    row ends (end id, a stop word, length, cancelled)."""
    import random

    from builder.runtime.core_adapter import Reply
    from builder.runtime.core_io import GenerationRequest, RowOutput, StreamState
    from builder.runtime.postprocess import PostprocessConfig
    from builder.runtime.preprocess import PreprocessConfig
    from builder.runtime.text_core import TextCodec, _TextStream
    from builder.runtime.tokenizer import GptTokenizer

    tokenizer = GptTokenizer.from_directory(Path(__file__).resolve().parents[1] / "builder" / "assets" / "gpt2")
    codec = TextCodec(tokenizer, PreprocessConfig(max_pos_seq_len=2048, vocab_size=50257),
                      PostprocessConfig(streaming=True, end_id=tokenizer.eos_id),
                      tuple(tensor.name for tensor in contract.ENSEMBLE_OUTPUTS))
    byte_token = {token[0]: i for i, token in enumerate(tokenizer.token_bytes) if len(token) == 1}
    rng = random.Random(5)

    def generation(kind: int) -> list[int]:
        if kind == 0:  # multi-byte characters, one byte per token
            return [byte_token[b] for b in "é数🚀 ok".encode() * 3]
        if kind == 1:  # whole tokens of a text
            return tokenizer.encode(" naïve café, 数字と絵文字 🚀 and more")
        return [rng.randrange(tokenizer.vocab_size) for _ in range(rng.randrange(1, 30))]  # any bytes at all

    checked = 0
    for case in range(120):
        rows = rng.randrange(1, 4)
        prompts = [tokenizer.encode(" prompt" * rng.randrange(1, 4)) for _ in range(rows)]
        generated = [generation(rng.randrange(3)) for _ in range(rows)]
        ending = rng.choice(["stop_end_id", "stop_word", "length", "cancelled"])
        if ending == "stop_end_id":
            generated = [ids + [tokenizer.eos_id] for ids in generated]
        specs = [GenerationRequest(input_ids=p, output_len=len(g), end_id=tokenizer.eos_id)
                 for p, g in zip(prompts, generated)]
        fast, reference = _TextStream(codec, count_per_response), StreamState(
            specs, stream=True, log_probs=False, count_per_response=count_per_response)
        done = [0] * rows
        while True:
            done = [min(len(g), d + rng.randrange(0, 4)) for g, d in zip(generated, done)]
            last = all(d == len(g) for g, d in zip(generated, done))
            outputs = [RowOutput(prompt_len=len(p), beams=[np.array(p + g[:d], dtype=np.int64)], finished=last,
                                 cancelled=last and ending == "cancelled",
                                 finish_reason="stop" if ending.startswith("stop") else ending)
                       for p, g, d in zip(prompts, generated, done)]
            mine = (fast.final if last else fast.update)(outputs)
            theirs = codec.reply(Reply(arrays=(reference.final if last else reference.update)(outputs)), {}).arrays
            assert theirs is not None and sorted(mine) == sorted(theirs), case
            for name in mine:
                assert mine[name].dtype == theirs[name].dtype and mine[name].tolist() == theirs[name].tolist(), (
                    case, name)
            checked += 1
            if last:
                break
    assert checked > 300
    # and the deltas of a valid text add up to its decoding (the oracle both ways share)
    stream = _TextStream(codec, False)
    prompt, ids = tokenizer.encode("Hi"), generation(0)
    pieces = [stream.update([RowOutput(prompt_len=len(prompt), beams=[np.array(prompt + ids[:n], dtype=np.int64)])])
              ["text_output"][0] for n in range(1, len(ids) + 1)]
    assert b"".join(pieces).decode() == tokenizer.decode(ids)


def test_one_static_batch_answers_each_request_on_its_own(tiny_ft_dir: Path, tmp_path: Path,
                                                           hf_greedy_continuation) -> None:
    """The codec without Triton (a non-streaming text core's execute): a bad request in the middle of a dynamic batch
    gets its own error naming the field; the others their own text."""
    from google.protobuf import json_format, text_format
    from tritonclient.grpc import model_config_pb2

    from builder.runtime.core_adapter import INVALID
    from builder.runtime.generation import GptEngine
    from builder.runtime.text_core import TextCodec

    repo = render_tiny(tmp_path / "fused", tiny_ft_dir, streaming=False, text_in_core=True)
    config = text_format.Parse((repo / "ensemble" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    args = {"model_config": json.dumps(json_format.MessageToDict(config, preserving_proto_field_name=True))}
    codec = TextCodec.from_args(args, repo / "ensemble" / "1")
    assert codec is not None and TextCodec.from_args({"model_config": "{}"}, repo / "ensemble" / "1") is None

    def request(prompt: str, max_tokens: int) -> dict[str, np.ndarray]:
        return {"text_input": np.array([[prompt.encode()]], dtype=object),
                "max_tokens": np.array([[max_tokens]], dtype=np.int32)}

    engine = GptEngine.from_ft_dir(tiny_ft_dir, max_batch_size=4, device="cpu")
    replies = codec.run_static(engine, [request("Hello", 6), request("Hello", 0), request(PROMPTS[1], 5)],
                               [lambda: False] * 3)
    assert replies[1].kind == INVALID and "max_tokens" in replies[1].error
    for reply, (prompt, max_tokens) in zip((replies[0], replies[2]), (("Hello", 6), (PROMPTS[1], 5))):
        assert reply.error is None, reply.error
        assert reply.arrays["text_output"].reshape(-1)[0].decode() == hf_greedy_continuation(prompt, max_tokens)[0]
        assert set(reply.arrays) <= {t.name for t in contract.ENSEMBLE_OUTPUTS} | set(contract.LOG_PROB_OUTPUTS)


def test_greedy_text_equals_hf_and_a_ragged_batch_works(fused: TritonServer, hf_greedy_continuation) -> None:
    with TextClient(fused.http_url) as client:
        for prompt in PROMPTS[:3]:
            assert client.generate(prompt, max_tokens=10).text == hf_greedy_continuation(prompt, 10)[0], prompt
        results = client.generate(PROMPTS, max_tokens=8)  # one request, six rows of different lengths
    assert [r.text for r in results] == [hf_greedy_continuation(p, 8)[0] for p in PROMPTS]
    with TextClient(fused.grpc_url, protocol="grpc") as grpc:
        assert grpc.generate(PROMPTS[1], max_tokens=10).text == hf_greedy_continuation(PROMPTS[1], 10)[0]


def test_streamed_and_sampled_answers_equal_the_classic_ensembles(fused: TritonServer, fused_streaming: TritonServer,
                                                                  classic_streaming: TritonServer) -> None:
    bodies = [{"text_input": "Hello there", "max_tokens": 16, **SAMPLING},
              {"text_input": "数字と絵文字 🚀", "max_tokens": 12, **SAMPLING},
              {"text_input": "The quick brown fox", "max_tokens": 12, "exclude_input_in_output": False},
              {"text_input": "One two three", "max_tokens": 9, "stop_words": [" the", " a"], "bad_words": [" and"]}]
    for body in bodies:
        [expected] = generate_json(classic_streaming, body)
        assert "error" not in expected, expected
        outputs = [t.name for t in contract.ENSEMBLE_OUTPUTS]  # (an ensemble's answer also echoes sequence_*)
        for server in (fused, fused_streaming):
            [answer] = generate_json(server, body)
            assert [answer[n] for n in outputs] == [expected[n] for n in outputs], (body, server.http_url)
        events = generate_json(fused_streaming, {**body, "stream": True}, stream=True)
        classic_events = generate_json(classic_streaming, {**body, "stream": True}, stream=True)
        assert all("error" not in event for event in events), events
        assert "".join(e["text_output"] for e in events) == "".join(e["text_output"] for e in classic_events)
        assert events[-1]["finish_reason"] == classic_events[-1]["finish_reason"] != ""
        assert all(event["finish_reason"] == "" for event in events[:-1])
    with TextClient(fused_streaming.grpc_url, protocol="grpc") as grpc:
        deltas = list(grpc.stream("Hello there", max_tokens=16, **SAMPLING))
    [plain] = generate_json(fused, bodies[0])
    assert len(deltas) > 1 and "".join(deltas) == plain["text_output"]


def test_log_probs_reach_the_client(fused_streaming: TritonServer, classic_streaming: TritonServer) -> None:
    body = {"text_input": "Hello", "max_tokens": 5, "return_log_probs": True}
    [answer], [expected] = generate_json(fused_streaming, body), generate_json(classic_streaming, body)
    assert answer["text_output"] == expected["text_output"]
    for name in contract.LOG_PROB_OUTPUTS:
        assert np.asarray(answer[name]).size > 0, answer
        np.testing.assert_allclose(answer[name], expected[name], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("body, field", [({"text_input": "Hello", "max_tokens": 0}, "max_tokens"),
                                         ({"text_input": "Hello", "max_tokens": 4, "top_k": -1}, "top_k"),
                                         ({"text_input": "Hello", "max_tokens": 10 ** 6}, "max_tokens")])
def test_a_bad_request_gets_a_400_naming_its_field(fused_streaming: TritonServer, body: dict, field: str) -> None:
    with pytest.raises(urllib.error.HTTPError) as raised:
        generate_json(fused_streaming, body)
    assert raised.value.code == 400
    assert field in json.loads(raised.value.read().decode())["error"]
    with TextClient(fused_streaming.http_url) as client:  # and the model still answers
        assert client.generate("Hello", max_tokens=3).finish_reason in ("stop", "length")


def test_a_client_that_hangs_up_frees_its_row(fused_streaming: TritonServer, tiny_ft_dir: Path) -> None:
    """Called directly (no ensemble in between), Triton cancels the request itself when the client goes away."""
    max_tokens = GptModelConfig.from_ini(tiny_ft_dir / "config.ini").max_pos_seq_len - 8
    body = json.dumps({"text_input": "Hello", "max_tokens": max_tokens, "min_tokens": max_tokens,
                       "stream": True}).encode()
    host, port = fused_streaming.http_url.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=30) as conn:
        conn.sendall(b"POST /v2/models/ensemble/generate_stream HTTP/1.1\r\nHost: x\r\nContent-Type: "
                     b"application/json\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        received = b""
        while b"data: " not in received:
            received += conn.recv(4096)
    pattern = r"a request was cancelled; its 1 running row\(s\) stop after \[(\d+)\] generated tokens"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not re.search(pattern, fused_streaming.log_text()):
        time.sleep(0.1)
    found = re.search(pattern, fused_streaming.log_text())
    assert found is not None, fused_streaming.log_text()[-3000:]
    assert int(found.group(1)) < max_tokens


def test_the_openai_api_serves_a_text_core(fused_streaming: TritonServer, classic_streaming: TritonServer) -> None:
    import openai

    from builder.openai_api import ApiSettings, OpenAIServer
    from builder.serve import free_port

    [expected] = generate_json(classic_streaming, {"text_input": "Hello there", "max_tokens": 8})
    with OpenAIServer(ApiSettings(fused_streaming.grpc_url), port=free_port()) as api:
        client = openai.OpenAI(base_url=api.url, api_key="unused", max_retries=0, timeout=60)
        assert [model.id for model in client.models.list()] == ["ensemble"]
        completion = client.completions.create(model="ensemble", prompt="Hello there", max_tokens=8, temperature=0)
        assert completion.choices[0].text == expected["text_output"]
        assert completion.usage.completion_tokens == expected["num_output_tokens"]
        chunks = client.completions.create(model="ensemble", prompt="Hello there", max_tokens=8, temperature=0,
                                           stream=True)
        assert "".join(chunk.choices[0].text for chunk in chunks if chunk.choices) == expected["text_output"]
