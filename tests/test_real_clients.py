"""Clients users already run, unchanged, against the served demo repositories (issue 13, "Must show").

- genai-perf 0.0.16 in TRT-LLM format (`--endpoint-type kserve --backend tensorrtllm`), with and without
  `--streaming` and `--output-tokens-mean-deterministic`, its `--tokenizer` pointed at the repository's own folder;
- TRT-LLM's `end_to_end_grpc_client.py` (tests/data/clients, late-2024 version) with stop and bad words;
- the exact tensors Triton's OpenAI frontend builds in its TRT-LLM request format (v2.52-v2.58 and v2.59+);
- FasterTransformer's `tools/issue_request.py` with its GPT sample requests, against the torch core.

Facts behind each request (names, dtypes, defaults, the output layout each client reads): docs/client_compat.md.
Oracle: the demo model counts, so "1 2 3 4 5 6" continues " 7 8 9 ..."; GPT-2 token counts come from the repository's
own tokenizer files; FT's token-id samples are checked against the same ids sent through the core's accepted inputs.

Before issue 13's contract (builder/runtime/contract.py) every case but one failed: the repositories refused names
these clients send, or answered in a layout they cannot read.
"""

from __future__ import annotations

import json
import os
import queue
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from builder.runtime.tokenizer import GptTokenizer
from builder.serve import TritonServer
from client.perf import perf_analyzer_env
from servers import server_on_free_ports

pytestmark = pytest.mark.server

ROOT = Path(__file__).resolve().parents[1]
CLIENTS = Path(__file__).parent / "data" / "clients"
TRTLLM_CLIENT = CLIENTS / "tensorrtllm_backend" / "end_to_end_grpc_client.py"
FT_CLIENT = CLIENTS / "fastertransformer_backend" / "issue_request.py"
FT_REQUESTS = CLIENTS / "fastertransformer_backend" / "requests"
# genai-perf lives in its own venv (scripts/setup.sh): it pulls numpy 2 and transformers 5, the project pins numpy<2.
GENAI_PERF = Path(os.environ.get("GENAI_PERF", ROOT / ".venv-genai-perf" / "bin" / "genai-perf"))
GENAI_PERF_ATTEMPTS = 3  # runs of one case when perf_analyzer's export comes back empty (see the test)
CORE = "gpt3_1.3b"
PROMPT = "1 2 3 4 5 6"
CLIENT_TIMEOUT_S = 120


class ClientFailed(Exception):
    """The client exited non-zero, reported a server error, or printed nothing to check: the expected failure today."""


def counting(prompt: str, count: int, skip: frozenset[int] = frozenset(), stop_before: int | None = None) -> str:
    """What the demo model answers greedily: the next `count` numbers, without `skip`, ending before `stop_before`."""
    numbers: list[int] = []
    n = int(prompt.split()[-1])
    while len(numbers) < count:
        n += 1
        if n == stop_before:
            break
        if n not in skip:
            numbers.append(n)
    return "".join(f" {k}" for k in numbers)


def tokenizer_folder(repository: Path) -> Path:
    """The repository's tokenizer folder (the one preprocessing loads)."""
    [vocab] = sorted((repository / "preprocessing").rglob("vocab.json"))[:1]
    return vocab.parent


def run_client(command: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    """Run a client as a user would; its stdout+stderr, or ClientFailed with their tail."""
    try:
        done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=CLIENT_TIMEOUT_S)
    except subprocess.TimeoutExpired as err:
        raise ClientFailed(f"{Path(command[1]).name} hung for {CLIENT_TIMEOUT_S} s: {err.stdout!r:.2000}") from err
    output = done.stdout + done.stderr
    if done.returncode != 0 or "Received an error from server" in output:
        raise ClientFailed(f"exit {done.returncode}:\n{output[-3000:]}")
    return output


@pytest.fixture(scope="module")
def plain(demo_repository: Path) -> Iterator[TritonServer]:
    with server_on_free_ports(demo_repository) as server:
        yield server


@pytest.fixture(scope="module")
def streaming(demo_streaming_repository: Path) -> Iterator[TritonServer]:
    with server_on_free_ports(demo_streaming_repository) as server:
        yield server


@pytest.fixture(scope="module")
def gpt2(demo_repository: Path) -> GptTokenizer:
    return GptTokenizer.from_directory(tokenizer_folder(demo_repository))


def served(request: pytest.FixtureRequest, which: str) -> TritonServer:
    server: TritonServer = request.getfixturevalue(which)
    return server


# --- the rendered tokenizer folder ------------------------------------------------------------------------------

def test_rendered_tokenizer_folder_loads_with_autotokenizer(demo_repository: Path) -> None:
    from transformers import AutoTokenizer  # heavy: only this test

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder(demo_repository))
    assert tokenizer.encode(" world 7 8 9", add_special_tokens=False) == [995, 767, 807, 860]
    assert tokenizer.eos_token_id == 50256
    assert tokenizer.decode([995, 767]) == " world 7"


# --- genai-perf 0.0.16, TRT-LLM format --------------------------------------------------------------------------

def written_tokenizer(repository: Path, folder: Path) -> Path:
    """The repository's GPT-2 BPE files as a tokenizer.json folder, which AutoTokenizer loads: genai-perf needs one
    to count tokens, and the rendered folder is not one yet (test_rendered_tokenizer_folder_...)."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE

    source = tokenizer_folder(repository)
    tokenizer = Tokenizer(BPE.from_file(str(source / "vocab.json"), str(source / "merges.txt")))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    folder.mkdir(parents=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"}))
    return folder


def refused(reason: str) -> pytest.MarkDecorator:
    return pytest.mark.xfail(strict=True, raises=ClientFailed, reason=f"issue 13: {reason}")


GENAI_PERF_CASES = [
    # (server, genai-perf flags, --tokenizer: the repository's own folder, or one written from its files)
    pytest.param("plain", [], False, id="plain"),
    pytest.param("plain", [], True, id="plain-repository-tokenizer"),
    pytest.param("streaming", [], False, id="streaming-repo"),
    pytest.param("streaming", ["--streaming"], False, id="streaming-repo-streamed"),
    pytest.param("plain", ["--output-tokens-mean-deterministic"], False, id="plain-deterministic"),
    pytest.param("streaming", ["--streaming", "--output-tokens-mean-deterministic"], False,
                 id="streamed-deterministic"),
]


@pytest.mark.parametrize(("which", "flags", "repository_tokenizer"), GENAI_PERF_CASES)
def test_genai_perf_trtllm_format_counts_every_token(request: pytest.FixtureRequest, which: str, flags: list[str],
                                                     repository_tokenizer: bool, tmp_path: Path,
                                                     gpt2: GptTokenizer) -> None:
    if not GENAI_PERF.is_file():
        pytest.fail(f"genai-perf not found at {GENAI_PERF}: run scripts/setup.sh (or set GENAI_PERF)")
    server = served(request, which)
    repository = server.config.model_repository
    tokenizer = (tokenizer_folder(repository) if repository_tokenizer
                 else written_tokenizer(repository, tmp_path / "tokenizer"))
    max_tokens, prompts = 10, [" ".join(str(n) for n in range(start, start + 6)) for start in range(1, 9)]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in prompts))
    env = perf_analyzer_env()
    # genai-perf runs the perf_analyzer on PATH: tritonclient's, in this venv.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    for attempt in range(1, GENAI_PERF_ATTEMPTS + 1):
        artifacts = tmp_path / f"artifacts-{attempt}"
        try:
            run_client([str(GENAI_PERF), "profile", "-m", "ensemble", "--endpoint-type", "kserve", "--backend",
                        "tensorrtllm", "-u", server.grpc_url, "--tokenizer", str(tokenizer),
                        "--input-file", str(tmp_path / "prompts.jsonl"), "--output-tokens-mean", str(max_tokens),
                        "--request-count", str(len(prompts)), "--warmup-request-count", "0", "--concurrency", "2",
                        "--artifact-dir", str(artifacts), *flags], cwd=tmp_path, env=env)
            break
        except ClientFailed as err:
            # perf_analyzer 2.51 sometimes writes an empty or cut profile export and still exits 0 (README,
            # Troubleshooting); genai-perf then fails to parse it. Anything else is a real failure.
            if "Failed to parse JSON string" not in str(err) or attempt == GENAI_PERF_ATTEMPTS:
                raise

    [export] = artifacts.rglob("profile_export.json")
    requests = [r for experiment in json.loads(export.read_text())["experiments"] for r in experiment["requests"]]
    assert sorted(r["request_inputs"]["text_input"] for r in requests) == sorted(prompts)
    for r in requests:
        sent = r["request_inputs"]
        assert sent["max_tokens"] == max_tokens
        if "--output-tokens-mean-deterministic" in flags:
            assert sent["min_length"] == max_tokens
        text = "".join(str(out.get("text_output", "")) for out in r["response_outputs"])
        assert text == counting(sent["text_input"], max_tokens)
        assert len(gpt2.encode(text)) == max_tokens
        if "--streaming" in flags:
            assert len(r["response_outputs"]) > 1  # streamed, not one final answer (a response may hold several tokens)
    [summary] = artifacts.rglob("profile_export_genai_perf.json")
    lengths = json.loads(summary.read_text())["output_sequence_length"]
    assert lengths["min"] == lengths["max"] == max_tokens  # genai-perf's own count of output tokens


# --- TRT-LLM's end_to_end_grpc_client.py ------------------------------------------------------------------------

STOP_AND_BAD = ["--stop-words", " 14", "--bad-words", " 9"]
TRTLLM_CASES = [
    # (server, client flags, expected continuation). Without --exclude-input-in-output the client sends it false and,
    # when not streaming, expects the prompt in front of the text (it prepends it itself before comparing).
    pytest.param("plain", [], counting(PROMPT, 10), id="plain"),
    pytest.param("plain", ["--exclude-input-in-output", "-n", "1", "--frequency-penalty", "0"], counting(PROMPT, 10),
                 id="plain-exclude-n1-frequency"),
    pytest.param("plain", STOP_AND_BAD, counting(PROMPT, 10, skip=frozenset({9}), stop_before=14),
                 id="plain-stop-bad"),
    pytest.param("streaming", [], counting(PROMPT, 10), id="streaming-repo"),
    pytest.param("streaming", STOP_AND_BAD, counting(PROMPT, 10, skip=frozenset({9}), stop_before=14),
                 id="streaming-repo-stop-bad"),
    pytest.param("streaming", ["-S"], counting(PROMPT, 10), id="streamed"),
    # Streamed text cannot take back a stop word already sent (README, Streaming): it stays in the deltas.
    pytest.param("streaming", ["-S", *STOP_AND_BAD], counting(PROMPT, 10, skip=frozenset({9}), stop_before=15),
                 id="streamed-stop-bad"),
    pytest.param("streaming", ["-S", "--exclude-input-in-output", "-n", "1", "--frequency-penalty", "0"],
                 counting(PROMPT, 10), id="streamed-exclude-n1-frequency"),
]


@pytest.mark.parametrize(("which", "flags", "expected"), TRTLLM_CASES)
def test_trtllm_end_to_end_grpc_client(request: pytest.FixtureRequest, which: str, flags: list[str], expected: str,
                                       tmp_path: Path) -> None:
    server = served(request, which)
    # --check-outputs makes the client itself assert the texts and exit non-zero on a mismatch.
    output = run_client([sys.executable, str(TRTLLM_CLIENT), "-u", server.grpc_url, "-p", PROMPT, "-o", "10",
                         "--check-outputs", "--expected-outputs", json.dumps([expected]), *flags], cwd=tmp_path)
    assert "Traceback" not in output


# --- the tensors Triton's OpenAI frontend builds (TRT-LLM format) -----------------------------------------------

def openai_frontend_inputs(version: str, stream: bool, stop: str | None = None) -> dict[str, np.ndarray]:
    """`_create_trtllm_inference_request` (server v2.52-v2.58) / `_create_trtllm_generate_request` (v2.59+) for
    `POST /v1/completions {"prompt": PROMPT, "max_tokens": 10, "temperature": 0, "seed": 7, "stream": stream}`: the
    schema's defaults (top_p 1, frequency and presence penalty 0, echo false) are sent too. Since v2.64 the echo tensor
    `exclude_input_in_output` goes only to models that declare it, and token counts are asked for."""
    def scalar(value: object, dtype: type) -> np.ndarray:
        return np.array([[value]], dtype=dtype)  # [batch 1, 1]

    inputs = {"text_input": scalar(PROMPT, object), "stream": scalar(stream, np.bool_),
              "max_tokens": scalar(10, np.int32)}
    if stop is not None:
        inputs["stop_words"] = scalar(stop, object)
    inputs |= {"top_p": scalar(1.0, np.float32), "frequency_penalty": scalar(0.0, np.float32),
               "presence_penalty": scalar(0.0, np.float32)}
    inputs["random_seed" if version == "v2.52" else "seed"] = scalar(7, np.uint64)
    inputs["temperature"] = scalar(0.0, np.float32)
    if version == "v2.71":
        inputs |= {name: scalar(True, np.bool_)
                   for name in ("exclude_input_in_output", "return_num_input_tokens", "return_num_output_tokens")}
    return inputs


def grpc_stream(url: str, model: str, inputs: dict[str, np.ndarray]) -> list[grpcclient.InferResult]:
    """One request over a gRPC stream (as decoupled-capable clients send); every response, or ClientFailed."""
    results: queue.Queue[tuple[grpcclient.InferResult | None, InferenceServerException | None]] = queue.Queue()
    tensors = []
    for name, value in inputs.items():
        tensor = grpcclient.InferInput(name, list(value.shape), np_to_triton_dtype(value.dtype))
        tensor.set_data_from_numpy(value)
        tensors.append(tensor)
    client = grpcclient.InferenceServerClient(url)
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        client.async_stream_infer(model, tensors, enable_empty_final_response=True)
    finally:
        client.stop_stream()
        client.close()
    answers = []
    while not results.empty():
        result, error = results.get()
        if error is not None:
            raise ClientFailed(str(error))
        assert result is not None
        if result.get_response().outputs:  # the empty final response of a decoupled model carries no tensors
            answers.append(result)
    return answers


OPENAI_CASES = [
    pytest.param("plain", False, "v2.71", id="plain-v2.71"),
    pytest.param("plain", False, "v2.52", id="plain-v2.52"),
    pytest.param("streaming", False, "v2.71", id="streaming-repo-v2.71"),
    pytest.param("streaming", True, "v2.71", id="streamed-v2.71"),
    pytest.param("streaming", True, "v2.52", id="streamed-v2.52"),
]


@pytest.mark.parametrize(("which", "stream", "version"), OPENAI_CASES)
def test_openai_frontend_trtllm_tensors(request: pytest.FixtureRequest, which: str, stream: bool,
                                        version: str) -> None:
    server = served(request, which)
    for stop, expected in ((None, counting(PROMPT, 10)), (" 12", counting(PROMPT, 10, stop_before=12))):
        responses = grpc_stream(server.grpc_url, "ensemble", openai_frontend_inputs(version, stream, stop))
        texts = []
        for response in responses:
            text_output = response.as_numpy("text_output")
            assert text_output is not None and text_output.size == 1  # the frontend reads exactly one string
            texts.append(text_output.item().decode())
        if stream:
            assert len(responses) > 1
        if stop is None or not stream:  # a streamed stop word stays in the streamed text
            assert "".join(texts) == expected
        if version == "v2.71" and stop is None:
            # The frontend's usage: prompt tokens from any response, completion tokens summed over the responses
            # (so a streamed response must count only its own tokens).
            assert int(responses[0].as_numpy("num_input_tokens").item()) == 6
            assert sum(int(r.as_numpy("num_output_tokens").item()) for r in responses) == 10


# --- FasterTransformer's tools/issue_request.py against the torch core -----------------------------------------

def printed_arrays(output: str) -> dict[str, np.ndarray]:
    """issue_request.py prints `name:\\n<numpy array>\\n`; the numbers of each, flat (float64)."""
    parts = re.split(r"^(\w+):\n", output, flags=re.M)  # numpy prints blank lines inside 3-D arrays
    return {name: np.array([float(x) for x in re.findall(r"-?\d+(?:\.\d*)?(?:e[+-]?\d+)?", body)])
            for name, body in zip(parts[1::2], parts[2::2])}


def ft_request(name: str) -> dict[str, np.ndarray]:
    return {r["name"]: np.array(r["data"], dtype=r["dtype"])
            for r in json.loads((FT_REQUESTS / name).read_text())["request"]}


def core_oracle(server: TritonServer, request: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """output_ids and sequence_length for the same ids through the inputs the core accepts today (FT's extras,
    start_id = end_id and beam_search_diversity_rate = 0, change nothing in greedy or top-k sampling)."""
    accepted = {k: v for k, v in request.items() if k not in ("start_id", "beam_search_diversity_rate")}
    tensors = []
    for name, value in accepted.items():
        tensor = httpclient.InferInput(name, list(value.shape), np_to_triton_dtype(value.dtype))
        tensor.set_data_from_numpy(value)
        tensors.append(tensor)
    with httpclient.InferenceServerClient(server.http_url) as client:
        result = client.infer(CORE, tensors)
    return result.as_numpy("output_ids"), result.as_numpy("sequence_length")


@pytest.mark.parametrize("sample", ["sample_request.json", "sample_request_runtime_top_k.json"])
def test_ft_issue_request_samples_against_the_torch_core(plain: TritonServer, sample: str, tmp_path: Path) -> None:
    params = json.dumps({"config": {"model_name": CORE, "url": plain.http_url}})
    output = run_client([sys.executable, str(FT_CLIENT), str(FT_REQUESTS / sample), "--params", params], cwd=tmp_path)
    if "output_ids:" not in output:
        raise ClientFailed(output[-3000:])
    printed = printed_arrays(output)
    request = ft_request(sample)
    expected_ids, expected_lengths = core_oracle(plain, request)
    rows, prompt = request["input_ids"].shape
    assert expected_ids.shape == (rows, 1, prompt + int(request["request_output_len"].max()))  # FT: [batch, beam, seq]
    assert np.array_equal(expected_ids[:, 0, :prompt], request["input_ids"])  # FT's output_ids carry the prompt
    assert np.array_equal(printed["output_ids"], expected_ids.ravel().astype(np.float64))
    assert np.array_equal(printed["sequence_length"], expected_lengths.ravel().astype(np.float64))
    assert printed["cum_log_probs"].shape == (rows,)  # is_return_log_probs was true


def test_ft_issue_request_stream_sample_against_the_streaming_core(plain: TritonServer, streaming: TritonServer,
                                                                   tmp_path: Path) -> None:
    params = json.dumps({"config": {"model_name": CORE, "url": streaming.grpc_url}})
    output = run_client([sys.executable, str(FT_CLIENT), str(FT_REQUESTS / "sample_request_stream.json"),
                         "--params", params], cwd=tmp_path)
    # Its consumer process prints row 0, beam 0 of each response: output_ids[:sequence_length].
    partials = [np.array(re.findall(r"\d+", body), dtype=np.int64)
                for body in re.findall(r"Partial result \(probability [^)]*\):\n\[(.*?)\]", output, flags=re.S)]
    if len(partials) < 2 or "Traceback" in output:
        raise ClientFailed(f"{len(partials)} partial results:\n{output[-3000:]}")
    for before, after in zip(partials, partials[1:]):
        assert len(after) > len(before) and np.array_equal(after[:len(before)], before)
    expected_ids, expected_lengths = core_oracle(plain, ft_request("sample_request_stream.json"))
    assert np.array_equal(partials[-1], expected_ids[0, 0, :int(expected_lengths[0, 0])])
