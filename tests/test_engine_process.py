"""The engine in a process of its own (engine_process.py), without Triton: the stub's handle drives a real child
process over the tiny checkpoint on the CPU. Oracle: the same engine generating in this process (greedy)."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from builder.runtime.core_adapter import CoreSettings
from builder.runtime.core_io import GenerationRequest, RowOutput
from builder.runtime.engine_process import EngineProcess, EngineProcessError
from builder.runtime.generation import GptEngine
from builder.runtime.metrics import MetricsRecorder

pytestmark = pytest.mark.slow

PROMPTS = [(464, 2068, 7586), (15496, 11), (40, 1101, 257, 1332, 286)]


class RecordingSink:
    """The stub's _Sink as the engine process's handle calls it (from its receiver thread)."""

    def __init__(self, cancel_after_updates: int | None = None) -> None:
        self.updates: list[list[np.ndarray]] = []
        self.final: list[RowOutput] | None = None
        self.error: str | None = None
        self.cancel_after_updates = cancel_after_updates
        self.done = threading.Event()

    def update(self, outputs: list[RowOutput]) -> None:
        self.updates.append([out.beams[0].copy() for out in outputs])

    def finish(self, outputs: list[RowOutput]) -> None:
        self.final = outputs
        self.done.set()

    def fail(self, error: Exception) -> None:
        self.error = str(error)
        self.done.set()

    def reject(self, message: str) -> None:
        self.error = f"rejected: {message}"
        self.done.set()

    def is_cancelled(self) -> bool:
        return self.cancel_after_updates is not None and len(self.updates) >= self.cancel_after_updates


def settings(model_dir: Path, **changes: object) -> CoreSettings:
    values: dict = dict(model_dir=model_dir, data_type="fp32", kv_slots=4, triton_max_batch_size=4, max_seq_len=128,
                        vocab_limit=None, decoupled=True, engine_process=True)
    return CoreSettings(**{**values, **changes})


@pytest.fixture(scope="module")
def engine_process(tiny_ft_dir: Path) -> EngineProcess:
    logs: list[str] = []
    remote = EngineProcess(settings(tiny_ft_dir), "cpu", log_info=logs.append, log_verbose=logs.append)
    remote.metrics = MetricsRecorder()
    yield remote
    remote.stop()


def local_greedy(model_dir: Path, prompts: list[tuple[int, ...]], output_len: int) -> list[list[int]]:
    engine = GptEngine.from_ft_dir(model_dir, device="cpu", dtype=torch.float32, max_batch_size=4, max_seq_len=128)
    rows = [GenerationRequest(input_ids=p, output_len=output_len, end_id=50256, min_length=output_len) for p in prompts]
    return [out.beams[0].tolist() for out in engine.generate(rows)]


def test_streams_from_the_engine_process_match_the_engine_here(engine_process: EngineProcess,
                                                               tiny_ft_dir: Path) -> None:
    expected = local_greedy(tiny_ft_dir, PROMPTS, 24)
    sinks = []
    for prompt in PROMPTS:  # three requests at once, one row each, streamed
        sinks.append(RecordingSink())
        engine_process.submit([GenerationRequest(input_ids=prompt, output_len=24, end_id=50256, min_length=24)],
                              sinks[-1], stream=True)
    for sink, want in zip(sinks, expected):
        assert sink.done.wait(60), "no final response"
        assert sink.error is None, sink.error
        assert sink.final is not None and sink.final[0].beams[0].tolist() == want
        for update in sink.updates:  # each update: the prompt, then a prefix of the generated tokens
            assert update[0].tolist() == want[:len(update[0])]
        assert len(sink.updates) < 2 or len(sink.updates[-1][0]) > len(sink.updates[0][0])
    # Updates are coalesced: a request whose tokens all come before the sender reaches it (a loaded machine) gets
    # its final only. Some request must have streamed, or the prefix checks above check nothing.
    assert any(sink.updates for sink in sinks), "no streamed request got an update"
    # The engine's metrics reach the stub's recorder (forwarded every METRICS_EVERY_S).
    generated, deadline = 0, time.monotonic() + 5
    while generated < 3 * 24 and time.monotonic() < deadline:
        generated += engine_process.metrics.take().counters["generated_tokens"]
        time.sleep(0.1)
    assert generated >= 3 * 24


def test_a_request_with_several_rows_and_log_probs_goes_whole(engine_process: EngineProcess,
                                                             tiny_ft_dir: Path) -> None:
    expected = local_greedy(tiny_ft_dir, PROMPTS[:2], 12)
    sink = RecordingSink()
    rows = [GenerationRequest(input_ids=p, output_len=12, end_id=50256, min_length=12, return_log_probs=True)
            for p in PROMPTS[:2]]
    engine_process.submit(rows, sink, stream=True)
    assert sink.done.wait(60) and sink.error is None, sink.error
    assert [out.beams[0].tolist() for out in sink.final] == expected
    assert all(out.output_log_probs is not None and len(out.output_log_probs[0]) == 12 for out in sink.final)


def test_a_cancelled_request_stops_early(engine_process: EngineProcess) -> None:
    sink = RecordingSink(cancel_after_updates=1)
    engine_process.submit([GenerationRequest(input_ids=PROMPTS[0], output_len=120, end_id=50256, min_length=120)],
                          sink, stream=True)
    assert sink.done.wait(60), "the cancelled request never ended"
    assert sink.error is None and sink.final is not None
    assert sink.final[0].cancelled or sink.final[0].finish_reason == "cancelled"
    assert len(sink.final[0].beams[0]) < len(PROMPTS[0]) + 120


class BrokenPollSink(RecordingSink):
    def is_cancelled(self) -> bool:
        raise RuntimeError("the response sender is gone")


def test_a_sink_whose_cancellation_poll_fails_still_gets_its_answer(engine_process: EngineProcess) -> None:
    """The stub's receiver thread polls and sends for every request: one broken poll must not stop it."""
    sink = BrokenPollSink()
    engine_process.submit([GenerationRequest(input_ids=PROMPTS[1], output_len=60, end_id=50256, min_length=60)],
                          sink, stream=True)
    assert sink.done.wait(60) and sink.error is None, sink.error
    assert len(sink.final[0].beams[0]) == len(PROMPTS[1]) + 60
    other = RecordingSink()
    engine_process.submit([GenerationRequest(input_ids=PROMPTS[0], output_len=4, end_id=50256)], other)
    assert other.done.wait(60) and other.error is None, other.error


def test_a_bad_request_is_refused_before_it_reaches_the_engine(engine_process: EngineProcess) -> None:
    from builder.runtime.core_io import RequestError

    with pytest.raises(RequestError, match="request_output_len"):
        engine_process.submit([GenerationRequest(input_ids=PROMPTS[0], output_len=1000, end_id=50256)],
                              RecordingSink())


def test_a_first_response_goes_before_the_log_lines_that_came_with_it(tiny_ft_dir: Path) -> None:
    """The admission's log line and the request's first token leave the engine process in one message; the stub
    sends the token first (each log line is a round trip to the server, on the way to the first response)."""
    order: list[str] = []

    class OrderSink(RecordingSink):
        def update(self, outputs: list[RowOutput]) -> None:
            order.append("update")
            super().update(outputs)

    remote = EngineProcess(settings(tiny_ft_dir), "cpu", log_info=lambda text: order.append(f"info: {text}"),
                           log_verbose=lambda text: order.append(f"verbose: {text}"))
    try:
        sink = OrderSink()
        remote.submit([GenerationRequest(input_ids=PROMPTS[0], output_len=4, end_id=50256, min_length=4)], sink,
                      stream=True)
        assert sink.done.wait(60) and sink.error is None
    finally:
        remote.stop()
    joined = next(i for i, line in enumerate(order) if "joined" in line)
    assert order.index("update") < joined, order


def test_a_dead_engine_process_fails_its_requests_and_says_so(tiny_ft_dir: Path) -> None:
    exits: list[str] = []
    remote = EngineProcess(settings(tiny_ft_dir), "cpu", log_info=lambda _: None, log_verbose=lambda _: None,
                           on_exit=exits.append)
    sink = RecordingSink()
    remote.submit([GenerationRequest(input_ids=PROMPTS[0], output_len=120, end_id=50256, min_length=120)], sink,
                  stream=True)
    remote.process.send_signal(signal.SIGKILL)
    assert sink.done.wait(30), "the running request was never failed"
    assert sink.error is not None and "engine process exited with status -9" in sink.error
    deadline = time.monotonic() + 5
    while not exits and time.monotonic() < deadline:
        time.sleep(0.05)
    assert exits and "exited with status -9" in exits[0]
    with pytest.raises(RuntimeError, match="engine process exited"):
        remote.submit([GenerationRequest(input_ids=PROMPTS[0], output_len=4, end_id=50256)], RecordingSink())
    remote.stop()


def test_an_engine_that_cannot_load_fails_the_start_with_its_traceback(tmp_path: Path) -> None:
    with pytest.raises(EngineProcessError, match="failed to load the model"):
        EngineProcess(settings(tmp_path / "missing"), "cpu", log_info=lambda _: None, log_verbose=lambda _: None)


def test_engine_process_is_a_checked_render_option_on_by_default(tiny_ft_dir: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    from google.protobuf import json_format

    from builder.render import parse_model_config, render_repository
    from builder.render_config import RenderConfig, RenderError
    from builder.runtime.model_config import GptModelConfig

    model = GptModelConfig.from_ini(tiny_ft_dir / "config.ini")
    with pytest.raises(RenderError, match="--engine-process needs --engine torch --streaming --tp 1"):
        RenderConfig(engine="torch", device="cpu", streaming=False, model=model, engine_process=True)
    assert not RenderConfig(engine="torch", device="cpu", streaming=False, model=model).engine_in_own_process

    def core_settings(**options: object) -> tuple[CoreSettings, dict]:
        """As tritonserver hands the rendered config to model.py."""
        output = tmp_path / f"r{len(list(tmp_path.iterdir()))}"
        repo = render_repository(RenderConfig(engine="torch", device="cpu", data_type="fp32", checkpoint=tiny_ft_dir,
                                              model=model, streaming=True, output=output, **options))
        path = repo / "gpt3_1.3b" / "config.pbtxt"
        config = json_format.MessageToDict(parse_model_config(path.read_text(), str(path)),
                                           preserving_proto_field_name=True)
        args = {"model_config": json.dumps(config), "model_repository": str(repo / "gpt3_1.3b"), "model_version": "1"}
        return CoreSettings.from_args(args), args

    monkeypatch.delenv("GPT_TRITON_ENGINE_PROCESS", raising=False)
    on, args = core_settings()
    assert on.engine_process
    assert core_settings(engine_process=True)[0].engine_process
    assert not core_settings(engine_process=False)[0].engine_process
    monkeypatch.setenv("GPT_TRITON_ENGINE_PROCESS", "0")  # A/B runs: the server's environment decides
    assert not CoreSettings.from_args(args).engine_process
    monkeypatch.setenv("GPT_TRITON_ENGINE_PROCESS", "on")
    with pytest.raises(ValueError, match="GPT_TRITON_ENGINE_PROCESS must be 0 or 1"):
        CoreSettings.from_args(args)
    monkeypatch.delenv("GPT_TRITON_ENGINE_PROCESS")
    config = json.loads(args["model_config"])
    config["parameters"]["engine_process"] = {"string_value": "yes"}
    with pytest.raises(ValueError, match="parameter engine_process must be 0 or 1"):
        CoreSettings.from_args({**args, "model_config": json.dumps(config)})
