"""The text client (library, CLI, perf runs) against a real tritonserver.

Until the real ensemble exists, the server runs a stand-in: a Python-backend model named `ensemble` with exactly
the ensemble's public contract, whose continuation is the deterministic `continuation()` below (counting on from
a prompt of integers, else the prompt's words backwards), one word per token. The streaming repository makes it
decoupled: one response per word. To test against the real rendered repositories, change `text_repository`,
`streaming_text_repository` and `core_model_name` (and the oracle `continuation`, e.g. to HF GPT-2).
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from builder.serve import TritonServer, free_port
from client import (AsyncTextClient, RequestError, RequestTimeoutError, ServerUnavailableError, TextClient,
                    TextClientError, WrongEndpointError)
from client.cli import cli
from client.perf import PerfConfig, find_perf_analyzer, run_perf
from servers import server_on_free_ports

pytestmark = pytest.mark.server
ROOT = Path(__file__).resolve().parent.parent


def continuation(prompt: str, max_tokens: int, stop_words: set) -> tuple[list, str]:
    """The stand-in's answer: counts on from a prompt of integers, else repeats its words backwards."""
    words = prompt.split()
    if words and all(w.isdigit() for w in words):
        candidates = [str(int(words[-1]) + 1 + i) for i in range(max_tokens)]
    else:
        cycle = list(reversed(words)) or ["x"]
        candidates = [cycle[i % len(cycle)] for i in range(max_tokens)]
    out = []
    for word in candidates:
        if word in stop_words:
            return out, "stop"
        out.append(word)
    return out, "length"


def expected(prompt: str, max_tokens: int, stop_words: tuple[str, ...] = ()) -> str:
    return "".join(" " + word for word in continuation(prompt, max_tokens, set(stop_words))[0])


STANDIN_MODEL = '''
import json
import time

import numpy as np
import triton_python_backend_utils as pb_utils

CONTINUATION


def optional(request, name, default):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return default if tensor is None else tensor.as_numpy()


class TritonPythonModel:
    def initialize(self, args):
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(json.loads(args["model_config"]))

    def parse(self, request):
        prompts = [p.decode() for p in pb_utils.get_input_tensor_by_name(request, "text_input").as_numpy()[:, 0]]
        max_tokens = pb_utils.get_input_tensor_by_name(request, "max_tokens").as_numpy()[:, 0]
        if int(max_tokens.min()) < 1:
            raise ValueError(f"max_tokens must be at least 1, got {int(max_tokens.min())}")
        rows = len(prompts)
        stops = optional(request, "stop_words", np.zeros((rows, 0), dtype=object))
        exclude = optional(request, "exclude_input_in_output", np.ones((rows, 1), dtype=bool))[:, 0]
        log_probs = bool(optional(request, "return_log_probs", np.zeros((rows, 1), dtype=bool)).any())
        stream = bool(optional(request, "stream", np.zeros((rows, 1), dtype=bool)).any())
        results = []
        for b, prompt in enumerate(prompts):
            if prompt.startswith("sleep "):  # lets the tests provoke a client timeout
                time.sleep(float(prompt.split()[1]))
            words, reason = continuation(prompt, int(max_tokens[b]), {w.decode() for w in stops[b]})
            results.append(("" if exclude[b] else prompt, words, reason, len(prompt.split())))
        return results, log_probs, stream

    @staticmethod
    def response(texts, reasons, n_in, n_out, log_probs):
        tensors = [
            pb_utils.Tensor("text_output", np.array([[t.encode()] for t in texts], dtype=object)),
            pb_utils.Tensor("finish_reason", np.array([[r.encode()] for r in reasons], dtype=object)),
            pb_utils.Tensor("num_input_tokens", np.array([[n] for n in n_in], dtype=np.int32)),
            pb_utils.Tensor("num_output_tokens", np.array([[n] for n in n_out], dtype=np.int32)),
        ]
        if log_probs:
            tensors.append(pb_utils.Tensor("cum_log_probs", np.array([[-0.5 * n] for n in n_out], np.float32)))
            tensors.append(pb_utils.Tensor("output_log_probs", np.full((len(texts), 1, max(n_out)), -0.5,
                                                                       np.float32)))
        return pb_utils.InferenceResponse(output_tensors=tensors)

    def execute(self, requests):
        responses = []
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        for request in requests:
            sender = request.get_response_sender() if self.decoupled else None
            try:
                results, log_probs, stream = self.parse(request)
            except ValueError as err:
                error = pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(str(err), pb_utils.TritonError.INVALID_ARG))
                if sender is None:
                    responses.append(error)
                else:
                    sender.send(error, flags=final)
                continue
            n_in = [r[3] for r in results]
            if not (self.decoupled and stream):
                full = self.response([p + "".join(" " + w for w in ws) for p, ws, _, _ in results],
                                     [r[2] for r in results], n_in, [len(r[1]) for r in results], log_probs)
                if sender is None:
                    responses.append(full)
                else:
                    sender.send(full, flags=final)
                continue
            steps = max(1, max(len(r[1]) for r in results))
            for step in range(steps):  # one word per response; counts are cumulative
                time.sleep(0.002)
                texts = [(p if step == 0 else "") + (" " + ws[step] if step < len(ws) else "")
                         for p, ws, _, _ in results]
                reasons = [reason if step == steps - 1 else "" for _, _, reason, _ in results]
                sender.send(self.response(texts, reasons, n_in, [min(step + 1, len(r[1])) for r in results],
                                          log_probs))
            sender.send(flags=final)
        return None if self.decoupled else responses
'''

# A stand-in for the core model with FT's token-id contract, for the --compare-core perf run.
STANDIN_CORE_MODEL = '''
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            ids = pb_utils.get_input_tensor_by_name(request, "input_ids").as_numpy()  # [B, T]
            new = int(pb_utils.get_input_tensor_by_name(request, "request_output_len").as_numpy().max())
            generated = np.full((ids.shape[0], new), 13, np.uint32)
            output_ids = np.concatenate([ids.astype(np.uint32), generated], axis=1)[:, None, :]  # [B, beam=1, T]
            lengths = np.full((ids.shape[0], 1), output_ids.shape[-1], np.uint32)
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("output_ids", output_ids), pb_utils.Tensor("sequence_length", lengths)]))
        return responses
'''

ENSEMBLE_INPUTS = [("text_input", "TYPE_STRING", "[1]"), ("max_tokens", "TYPE_INT32", "[1]"),
                   ("stop_words", "TYPE_STRING", "[-1]"), ("bad_words", "TYPE_STRING", "[-1]"),
                   ("top_k", "TYPE_INT32", "[1]"), ("top_p", "TYPE_FP32", "[1]"), ("temperature", "TYPE_FP32", "[1]"),
                   ("repetition_penalty", "TYPE_FP32", "[1]"), ("presence_penalty", "TYPE_FP32", "[1]"),
                   ("min_tokens", "TYPE_INT32", "[1]"), ("len_penalty", "TYPE_FP32", "[1]"),
                   ("beam_width", "TYPE_INT32", "[1]"), ("random_seed", "TYPE_UINT64", "[1]"),
                   ("end_id", "TYPE_INT32", "[1]"), ("pad_id", "TYPE_INT32", "[1]"),
                   ("return_log_probs", "TYPE_BOOL", "[1]"), ("exclude_input_in_output", "TYPE_BOOL", "[1]")]
ENSEMBLE_OUTPUTS = [("text_output", "TYPE_STRING", "[-1]"), ("num_input_tokens", "TYPE_INT32", "[1]"),
                    ("num_output_tokens", "TYPE_INT32", "[-1]"), ("finish_reason", "TYPE_STRING", "[-1]"),
                    ("cum_log_probs", "TYPE_FP32", "[-1]"), ("output_log_probs", "TYPE_FP32", "[-1, -1]")]
REQUIRED = {"text_input", "max_tokens"}
DOTTED_CORE = "gpt3_1.3b"


def _tensor_lines(kind: str, specs: list[tuple[str, str, str]], required: set[str]) -> list[str]:
    optional = "" if kind == "output" else " optional: {}"
    return [f'{kind} {{ name: "{name}" data_type: {dtype} dims: {dims}'
            + (optional.format(str(name not in required).lower()) if optional else "") + " }"
            for name, dtype, dims in specs]


def write_model(repo: Path, name: str, source: str, config_lines: list[str]) -> None:
    (repo / name / "1").mkdir(parents=True)
    (repo / name / "1" / "model.py").write_text(source)
    (repo / name / "config.pbtxt").write_text("\n".join([f'name: "{name}"', 'backend: "python"', *config_lines]) + "\n")


def write_standin_repository(repo: Path, decoupled: bool) -> Path:
    """A repository whose `ensemble` honours the text ensemble's contract (plus a token-id core model)."""
    inputs = ENSEMBLE_INPUTS + ([("stream", "TYPE_BOOL", "[1]")] if decoupled else [])
    model_source = STANDIN_MODEL.replace("CONTINUATION", textwrap.dedent(inspect.getsource(continuation)))
    write_model(repo, "ensemble", model_source, [
        "max_batch_size: 8", "dynamic_batching {}", "instance_group [{ count: 2, kind: KIND_CPU }]",
        *(["model_transaction_policy { decoupled: true }"] if decoupled else []),
        *_tensor_lines("input", inputs, REQUIRED), *_tensor_lines("output", ENSEMBLE_OUTPUTS, set())])
    if not decoupled:
        # Two names for the core model: the second has a dot, as the real "gpt3_1.3b" does.
        for core_name in ("gpt_core", DOTTED_CORE):
            write_model(repo, core_name, STANDIN_CORE_MODEL, [
                "max_batch_size: 8", "instance_group [{ count: 1, kind: KIND_CPU }]",
                *_tensor_lines("input", [("input_ids", "TYPE_UINT32", "[-1]"),
                                         ("input_lengths", "TYPE_UINT32", "[1]"),
                                         ("request_output_len", "TYPE_UINT32", "[-1]")],
                               {"input_ids", "input_lengths", "request_output_len"}),
                *_tensor_lines("output", [("output_ids", "TYPE_UINT32", "[-1, -1]"),
                                          ("sequence_length", "TYPE_UINT32", "[-1]")], set())])
    return repo


# -- fixtures ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def text_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The non-streaming text repository under test (swap in a rendered repository here)."""
    return write_standin_repository(tmp_path_factory.mktemp("text_repo"), decoupled=False)


@pytest.fixture(scope="module")
def streaming_text_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The streaming (decoupled) text repository under test."""
    return write_standin_repository(tmp_path_factory.mktemp("text_repo_stream"), decoupled=True)


@pytest.fixture(scope="module")
def core_model_name() -> str:
    return "gpt_core"


def _module_server(repository: Path) -> Iterator[TritonServer]:
    # Module-scoped twin of conftest's `start_server` (function-scoped): one server start per repository.
    server = server_on_free_ports(repository)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def server(text_repository: Path) -> Iterator[TritonServer]:
    yield from _module_server(text_repository)


@pytest.fixture(scope="module")
def streaming_server(streaming_text_repository: Path) -> Iterator[TritonServer]:
    yield from _module_server(streaming_text_repository)


def url_of(server: TritonServer, protocol: str) -> str:
    return server.http_url if protocol == "http" else server.grpc_url


def request_counts(server: TritonServer, settle_s: float = 0.3) -> tuple[int, int]:
    """(requests, rows) the ensemble has served so far, from Triton's statistics.

    The Python backend records statistics just after it sends a response: read until they stop changing.
    """
    import tritonclient.http as triton_http

    client = triton_http.InferenceServerClient(server.http_url)
    counts, deadline = None, time.monotonic() + settle_s
    while True:
        stats = client.get_inference_statistics("ensemble")["model_stats"][0]
        latest = int(stats["inference_stats"]["success"]["count"]), int(stats["inference_count"])
        if latest == counts or time.monotonic() > deadline:
            client.close()
            return latest
        counts = latest
        time.sleep(0.05)


# -- library -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_generate_one_prompt_and_a_batch_in_one_request(server: TritonServer, protocol: str) -> None:
    with TextClient(url_of(server, protocol), protocol=protocol) as client:
        single = client.generate("1 2 3 4 5 6", max_tokens=30)
        assert single.text == expected("1 2 3 4 5 6", 30)
        assert single.text.split()[-1] == "36"
        assert (single.finish_reason, single.num_input_tokens, single.num_output_tokens) == ("length", 6, 30)

        prompts = ["7 8 9", "the cat sat", "alpha beta stop gamma"]
        before = request_counts(server)
        batch = client.generate(prompts, max_tokens=5, stop_words=["beta"], top_k=4, top_p=0.9, temperature=0.7,
                                random_seed=2**64 - 1, return_log_probs=True)
        after = request_counts(server)
    assert after[0] - before[0] == 1, "a list of prompts must travel as ONE request"
    assert after[1] - before[1] == len(prompts), "... of B rows"
    assert [r.text for r in batch] == [expected(p, 5, ("beta",)) for p in prompts]
    assert [r.finish_reason for r in batch] == ["length", "length", "stop"]
    assert [r.num_output_tokens for r in batch] == [5, 5, 2]
    assert batch[0].cum_log_prob == pytest.approx(-2.5) and batch[0].output_log_probs == (-0.5,) * 5


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_stream_yields_deltas_and_generate_joins_them(streaming_server: TritonServer, protocol: str) -> None:
    # HTTP streams through POST /v2/models/ensemble/generate_stream (SSE); gRPC through ModelStreamInfer.
    with TextClient(url_of(streaming_server, protocol), protocol=protocol) as client:
        deltas = list(client.stream("10 11", max_tokens=6))
        assert deltas == [" " + word for word in continuation("10 11", 6, set())[0]]
        # Plain infer endpoints reject decoupled models: generate() must go through the stream and join it.
        joined = client.generate(["10 11", "x y"], max_tokens=6)
        stopped = client.generate("a b c", max_tokens=6, stop=["a"])
        early = client.stream("1 2 3", max_tokens=200)
        assert next(early) == " 4"
        early.close()  # stopping early cancels the rest; the client stays usable
        assert client.generate("1", max_tokens=2).text == " 2 3"
    assert [r.text for r in joined] == [expected("10 11", 6), expected("x y", 6)]
    assert [r.num_output_tokens for r in joined] == [6, 6] and joined[0].finish_reason == "length"
    assert (stopped.text, stopped.finish_reason) == (expected("a b c", 6, ("a",)), "stop")


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_stream_error_is_one_line_naming_the_input(streaming_server: TritonServer, protocol: str) -> None:
    with TextClient(url_of(streaming_server, protocol), protocol=protocol) as client:
        with pytest.raises(RequestError) as caught:
            list(client.stream("1 2", max_tokens=0))
    message = str(caught.value)
    assert "max_tokens" in message and "\n" not in message and "StatusCode" not in message


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_async_client(server: TritonServer, streaming_server: TritonServer, protocol: str) -> None:
    async def scenario() -> None:
        async with AsyncTextClient(url_of(server, protocol), protocol=protocol) as client:
            batch = await client.generate(["1 2", "b a"], max_tokens=4)
            assert [r.text for r in batch] == [expected("1 2", 4), expected("b a", 4)]
            prompts = [f"{i} {i + 1}" for i in range(12)]
            many = await client.generate_many(prompts, max_tokens=3, concurrency=4)
            assert [r.text for r in many] == [expected(p, 3) for p in prompts]
            with pytest.raises(RequestError, match="max_tokens"):
                await client.generate("1", max_tokens=0)
        async with AsyncTextClient(url_of(streaming_server, protocol), protocol=protocol) as client:
            # Several streams at once on one client.
            streams = await asyncio.gather(*[collect(client.stream(f"{i}", max_tokens=4)) for i in range(3)])
            assert streams == [[" " + w for w in continuation(f"{i}", 4, set())[0]] for i in range(3)]

    async def collect(stream) -> list[str]:
        return [piece async for piece in stream]

    asyncio.run(scenario())


def test_generate_many_keeps_order_and_reports_failures(server: TritonServer) -> None:
    prompts = [f"{i}" for i in range(10)]
    with TextClient(server.grpc_url, protocol="grpc") as client:
        results = client.generate_many(prompts, max_tokens=2, concurrency=3)
        assert [r.text for r in results] == [expected(p, 2) for p in prompts]
        mixed = client.generate_many(["1", "2"], max_tokens=0, concurrency=2, return_exceptions=True)
    assert all(isinstance(item, RequestError) for item in mixed)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_timeout_is_a_clear_error(server: TritonServer, protocol: str) -> None:
    with TextClient(url_of(server, protocol), protocol=protocol, timeout_s=0.3) as client:
        start = time.monotonic()
        with pytest.raises(RequestTimeoutError, match="within 0.3 s"):
            client.generate("sleep 1.0", max_tokens=1)
    assert time.monotonic() - start < 0.9


@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_connection_refused_is_retried_then_fails(protocol: str, flavour: str,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    url = f"127.0.0.1:{free_port()}"

    async def async_generate() -> None:
        async with AsyncTextClient(url, protocol=protocol, retries=2, backoff_s=0.01) as client:
            await client.generate("1 2", max_tokens=2)

    with caplog.at_level(logging.WARNING, logger="client"), pytest.raises(ServerUnavailableError) as caught:
        if flavour == "sync":
            TextClient(url, protocol=protocol, retries=2, backoff_s=0.01).generate("1 2", max_tokens=2)
        else:
            asyncio.run(async_generate())
    retries = [record for record in caplog.records if "retrying" in record.getMessage()]
    assert len(retries) == 2
    assert "connection refused" in str(caught.value) and "gave up after 3 attempts" in str(caught.value)


def test_model_errors_are_not_retried(server: TritonServer, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="client"), TextClient(server.http_url) as client:
        with pytest.raises(RequestError, match="max_tokens must be at least 1") as caught:
            client.generate("1", max_tokens=0)
    assert caught.value.status == "400"
    assert not [record for record in caplog.records if "retrying" in record.getMessage()]


# -- CLI ---------------------------------------------------------------------------------------------------------
def invoke(*args: str) -> object:
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_cli_prints_prompt_and_continuation(server: TritonServer) -> None:
    result = invoke("1 2 3 4 5 6", "--server", server.http_url)
    assert result.exit_code == 0, result.output
    assert result.stdout == "1 2 3 4 5 6" + expected("1 2 3 4 5 6", 30) + "\n"
    only = invoke("5 6", "--server", server.grpc_url, "--protocol", "grpc", "--output-length", "3",
                  "--only-continuation", "--stop", "8")
    assert only.stdout == expected("5 6", 3, ("8",)) + "\n"


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_cli_stream(streaming_server: TritonServer, protocol: str) -> None:
    result = invoke("1 2 3", "--server", url_of(streaming_server, protocol), "--protocol", protocol, "--stream",
                    "-n", "5")
    assert result.exit_code == 0, result.output
    assert result.stdout == "1 2 3" + expected("1 2 3", 5) + "\n"


def test_cli_file_with_concurrency(server: TritonServer, tmp_path: Path) -> None:
    prompts = [f"{i} {i + 1}" for i in range(7)] + ["the end"]
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(prompts[:4]) + "\n\n" + "\n".join(prompts[4:]) + "\n")
    result = invoke("--file", str(path), "--concurrency", "3", "--server", server.http_url, "-n", "4", "--json")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [row["prompt"] for row in rows] == prompts
    assert [row["text"] for row in rows] == [expected(p, 4) for p in prompts]


@pytest.mark.parametrize("repo, protocol", [("plain", "http"), ("plain", "grpc"), ("streaming", "http"),
                                            ("streaming", "grpc")])
def test_cli_bad_request_is_one_line_and_fails(server: TritonServer, streaming_server: TritonServer, repo: str,
                                               protocol: str) -> None:
    target = server if repo == "plain" else streaming_server
    args = ["1 2 3", "--server", url_of(target, protocol), "--protocol", protocol, "--output-length", "0"]
    result = invoke(*args, *(["--stream"] if repo == "streaming" else []))
    assert result.exit_code == 1
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: ") and "max_tokens" in errors[0], result.stderr
    assert "in ensemble" not in errors[0] and "Traceback" not in result.stderr


def test_cli_unreachable_server_subprocess() -> None:
    # The real entry point, as a user runs it: one line, non-zero exit, after the retries.
    completed = subprocess.run([sys.executable, "-m", "client", "1 2", "--server", f"127.0.0.1:{free_port()}",
                                "--retries", "1"], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert completed.returncode == 1
    lines = completed.stderr.strip().splitlines()
    assert lines[-1].startswith("error: cannot reach Triton") and "connection refused" in lines[-1]
    assert len([line for line in lines if line.startswith("error:")]) == 1 and "Traceback" not in completed.stderr


# -- perf --------------------------------------------------------------------------------------------------------
# These runs test the plumbing, not the numbers. perf_analyzer 2.51 calls a level stable when max/min of the last 3
# windows' throughput and latency is <= 1 + percentage/100; the stand-in answers in ~1 ms, and on a busy 2-core
# machine the ratio was seen above 6 (unstable even at 500 %). A window without any answer is never stable, hence
# a few spare windows.
LOOSE_STABILITY = 100_000.0


def quick_perf(tmp_path: Path, **overrides: object) -> PerfConfig:
    settings: dict[str, object] = dict(output_dir=tmp_path / "perf", prompt_tokens=16, max_tokens=8,
                                       concurrency=(1, 2), measurement_interval_ms=300,
                                       stability_percentage=LOOSE_STABILITY, max_trials=5, num_prompts=4)
    settings.update(overrides)
    return PerfConfig(**settings)


def test_perf_run_with_core_comparison(server: TritonServer, core_model_name: str, tmp_path: Path) -> None:
    config = quick_perf(tmp_path, server=server.http_url, protocol="http", compare_core=core_model_name)
    report = run_perf(config, echo=lambda line: None)
    saved = json.loads((config.output_dir / "report.json").read_text())
    assert saved == json.loads(json.dumps(report))
    assert [r["concurrency"] for r in saved["results"]] == [1, 2]
    for row in saved["results"] + saved["core_results"]:
        assert row["throughput_rps"] > 0 and row["requests"] > 0 and row["latency_ms"]["p99"] > 0
    # Every request asked 8 tokens of the stand-in, one GPT-2 token per " <word>".
    assert all(row["output_tokens_per_request"] == pytest.approx(8) for row in saved["results"])
    assert [row["concurrency"] for row in saved["ensemble_added_latency_ms"]] == [1, 2]
    assert (config.output_dir / "plot.png").stat().st_size > 0
    assert "| ensemble | 1 |" in (config.output_dir / "report.md").read_text()
    data = json.loads((config.output_dir / "raw" / "inputs_ensemble.json").read_text())["data"]
    assert data[0]["max_tokens"] == [8] and data[0]["exclude_input_in_output"] == [True]


def test_perf_streaming_cli(streaming_server: TritonServer, tmp_path: Path) -> None:
    out = tmp_path / "stream"
    result = invoke("perf", "--server", streaming_server.grpc_url, "--stream", "--concurrency", "1:2",
                    "--prompt-tokens", "16", "--max-tokens", "8", "--measurement-interval", "300",
                    "--stability-percentage", f"{LOOSE_STABILITY:g}", "--max-trials", "5", "--output", str(out))
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    for row in report["results"]:
        assert row["throughput_rps"] > 0 and row["output_tokens_per_s"] > 0
        assert 0 < row["ttft_ms"]["p50"] <= row["latency_ms"]["p50"]
        assert row["itl_ms"]["p50"] > 0  # the stand-in sleeps 2 ms per token
    assert "TTFT p50 ms" in result.stdout


def test_perf_refuses_decoupled_model_without_stream(streaming_server: TritonServer, tmp_path: Path) -> None:
    result = invoke("perf", "--server", streaming_server.grpc_url, "--protocol", "grpc", "--output",
                    str(tmp_path / "x"))
    assert result.exit_code == 1 and "--stream" in result.stderr


def perf_analyzer_wrapper(tmp_path: Path, script: str) -> Path:
    """A folder (to put first on PATH) holding a `perf_analyzer` shell script: `script`, in which {real} is the real
    perf_analyzer's path."""
    folder = tmp_path / "bin"
    folder.mkdir()
    wrapper = folder / "perf_analyzer"
    wrapper.write_text("#!/bin/sh\n" + script.replace("{real}", str(find_perf_analyzer())))
    wrapper.chmod(0o755)
    return folder


def unstable_at(tmp_path: Path, model: str, level: int) -> Path:
    """A folder with a `perf_analyzer` that is the real one, except that for `model` at concurrency `level` it must
    find windows within 0 % of each other. Real measurements never are, so perf_analyzer itself gives up on that
    level with its own message and exit status (2, STABILITY_ERROR)."""
    return perf_analyzer_wrapper(tmp_path, f"""case " $* " in
  *" -m {model} "*" --concurrency-range {level} "*) exec "{{real}}" "$@" --stability-percentage 0 ;;
esac
exec "{{real}}" "$@"
""")


def test_perf_records_an_unstable_level_and_goes_on(server: TritonServer, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PERF_ANALYZER", raising=False)
    monkeypatch.setenv("PATH", f"{unstable_at(tmp_path, 'ensemble', 2)}{os.pathsep}{os.environ['PATH']}")
    # The core model's name has a dot: each level must keep its own raw files.
    config = quick_perf(tmp_path, server=server.http_url, protocol="http", concurrency=(1, 2, 3),
                        compare_core=DOTTED_CORE)
    lines: list[str] = []
    report = run_perf(config, echo=lines.append)
    assert [row["concurrency"] for row in report["results"]] == [1, 3]
    assert [row["concurrency"] for row in report["core_results"]] == [1, 2, 3]
    assert [(row["model"], row["concurrency"]) for row in report["unstable"]] == [("ensemble", 2)]
    assert "Failed to obtain stable measurement" in report["unstable"][0]["detail"]
    assert [row["concurrency"] for row in report["ensemble_added_latency_ms"]] == [1, 3]
    assert any(line.startswith("warning: ensemble at concurrency 2 is unstable") for line in lines)
    table = (config.output_dir / "report.md").read_text()
    assert "| ensemble | 2 | unstable |" in table and "| ensemble | 3 |" in table
    raw = config.output_dir / "raw"
    for level in (1, 2, 3):
        rows = (raw / f"{DOTTED_CORE}_c{level}.csv").read_text().splitlines()
        assert rows[1].split(",")[0] == str(level), rows  # the CSV's Concurrency column
        assert (raw / f"{DOTTED_CORE}_c{level}_export.json").is_file()


def truncating_first_export(tmp_path: Path, model: str) -> Path:
    """A folder with a `perf_analyzer` that is the real one, except that the first export it writes for `model` is
    cut short, as perf_analyzer 2.51's own fault leaves it (exit 0, JSON truncated)."""
    marker = tmp_path / "truncated-once"
    return perf_analyzer_wrapper(tmp_path, f""""{{real}}" "$@" || exit $?
case " $* " in
  *" -m {model} "*) [ -e "{marker}" ] && exit 0; touch "{marker}"
    while [ $# -gt 1 ]; do [ "$1" = --profile-export-file ] && path="$2"; shift; done
    head -c 100 "$path" > "$path.cut" && mv "$path.cut" "$path" ;;
esac
""")


def test_perf_measures_a_level_again_when_its_export_is_cut_short(server: TritonServer, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PERF_ANALYZER", raising=False)
    monkeypatch.setenv("PATH", f"{truncating_first_export(tmp_path, 'ensemble')}{os.pathsep}{os.environ['PATH']}")
    lines: list[str] = []
    report = run_perf(quick_perf(tmp_path, server=server.http_url, protocol="http", concurrency=(1,)),
                      echo=lines.append)
    assert (tmp_path / "truncated-once").exists()  # the fault really happened once
    assert [row["concurrency"] for row in report["results"]] == [1] and report["error"] is None
    assert report["results"][0]["output_tokens_per_request"] == pytest.approx(8)
    # At least the forced one: perf_analyzer's own fault may cut a later export of the same level too.
    assert sum("measuring the level again" in line for line in lines) >= 1


def test_perf_cli_fails_when_no_level_is_stable(server: TritonServer, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PERF_ANALYZER", raising=False)
    monkeypatch.setenv("PATH", f"{unstable_at(tmp_path, 'ensemble', 1)}{os.pathsep}{os.environ['PATH']}")
    out = tmp_path / "report"
    result = invoke("perf", "--server", server.http_url, "--concurrency", "1", "--prompt-tokens", "8",
                    "--max-tokens", "4", "--measurement-interval", "300", "--max-trials", "3", "--output", str(out))
    assert result.exit_code == 1 and "no level of ensemble was measured stably" in result.stderr
    assert json.loads((out / "report.json").read_text())["unstable"][0]["concurrency"] == 1  # still written


def test_perf_cli_default_folder_and_a_dotted_core_name(server: TritonServer, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    # As the README runs it: no --output, and a core model named like the real "gpt3_1.3b".
    monkeypatch.chdir(tmp_path)
    result = invoke("perf", "--server", server.http_url, "--concurrency", "1,2", "--compare-core", DOTTED_CORE,
                    "--prompt-tokens", "8", "--max-tokens", "4", "--measurement-interval", "300",
                    "--stability-percentage", f"{LOOSE_STABILITY:g}", "--max-trials", "5")
    assert result.exit_code == 0, result.output
    folders = [path for path in tmp_path.iterdir() if path.is_dir()]
    assert [path.name.startswith("perf-ensemble-") for path in folders] == [True], folders
    assert (folders[0] / "report.json").is_file() and not (tmp_path / "docs").exists()
    raw = folders[0] / "raw"
    for level in (1, 2):
        rows = (raw / f"{DOTTED_CORE}_c{level}.csv").read_text().splitlines()
        assert rows[1].split(",")[0] == str(level), rows  # the CSV's Concurrency column


def metrics_address(server: TritonServer) -> str:
    return f"127.0.0.1:{server.config.metrics_port}"


@pytest.mark.parametrize("protocol, port, hint", [("http", "grpc", "is this the HTTP port?"),
                                                  ("http", "metrics", "is this the HTTP port?"),
                                                  ("grpc", "http", "is this the gRPC port?")])
def test_wrong_port_names_the_likely_mistake(server: TritonServer, protocol: str, port: str, hint: str) -> None:
    url = {"grpc": server.grpc_url, "http": server.http_url, "metrics": metrics_address(server)}[port]
    with pytest.raises(TextClientError) as caught, TextClient(url, protocol=protocol, retries=0) as client:
        client.generate("1 2", max_tokens=2)
    assert hint in str(caught.value), str(caught.value)
    if protocol == "http":  # an answer in another protocol: not worth retrying
        assert isinstance(caught.value, WrongEndpointError)

    async def async_generate() -> None:
        async with AsyncTextClient(url, protocol=protocol, retries=0) as client:
            await client.generate("1 2", max_tokens=2)

    with pytest.raises(TextClientError, match=hint.replace("?", r"\?")):
        asyncio.run(async_generate())


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "client", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=60)


def test_cli_at_the_grpc_port_says_so(server: TritonServer) -> None:
    completed = run_cli("1 2", "--server", server.grpc_url, "--retries", "0")
    assert completed.returncode == 1 and completed.stdout == ""
    lines = completed.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "is this the HTTP port?" in lines[0], lines


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_cli_stream_error_prints_nothing_to_stdout(streaming_server: TritonServer, protocol: str) -> None:
    completed = run_cli("1 2 3", "--stream", "--protocol", protocol, "--server", url_of(streaming_server, protocol),
                        "--output-length", "0")
    assert completed.returncode == 1
    assert completed.stdout == "", "nothing (not even the prompt) may reach stdout before the first delta"
    assert completed.stderr.startswith("error: ") and "max_tokens" in completed.stderr
    fine = run_cli("1 2 3", "--stream", "--protocol", protocol, "--server", url_of(streaming_server, protocol),
                   "--output-length", "3")
    assert (fine.returncode, fine.stdout) == (0, "1 2 3" + expected("1 2 3", 3) + "\n")
