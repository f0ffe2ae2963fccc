"""Client pieces that need no server: error cleaning, request tensors, JSON bodies, parsing, SSE, CLI wiring."""

from __future__ import annotations

from pathlib import Path

import click
import httpx
import numpy as np
import pytest
from click.testing import CliRunner

from client.cli import cli
from client.connection import ConnectionConfig, normalize_url, translate_error
from client.errors import (RequestError, RequestTimeoutError, ServerUnavailableError, WrongEndpointError,
                           clean_server_message)
from client.perf import LevelRun
from client.perf_report import LevelResult, Percentiles, UnstableLevel, added_latency, added_latency_warnings, \
    markdown_table
from client.request import GenerationResult, ModelInfo, SamplingParams, TextRequest, parse_results
from client.sse import SseParser, error_from_body
from tritonclient.utils import InferenceServerException

FULL = ModelInfo(name="ensemble", decoupled=False, max_batch_size=8, inputs=frozenset({
    "text_input", "max_tokens", "stop_words", "bad_words", "top_k", "top_p", "temperature", "random_seed",
    "return_log_probs", "exclude_input_in_output"}))
STREAMING = ModelInfo(name="ensemble", decoupled=True, max_batch_size=8, inputs=FULL.inputs | {"stream"})


@pytest.mark.parametrize("raw, clean", [
    ("[StatusCode.INVALID_ARGUMENT] in ensemble 'ensemble', Failed to process the request(s) for model instance "
     "'preprocessing_0_0', message: ValueError: max_tokens must be >= 1, got 0", "max_tokens must be >= 1, got 0"),
    ("in ensemble 'ensemble', Failed to process the request(s) for model instance 'preprocessing_0_1', message: "
     "TritonModelException: Traceback (most recent call last):\n  File \"model.py\", line 3, in execute\n"
     "AttributeError: 'int' object has no attribute 'decode'",
     "AttributeError: 'int' object has no attribute 'decode'"),
    ("unexpected inference input 'max_tokenz' for model 'ensemble'",
     "unexpected inference input 'max_tokenz' for model 'ensemble'"),
    ("  top_p must be in (0, 1],\n  got 2.0 ", "top_p must be in (0, 1], got 2.0"),
])
def test_clean_server_message(raw: str, clean: str) -> None:
    assert clean_server_message(raw) == clean


def test_translate_error_classifies_transport_failures() -> None:
    config = ConnectionConfig.create("h:1", "grpc", "ensemble", 2.0, 3)
    refused = InferenceServerException("failed to connect to all addresses; Connection refused",
                                       status="StatusCode.UNAVAILABLE")
    assert isinstance(translate_error(refused, config), ServerUnavailableError)
    late = InferenceServerException("Deadline Exceeded", status="StatusCode.DEADLINE_EXCEEDED")
    assert isinstance(translate_error(late, config), RequestTimeoutError)
    bad = InferenceServerException("in ensemble 'ensemble', bad stop_words", status="StatusCode.INVALID_ARGUMENT")
    err = translate_error(bad, config)
    assert isinstance(err, RequestError) and str(err) == "bad stop_words"
    assert isinstance(translate_error(ConnectionRefusedError(111, "Connection refused"), config),
                      ServerUnavailableError)
    assert isinstance(translate_error(TimeoutError("timed out"), config), RequestTimeoutError)


@pytest.mark.parametrize("url, protocol, expected", [
    (None, "http", "localhost:8000"), (None, "grpc", "localhost:8001"), ("gpu-host", "grpc", "gpu-host:8001"),
    ("http://gpu-host:9000/", "http", "gpu-host:9000"), ("10.0.0.2:8000", "grpc", "10.0.0.2:8000"),
])
def test_normalize_url(url: str | None, protocol: str, expected: str) -> None:
    assert normalize_url(url, protocol) == expected


def test_connection_config_validates_once() -> None:
    with pytest.raises(ValueError, match="protocol"):
        ConnectionConfig.create(None, "udp", "ensemble", 1.0, 0)
    with pytest.raises(ValueError, match="timeout_s"):
        ConnectionConfig.create(None, "http", "ensemble", 0, 0)
    config = ConnectionConfig.create(None, "http", "ensemble", 1.0, 5, backoff_s=0.5)
    assert [config.backoff(n) for n in range(1, 6)] == [0.5, 1.0, 2.0, 4.0, 4.0]  # exponential, capped


def test_sampling_params_name_the_bad_field() -> None:
    with pytest.raises(ValueError, match="random_seed must be in"):
        SamplingParams(random_seed=-1)
    with pytest.raises(ValueError, match="top_k must be in"):
        SamplingParams(top_k=2**31)
    with pytest.raises(TypeError, match="return_log_probs must be a bool"):
        SamplingParams(return_log_probs=1)  # type: ignore[arg-type]  # the wrong type, on purpose
    with pytest.raises(TypeError, match="unknown generation option 'topk'"):
        SamplingParams.from_kwargs(topk=3)
    params = SamplingParams.from_kwargs(seed=7, stop="end", length_penalty=1.0)
    assert (params.random_seed, params.stop_words, params.len_penalty) == (7, ("end",), 1.0)


def test_request_tensors_have_the_batch_dimension_first() -> None:
    request = TextRequest(("héllo", "b"), 12, SamplingParams(top_p=0.5, stop_words=("x", "y z"),
                                                               random_seed=2**64 - 1))
    tensors = {t.name: t for t in request.tensors(FULL)}
    assert set(tensors) == {"text_input", "max_tokens", "top_p", "random_seed", "stop_words"}
    assert tensors["text_input"].data.shape == (2, 1) and tensors["text_input"].data[0, 0] == "héllo".encode()
    assert (tensors["max_tokens"].datatype, tensors["max_tokens"].data.dtype) == ("INT32", np.int32)
    assert tensors["max_tokens"].data.tolist() == [[12], [12]]
    assert tensors["random_seed"].data.dtype == np.uint64 and int(tensors["random_seed"].data[1, 0]) == 2**64 - 1
    assert tensors["stop_words"].data.shape == (2, 2) and tensors["stop_words"].data[1, 1] == b"y z"
    streamed = {t.name: t for t in TextRequest(("a",), 3, stream=True).tensors(STREAMING)}
    assert streamed["stream"].datatype == "BOOL" and streamed["stream"].data.tolist() == [[True]]


def test_request_refuses_inputs_the_model_lacks() -> None:
    with pytest.raises(RequestError, match="has no input 'presence_penalty'"):
        TextRequest(("a",), 3, SamplingParams(presence_penalty=0.5)).tensors(FULL)


def test_generate_body_maps_rows_onto_the_batch_dimension() -> None:
    one = TextRequest(("a b",), 5, SamplingParams(top_k=3, stop_words=("c",)), stream=True).generate_body(STREAMING)
    assert one == {"text_input": "a b", "max_tokens": 5, "top_k": 3, "stop_words": ["c"], "stream": True}
    two = TextRequest(("a", "b"), 5, stream=True).generate_body(STREAMING)
    assert two == {"text_input": ["a", "b"], "max_tokens": [5, 5], "stream": [True, True]}
    with pytest.raises(RequestError, match="stop_words"):
        TextRequest(("a", "b"), 5, SamplingParams(stop_words=("c",))).generate_body(STREAMING)


def test_parse_results_from_tensors_and_from_generate_json() -> None:
    arrays = {"text_output": np.array([[b" 4 5"], [b" b"]], dtype=object),
              "finish_reason": np.array([[b"length"], [b"stop"]], dtype=object),
              "num_input_tokens": np.array([[3], [2]], np.int32), "num_output_tokens": np.array([[2], [1]], np.int32),
              "output_log_probs": np.full((2, 1, 2), -0.25, np.float32)}
    from_tensors = parse_results(["1 2 3", "a b"], arrays.get)
    # /generate_stream flattens every tensor; a single element comes back as a scalar.
    flat = {"text_output": [" 4 5", " b"], "finish_reason": ["length", "stop"], "num_input_tokens": [3, 2],
            "num_output_tokens": [2, 1], "output_log_probs": [-0.25] * 4}
    from_json = parse_results(["1 2 3", "a b"], flat.get)
    assert from_tensors == from_json
    assert from_json[1] == GenerationResult(prompt="a b", text=" b", finish_reason="stop", num_input_tokens=2,
                                            num_output_tokens=1, beams=(" b",), output_log_probs=(-0.25, -0.25))
    scalar = parse_results(["x"], {"text_output": " y", "num_output_tokens": 1, "finish_reason": ""}.get)[0]
    assert (scalar.text, scalar.num_output_tokens, scalar.finish_reason) == (" y", 1, None)


def test_merged_stream_deltas() -> None:
    total = GenerationResult(prompt="p", text="")
    for text, count, reason in ((" a", 1, None), ("", 1, None), (" b", 2, "length")):
        total = total.merged(GenerationResult(prompt="p", text=text, num_output_tokens=count, beams=(text,),
                                              finish_reason=reason))
    assert (total.text, total.beams, total.num_output_tokens, total.finish_reason) == (" a b", (" a b",), 2, "length")


def test_sse_parser_checks_every_event() -> None:
    parser = SseParser()
    events = [parser.feed(line) for line in ['data: {"text_output":" a"}\n', "\n", ": keep-alive\n",
                                             'data: {"text_output":" b"}\n', "\n"]]
    assert [e for e in events if e] == [{"text_output": " a"}, {"text_output": " b"}]
    parser.feed('data: {"error":"in ensemble \'ensemble\', max_tokens must be >= 1"}\n')
    with pytest.raises(RequestError, match=r"^max_tokens must be >= 1$"):
        parser.feed("\n")


def test_error_bodies() -> None:
    assert str(error_from_body(400, b'{"error":"unexpected inference input \'x\'"}')) == \
        "unexpected inference input 'x'"
    sse = error_from_body(400, b'data: {"error":"max_tokens must be at least 1, got 0"}\n\n')
    assert (str(sse), sse.status) == ("max_tokens must be at least 1, got 0", "400")
    assert str(error_from_body(502, b"<html>bad gateway</html>")).startswith("HTTP 502")


def test_cli_help_explains_both_commands() -> None:
    runner = CliRunner()
    top = runner.invoke(cli, ["--help"])
    assert top.exit_code == 0 and "generate" in top.output and "perf" in top.output
    assert '"1 2 3 4 5 6"' in top.output
    generate = runner.invoke(cli, ["generate", "--help"])
    assert "--output-length" in generate.output and "--stream" in generate.output
    perf = runner.invoke(cli, ["perf", "--help"])
    assert "--compare-core" in perf.output and "--concurrency" in perf.output


def test_cli_usage_errors() -> None:
    runner = CliRunner()
    assert runner.invoke(cli, ["generate"]).exit_code == 2  # neither prompt nor --file
    result = runner.invoke(cli, ["perf", "--stream", "--protocol", "http"])
    assert result.exit_code == 1 and "--protocol grpc" in result.stderr
    result = runner.invoke(cli, ["perf", "--concurrency", "4:1"])
    assert result.exit_code == 1 and "end >= start" in result.stderr


def _options(command: click.Command, path: str) -> list[tuple[str, click.Option]]:
    found = [(f"{path} {param.opts[-1]}", param) for param in command.get_params(click.Context(command))
             if isinstance(param, click.Option)]
    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            found += _options(sub, f"{path} {name}")
    return found


def test_every_option_of_the_client_and_convert_has_help() -> None:
    from builder.checkpoints.cli import convert_command

    options = _options(cli, "client") + _options(convert_command, "convert")
    names = {name for name, _ in options}
    assert {"client generate --top-p", "client perf --output", "convert --weight-data-type"} <= names  # walked all
    missing = [name for name, option in options if not (option.help or "").strip()]
    assert not missing, f"options without help text: {missing}"


def test_wrong_port_errors_say_which_port() -> None:
    http = ConnectionConfig.create("h:8001", "http", "ensemble", 2.0, 3)
    parse_error = type("HTTPParseError", (Exception,), {})(("Expected HTTP/", 8))  # geventhttpclient's, at gRPC
    err = translate_error(parse_error, http)
    assert isinstance(err, WrongEndpointError) and "is this the HTTP port?" in str(err)
    grpc = ConnectionConfig.create("h:8000", "grpc", "ensemble", 2.0, 3)
    closed = InferenceServerException("failed to connect to all addresses; last error: UNAVAILABLE: "
                                      "ipv4:127.0.0.1:8000: Socket closed", status="StatusCode.UNAVAILABLE")
    assert "is this the gRPC port?" in str(translate_error(closed, grpc))
    refused = InferenceServerException("failed to connect to all addresses; Connection refused",
                                       status="StatusCode.UNAVAILABLE")
    assert "port?" not in str(translate_error(refused, grpc))  # nobody listens: no guess about the port


def test_httpx_errors_map_to_the_client_errors() -> None:
    http = ConnectionConfig.create("h:8001", "http", "ensemble", 2.0, 3)
    # h11's words for the gRPC port's HTTP/2 frames: another endpoint, with the hint.
    garbled = translate_error(httpx.RemoteProtocolError("illegal request line"), http)
    assert isinstance(garbled, WrongEndpointError) and "is this the HTTP port?" in str(garbled)
    # A server that closes the connection (a restart) is unavailable, so retried, and no port is blamed.
    closed = translate_error(httpx.RemoteProtocolError("Server disconnected without sending a response."), http)
    assert isinstance(closed, ServerUnavailableError) and "port?" not in str(closed)
    # asyncio's refusal sits under anyio's "All connection attempts failed": the words come from the innermost cause.
    refused = httpx.ConnectError("All connection attempts failed")
    try:
        try:
            raise ConnectionRefusedError(111, "Connect call failed ('127.0.0.1', 1)")
        except ConnectionRefusedError as inner:
            raise refused from inner
    except httpx.ConnectError:
        pass
    assert "connection refused" in str(translate_error(refused, http))
    assert isinstance(translate_error(httpx.ReadTimeout("timed out"), http), RequestTimeoutError)


def _latency(model: str, level: int, p50: float) -> LevelResult:
    stats = Percentiles(avg=p50, p50=p50, p90=p50, p95=p50, p99=p50 + 1)
    return LevelResult(model=model, concurrency=level, requests=10, throughput_rps=50.0, latency_ms=stats)


def test_negative_added_latency_is_warned_as_noise() -> None:
    ensemble = [_latency("ensemble", 1, 1.9), _latency("ensemble", 2, 4.0)]
    core = [_latency("gpt", 1, 2.0), _latency("gpt", 2, 3.0)]
    added = added_latency(ensemble, core)
    warnings = added_latency_warnings(added)
    assert len(warnings) == 1 and "concurrency 1" in warnings[0] and "p50 -0.10 ms" in warnings[0]
    assert "noise" in warnings[0]
    table = markdown_table("perf", {}, ensemble, core, added, notes=warnings)
    assert warnings[0] in table


def test_unstable_levels_are_rows_of_the_table() -> None:
    ensemble = [_latency("ensemble", 1, 2.0), _latency("ensemble", 4, 3.0)]
    unstable = [UnstableLevel("ensemble", 2, "Failed to obtain stable measurement within 3 measurement windows")]
    table = markdown_table("perf", {}, ensemble, [], [], unstable).splitlines()
    rows = [line for line in table if line.startswith("| ensemble |")]
    assert [row.split(" | ")[1] for row in rows] == ["1", "2", "4"]  # in concurrency order
    assert rows[1] == "| ensemble | 2 | unstable | - | - | - |"
    assert any("within 3 measurement windows" in line for line in table)


def test_level_files_of_a_dotted_model_name_stay_apart(tmp_path: Path) -> None:
    runs = [LevelRun.in_folder(tmp_path, "gpt3_1.3b", level, False, tmp_path / "in.json") for level in (1, 2)]
    assert [run.csv_path.name for run in runs] == ["gpt3_1.3b_c1.csv", "gpt3_1.3b_c2.csv"]
    assert [run.export_path.name for run in runs] == ["gpt3_1.3b_c1_export.json", "gpt3_1.3b_c2_export.json"]
