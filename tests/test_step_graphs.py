"""Scheduler steps whose selection replays a graph and whose decode replays the decode graph
(builder/runtime/step_graphs.py) give exactly what op-by-op steps give.

On the CPU a "graph" re-runs its selection when replayed (ReplayedStepGraphs), so what is tested there is the
bookkeeping: rows buckets larger than the batch, the decode's input buffers the selection fills, the shared logits
buffer that prefills write into, the read-back layout of a bucket, a graph per set of selection flags, and the op-by-op
fallback for stop words, bad words and log-probs next to graph-replayed steps. On CUDA the real graphs run (skipped
without a GPU).
"""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from builder.runtime.core_io import GenerationRequest, RowOutput
from builder.runtime.generation import GptEngine
from builder.runtime.gpt import batch_buckets
from builder.runtime.scheduler import InflightScheduler
from builder.runtime.step_graphs import StepGraphs
from engine_testing import TinyGpt, random_prompts, request
from test_scheduler import SAMPLING, Sink, tokens


class ReplayedStepGraphs(StepGraphs):
    """CPU stand-in: the first use of a key runs the step (as the CUDA warm-up does); a replay runs it again."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.replays = 0

    def _graph(self, run: Any) -> Any:
        run()

        def replay() -> None:
            self.replays += 1
            run()

        return SimpleNamespace(replay=replay)


class FailingStepGraphs(ReplayedStepGraphs):
    """CPU stand-in whose third capture fails after its step ran, as a CUDA capture that runs out of memory does."""

    def _graph(self, run: Any) -> Any:
        if len(self.graphs) < 2:
            return super()._graph(run)
        run()
        self.failure = "capturing a step graph failed (out of memory, simulated)"
        return None


def replayed_step_graphs(scheduler: InflightScheduler,
                         kind: type[ReplayedStepGraphs] = ReplayedStepGraphs) -> ReplayedStepGraphs:
    """Install CPU step graphs on a scheduler that has not started (a CPU engine has no decode graphs)."""
    assert scheduler.step_graphs is None
    graphs = kind(scheduler.engine.model, scheduler.table, scheduler.readback.flags, scheduler.engine.vocab_limit,
                  buckets=batch_buckets(scheduler.slot_count))
    scheduler.step_graphs, scheduler._logits = graphs, graphs.logits
    return graphs


def workload(engine: GptEngine) -> tuple[list[GenerationRequest], list[GenerationRequest]]:
    """(first wave, second wave): prompts of 5-40 tokens and 6-30 new tokens, so the batch crosses several rows buckets;
    greedy, seeded sampling, min_length, penalties in the first wave (graph-replayed steps); the second adds stop
    words, bad words and log-probs, whose steps run op by op. Its last request is sent alone at the end (the
    smallest rows bucket)."""
    prompts = random_prompts(13, seed=41, min_len=5, max_len=40)
    stop = tokens(engine.generate([request(prompts[8], 14)])[0])[len(prompts[8]) + 2:][:2]  # reached in 4 tokens
    first = [
        request(prompts[0], 30),
        request(prompts[1], 20, random_seed=3, **SAMPLING),
        request(prompts[2], 25, random_seed=4, top_k=3, temperature=0.7),
        request(prompts[3], 12, end_id=7, min_length=10),
        request(prompts[4], 18, repetition_penalty=1.8, presence_penalty=0.5),
        request(prompts[5], 16, frequency_penalty=0.7),
        request(prompts[6], 22, random_seed=9, top_p=0.8),
        request(prompts[7], 9),
    ]
    second = [
        request(prompts[8], 14, stop_words=(tuple(stop),)),
        request(prompts[9], 10, bad_words=((11,), (12, 13))),
        request(prompts[10], 12, return_log_probs=True),
        request(prompts[11], 26),
        request(prompts[12], 15, random_seed=12, **SAMPLING),
    ]
    return first, second


def serve(engine: GptEngine, first: list[GenerationRequest], second: list[GenerationRequest], *,
          cpu_graphs: bool, kind: type[ReplayedStepGraphs] = ReplayedStepGraphs
          ) -> tuple[list[RowOutput], ReplayedStepGraphs | None, InflightScheduler]:
    """The first wave at once (4 slots: the rest wait), then the second while the first still runs, but its last
    request, which runs alone once everything else has finished."""
    sinks = [Sink(name=str(i)) for i in range(len(first) + len(second))]
    scheduler = InflightScheduler(engine, step_prompt_tokens=8, admit_gather_steps=0)
    graphs = replayed_step_graphs(scheduler, kind=kind) if cpu_graphs else None
    with scheduler:
        for i, row in enumerate(first):
            scheduler.submit([row], sinks[i], stream=bool(i % 2))
        while len(sinks[1].updates) < 3 and not sinks[1].done.is_set():  # a streamed one
            time.sleep(0.001)
        for i, row in enumerate(second[:-1], start=len(first)):
            scheduler.submit([row], sinks[i], stream=bool(i % 2))
        results = [sink.result()[0] for sink in sinks[:-1]]
        scheduler.submit([second[-1]], sinks[-1], stream=True)
        results.append(sinks[-1].result()[0])
    return results, graphs, scheduler


def test_replayed_steps_equal_op_by_op_steps(tiny: TinyGpt) -> None:
    engine = GptEngine.from_ft_dir(tiny.ft_dir, max_batch_size=4, cancel_poll_s=0.0)
    first, second = workload(engine)
    solo = [engine.generate([row])[0] for row in first + second]
    results, graphs, _ = serve(engine, first, second, cpu_graphs=True)
    for i, (alone, result) in enumerate(zip(solo, results)):
        assert tokens(result) == tokens(alone), f"request {i}"
        assert result.finish_reason == alone.finish_reason, f"request {i}"
    assert graphs is not None and graphs.replays > 0
    rows, flags = (set(keys) for keys in zip(*graphs.graphs))
    assert len(rows) >= 2 and len(flags) >= 2, graphs.graphs.keys()
    assert solo[8].finish_reason == "stop"  # the stop word is reached: the op-by-op steps matter


def test_a_failed_capture_leaves_the_steps_op_by_op(tiny: TinyGpt, caplog: pytest.LogCaptureFixture) -> None:
    """A step whose graph cannot be captured has run all the same; the next steps go op by op, every request still
    gets what it gets alone, and the log says why."""
    engine = GptEngine.from_ft_dir(tiny.ft_dir, max_batch_size=4, cancel_poll_s=0.0)
    first, second = workload(engine)
    solo = [engine.generate([row])[0] for row in first + second]
    results, graphs, scheduler = serve(engine, first, second, cpu_graphs=True, kind=FailingStepGraphs)
    for i, (alone, result) in enumerate(zip(solo, results)):
        assert tokens(result) == tokens(alone), f"request {i}"
    assert graphs is not None and len(graphs.graphs) == 2 and scheduler.step_graphs is None
    assert scheduler.stats.failed_requests == 0
    assert any("out of memory, simulated" in record.getMessage() and "op by op" in record.getMessage()
               for record in caplog.records)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_step_graphs_equal_the_chunk_path(tiny: TinyGpt) -> None:
    """Real CUDA graphs of the selection, then the decode graphs (on by default with the decode graphs), fp32: every
    request gets exactly what it gets alone through the engine's chunk path."""
    engine = GptEngine.from_ft_dir(tiny.ft_dir, max_batch_size=4, cancel_poll_s=0.0, device="cuda:0")
    first, second = workload(engine)
    solo = [engine.generate([row])[0] for row in first + second]
    with InflightScheduler(engine) as scheduler:
        assert scheduler.step_graphs is not None
    results, _, _ = serve(engine, first, second, cpu_graphs=False)
    for i, (alone, result) in enumerate(zip(solo, results)):
        assert tokens(result) == tokens(alone), f"request {i}"
        assert result.finish_reason == alone.finish_reason, f"request {i}"
