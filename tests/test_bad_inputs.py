"""Bad input against the served demo ensemble (torch engine, CPU): every case gets a valid answer or its own error.

One tritonserver for the module. Each table row is one malformed or borderline request, sent over HTTP infer, gRPC
infer or HTTP /generate. A row expects either
- a valid answer (`Ok`): the value is legitimately usable, the row says why, and the answer is checked; or
- an error (`Fails`): the status and substrings naming the input and, where there is one, the limit.
After every row the server must still be ready and answer the reference request exactly as before (the answer taken
when the server started is the oracle). Finally a bad request sent among concurrent good ones must fail alone.

Demo model limits (from its config.ini and the rendered configs): max_pos_seq_len 128, padded vocab 50304,
max_batch_size 64 rows (= KV-cache slots of the engine), beam_width <= 8, <= 64 stop/bad words of <= 256 characters and
<= 1024 tokens per row.

Malformed JSON on HTTP is answered by Triton's own HTTP frontend (before any model runs) with status 500, not 400: the
table pins that upstream behaviour (README.md, "Errors returned").
"""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from builder.serve import TritonServer, server_ready
from servers import server_on_free_ports

pytestmark = pytest.mark.server

MODEL = "ensemble"
CORE_MODEL = "gpt3_1.3b"
MAX_POS = 128
VOCAB = 50304
REFERENCE = {"text_input": "1 2 3 4 5 6", "max_tokens": 3}
GRPC_STATUS = {"StatusCode.INVALID_ARGUMENT": 400, "StatusCode.INTERNAL": 500, "StatusCode.UNAVAILABLE": 503}


# -- request building ----------------------------------------------------------------------------------------------
def text(*values: str | bytes) -> np.ndarray:
    """[rows, 1] BYTES."""
    return np.array([[v.encode() if isinstance(v, str) else v] for v in values], dtype=np.object_)


def words(*values: str | bytes) -> np.ndarray:
    """[1, words] BYTES: one row's stop or bad words."""
    return np.array([[v.encode() if isinstance(v, str) else v for v in values]], dtype=np.object_)


def scalar(value: Any, dtype: type) -> np.ndarray:
    return np.array([[value]], dtype=dtype)


def request(prompt: str | bytes = "1 2 3", max_tokens: int | np.ndarray | None = 3,
            **extra: np.ndarray | None) -> dict[str, np.ndarray]:
    """Infer inputs; a value of None removes that input, an array replaces it."""
    inputs = {"text_input": text(prompt)}
    if max_tokens is not None:
        inputs["max_tokens"] = max_tokens if isinstance(max_tokens, np.ndarray) else scalar(max_tokens, np.int32)
    for name, value in extra.items():
        if value is None:
            inputs.pop(name, None)
        else:
            inputs[name] = value
    return inputs


DATATYPES = {np.dtype(np.object_): "BYTES", np.dtype(np.int32): "INT32", np.dtype(np.int64): "INT64",
             np.dtype(np.float32): "FP32", np.dtype(np.uint64): "UINT64", np.dtype(np.bool_): "BOOL"}


# -- expectations --------------------------------------------------------------------------------------------------
Outputs = dict[str, Any]  # output name -> numpy array (infer) or JSON value (/generate)


@dataclass(frozen=True)
class Ok:
    why: str  # why the value is legitimately usable
    check: Callable[[Outputs, Outputs], None] = lambda out, reference: None  # (answer, reference answer)


@dataclass(frozen=True)
class Fails:
    status: int
    names: tuple[str, ...]  # substrings the message must hold: the input, and the limit where there is one
    # Values the client sent (or sums of them) that the message must NOT echo, as whole numbers: any input can come
    # from a shared-memory region, and an echoed value would read that memory back (tests/test_error_values.py).
    hides: tuple[str, ...] = ()


@dataclass(frozen=True)
class Case:
    id: str
    payload: dict[str, np.ndarray] | bytes | dict[str, Any]  # infer inputs, or the /generate body
    expect: Ok | Fails
    protocols: tuple[str, ...] = ("http", "grpc")  # "http" / "grpc" infer, or "generate"


def first(out: Outputs, name: str) -> Any:
    value = out[name]
    return np.asarray(value).reshape(-1)[0] if isinstance(value, np.ndarray) else value


def as_text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def generated_within(max_tokens: int) -> Callable[[Outputs, Outputs], None]:
    def check(out: Outputs, reference: Outputs) -> None:
        assert as_text(first(out, "finish_reason")) in ("stop", "length")
        assert 1 <= int(first(out, "num_output_tokens")) <= max_tokens
    return check


def same_as_reference(out: Outputs, reference: Outputs) -> None:
    assert as_text(first(out, "text_output")) == as_text(first(reference, "text_output"))


def stopped(out: Outputs, reference: Outputs) -> None:
    assert as_text(first(out, "finish_reason")) == "stop"


def fills_the_context(out: Outputs, reference: Outputs) -> None:
    assert int(first(out, "num_input_tokens")) + int(first(out, "num_output_tokens")) == MAX_POS


def three_tokens(out: Outputs, reference: Outputs) -> None:
    assert int(first(out, "num_output_tokens")) == 3


COUNT_TO_100 = " ".join(str(i) for i in range(1, 101))  # 100 tokens: one per number
SECRET_INT32 = int(np.frombuffer(b"TOPS", np.int32)[0])  # 1397772116: what a shared-memory region could hold
HUGE = "1 2 " * 400_000  # 1.6 MB
TOO_MANY_TOKENS = ["😀" * 200 + str(i) for i in range(10)]  # each emoji is 2+ tokens; x2 leading-space variants

CASES: list[Case] = [
    # text_input
    Case("empty text", request(""), Fails(400, ("'text_input'", "empty"))),
    Case("huge text (1.6 MB)", request(HUGE), Fails(400, ("'text_input'", "1600000 bytes", "max_pos_seq_len 128"))),
    Case("invalid UTF-8 text", request(b"1 2 \xff\xfe"), Fails(400, ("'text_input'", "UTF-8"))),
    Case("NUL bytes in text", request("1 2\x00 3\x00"),
         Ok("U+0000 is valid UTF-8 and byte-level BPE has a token for every byte", generated_within(3))),
    Case("text as INT32", request(text_input=scalar(5, np.int32)), Fails(400, ("'text_input'", "BYTES"))),
    Case("two prompts, one max_tokens", request(text_input=text("1", "2")), Fails(400, ("batch size",))),
    Case("65 rows > max_batch_size", request(text_input=text(*["1"] * 65),
                                             max_tokens=np.ones((65, 1), np.int32)), Fails(400, ("64",))),
    Case("zero rows", request(text_input=np.zeros((0, 1), np.object_), max_tokens=np.zeros((0, 1), np.int32)),
         Fails(400, ("'max_tokens'",))),
    Case("missing text_input", request(text_input=None), Fails(400, ("text_input",))),
    # max_tokens and the context window
    Case("max_tokens 0", request(max_tokens=0), Fails(400, ("'max_tokens'", "[1, 127]"), hides=("0",))),
    Case("max_tokens negative", request(max_tokens=-7), Fails(400, ("'max_tokens'", "[1, 127]"), hides=("-7",))),
    Case("max_tokens = max_pos_seq_len", request(max_tokens=MAX_POS),
         Fails(400, ("'max_tokens'", "[1, 127]", "max_pos_seq_len 128"))),
    Case("max_tokens INT32 max", request(max_tokens=2**31 - 1),
         Fails(400, ("'max_tokens'", "max_pos_seq_len 128"), hides=("2147483647",))),
    Case("max_tokens: the bytes of a secret", request(max_tokens=SECRET_INT32),
         Fails(400, ("'max_tokens'", "[1, 127]"), hides=(str(SECRET_INT32),))),
    Case("prompt + max_tokens > max_pos_seq_len", request("1 2 3 4 5 6", MAX_POS - 5),
         Fails(400, ("'text_input'", "6 tokens", "max_pos_seq_len 128"), hides=("123", "129"))),
    Case("prompt + max_tokens = max_pos_seq_len", request(COUNT_TO_100, MAX_POS - 100),
         Ok("the limit is inclusive: 100 prompt + 28 new tokens fill the position table", fills_the_context)),
    Case("max_tokens FP32", request(max_tokens=scalar(3.0, np.float32)), Fails(400, ("'max_tokens'", "INT32"))),
    Case("max_tokens INT64", request(max_tokens=scalar(3, np.int64)), Fails(400, ("'max_tokens'", "INT32"))),
    Case("max_tokens shape [1, 2]", request(max_tokens=np.array([[3, 4]], np.int32)),
         Fails(400, ("'max_tokens'", "shape"))),
    Case("missing max_tokens", request(max_tokens=None), Fails(400, ("max_tokens",))),
    # sampling
    Case("top_p 1.5", request(top_p=scalar(1.5, np.float32)), Fails(400, ("'top_p'", "[0, 1]"), hides=("1.5",))),
    Case("top_p NaN", request(top_p=scalar(np.nan, np.float32)), Fails(400, ("'top_p'", "[0, 1]"))),
    Case("top_k negative", request(top_k=scalar(-1, np.int32)), Fails(400, ("'top_k'", "[0, 50304]"), hides=("-1",))),
    Case("top_k > vocab", request(top_k=scalar(VOCAB + 1, np.int32)),
         Fails(400, ("'top_k'", "[0, 50304]"), hides=("50305",))),
    Case("top_k: the bytes of a secret", request(top_k=scalar(SECRET_INT32, np.int32)),
         Fails(400, ("'top_k'", "[0, 50304]"), hides=(str(SECRET_INT32),))),
    Case("top_k = vocab", request(top_k=scalar(VOCAB, np.int32), random_seed=scalar(7, np.uint64)),
         Ok("top_k = vocab keeps every token: plain sampling", generated_within(3))),
    Case("temperature negative", request(temperature=scalar(-0.5, np.float32)),
         Fails(400, ("'temperature'", ">= 0"), hides=("-0.5",))),
    Case("temperature inf", request(temperature=scalar(np.inf, np.float32)), Fails(400, ("'temperature'", "finite"))),
    Case("temperature 0", request("1 2 3 4 5 6", 3, temperature=scalar(0.0, np.float32),
                                  top_p=scalar(0.9, np.float32)),
         Ok("temperature 0 means greedy (OpenAI convention)", same_as_reference)),
    Case("temperature 1e-44", request("1 2 3 4 5 6", 3, temperature=scalar(1e-44, np.float32),
                                      top_p=scalar(0.9, np.float32)),
         Ok("below 1e-5 a temperature is greedy too: logits / 1e-44 would overflow float32", same_as_reference)),
    Case("repetition_penalty 0", request(repetition_penalty=scalar(0.0, np.float32)),
         Fails(400, ("'repetition_penalty'", "> 0"))),
    Case("presence_penalty NaN", request(presence_penalty=scalar(np.nan, np.float32)),
         Fails(400, ("'presence_penalty'", "finite"))),
    Case("len_penalty inf", request(len_penalty=scalar(np.inf, np.float32)), Fails(400, ("'len_penalty'", "finite"))),
    Case("random_seed UINT64 max", request(top_k=scalar(5, np.int32), random_seed=scalar(2**64 - 1, np.uint64)),
         Ok("every uint64 is a seed", generated_within(3))),
    Case("min_tokens > max_tokens", request(min_tokens=scalar(4, np.int32)),
         Fails(400, ("'min_tokens'", "must be <= max_tokens"), hides=("4", "3"))),
    Case("min_tokens negative", request(min_tokens=scalar(-1, np.int32)),
         Fails(400, ("'min_tokens'", ">= 0"), hides=("-1",))),
    Case("return_log_probs as INT32", request(return_log_probs=scalar(1, np.int32)),
         Fails(400, ("'return_log_probs'", "BOOL"))),
    # beams and KV-cache slots
    Case("beam_width 0", request(beam_width=scalar(0, np.int32)),
         Fails(400, ("'beam_width'", "[1, 8]"), hides=("0",))),
    Case("beam_width 9", request(beam_width=scalar(9, np.int32)),
         Fails(400, ("'beam_width'", "[1, 8]"), hides=("9",))),
    Case("9 rows x beam 8 > 64 KV-cache slots",  # refused by the core model: its message hides the beam width too
         request(text_input=text(*["1 2"] * 9), max_tokens=np.full((9, 1), 2, np.int32),
                 beam_width=np.full((9, 1), 8, np.int32)),
         Fails(400, ("beam_width", "max_batch_size 64", "9 rows"), hides=("8", "72"))),
    # end_id / pad_id
    Case("end_id negative", request(end_id=scalar(-1, np.int32)),
         Fails(400, ("'end_id'", "[0, 50304)"), hides=("-1",))),
    Case("end_id = vocab", request(end_id=scalar(VOCAB, np.int32)), Fails(400, ("'end_id'", "[0, 50304)"))),
    Case("end_id in the padded vocab", request(end_id=scalar(VOCAB - 4, np.int32)),
         Ok("ids up to the padded embedding table are rows of the model; it just never ends early", three_tokens)),
    Case("pad_id = vocab", request(pad_id=scalar(VOCAB, np.int32)), Fails(400, ("'pad_id'", "[0, 50304)"))),
    # stop / bad words
    Case("stop word empty", request(stop_words=words("")), Ok("empty words are skipped", three_tokens)),
    Case("stop words whitespace", request(stop_words=words(" ", "\t", "\n")),
         Ok("whitespace is a legitimate stop sequence", generated_within(3))),
    Case("stop word emoji", request(stop_words=words("🙂"), bad_words=words("😀")),
         Ok("any UTF-8 text is a word", three_tokens)),
    Case("stop word 300 characters", request(stop_words=words("x" * 300)), Fails(400, ("'stop_words'", "256"))),
    Case("65 stop words", request(stop_words=words(*map(str, range(65)))), Fails(400, ("'stop_words'", "64"))),
    Case("bad words over 1024 tokens", request(bad_words=words(*TOO_MANY_TOKENS)),
         Fails(400, ("'bad_words'", "1024"))),
    Case("stop word invalid UTF-8", request(stop_words=words(b"\xc3")), Fails(400, ("'stop_words'", "UTF-8"))),
    Case("stop words INT32", request(stop_words=np.array([[4]], np.int32)), Fails(400, ("'stop_words'", "BYTES"))),
    Case("no stop words (shape [1, 0])", request(stop_words=np.zeros((1, 0), np.object_)),
         Ok("an empty list is no words", three_tokens)),
    # names
    Case("unknown input name", request(temprature=scalar(0.5, np.float32)), Fails(400, ("'temprature'",))),

    # /generate: Triton's HTTP frontend turns the JSON body into tensors itself
    Case("generate: array for max_tokens", {"text_input": "1 2", "max_tokens": [3, 4]},
         Fails(400, ("batch size",)), ("generate",)),
    Case("generate: array for text_input", {"text_input": ["1 2", "3"], "max_tokens": 3},
         Fails(400, ("batch size",)), ("generate",)),
    Case("generate: string for max_tokens", {"text_input": "1 2", "max_tokens": "three"},
         Fails(500, ("signed-integer",)), ("generate",)),
    Case("generate: float for max_tokens", {"text_input": "1 2", "max_tokens": 3.5},
         Fails(500, ("signed-integer",)), ("generate",)),
    Case("generate: string for top_p", {"text_input": "1 2", "max_tokens": 3, "top_p": "high"},
         Fails(500, ("non-number",)), ("generate",)),
    Case("generate: null text", {"text_input": None, "max_tokens": 3}, Fails(500, ("non-string",)), ("generate",)),
    Case("generate: malformed JSON", b'{"text_input": "1 2", "max_tokens": 3', Fails(500, ("JSON",)), ("generate",)),
    Case("generate: empty body", b"", Fails(500, ("empty",)), ("generate",)),
    Case("generate: body is a list", b"[]", Fails(500, ("non-object",)), ("generate",)),
    Case("generate: parameters not an object", {"text_input": "1 2", "max_tokens": 3, "parameters": 5},
         Fails(500, ("parameters",)), ("generate",)),
    Case("generate: invalid UTF-8", b'{"text_input": "1 2 \xff", "max_tokens": 3}',
         Fails(400, ("'text_input'", "UTF-8")), ("generate",)),
    Case("generate: huge text", {"text_input": HUGE, "max_tokens": 3},
         Fails(400, ("'text_input'", "max_pos_seq_len 128")), ("generate",)),
    Case("generate: max_tokens negative", {"text_input": "1 2", "max_tokens": -1},
         Fails(400, ("'max_tokens'", "[1, 127]"), hides=("-1",)), ("generate",)),
    Case("generate: top_k beyond INT32", {"text_input": "1 2", "max_tokens": 3, "top_k": 99_999_999_999},
         Fails(400, ("'top_k'", "[0, 50304]"), hides=("1215752191", "99999999999")),
         ("generate",)),  # Triton wraps it to INT32 first (1215752191)
    Case("generate: max_tokens 2**32 + 3", {"text_input": "1 2", "max_tokens": 2**32 + 3},
         Ok("Triton's JSON parser wraps it to INT32 (3) before any model sees it: an upstream quirk, pinned here",
            three_tokens), ("generate",)),
    Case("generate: unknown key", {"text_input": "1 2", "max_tokens": 3, "temprature": 0.5},
         Ok("unknown keys become Triton request parameters, which the ensemble does not read (Triton's mapping)",
            three_tokens), ("generate",)),
    Case("generate: stop word as a string", {"text_input": "1 2 3", "max_tokens": 3, "stop_words": "5"},
         Ok("a scalar maps to one word", stopped), ("generate",)),
    Case("generate: stop words nested list", {"text_input": "1 2 3", "max_tokens": 3, "stop_words": [["5"]]},
         Ok("Triton flattens it to one word", stopped), ("generate",)),
    Case("generate: empty stop word list", {"text_input": "1 2", "max_tokens": 3, "stop_words": []},
         Ok("no words", three_tokens), ("generate",)),
    Case("generate: values under parameters", {"text_input": "1 2 3 4 5 6", "parameters": {"max_tokens": 3}},
         Ok("the nested object maps like top-level keys", same_as_reference), ("generate",)),
]


# -- transport -----------------------------------------------------------------------------------------------------
@dataclass
class Answer:
    status: int
    outputs: Outputs
    message: str = ""


def infer(server: TritonServer, protocol: str, inputs: dict[str, np.ndarray]) -> Answer:
    module: Any = httpclient if protocol == "http" else grpcclient
    url = server.http_url if protocol == "http" else server.grpc_url
    tensors = []
    for name, array in inputs.items():
        tensor = module.InferInput(name, list(array.shape), DATATYPES[array.dtype])
        tensor.set_data_from_numpy(array)
        tensors.append(tensor)
    client = module.InferenceServerClient(url)
    try:
        result = client.infer(MODEL, tensors)
    except InferenceServerException as err:
        status = err.status() or ""
        code = GRPC_STATUS[status] if status in GRPC_STATUS else int(status) if status.isdigit() else 0
        return Answer(code, {}, err.message() or str(err))
    finally:
        client.close()
    names = ("text_output", "finish_reason", "num_input_tokens", "num_output_tokens")
    return Answer(200, {name: result.as_numpy(name) for name in names})


def generate(server: TritonServer, body: bytes | dict[str, Any]) -> Answer:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    call = urllib.request.Request(f"http://{server.http_url}/v2/models/{MODEL}/generate", data=data, method="POST")
    try:
        with urllib.request.urlopen(call, timeout=60) as response:
            return Answer(response.status, json.loads(response.read()))
    except urllib.error.HTTPError as err:
        return Answer(err.code, {}, json.loads(err.read()).get("error", ""))


def send(server: TritonServer, protocol: str, payload: Any) -> Answer:
    return generate(server, payload) if protocol == "generate" else infer(server, protocol, payload)


# -- fixtures ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(demo_repository: Path) -> Iterator[TritonServer]:
    with server_on_free_ports(demo_repository) as running:
        yield running


@pytest.fixture(scope="module")
def reference(server: TritonServer) -> Outputs:
    """The reference request's answer when nothing bad has happened yet: the oracle for 'still serving'."""
    answer = generate(server, REFERENCE)
    assert answer.status == 200, answer.message
    return answer.outputs


def assert_still_serving(server: TritonServer, reference: Outputs) -> None:
    assert server_ready(server.http_url, timeout_s=5), "server not ready after the bad request"
    assert server.process is not None and server.process.poll() is None, "tritonserver exited"
    again = generate(server, REFERENCE)
    assert again.status == 200, again.message
    assert again.outputs["text_output"] == reference["text_output"]


# -- tests ---------------------------------------------------------------------------------------------------------
def test_table_has_enough_distinct_cases() -> None:
    assert len({case.id for case in CASES}) == len(CASES) >= 25


@pytest.mark.parametrize("case,protocol", [pytest.param(case, protocol, id=f"{protocol}: {case.id}")
                                           for case in CASES for protocol in case.protocols])
def test_bad_input(server: TritonServer, reference: Outputs, case: Case, protocol: str) -> None:
    answer = send(server, protocol, case.payload)
    if isinstance(case.expect, Ok):
        assert answer.status == 200, f"expected a valid answer ({case.expect.why}), got: {answer.message}"
        case.expect.check(answer.outputs, reference)
    else:
        assert answer.status == case.expect.status, f"status {answer.status}: {answer.message}"
        for name in case.expect.names:
            assert name in answer.message, f"{name!r} not in the error: {answer.message}"
        for value in case.expect.hides:
            assert not re.search(rf"(?<![\d.]){re.escape(value)}(?![\d.])", answer.message), \
                f"the value {value!r} is echoed in the error: {answer.message}"
        assert "Traceback" not in answer.message
    assert_still_serving(server, reference)


@pytest.mark.parametrize("round_", range(2))
def test_bad_requests_fail_alone_among_concurrent_good_ones(server: TritonServer, reference: Outputs,
                                                           round_: int) -> None:
    """Good and bad requests at once (HTTP, gRPC, /generate): the bad ones, failing in preprocessing or in the core
    model, get their own errors; every good one gets the reference answer."""
    good = [("http", request(REFERENCE["text_input"], 3)), ("grpc", request(REFERENCE["text_input"], 3)),
            ("generate", REFERENCE)] * 3
    bad = [("http", request(top_p=scalar(2.0, np.float32)), "'top_p'"),  # preprocessing refuses it
           ("grpc", CASES_BY_ID["9 rows x beam 8 > 64 KV-cache slots"].payload, "max_batch_size 64"),  # the core does
           ("generate", {"text_input": "", "max_tokens": 3}, "empty")]
    jobs = [(protocol, payload, None) for protocol, payload in good] + bad
    jobs = jobs[round_::2] + jobs[1 - round_::2]  # interleave differently each round
    answers: list[Answer | None] = [None] * len(jobs)
    barrier = threading.Barrier(len(jobs))

    def run(index: int) -> None:
        protocol, payload, _ = jobs[index]
        barrier.wait()
        answers[index] = send(server, protocol, payload)

    before = core_model_stats(server)
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    for (protocol, _, bad_name), answer in zip(jobs, answers):
        assert answer is not None, f"{protocol} request did not finish"
        if bad_name is None:
            assert answer.status == 200, f"a good {protocol} request failed: {answer.message}"
            assert as_text(first(answer.outputs, "text_output")) == as_text(first(reference, "text_output"))
        else:
            assert answer.status == 400 and bad_name in answer.message, (protocol, answer.status, answer.message)
    # 9 good one-row requests and the 9-row bad one reached the core model (Triton counts rows, and updates the
    # statistics shortly after answering): fewer than 10 executions means requests shared a dynamic batch.
    deadline = time.monotonic() + 10
    while (after := core_model_stats(server))["inference_count"] - before["inference_count"] < 18:
        assert time.monotonic() < deadline, (before, after)
        time.sleep(0.1)
    assert after["execution_count"] - before["execution_count"] < 10, (before, after)
    assert_still_serving(server, reference)


def core_model_stats(server: TritonServer) -> dict[str, int]:
    client = httpclient.InferenceServerClient(server.http_url)
    try:
        stats = client.get_inference_statistics(CORE_MODEL)["model_stats"][0]
    finally:
        client.close()
    return {key: int(stats[key]) for key in ("execution_count", "inference_count")}


CASES_BY_ID = {case.id: case for case in CASES}
