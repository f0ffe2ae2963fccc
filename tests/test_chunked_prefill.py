"""Chunked prefill (issue 17): a prompt prefilled in pieces at offsets gives exactly what one whole prefill gives, and
the in-flight scheduler's per-step prompt-token budget lets long prompts join in chunks while running rows decode.

Oracles: GptModel.prefill of the whole prompt (itself checked against HF in test_engine_model.py) and the engine's
unchunked chunk path (`GptEngine.generate` of a row alone). CPU in fp32; the CUDA cases (graph-replayed chunks) run
where a GPU is.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest.mock import patch

import numpy as np
import pytest
import torch

from builder.runtime import scheduler as scheduler_module
from builder.runtime.core_adapter import CoreSettings
from builder.runtime.core_io import GenerationRequest, RowOutput
from builder.runtime.generation import GptEngine
from builder.runtime.gpt import GptModel, PrefillGraphs
from builder.runtime.model_config import GptModelConfig
from builder.runtime.scheduler import InflightScheduler, StepRecord
from engine_testing import TinyGpt, hf_generate, random_prompts, request
from test_scheduler import DEVICES, HOOK_WAIT_S, SAMPLING, AtDecodeStep, Sink, tokens

CHUNKS = (10, 3, 24)  # uneven pieces of a 37-token prompt


class ReplayedPrefillGraphs(PrefillGraphs):
    """PrefillGraphs' bookkeeping on the CPU (static buffers, widths, kv buckets, offsets, one replay per row): a
    "graph" re-runs its pass, reading the static buffers at replay time, into the same output tensor."""

    @dataclass
    class Replay:
        run: Callable[[], torch.Tensor]
        out: torch.Tensor

        def replay(self) -> None:
            self.out.copy_(self.run())

    def __init__(self, model: GptModel, chunk_width: int) -> None:
        with patch("torch.cuda.graph_pool_handle", return_value=None):
            super().__init__(model, chunk_width=chunk_width)

    def _graph(self, run: Callable[[], torch.Tensor]) -> tuple[Any, torch.Tensor]:
        out = run()  # the warm-up pass
        return self.Replay(run, out), out

    def capture_all(self) -> int:
        with patch("torch.cuda.synchronize"):
            return super().capture_all()


# cpu-graphs: the CPU engine with ReplayedPrefillGraphs, all captured up front as at load.
ENGINES = [*DEVICES[:1], "cpu-graphs", *DEVICES[1:]]


def new_engine(tiny: TinyGpt, slots: int, device: str = "cpu", kv_cache_dtype: str = "auto") -> GptEngine:
    engine = GptEngine.from_ft_dir(tiny.ft_dir, max_batch_size=slots, cancel_poll_s=0.0,
                                   device="cpu" if device == "cpu-graphs" else device, kv_cache_dtype=kv_cache_dtype)
    if device == "cpu-graphs":
        engine.prefill_graphs = ReplayedPrefillGraphs(engine.model, chunk_width=512)  # the count below is for 512
        # max_seq_len 128: whole prompts of 64 and 128 tokens; chunks of 64 (kv 128) and 128 (kv 128); several
        # prompts: 2, 3 or 4 rows of 64 or 128 tokens, 5 to 8 rows of 64.
        assert engine.prefill_graphs.capture_all() == 4 + 10
    return engine


@pytest.fixture(scope="module")
def long_prompt() -> list[int]:
    return random_prompts(1, seed=21, min_len=37, max_len=37)[0]


@pytest.mark.parametrize("device", ENGINES)  # CUDA: chunks of up to 4 rows replay the prefill CUDA graphs
@torch.inference_mode()
def test_a_prompt_prefilled_in_chunks_matches_one_whole_prefill(tiny: TinyGpt, long_prompt: list[int],
                                                                device: str) -> None:
    engine = new_engine(tiny, slots=4, device=device)
    model, n = engine.model, len(long_prompt)
    prompt = torch.tensor([long_prompt], device=engine.device)
    whole = model.prefill(prompt, torch.tensor([n], device=engine.device), first_slot=0)  # slot 0

    start = 0
    for size in CHUNKS:  # slot 2, one chunk per call, each attending to what the calls before it cached
        chunk = torch.tensor([long_prompt[start:start + size]])
        chunked = engine.prefill_chunks(chunk, [start], [size], [2])
        start += size
    assert start == n
    tolerance = dict(rtol=1e-5, atol=1e-4 if device == "cuda" else 1e-5)  # fp32; CUDA: other attention kernels
    torch.testing.assert_close(chunked, whole, **tolerance)
    for layer in range(len(model.layers)):
        for cache in (model.k_cache[layer], model.v_cache[layer]):
            torch.testing.assert_close(cache[2, :, :n], cache[0, :, :n], **tolerance)

    # Several rows in one pass, at different offsets, in slots out of order: slot 3 takes the prompt from 0 to 20,
    # then slot 3 (20..37) and slot 1 (0..15) share a pass; slot 1 is then finished alone.
    engine.prefill_chunks(torch.tensor([long_prompt[:20]]), [0], [20], [3])
    pair = torch.zeros((2, 17), dtype=torch.long)
    pair[0, :17], pair[1, :15] = torch.tensor(long_prompt[20:]), torch.tensor(long_prompt[:15])
    both = engine.prefill_chunks(pair, [20, 0], [17, 15], [3, 1])
    last = engine.prefill_chunks(torch.tensor([long_prompt[15:]]), [15], [n - 15], [1])
    torch.testing.assert_close(both[:1], whole, **tolerance)
    torch.testing.assert_close(last, whole, **tolerance)

    # Greedy decoding from each slot's cache gives the same continuation as HF's from the whole prompt.
    expected = hf_generate(tiny.hf, long_prompt, 12, eos_token_id=None)[n:]
    first = torch.cat([whole, whole, chunked, both[:1]]).argmax(-1)  # slots 0..3
    generated, tokens_, position = [first.tolist()], first, n
    for _ in range(11):
        logits = engine.decode(tokens_, torch.full((4,), position, device=engine.device), position + 1)
        tokens_, position = logits.argmax(-1), position + 1
        generated.append(tokens_.tolist())
    for slot in range(4):
        assert [step[slot] for step in generated] == expected, f"slot {slot}"


@pytest.mark.parametrize("device", ENGINES)  # cpu-graphs and CUDA: one several-prompt graph
@torch.inference_mode()
def test_several_whole_prompts_in_one_pass_match_each_alone(tiny: TinyGpt, long_prompt: list[int],
                                                            device: str) -> None:
    engine = new_engine(tiny, slots=4, device=device)
    model, slots = engine.model, [3, 1, 2]
    prompts = [long_prompt, long_prompt[:20], long_prompt[5:20]]
    tokens_ = torch.zeros((3, 64), dtype=torch.long)  # padded to 64 as the scheduler pads a pass
    for i, prompt in enumerate(prompts):
        tokens_[i, :len(prompt)] = torch.tensor(prompt)
    graphs = engine.prefill_graphs
    if graphs is None:  # the plain CPU engine: one eager pass
        together = engine.prefill_chunks(tokens_, [0, 0, 0], [len(p) for p in prompts], slots)
    else:
        with patch.object(graphs, "prefill_rows", wraps=graphs.prefill_rows) as spy:
            together = engine.prefill_chunks(tokens_, [0, 0, 0], [len(p) for p in prompts], slots)
        assert spy.call_count == 1 and engine.prefill_graphs is graphs
    tolerance = dict(rtol=1e-5, atol=1e-4 if device == "cuda" else 1e-5)
    for i, (prompt, slot) in enumerate(zip(prompts, slots)):
        alone = model.prefill(torch.tensor([prompt], device=engine.device),
                              torch.tensor([len(prompt)], device=engine.device), first_slot=0)  # slot 0
        torch.testing.assert_close(together[i:i + 1], alone, **tolerance)
        for layer in range(len(model.layers)):
            for cache in (model.k_cache[layer], model.v_cache[layer]):
                torch.testing.assert_close(cache[slot, :, :len(prompt)], cache[0, :, :len(prompt)], **tolerance)


def test_the_load_time_check_keeps_agreeing_prefill_graphs_and_drops_wrong_ones(tiny: TinyGpt,
                                                                             caplog: pytest.LogCaptureFixture) -> None:
    """GptEngine.capture_graphs (CUDA at load) on the CPU stand-in graphs: graphs that compute what the eager passes
    compute are kept, with a note per check; a several-prompt graph that disagrees drops the prefill graphs."""
    engine = new_engine(tiny, slots=4, device="cpu-graphs")
    graphs = engine.prefill_graphs
    engine.graphs = SimpleNamespace(capture_all=lambda: 0)  # no decode graphs on the CPU: capture nothing
    note = engine.capture_graphs()
    assert engine.prefill_graphs is graphs
    assert all(f"{check} max |d logit|" in note for check in ("prefill graph vs eager", "chunk graph vs whole prompt",
                                                              "two-prompt graph vs eager")), note

    def wrong_rows(*args: Any) -> torch.Tensor:
        return PrefillGraphs.prefill_rows(graphs, *args) + 1.0  # every logit off by 1

    with patch.object(graphs, "prefill_rows", side_effect=wrong_rows):
        engine.capture_graphs()
    assert engine.prefill_graphs is None
    assert any("several-prompt prefill CUDA graph disagrees with eager" in r.getMessage() for r in caplog.records)


def test_an_engine_of_one_slot_loads_its_graphs(tiny: TinyGpt) -> None:
    """One KV slot (max_batch_size 1): the load-time check has no two-prompt pass to compare (it would write a second
    slot: a device-side assert that killed the load on a GPU), the other checks still run."""
    engine = new_engine(tiny, slots=1, device="cpu-graphs")
    graphs = engine.prefill_graphs
    engine.graphs = SimpleNamespace(capture_all=lambda: 0)
    note = engine.capture_graphs()
    assert engine.prefill_graphs is graphs
    assert "chunk graph vs whole prompt" in note and "two-prompt" not in note, note


@dataclass
class Trace:
    """The scheduler's on_step records, appended from its thread."""
    records: list[StepRecord]

    def chunks_of(self, slot: int) -> list[tuple[int, StepRecord]]:
        return [(i, r) for i, r in enumerate(self.records) if any(c[0] == slot for c in r.chunks)]


def solo_results(engine: GptEngine, rows: list) -> list[RowOutput]:
    return [engine.generate([row])[0] for row in rows]


@pytest.mark.parametrize("device", ENGINES)
def test_chunked_and_unchunked_scheduling_give_identical_results(tiny: TinyGpt, long_run, device: str) -> None:
    """Prompts of 5-40 tokens with a budget of 8 prompt tokens per step, sent while a long row decodes: every
    prompt over 8 tokens joins in several chunks, next to other rows' decoding and chunks, in slots freed by others;
    every request gets exactly what it gets alone (unchunked), stop words, bans and penalties included (they read
    the slot state written once the prompt is cached)."""
    engine = new_engine(tiny, slots=4, device=device)
    long_row, long_sequence = long_run(100)
    prompts = random_prompts(14, seed=31, min_len=5, max_len=40)
    rows = [request(p, 6 + i % 5, **(dict(random_seed=i, return_log_probs=True, **SAMPLING) if i % 3 == 1 else {}))
            for i, p in enumerate(prompts[:10])]
    greedy = [tokens(engine.generate([request(p, 8)])[0])[len(p):] for p in prompts[10:]]
    rows += [
        request(prompts[10], 8, stop_words=((greedy[0][2], greedy[0][3]),)),  # stops within 4 tokens
        request(prompts[11], 8, bad_words=((greedy[1][0],), (greedy[1][1], greedy[1][2]))),
        request(prompts[12], 8, repetition_penalty=1.8, presence_penalty=0.5, return_log_probs=True),
        request(prompts[13], 8, end_id=greedy[3][1], min_length=5),  # end_id banned for 5 tokens
    ]
    solo = solo_results(engine, rows)
    assert solo[10].finish_reason == "stop" and len(tokens(solo[10])) <= len(prompts[10]) + 4  # the case can fail
    assert tokens(solo[11])[len(prompts[11])] != greedy[1][0]
    sinks = [Sink(name=str(i)) for i in range(len(rows))]
    long = Sink(name="long")

    def send_all() -> None:  # the long row decodes: from now on the budget applies
        for i, (row, sink) in enumerate(zip(rows, sinks)):
            scheduler.submit([row], sink, stream=bool(i % 2))

    with InflightScheduler(engine, step_prompt_tokens=8, admit_gather_steps=0,
                           on_step=AtDecodeStep(1, send_all)) as scheduler:
        scheduler.submit([long_row], long, stream=True)
        results = [sink.result()[0] for sink in sinks]
        assert tokens(long.result()[0]) == long_sequence, "the long row must outlast the others"
        stats = scheduler.stats
    for i, (row, alone, result) in enumerate(zip(rows, solo, results)):
        assert tokens(result) == tokens(alone), f"request {i}"
        assert result.finish_reason == alone.finish_reason, f"request {i}"
        if row.return_log_probs:
            np.testing.assert_allclose(result.output_log_probs[0], alone.output_log_probs[0],
                                       atol=1e-4 if device == "cuda" else 1e-5)
    # Every prompt over the budget was chunked (a shorter one may be too, when a chunk before it used part of it).
    assert stats.chunked_rows >= sum(len(p) > 8 for p in prompts) >= 10, stats
    assert stats.prefill_chunks >= 1 + sum(-(-len(p) // 8) for p in prompts), stats  # at most 8 tokens per chunk
    assert stats.joined_running_rows == len(rows), stats


def test_running_rows_decode_every_step_while_a_long_prompt_joins_in_chunks(tiny: TinyGpt, long_prompt: list[int],
                                                                              long_run) -> None:
    """A 37-token prompt arrives while a row decodes; with a budget of 8 it is prefilled over 5 steps, and in each of
    them the running row appends one token (the decode is not held back); the new row decodes only after its last
    chunk, whose step also samples its first token. A lone request in an idle engine prefills in one pass."""
    engine = new_engine(tiny, slots=4)
    running_row, running_sequence = long_run(60)
    late_row = request(long_prompt, 6)
    expected_late = tokens(engine.generate([late_row])[0])
    trace = Trace(records=[])
    late = Sink(name="late")

    running = Sink(name="running")
    send_late = AtDecodeStep(2, lambda: scheduler.submit([late_row], late, stream=True), then=trace.records.append)
    with InflightScheduler(engine, step_prompt_tokens=8, admit_gather_steps=0, on_step=send_late) as scheduler:
        scheduler.submit([running_row], running, stream=True)
        assert tokens(late.result()[0]) == expected_late
        assert tokens(running.result()[0]) == running_sequence
        alone = Sink(name="alone")  # the engine is idle again: the budget does not apply
        scheduler.submit([late_row], alone)
        assert tokens(alone.result()[0]) == expected_late

    assert trace.records[0].chunks == [(0, 0, len(running_row.input_ids))]
    late_chunks = trace.chunks_of(1)
    spans = [c[1:] for _, r in late_chunks for c in r.chunks if c[0] == 1]
    assert spans == [(0, 8), (8, 16), (16, 24), (24, 32), (32, 37)], spans
    for k, (_, record) in enumerate(late_chunks):
        assert record.decoded and 0 in record.advanced, f"chunk {k}: the running row did not advance"
        assert (1 in record.advanced) == (k == len(late_chunks) - 1), f"chunk {k}"
    between = trace.records[late_chunks[0][0]:late_chunks[-1][0] + 1]
    assert all(0 in r.advanced for r in between)
    # Idle: the whole prompt in one chunk, in whichever slot it got.
    idle_chunks = [c for r in trace.records[late_chunks[-1][0] + 1:] for c in r.chunks]
    assert [c[1:] for c in idle_chunks] == [(0, len(long_prompt))]


@pytest.fixture(scope="module")
def long_run(tiny: TinyGpt) -> Callable[[int], tuple[GenerationRequest, list[int]]]:
    """steps -> a greedy request that runs that many steps without ending (<= 100), and its expected tokens."""
    prompt = random_prompts(1, seed=5, min_len=6, max_len=6)[0]
    sequence = hf_generate(tiny.hf, prompt, 100, eos_token_id=None)
    end_id = next(t for t in range(1, 512) if t not in sequence[len(prompt):])
    return lambda steps: (request(prompt, steps, end_id=end_id), sequence[:len(prompt) + steps])


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8"])
def test_streamed_text_equals_not_streamed_with_chunked_prompts(tiny: TinyGpt, long_run, kv_cache_dtype: str) -> None:
    """Same requests streamed and not, sent while a long row decodes, with prompts chunked (budget 4): the final
    outputs are equal, every update is a prefix of the final one, and no update comes before the prompt is fully
    prefilled (none shows a partial prompt or a token past it that is not in the final). With an fp8 KV cache too,
    whose chunked outputs also equal the same requests run alone (whole prompts, nothing beside them)."""
    engine = new_engine(tiny, slots=5, kv_cache_dtype=kv_cache_dtype)
    long_row, _ = long_run(100)
    prompts = random_prompts(4, seed=41, min_len=9, max_len=30)
    rows = [request(p, 8, random_seed=7 + i, **SAMPLING) for i, p in enumerate(prompts)]
    outputs = {}
    for stream in (True, False):
        sinks = [Sink(name=f"{stream}{i}") for i in range(len(rows))]

        def send_all(sinks: list[Sink] = sinks, stream: bool = stream) -> None:  # the long row decodes: budget
            for row, sink in zip(rows, sinks):
                scheduler.submit([row], sink, stream=stream)

        with InflightScheduler(engine, step_prompt_tokens=4, admit_gather_steps=0,
                               on_step=AtDecodeStep(1, send_all)) as scheduler:
            scheduler.submit([long_row], Sink(name="long"), stream=True)
            outputs[stream] = [tokens(sink.result()[0]) for sink in sinks]
            assert scheduler.stats.chunked_rows == len(rows)
        if stream:
            # Updates are coalesced: a row whose 8 tokens all come before the sender reaches it (a loaded machine)
            # gets its final only. Some row must have streamed, or the prefix checks below check nothing.
            assert any(sink.updates for sink in sinks), "no streamed request got an update"
            for sink, prompt, final in zip(sinks, prompts, outputs[stream]):
                for update in sink.updates:
                    seen = tokens(update[0])
                    assert len(prompt) < len(seen) <= len(final) and final[:len(seen)] == seen
        else:
            assert all(sink.updates == [] for sink in sinks)
    assert outputs[True] == outputs[False]
    assert outputs[False] == [tokens(engine.generate([row])[0]) for row in rows]


def test_cancelling_or_failing_a_request_mid_prefill_frees_its_slot(tiny: TinyGpt, long_prompt: list[int], long_run,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """One request is cancelled after its first chunk, another fails in its third chunk (an injected fault): both
    end at once (cancelled with the prompt only; the error), the running row is unaffected, and a request that then
    gets the freed slot is exact (nothing the partial prefill left in the cache leaks into it)."""
    engine = new_engine(tiny, slots=2)
    running_row, running_sequence = long_run(100)
    poison = 511
    poisoned_prompt = long_prompt[:20] + [poison] + long_prompt[21:]
    real_prefill = engine.prefill_chunks

    def prefill_chunks(chunks: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        if bool((chunks == poison).any()):
            raise RuntimeError("injected prefill fault")
        return real_prefill(chunks, *args, **kwargs)

    monkeypatch.setattr(engine, "prefill_chunks", prefill_chunks)
    chunked = threading.Event()  # set once the cancelled request's first chunk is cached
    told = threading.Event()  # set once the sender was told so by is_cancelled

    def on_step(record: StepRecord) -> None:
        if any(c[0] == 1 and c[1] == 0 for c in record.chunks):
            chunked.set()
            # The loop goes on once the sender has seen the cancellation (it reports it at once), so that the 36
            # one-token chunks left cannot all pass before it applies, however late the sender thread runs.
            assert told.wait(HOOK_WAIT_S), "the sender never polled is_cancelled"

    @dataclass
    class CancelledSink(Sink):
        def is_cancelled(self) -> bool:
            if chunked.is_set():
                told.set()
            return chunked.is_set()

    follow_row = request(long_prompt[::-1], 5)
    expected_follow = tokens(engine.generate([follow_row])[0])
    cancelled, failed, follow = CancelledSink(name="cancelled"), Sink(name="failed"), Sink(name="follow")

    def send() -> None:  # FIFO, one token per step: each runs while the others wait
        scheduler.submit([request(long_prompt, 6)], cancelled)  # slot 1, cancelled after its first chunk
        scheduler.submit([request(poisoned_prompt, 6)], failed)  # then slot 1: fails at prompt position 20
        scheduler.submit([follow_row], follow)  # then slot 1 again

    running = Sink(name="running")
    with InflightScheduler(engine, step_prompt_tokens=1, admit_gather_steps=0, cancel_poll_s=0.0,
                           on_step=AtDecodeStep(2, send, then=on_step)) as scheduler:
        scheduler.submit([running_row], running, stream=True)
        result = cancelled.result()[0]
        assert failed.done.wait(30) and "injected prefill fault" in str(failed.error)
        assert tokens(follow.result()[0]) == expected_follow
        assert tokens(running.result()[0]) == running_sequence
        stats = scheduler.stats
    assert result.cancelled and result.finish_reason == "cancelled" and tokens(result) == long_prompt
    assert stats.failed_requests == 1 and stats.finished_requests == 3


# ---- the render option, through tritonserver ------------------------------------------------------------------------
LONG_TOKENS = 120  # with its 6-token prompt, nearly the tiny model's 128 positions
ATTEMPTS = 3  # test_chunked_prompts_through_the_streaming_ensemble says why
CHUNK_LINE = re.compile(r"a prompt of (\d+) tokens was prefilled in chunks")


def test_step_prompt_tokens_is_a_checked_render_option(tiny_ft_dir: Path, tmp_path: Path) -> None:
    # Renderer packages are imported here: the engine tests above also run on a GPU host's kit Python, without them.
    from google.protobuf import json_format

    from builder.render import parse_model_config, render_repository
    from builder.render_config import RenderConfig, RenderError

    model = GptModelConfig.from_ini(tiny_ft_dir / "config.ini")
    with pytest.raises(RenderError, match="--step-prompt-tokens must be in 0..65536"):
        RenderConfig(engine="torch", device="cpu", streaming=True, model=model, step_prompt_tokens=-1)
    repo = render_repository(RenderConfig(engine="torch", device="cpu", data_type="fp32", checkpoint=tiny_ft_dir,
                                          model=model, streaming=True, step_prompt_tokens=24, output=tmp_path / "r"))
    path = repo / "gpt3_1.3b" / "config.pbtxt"
    config = json_format.MessageToDict(parse_model_config(path.read_text(), str(path)),
                                       preserving_proto_field_name=True)
    args = {"model_config": json.dumps(config), "model_repository": str(repo / "gpt3_1.3b"), "model_version": "1"}
    assert CoreSettings.from_args(args).step_prompt_tokens == 24  # as tritonserver hands the config to model.py
    config["parameters"]["step_prompt_tokens"] = {"string_value": "lots"}
    with pytest.raises(ValueError, match="parameter step_prompt_tokens must be a whole number"):
        CoreSettings.from_args({**args, "model_config": json.dumps(config)})


@pytest.mark.server
@pytest.mark.slow
def test_chunked_prompts_through_the_streaming_ensemble(tiny_ft_dir: Path, tmp_path: Path,
                                                        hf_greedy_continuation: Callable[[str, int], tuple[str, int]]
                                                        ) -> None:
    """A streaming repository rendered with --step-prompt-tokens 4: prompts sent while a long stream decodes join in
    chunks (the core's log says so), and their text, streamed or not, is HF's greedy continuation."""
    from builder.render import render_repository
    from builder.render_config import RenderConfig
    from builder.serve import TritonServer
    from client import TextClient
    from servers import server_on_free_ports

    model = GptModelConfig.from_ini(tiny_ft_dir / "config.ini")
    repo = render_repository(RenderConfig(engine="torch", device="cpu", data_type="fp32", checkpoint=tiny_ft_dir,
                                          model=model, streaming=True, max_batch_size=8, step_prompt_tokens=4,
                                          output=tmp_path / "repo"))
    long_prompt, prompts = "The quick brown fox jumps over", [
        "One two three four five six seven eight nine ten eleven twelve",
        "Triton serves text to many clients at once, and each of them gets its own answer back"]
    answers: dict[tuple[str, bool], str] = {}

    def ask(url: str, prompt: str, stream: bool) -> None:
        with TextClient(url, protocol="grpc") as client:
            answers[(prompt, stream)] = ("".join(client.stream(prompt, max_tokens=12)) if stream else
                                         client.generate(prompt, max_tokens=12).text)

    def send_while_a_long_stream_runs(server: TritonServer) -> str:
        with TextClient(server.grpc_url, protocol="grpc") as client:
            long_stream = client.stream(long_prompt, max_tokens=LONG_TOKENS)
            long_text = next(long_stream)  # the long row decodes from here on: the others arrive meanwhile, at once
            threads = [threading.Thread(target=ask, args=(server.grpc_url, p, stream)) for p in prompts
                       for stream in (True, False)]
            for thread in threads:
                thread.start()
            long_text += "".join(long_stream)
            for thread in threads:
                thread.join(60)
        return long_text

    # The long stream's 120 steps take a fraction of a second here: on a busy machine the others may all arrive
    # after it ended (and, arriving together at an idle engine, go whole). Such a run shows nothing either way, so
    # it is repeated, up to ATTEMPTS runs; an engine that never chunks fails every run. Every run's text is checked.
    runs = []
    with server_on_free_ports(repo, log_verbose=1) as server:
        for _ in range(ATTEMPTS):
            log_from = len(server.log_text())
            answers.clear()
            long_text = send_while_a_long_stream_runs(server)
            for prompt in prompts:
                expected, produced = hf_greedy_continuation(prompt, 12)
                assert produced == 12, "the oracle ended early: pick other prompts"
                assert answers[(prompt, True)] == answers[(prompt, False)] == expected, prompt
            assert long_text == hf_greedy_continuation(long_prompt, LONG_TOKENS)[0]
            runs.append([int(n) for n in CHUNK_LINE.findall(server.log_text()[log_from:])])
            # At least those that came while the long row decoded (a later one may find the engine idle, go whole).
            if runs[-1]:
                break
    assert runs[-1] and min(runs[-1]) > 4, runs


@pytest.mark.parametrize("budget,most_wait", [(8, 1), (512, 3)])
def test_arrivals_that_fill_the_budget_do_not_wait_to_share_a_pass(tiny: TinyGpt, long_prompt: list[int], long_run,
                                                                  monkeypatch: pytest.MonkeyPatch, budget: int,
                                                                  most_wait: int) -> None:
    """While the batch counts as busy, a lone arrival may wait up to admit_gather_steps steps for others to share its
    prefill pass, unless its prompt alone fills the step's budget (a 37-token prompt, budget 8): then it starts at the
    next step. With a budget it does not fill (512) it waits."""
    monkeypatch.setattr(scheduler_module, "ADMIT_GATHER_MIN_RUNNING", 1)
    engine = new_engine(tiny, slots=4)
    running_row, running_sequence = long_run(60)
    late_row = request(long_prompt, 6)
    expected_late = tokens(engine.generate([late_row])[0])
    late = Sink(name="late")

    running = Sink(name="running")
    send_late = AtDecodeStep(2, lambda: scheduler.submit([late_row], late))
    with InflightScheduler(engine, step_prompt_tokens=budget, admit_gather_steps=4, on_step=send_late) as scheduler:
        scheduler.submit([running_row], running, stream=True)
        assert tokens(late.result()[0]) == expected_late
        assert tokens(running.result()[0]) == running_sequence
        waited = scheduler.stats.max_admission_wait_steps
    assert waited <= most_wait if budget == 8 else waited >= most_wait, waited


def prompt_tokens_per_step(tiny: TinyGpt, long_run, rows: list, **options: Any) -> list[int]:
    """Send `rows` at once after a long streamed row's first decode step, on a scheduler with `options`; check every
    result against the row alone and return the prompt tokens each later step prefilled."""
    engine = new_engine(tiny, slots=8)
    running_row, running_sequence = long_run(60)
    expected = [tokens(result) for result in solo_results(engine, rows)]
    sinks, running = [Sink(name=str(i)) for i in range(len(rows))], Sink(name="running")
    trace = Trace(records=[])

    def send_all() -> None:
        for row, sink in zip(rows, sinks):
            scheduler.submit([row], sink)

    with InflightScheduler(engine, admit_gather_steps=0, on_step=AtDecodeStep(1, send_all, then=trace.records.append),
                           **options) as scheduler:
        scheduler.submit([running_row], running, stream=True)
        assert [tokens(sink.result()[0]) for sink in sinks] == expected
        assert tokens(running.result()[0]) == running_sequence
    per_step = [sum(end - start for _, start, end in record.chunks) for record in trace.records[1:]]
    assert sum(per_step) == sum(len(row.input_ids) for row in rows)
    return per_step


@pytest.mark.parametrize("with_long", [False, True])
def test_short_prompts_share_graph_sized_passes_and_a_long_one_gets_the_whole_budget(tiny: TinyGpt, long_prompt,
                                                                                     long_run, with_long: bool) -> None:
    """While a row decodes, prompts that each fit a prefill graph (graph_prompt_tokens 8) are prefilled at most 8
    tokens a step, even with a budget of 32: passes that replay a graph. Once a prompt longer than that waits, a step
    prefills up to the whole budget (its passes run eagerly anyway, and wider ones cost less per token)."""
    shorts = [request(p, 4) for p in random_prompts(5, seed=8, min_len=5, max_len=8)]
    rows = shorts + ([request(long_prompt, 4)] if with_long else [])
    per_step = prompt_tokens_per_step(tiny, long_run, rows, step_prompt_tokens=32, graph_prompt_tokens=8)
    if with_long:
        assert max(per_step) > 8, per_step
        assert all(tokens <= 32 for tokens in per_step), per_step
    else:
        assert max(per_step) <= 8 and sum(t > 0 for t in per_step) >= 4, per_step


def test_short_prompts_gather_to_the_gather_bound_and_join_up_to_the_graph_width(tiny: TinyGpt, long_run) -> None:
    """Graph passes of up to graph_prompt_tokens (16) take every short prompt (<= gather_prompt_tokens, 8) that
    waits, several at once; a prompt longer than 8 gets the step's whole budget (32)."""
    shorts = [request(p, 4) for p in random_prompts(5, seed=8, min_len=5, max_len=8)]
    per_step = prompt_tokens_per_step(tiny, long_run, shorts, step_prompt_tokens=32, graph_prompt_tokens=16,
                                      gather_prompt_tokens=8)
    assert 8 < max(per_step) <= 16, per_step  # more than one gather's worth in a pass, never past the graph width
