"""In-flight batching through a real tritonserver: a rendered streaming (decoupled) tiny repository, text in/out.

Oracle: HF transformers' GPT2LMHeadModel on the same weights (the FT files read back), greedy.
"""

from __future__ import annotations

import queue
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from builder.render import render_repository
from builder.render_config import RenderConfig
from builder.runtime.model_config import GptModelConfig
from builder.serve import TritonServer
from client import TextClient
from servers import server_on_free_ports

pytestmark = [pytest.mark.server, pytest.mark.slow]

CORE_MODEL = "gpt3_1.3b"  # RenderConfig's default model name
SLOTS = 8  # KV-cache slots of the core model (its Triton max_batch_size)
LONG_PROMPT, LONG_TOKENS = "The quick brown fox jumps over", 120  # 6 prompt tokens: nearly 128 positions
ATTEMPTS = 3  # test_requests_sent_mid_generation_join_the_running_batch says why
SHORT_ONES = {"hello": ("Hello", 6), "digits": ("One two three four five six seven", 10)}
BATCH_PROMPTS, BATCH_TOKENS = ["a", "Triton serves text", "naïve café"], 8  # one request of three rows
JOIN_LINE = re.compile(r"in-flight batching: (\d+) row\(s\) joined (\d+) running row\(s\)")


@pytest.fixture(scope="module")
def hf_greedy(hf_greedy_continuation: Callable[[str, int], tuple[str, int]]) -> Callable[[str, int], str]:
    """prompt -> HF's greedy continuation text on the same weights, which must run the full length."""
    def continuation(prompt: str, max_tokens: int) -> str:
        text, produced = hf_greedy_continuation(prompt, max_tokens)
        assert produced == max_tokens, "the oracle ended early: pick other prompts"
        return text

    return continuation


@pytest.fixture(scope="module", params=[False, True], ids=["engine-in-stub", "engine-process"])
def server(request: pytest.FixtureRequest, tiny_ft_dir: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    """The streaming repository, its engine in the core model's stub or in a process of its own (--engine-process:
    the same answers, admissions and cancellations, and the engine's log lines forwarded to the server log)."""
    model = GptModelConfig.from_ini(tiny_ft_dir / "config.ini")
    repo = render_repository(RenderConfig(engine="torch", device="cpu", data_type="fp32", checkpoint=tiny_ft_dir,
                                          model=model, streaming=True, max_batch_size=SLOTS,
                                          engine_process=request.param,
                                          output=tmp_path_factory.mktemp("stream") / "repo"))
    # Verbose: the scheduler logs every admission and cancellation.
    with server_on_free_ports(repo, log_verbose=1) as running:
        assert ("(engine process " in running.log_text()) == request.param  # the load line says where it runs
        yield running


def joined_running(server: TritonServer, log_from: int, want: int) -> list[tuple[int, int]]:
    """(rows, running rows) of each admission logged after `log_from`, once `want` rows joined running ones (or after
    a few seconds: the core's log lines travel through the Python backend's stub)."""
    deadline = time.monotonic() + 5
    while True:
        joins = [(int(rows), int(running)) for rows, running in JOIN_LINE.findall(server.log_text()[log_from:])]
        if sum(rows for rows, running in joins if running >= 1) >= want or time.monotonic() > deadline:
            return joins
        time.sleep(0.05)


def send_while_a_long_stream_runs(server: TritonServer) -> dict[str, str | list[str]]:
    """The long stream starts; as soon as its first piece arrives the other requests are sent, at once, on clients
    that are already connected and know the model."""
    answers: dict[str, str | list[str]] = {}
    errors: list[BaseException] = []
    long_started = threading.Event()
    asks: dict[str, Callable[[TextClient], str | list[str]]] = {
        name: lambda client, p=prompt, n=max_tokens: client.generate(p, max_tokens=n).text
        for name, (prompt, max_tokens) in SHORT_ONES.items()}
    asks["batch"] = lambda client: [r.text for r in client.generate(BATCH_PROMPTS, max_tokens=BATCH_TOKENS)]
    clients = {name: TextClient(server.grpc_url, protocol="grpc") for name in ["long", *asks]}

    def record(name: str, ask: Callable[[TextClient], str | list[str]]) -> None:
        try:
            if name != "long":
                assert long_started.wait(60), "the long request never streamed"
            answers[name] = ask(clients[name])
        except BaseException as err:  # noqa: BLE001  (reported by the main thread)
            errors.append(err)
            long_started.set()

    def stream_long(client: TextClient) -> str:
        pieces = []
        for piece in client.stream(LONG_PROMPT, max_tokens=LONG_TOKENS):
            pieces.append(piece)
            long_started.set()
        return "".join(pieces)

    try:
        for client in clients.values():
            assert client.model_info.inputs  # fetched now: the requests below go out at once
        threads = [threading.Thread(target=record, args=(name, ask))
                   for name, ask in [("long", stream_long), *asks.items()]]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
    finally:
        for client in clients.values():
            client.close()
    assert not errors, errors
    return answers


def test_requests_sent_mid_generation_join_the_running_batch(server: TritonServer, hf_greedy) -> None:
    """Requests sent while a long stream decodes join its batch (running >= 1) instead of waiting for it to end.

    The long stream's 120 steps take a fraction of a second on this toy model, and the others are sent when its first
    piece reaches the client (through the ensemble's postprocessing): on a busy machine it can end before they arrive.
    Such a run shows nothing either way, so the scenario is repeated (up to ATTEMPTS times) until one run has every
    other row admitted while something decodes; a scheduler that holds arrivals until the batch drains fails every
    run. Every run's text is checked."""
    want = len(SHORT_ONES) + len(BATCH_PROMPTS)
    runs = []
    for _ in range(ATTEMPTS):
        log_from = len(server.log_text())
        answers = send_while_a_long_stream_runs(server)
        assert answers["long"] == hf_greedy(LONG_PROMPT, LONG_TOKENS)
        for name, (prompt, max_tokens) in SHORT_ONES.items():
            assert answers[name] == hf_greedy(prompt, max_tokens), name
        assert answers["batch"] == [hf_greedy(p, BATCH_TOKENS) for p in BATCH_PROMPTS]
        joins = joined_running(server, log_from, want)
        runs.append(joins)
        if sum(rows for rows, running in joins if running >= 1) >= want:
            return
    pytest.fail(f"in none of {ATTEMPTS} runs did the {want} rows sent mid-generation join running rows: (rows, "
                f"running rows) admitted per run: {runs}")


def core_inputs(rows: int, output_len: int, *, stream: bool) -> list[grpcclient.InferInput]:
    """The core model's FT inputs: `rows` copies of a short prompt."""
    arrays = {"input_ids": np.full((rows, 4), 464, np.uint32), "input_lengths": np.full((rows, 1), 4, np.uint32),
              "request_output_len": np.full((rows, 1), output_len, np.uint32), "stream": np.full((rows, 1), stream)}
    inputs = []
    for name, array in arrays.items():
        tensor = grpcclient.InferInput(name, list(array.shape), "BOOL" if array.dtype == bool else "UINT32")
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def test_a_cancelled_stream_frees_its_slots(server: TritonServer) -> None:
    responses: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(server.grpc_url)
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    client.async_stream_infer(CORE_MODEL, core_inputs(SLOTS, 120, stream=True))  # every slot, for 120 steps
    for _ in range(3):
        result, error = responses.get(timeout=60)
        assert error is None, error
    client.stop_stream(cancel_requests=True)
    started = time.monotonic()
    # The next request needs every slot: it runs only once the cancelled rows left them.
    follow_up = grpcclient.InferenceServerClient(server.grpc_url)
    done: queue.Queue = queue.Queue()
    follow_up.start_stream(callback=lambda result, error: done.put((result, error)))
    follow_up.async_stream_infer(CORE_MODEL, core_inputs(SLOTS, 2, stream=False), enable_empty_final_response=False)
    result, error = done.get(timeout=60)
    follow_up.stop_stream()
    assert error is None, error
    assert result.as_numpy("sequence_length").tolist() == [[6]] * SLOTS
    assert time.monotonic() - started < 30
    assert "in-flight batching: a request was cancelled; its 8 running row(s) stop" in server.log_text()
