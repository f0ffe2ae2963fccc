"""InflightScheduler (in-flight batching) on the CPU: rows joining a running batch get exactly what they get alone.

Oracle: the same engine's chunk path (`GptEngine.generate` of the row alone, itself checked against HF in
test_engine*.py); greedy rows are also checked against HF directly.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import pytest
import torch

from builder.runtime.core_io import RequestError, RowOutput
from builder.runtime.generation import GptEngine, ResourceError
from builder.runtime import scheduler as scheduler_module
from builder.runtime.scheduler import InflightScheduler, StepRecord
from engine_testing import TinyGpt, hf_generate, random_prompts, request

SAMPLING = dict(top_k=20, top_p=0.9, temperature=1.3)
WAIT_S = 30.0
# The most an on_step hook waits for the sender thread; shorter than WAIT_S, so that a hook's AssertionError (which
# fails the running requests) reaches the sinks while the test still waits for them.
HOOK_WAIT_S = 10.0


@dataclass
class Sink:
    """Records what the scheduler sends for one request; `on_update` may act from the scheduler thread."""
    name: str = ""
    events: list[str] | None = None  # shared finish order across sinks
    on_update: Callable[[Sink, list[RowOutput]], None] | None = None
    then: Callable[[], None] | None = None  # run once, at the second update or at the end, whichever comes first
    cancel_after_updates: int | None = None
    updates: list[list[RowOutput]] = field(default_factory=list)
    outputs: list[RowOutput] | None = None
    error: Exception | None = None
    done: threading.Event = field(default_factory=threading.Event)
    told: threading.Event = field(default_factory=threading.Event)  # is_cancelled returned True

    def update(self, outputs: list[RowOutput]) -> None:
        self.updates.append(outputs)
        if self.on_update is not None:
            self.on_update(self, outputs)
        if len(self.updates) == 2:
            self._then()

    def _then(self) -> None:
        then, self.then = self.then, None
        if then is not None:
            then()

    def finish(self, outputs: list[RowOutput]) -> None:
        self.outputs = outputs
        self._close()

    def fail(self, error: Exception) -> None:
        self.error = error
        self._close()

    def _close(self) -> None:
        if self.events is not None:
            self.events.append(self.name)
        self._then()
        self.done.set()

    def is_cancelled(self) -> bool:
        cancelled = self.cancel_after_updates is not None and len(self.updates) >= self.cancel_after_updates
        if cancelled:
            self.told.set()
        return cancelled

    def result(self) -> list[RowOutput]:
        assert self.done.wait(WAIT_S), f"{self.name}: no final response"
        assert self.error is None, f"{self.name}: {self.error}"
        assert self.outputs is not None
        return self.outputs


class AtDecodeStep:
    """An `on_step` hook that runs `action` on the loop's thread right after its n-th decode step (and passes every
    record on to `then`). What the action submits is admitted at the next step boundary: unlike an action in a sink's
    `update`, it does not depend on how far the sender thread lags behind the loop (tens of steps on a busy machine,
    by which time a "long" row may have ended)."""

    def __init__(self, n: int, action: Callable[[], None],
                 then: Callable[[StepRecord], None] | None = None) -> None:
        self.n, self.action, self.then, self.decoded = n, action, then, 0

    def __call__(self, record: StepRecord) -> None:
        self.decoded += record.decoded
        if self.then is not None:
            self.then(record)
        if self.decoded == self.n and record.decoded:
            self.action()


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    return random_prompts(8, seed=4, min_len=2, max_len=12)


@pytest.fixture(scope="module")
def greedy(tiny: TinyGpt, prompts: list[list[int]]) -> list[list[int]]:
    return [hf_generate(tiny.hf, p, 12) for p in prompts]


@pytest.fixture(scope="module")
def long_run(tiny: TinyGpt, prompts: list[list[int]]) -> tuple[list[int], int]:
    """HF's 100-token greedy continuation of prompts[0] (no end), and an end_id it never produces."""
    sequence = hf_generate(tiny.hf, prompts[0], 100, eos_token_id=None)
    return sequence, next(t for t in range(1, 512) if t not in sequence[len(prompts[0]):])


def new_engine(tiny: TinyGpt, slots: int, device: str = "cpu") -> GptEngine:
    return GptEngine.from_ft_dir(tiny.ft_dir, max_batch_size=slots, cancel_poll_s=0.0, device=device)


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                reason="needs a CUDA GPU"))]


def tokens(output: RowOutput) -> list[int]:
    return output.beams[0].tolist()


@pytest.mark.parametrize("device", DEVICES)  # CUDA: CUDA-graph decode, pinned asynchronous read-back
def test_staggered_requests_get_exactly_their_solo_results(tiny: TinyGpt, prompts, greedy, device: str) -> None:
    engine = new_engine(tiny, slots=4, device=device)
    generated = [g[len(p):] for p, g in zip(prompts, greedy)]
    rows = [
        request(prompts[0], 12),  # greedy
        request(prompts[1], 9, random_seed=11, return_log_probs=True, **SAMPLING),  # seeded sampling
        request(prompts[2], 12, stop_words=((generated[2][2], generated[2][3]),)),  # stops within 4 tokens
        request(prompts[3], 10, end_id=generated[3][1], min_length=5),  # end_id banned for 5 tokens
        request(prompts[4], 12, end_id=generated[4][1]),  # ends within 2 tokens: frees its slot early
        request(prompts[5], 11, repetition_penalty=1.8, presence_penalty=0.5, return_log_probs=True),
        request(prompts[6], 8, bad_words=((generated[6][0],), (generated[6][1], generated[6][2]))),
        request(prompts[7], 12, random_seed=5, top_k=3, temperature=0.7),
        request(prompts[0], 7, random_seed=99, **SAMPLING),  # same prompt as row 0, joins at another step
        request(prompts[2], 12, return_log_probs=True),
    ]
    solo = [engine.generate([row])[0] for row in rows]
    for stopped in (2, 4):  # rows that must end early, so the case can fail
        assert solo[stopped].finish_reason == "stop" and len(tokens(solo[stopped])) <= len(prompts[stopped]) + 4
    assert len(tokens(solo[3])) >= len(prompts[3]) + 5  # without min_length it would end after 2 tokens

    # Each request is sent when the previous one has generated two tokens (or ended): they join a running batch at
    # different steps; 10 requests share 4 slots, so later ones also wait for free slots. (Sent from the loop's
    # thread, at the step boundary: a sink's second update may come many steps late on a busy machine; a request that
    # ends first is followed from the sender's thread.)
    sinks = [Sink(name=str(i)) for i in range(len(rows))]
    chain, lock = {"next": 1, "slot": -1, "advanced": 0}, threading.RLock()

    def send_after(previous: int) -> None:
        with lock:
            if chain["next"] == previous + 1 < len(rows):
                scheduler.submit([rows[chain["next"]]], sinks[chain["next"]], stream=True)
                chain.update(next=chain["next"] + 1, slot=-1, advanced=0)

    def send_next(record: StepRecord) -> None:
        with lock:
            for slot, start, _ in record.chunks:
                if start == 0 and chain["slot"] < 0:  # the previous request's row got its slot
                    chain["slot"] = slot
            chain["advanced"] += chain["slot"] in record.advanced
            if chain["advanced"] >= 2:
                send_after(chain["next"] - 1)

    for i, sink in enumerate(sinks):
        sink.then = partial(send_after, i)  # at its end (or second update)
    with InflightScheduler(engine, admit_gather_steps=0, on_step=send_next) as scheduler:  # each joins at once
        scheduler.submit([rows[0]], sinks[0], stream=True)
        results = [sink.result()[0] for sink in sinks]
        stats = scheduler.stats
    assert stats.joined_running_rows >= len(rows) - 2, stats
    for i, (row, alone, result) in enumerate(zip(rows, solo, results)):
        assert tokens(result) == tokens(alone), f"request {i}"
        assert result.finish_reason == alone.finish_reason, f"request {i}"
        if row.return_log_probs:
            np.testing.assert_allclose(result.output_log_probs[0], alone.output_log_probs[0], atol=1e-5)
            assert result.cum_log_probs[0] == pytest.approx(alone.cum_log_probs[0], abs=1e-4)
    assert tokens(results[0]) == greedy[0]
    assert tokens(results[9]) == greedy[2]


@pytest.mark.parametrize("device", DEVICES)
def test_streaming_updates_are_cumulative_one_token_each(tiny: TinyGpt, prompts, greedy, device: str) -> None:
    engine = new_engine(tiny, slots=4, device=device)
    streamed, quiet = Sink(name="streamed"), Sink(name="quiet")
    decoded = 0

    def keep_up(record: StepRecord) -> None:
        """The sender keeps up: after the k-th decode step the loop waits until the k-th update was sent (the
        sender coalesces whatever it finds marked, so on a busy machine it would otherwise lag by chance)."""
        nonlocal decoded
        decoded += record.decoded
        deadline = time.monotonic() + HOOK_WAIT_S
        while len(streamed.updates) < min(decoded, 11):
            assert time.monotonic() < deadline, f"update {min(decoded, 11)} never came ({len(streamed.updates)} did)"
            time.sleep(0.0005)

    with InflightScheduler(engine, on_step=keep_up) as scheduler:
        scheduler.submit([request(prompts[0], 12), request(prompts[1], 5)], streamed, stream=True)
        scheduler.submit([request(prompts[2], 6)], quiet, stream=False)
        final = streamed.result()
        assert tokens(quiet.result()[0]) == greedy[2][:len(prompts[2]) + 6]
    assert quiet.updates == []
    assert [tokens(o) for o in final] == [greedy[0], greedy[1][:len(prompts[1]) + 5]]
    # One update per token (the 12th token goes out with the final response). When the sender lags, updates carry
    # several tokens instead (test_a_slow_transport_never_slows_the_decode_loop).
    assert len(streamed.updates) == 11
    sent = 0
    for update in streamed.updates:
        first, second = (tokens(o) for o in update)
        step = len(first) - len(prompts[0])
        assert step == sent + 1  # each update adds exactly one token
        sent = step
        assert first == greedy[0][:len(prompts[0]) + step]
        assert second == greedy[1][:len(prompts[1]) + min(step, 5)]  # the finished row stays as it ended
        assert [o.finished for o in update] == [False, step >= 5]



def test_each_token_is_handed_over_before_the_decode_that_extends_it(tiny: TinyGpt, prompts, greedy,
                                                                     monkeypatch) -> None:
    """The host reads a step's selection before its decode: on the CPU the loop hands the new token to the sender
    first and decodes after, so no token waits for a decode step, and a step whose rows all finished decodes nothing
    (on CUDA the decode is launched first and runs while the host reads: the same order on the device)."""
    engine = new_engine(tiny, slots=2)
    scheduler = InflightScheduler(engine)
    events: list[str] = []
    decode, mark, close = engine.decode, scheduler._sender.mark, scheduler._sender.close

    def log_decode(*args, **kwargs):
        events.append("decode")
        return decode(*args, **kwargs)

    def log_mark(requests):
        events.append("token")
        mark(requests)

    def log_close(*args, **kwargs):
        events.append("final")
        close(*args, **kwargs)

    monkeypatch.setattr(engine, "decode", log_decode)
    monkeypatch.setattr(scheduler._sender, "mark", log_mark)
    monkeypatch.setattr(scheduler._sender, "close", log_close)
    streamed, single = Sink(name="streamed"), Sink(name="single")
    with scheduler:
        scheduler.submit([request(prompts[0], 4)], streamed, stream=True)
        assert [tokens(o) for o in streamed.result()] == [greedy[0][:len(prompts[0]) + 4]]
        assert events == ["token", "decode"] * 3 + ["final"]
        events.clear()
        scheduler.submit([request(prompts[1], 1)], single, stream=False)
        assert [tokens(o) for o in single.result()] == [greedy[1][:len(prompts[1]) + 1]]
    assert events == ["final"]  # its one token came from the prefill's logits: no decode at all

def test_a_row_finishing_early_frees_its_slot_for_a_waiting_request(tiny: TinyGpt, prompts, greedy,
                                                                    long_run) -> None:
    engine = new_engine(tiny, slots=2)
    events: list[str] = []
    long, short, waiting = (Sink(name=name, events=events) for name in ("long", "short", "waiting"))
    long_sequence, long_end_id = long_run
    long_row = request(prompts[0], 100, end_id=long_end_id)
    with InflightScheduler(engine) as scheduler:
        scheduler.submit([long_row], long, stream=True)
        scheduler.submit([request(prompts[1], 3)], short)
        scheduler.submit([request(prompts[2], 4)], waiting)  # no free slot yet
        long_tokens = tokens(long.result()[0])
        assert tokens(short.result()[0]) == greedy[1][:len(prompts[1]) + 3]
        assert tokens(waiting.result()[0]) == greedy[2][:len(prompts[2]) + 4]
        stats = scheduler.stats
    assert events == ["short", "waiting", "long"]
    assert stats.peak_rows == 2 and stats.joined_running_rows >= 1  # "waiting" joined the long row
    assert long_tokens == long_sequence


def test_many_more_requests_than_slots_all_complete(tiny: TinyGpt) -> None:
    engine = new_engine(tiny, slots=3)
    many = random_prompts(24, seed=9, min_len=1, max_len=20)
    rows = [[request(p, 3 + i % 7)] for i, p in enumerate(many[:20])] + [
        [request(many[20], 4), request(many[21], 9)], [request(many[22], 2), request(many[23], 5),
                                                       request(many[20], 6, random_seed=3, **SAMPLING)]]
    solo = [engine.generate(r) for r in rows]
    sinks = [Sink(name=str(i)) for i in range(len(rows))]
    with InflightScheduler(engine) as scheduler:
        for r, sink in zip(rows, sinks):
            scheduler.submit(r, sink, stream=bool(len(r) % 2))
        results = [sink.result() for sink in sinks]
        assert scheduler.stats.peak_rows == 3
    for alone, result in zip(solo, results):
        assert [tokens(o) for o in result] == [tokens(o) for o in alone]


def test_cancellation_stops_running_and_waiting_requests(tiny: TinyGpt, prompts, greedy, long_run) -> None:
    engine = new_engine(tiny, slots=1)
    running = Sink(name="running", cancel_after_updates=3)
    behind = Sink(name="behind")
    blocker, gone = Sink(name="blocker"), Sink(name="gone", cancel_after_updates=0)
    gone_sent = threading.Event()
    long_sequence, long_end_id = long_run
    steps = {"admitted": 0, "decoded": 0}  # requests admitted so far (running, behind, blocker); running's decodes

    def sender_in_step(record: StepRecord) -> None:
        """After a decode step, the loop waits for what the sender must see first: while "running" decodes, its
        first 3 updates (one per step), then its cancellation polled; at "blocker"'s first step, "gone" sent and its
        cancellation polled. The loop applies a cancellation at the next step boundary after the sender reports it;
        on a busy machine the sender could otherwise lag by tens of steps."""
        steps["admitted"] += any(start == 0 for _, start, _ in record.chunks)
        if not record.decoded:
            return
        if steps["admitted"] == 1:  # "running" alone (one slot)
            steps["decoded"] += 1
            deadline = time.monotonic() + HOOK_WAIT_S
            while not running.told.is_set() and len(running.updates) < min(steps["decoded"], 3):
                assert time.monotonic() < deadline, f"update {min(steps['decoded'], 3)} never came"
                time.sleep(0.0005)
            if steps["decoded"] >= 3:
                assert running.told.wait(HOOK_WAIT_S), "is_cancelled was never polled"
        elif steps["admitted"] == 3 and not gone.told.is_set():  # "blocker" streams (so the sender is awake)
            assert gone_sent.wait(HOOK_WAIT_S) and gone.told.wait(HOOK_WAIT_S), "is_cancelled was never polled"

    with InflightScheduler(engine, cancel_poll_s=0.0, on_step=sender_in_step) as scheduler:
        scheduler.submit([request(prompts[0], 100, end_id=long_end_id)], running, stream=True)
        scheduler.submit([request(prompts[1], 5)], behind)
        cancelled = running.result()[0]
        assert tokens(behind.result()[0]) == greedy[1][:len(prompts[1]) + 5]  # got the freed slot

        scheduler.submit([request(prompts[2], 60)], blocker, stream=True)
        scheduler.submit([request(prompts[3], 5)], gone)  # cancelled while it waits for the only slot
        gone_sent.set()
        gone_output = gone.result()[0]
        assert not blocker.done.is_set(), "the waiting request should have been dropped before the slot freed"
        blocker.result()
    assert cancelled.cancelled and cancelled.finish_reason == "cancelled"
    generated = len(tokens(cancelled)) - len(prompts[0])
    # The sender thread polls and reports the cancellation; the loop applies it at the next step boundary. A step of
    # this toy model takes ~0.1 ms on a CPU, so a few ms of thread hand-over are tens of steps (on a GPU, one or two).
    assert 3 <= generated < 60
    assert tokens(cancelled) == long_sequence[:len(prompts[0]) + generated]
    assert gone_output.cancelled and tokens(gone_output) == prompts[3]


def test_an_engine_error_fails_only_the_affected_requests(tiny: TinyGpt, prompts, greedy,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    engine = new_engine(tiny, slots=4)
    poison = 511  # a prompt holding this token makes prefill fail
    real_prefill, real_decode = engine.prefill_chunks, engine.decode
    decode_failures = {"left": 0}

    def prefill_chunks(chunks: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        if bool((chunks == poison).any()):
            raise RuntimeError("injected prefill fault")
        return real_prefill(chunks, *args, **kwargs)

    def decode(*args: object) -> torch.Tensor:
        if decode_failures["left"]:
            decode_failures["left"] -= 1
            raise RuntimeError("injected decode fault")
        return real_decode(*args)

    monkeypatch.setattr(engine, "prefill_chunks", prefill_chunks)
    monkeypatch.setattr(engine, "decode", decode)
    armed: list[Callable[[], None]] = []

    def break_decode_while_four_rows_run(record: StepRecord) -> None:
        if armed and len(record.advanced) == 4:  # "first" runs in every slot: its next decode fails
            armed.pop()()

    healthy, poisoned = Sink(name="healthy"), Sink(name="poisoned")
    joined = Sink(name="joined")

    def send_poisoned() -> None:  # while "healthy" runs
        scheduler.submit([request([5, poison, 7], 4)], poisoned)
        scheduler.submit([request(prompts[1], 6)], joined)

    with InflightScheduler(engine, on_step=AtDecodeStep(2, send_poisoned, then=break_decode_while_four_rows_run)
                           ) as scheduler:
        scheduler.submit([request(prompts[0], 12)], healthy, stream=True)
        assert tokens(healthy.result()[0]) == greedy[0]
        assert tokens(joined.result()[0]) == greedy[1][:len(prompts[1]) + 6]
        assert poisoned.done.wait(WAIT_S) and "injected prefill fault" in str(poisoned.error)

        first, second = Sink(name="first"), Sink(name="second")

        def break_decode() -> None:
            decode_failures["left"] = 1
            scheduler.submit([request(prompts[3], 4)], second)

        armed.append(break_decode)
        scheduler.submit([request(prompts[i], 12) for i in (2, 5, 6, 7)], first, stream=True)  # every slot
        assert first.done.wait(WAIT_S) and "injected decode fault" in str(first.error)
        assert tokens(second.result()[0]) == greedy[3][:len(prompts[3]) + 4]  # was waiting for a slot: unaffected
        after = Sink(name="after")
        scheduler.submit([request(prompts[4], 5)], after)
        assert tokens(after.result()[0]) == greedy[4][:len(prompts[4]) + 5]  # the loop keeps serving
        assert scheduler.stats.failed_requests == 2


def test_requests_that_can_never_fit_are_refused(tiny: TinyGpt, prompts) -> None:
    engine = new_engine(tiny, slots=2)
    with InflightScheduler(engine) as scheduler:
        with pytest.raises(ResourceError, match="KV-cache slots"):
            scheduler.submit([request(p, 4) for p in prompts[:3]], Sink())
        with pytest.raises(RequestError, match="max_seq_len"):
            scheduler.submit([request(prompts[0], 128)], Sink())
        with pytest.raises(RequestError, match="beam_width"):
            scheduler.submit([request(prompts[0], 4, beam_width=4)], Sink())
        fits = Sink()
        scheduler.submit([request(p, 3) for p in prompts[:2]], fits)
        assert len(fits.result()) == 2
    with pytest.raises(RuntimeError, match="not running"):
        scheduler.submit([request(prompts[0], 3)], Sink())


def test_beam_search_runs_through_the_chunk_path_between_in_flight_rows(tiny: TinyGpt, prompts, greedy,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    engine = new_engine(tiny, slots=4)
    beam_row = request(prompts[5], 6, beam_width=2, len_penalty=1.0, return_log_probs=True)
    expected = engine.generate([beam_row])[0]
    before, beam, after = Sink(name="before"), Sink(name="beam"), Sink(name="after")
    events: list[str] = []
    for sink in (before, beam, after):
        sink.events = events
    real_generate = engine.generate

    def generate(specs: list, on_step: Callable | None = None, **kwargs: object) -> list[RowOutput]:
        """The beam request's first step waits until the sender sent its update: the 6 steps could otherwise all
        run before the sender does (then only the final response goes)."""
        first = [True]

        def first_step_sent(updates: list) -> None:
            on_step(updates)
            deadline = time.monotonic() + HOOK_WAIT_S
            while first and not beam.updates and time.monotonic() < deadline:
                time.sleep(0.0005)
            first.clear()

        return real_generate(specs, on_step=first_step_sent if on_step is not None else None, **kwargs)

    monkeypatch.setattr(engine, "generate", generate)
    with InflightScheduler(engine) as scheduler:
        scheduler.submit([request(prompts[0], 12)], before, stream=True)
        scheduler.submit([beam_row], beam, stream=True)
        scheduler.submit([request(prompts[1], 4)], after)  # FIFO: waits behind the beam request
        result = beam.result()[0]
        assert tokens(before.result()[0]) == greedy[0]
        assert tokens(after.result()[0]) == greedy[1][:len(prompts[1]) + 4]
    assert events == ["before", "beam", "after"]
    assert [b.tolist() for b in result.beams] == [b.tolist() for b in expected.beams]
    assert tokens(result) == hf_generate(tiny.hf, prompts[5], 6, num_beams=2, length_penalty=1.0)
    assert len(beam.updates) >= 1


def test_stop_fails_what_is_still_queued(tiny: TinyGpt, prompts) -> None:
    engine = new_engine(tiny, slots=1)
    decoding, stopping = threading.Event(), threading.Event()

    def hold(record: StepRecord) -> None:  # the first request decodes until stop() is called (not for 100 steps)
        if record.decoded and not decoding.is_set():
            decoding.set()
            assert stopping.wait(HOOK_WAIT_S)

    scheduler = InflightScheduler(engine, on_step=hold).start()
    sinks = [Sink(name=str(i)) for i in range(3)]
    for sink in sinks:
        scheduler.submit([request(prompts[0], 100)], sink, stream=True)
    assert decoding.wait(WAIT_S)
    stopping.set()
    scheduler.stop()
    for sink in sinks:
        assert sink.done.is_set() and "shutting down" in str(sink.error)


@pytest.mark.parametrize("min_running,most_wait", [(None, 1), (1, 4)])
def test_arrivals_wait_for_a_shared_prefill_only_when_the_batch_is_busy(tiny: TinyGpt, prompts, greedy, long_run,
                                                                         monkeypatch: pytest.MonkeyPatch,
                                                                         min_running: int | None,
                                                                         most_wait: int) -> None:
    """Requests arrive while one long request decodes. With one running row (below ADMIT_GATHER_MIN_RUNNING) each is
    prefilled at the next step boundary; when the batch counts as busy they may wait up to ADMIT_GATHER_STEPS steps
    to share a prefill pass, and do share passes."""
    sequence, end_id = long_run
    if min_running is not None:
        monkeypatch.setattr(scheduler_module, "ADMIT_GATHER_MIN_RUNNING", min_running)
    engine = new_engine(tiny, slots=8)
    late = [Sink(name=f"late{i}") for i in range(4)]

    decoded = 0

    def submit_while_decoding(record: StepRecord) -> None:  # one after each of the first decode steps
        nonlocal decoded
        decoded += record.decoded
        if record.decoded and decoded <= len(late):
            scheduler.submit([request(prompts[decoded], 6)], late[decoded - 1], stream=False)

    long = Sink(name="long")
    with InflightScheduler(engine, admit_gather_steps=4, on_step=submit_while_decoding) as scheduler:
        scheduler.submit([request(prompts[0], 60, end_id=end_id)], long, stream=True)
        results = [sink.result()[0] for sink in late]
        assert tokens(long.result()[0]) == sequence[:len(prompts[0]) + 60]
        stats = scheduler.stats
    assert [tokens(r) for r in results] == [greedy[i][:len(prompts[i]) + 6] for i in range(1, 5)]
    assert stats.max_admission_wait_steps <= most_wait
    if min_running is not None:
        assert stats.admissions - 1 <= 2  # four arrivals, at most two passes


def test_prompt_token_budget_spreads_a_burst_of_arrivals_over_steps(tiny: TinyGpt, prompts, greedy, long_run) -> None:
    """Four requests arrive at once while a long one decodes: with a budget of one prompt token per step, each
    prompt is prefilled one token per step and the next request joins only once the one before it is cached (one
    admission per request, the running row keeps decoding meanwhile); results are unchanged."""
    sequence, end_id = long_run
    engine = new_engine(tiny, slots=8)
    late = [Sink(name=f"late{i}") for i in range(4)]

    def burst() -> None:
        for i, waiting in enumerate(late):
            scheduler.submit([request(prompts[i + 1], 6)], waiting)

    long = Sink(name="long")
    with InflightScheduler(engine, admit_gather_steps=0, step_prompt_tokens=1,
                           on_step=AtDecodeStep(1, burst)) as scheduler:
        scheduler.submit([request(prompts[0], 60, end_id=end_id)], long, stream=True)
        results = [sink.result()[0] for sink in late]
        assert tokens(long.result()[0]) == sequence[:len(prompts[0]) + 60]
        stats = scheduler.stats
    assert [tokens(r) for r in results] == [greedy[i][:len(prompts[i]) + 6] for i in range(1, 5)]
    assert stats.admissions == 5  # the long one, then one per step


def test_a_slow_transport_never_slows_the_decode_loop(tiny: TinyGpt, prompts, long_run) -> None:
    """Each update takes 20 ms to send (a congested transport): the loop keeps decoding, updates coalesce (each
    carries every token since the previous one, none lost or repeated), and the final response is not held back."""
    sequence, end_id = long_run
    engine = new_engine(tiny, slots=2)

    @dataclass
    class SlowSink(Sink):
        def update(self, outputs: list[RowOutput]) -> None:
            time.sleep(0.02)
            super().update([RowOutput(prompt_len=o.prompt_len, beams=[b.copy() for b in o.beams]) for o in outputs])

    slow = SlowSink(name="slow")
    with InflightScheduler(engine) as scheduler:
        started = time.monotonic()
        scheduler.submit([request(prompts[0], 80, end_id=end_id)], slow, stream=True)
        final = slow.result()[0]
        elapsed = time.monotonic() - started
    assert tokens(final) == sequence[:len(prompts[0]) + 80]
    lengths = [len(update[0].beams[0]) for update in slow.updates]
    assert all(tokens(update[0]) == sequence[:n] for update, n in zip(slow.updates, lengths))
    # Each update (and then the final response) is newer than the one before, and some step between them carries
    # several tokens: coalesced. (On a fast machine the loop may finish during the first update's 20 ms: one update.)
    lengths.append(len(tokens(final)))
    assert lengths == sorted(set(lengths)) and max(b - a for a, b in zip(lengths, lengths[1:])) > 1, lengths
    assert len(slow.updates) < 40
    assert elapsed < 80 * 0.02 / 2  # sending one update per token would have taken >= 1.6 s


def test_a_new_request_does_not_wait_for_a_sweep_of_updates(tiny: TinyGpt, prompts, long_run) -> None:
    """Six streams whose updates take 60 ms each to send: a sweep of updates takes ~0.36 s (the loop is slowed to
    10 ms a step, so the streams outlast a few sweeps). A request submitted just as a sweep starts gets its first
    response, and another its final one, after the update in progress, not after the whole sweep (at hundreds of
    streams a sweep is tens of milliseconds of everyone's time to first token)."""
    sequence, end_id = long_run
    engine = new_engine(tiny, slots=8)
    sent: list[str] = []  # the streams' updates and the new requests' responses, in the order they went out
    started = threading.Event()
    newcomer = Sink(name="newcomer", on_update=lambda sink, outputs: sent.append("newcomer update"))
    first_only = Sink(name="first only final", events=sent)  # appends its name when its final response goes out

    @dataclass
    class SlowSink(Sink):
        def update(self, outputs: list[RowOutput]) -> None:
            sent.append(self.name)
            if self.name == "0" and len(self.updates) == 1 and not started.is_set():
                # The second sweep starts with stream 0 (slot 0, marked first at each step): submit the newcomers.
                scheduler.submit([request(prompts[1], 40)], newcomer, stream=True)
                scheduler.submit([request(prompts[2], 1)], first_only, stream=False)
                started.set()
            time.sleep(0.06)
            super().update(outputs)

    streams = [SlowSink(name=str(i)) for i in range(6)]
    with InflightScheduler(engine, on_step=lambda record: time.sleep(0.01)) as scheduler:
        for sink in streams:
            scheduler.submit([request(prompts[0], 100, end_id=end_id)], sink, stream=True)
        assert started.wait(WAIT_S), " ".join(sent)
        first_only.result()
        newcomer.result()
        for sink in streams:
            assert tokens(sink.result()[0]) == sequence[:len(prompts[0]) + 100]
    at = sent.index("0", sent.index("0") + 1)  # the second sweep's first update
    # The sweep in progress sent at most one more stream update before each of them (the one under way when they
    # came), not the five other streams' (~0.3 s).
    for name in ("first only final", "newcomer update"):
        assert len([entry for entry in sent[at + 1:sent.index(name)] if entry.isdigit()]) <= 1, " ".join(sent)


def test_a_busy_sender_leaves_the_loop_its_share_of_the_gil(tiny: TinyGpt, prompts, long_run) -> None:
    """Six streams whose updates each take 5 ms of CPU (a busy stub), while short requests keep arriving (each a final
    response to send at once, which used to cut the sender's rest short): the sender spends at most about
    SENDER_DUTY of its time in updates, and every request still gets its tokens."""
    sequence, end_id = long_run
    engine = new_engine(tiny, slots=10)
    spans: list[tuple[float, float]] = []

    @dataclass
    class BusySink(Sink):
        def update(self, outputs: list[RowOutput]) -> None:
            started = time.perf_counter()
            while time.perf_counter() - started < 0.005:  # holds the GIL, as building and sending a response does
                pass
            spans.append((started, time.perf_counter()))
            super().update(outputs)

    streams = [BusySink(name=str(i)) for i in range(6)]
    arrivals: list[Sink] = []
    with InflightScheduler(engine, on_step=lambda record: time.sleep(0.004)) as scheduler:
        for sink in streams:
            scheduler.submit([request(prompts[0], 100, end_id=end_id)], sink, stream=True)
        while not all(sink.done.is_set() for sink in streams):
            arrivals.append(Sink(name=f"arrival {len(arrivals)}"))
            scheduler.submit([request(prompts[1], 1)], arrivals[-1])
            time.sleep(0.005)
        for sink in streams:
            assert tokens(sink.result()[0]) == sequence[:len(prompts[0]) + 100]
        for sink in arrivals:
            sink.result()
    assert len(spans) > 20 and len(arrivals) > 20
    busy = sum(end - start for start, end in spans)
    duty = busy / (spans[-1][1] - spans[0][0])
    assert duty <= scheduler_module.SENDER_DUTY + 0.15, (duty, len(spans))


def test_cancellation_polls_stay_within_their_budget(tiny: TinyGpt, prompts, long_run) -> None:
    """is_cancelled is an IPC round trip in Triton: however many requests run and however short cancel_poll_s is
    (0 here), the sender polls at most MAX_CANCEL_POLLS_PER_S a second in all, and still polls every request."""
    _, end_id = long_run
    engine = new_engine(tiny, slots=8)
    polls: dict[str, int] = {}

    @dataclass
    class CountingSink(Sink):
        def is_cancelled(self) -> bool:
            polls[self.name] = polls.get(self.name, 0) + 1
            return False

    sinks = [CountingSink(name=str(i)) for i in range(8)]
    with InflightScheduler(engine, cancel_poll_s=0.0, on_step=lambda record: time.sleep(0.01)) as scheduler:
        started = time.monotonic()
        for sink in sinks:
            scheduler.submit([request(prompts[0], 60, end_id=end_id)], sink, stream=False)
        for sink in sinks:
            sink.result()
        elapsed = time.monotonic() - started
    assert set(polls) == {sink.name for sink in sinks}
    budget = scheduler_module.MAX_CANCEL_POLLS_PER_S
    assert sum(polls.values()) <= budget * elapsed + budget / 10 + 1, (polls, elapsed)


def test_prompts_near_max_seq_len_prefill_within_the_cache(tiny: TinyGpt) -> None:
    """Prefill passes pad prompts to a multiple of 64 tokens, never past max_seq_len (here 67: not a multiple)."""
    engine = GptEngine.from_ft_dir(tiny.ft_dir, max_batch_size=4, max_seq_len=67, cancel_poll_s=0.0)
    rows = [request([5 + k] * (66 - k), 1) for k in range(3)]
    solo = [tokens(engine.generate([row])[0]) for row in rows]
    sinks = [Sink(name=str(k)) for k in range(3)]
    with InflightScheduler(engine) as scheduler:
        for row, sink in zip(rows, sinks):
            scheduler.submit([row], sink)
        assert [tokens(sink.result()[0]) for sink in sinks] == solo


def test_a_request_sent_to_an_idle_scheduler_is_polled_for_cancellation(tiny: TinyGpt, prompts, long_run) -> None:
    """The idle sender sleeps without a timeout; a new request must wake it, or a client that gives up at once (not
    streamed: no update ever wakes the sender) gets all its tokens generated anyway."""
    engine = new_engine(tiny, slots=1)
    gone = Sink(name="gone", cancel_after_updates=0)  # the client gave up at once
    held: list[bool] = []

    def hold(record: StepRecord) -> None:  # the row waits (at most HOOK_WAIT_S) for the sender's first poll
        if record.decoded and not held:
            held.append(gone.told.wait(HOOK_WAIT_S))

    sequence, end_id = long_run
    with InflightScheduler(engine, cancel_poll_s=0.0, on_step=hold) as scheduler:
        time.sleep(0.2)  # the sender has gone to sleep: nothing is live
        scheduler.submit([request(sequence[:6], 100, end_id=end_id)], gone)
        output = gone.result()[0]
    assert gone.told.is_set() and held in ([], [True]), "is_cancelled was never polled while the row ran"
    assert output.cancelled and len(tokens(output)) < 6 + 100  # [] above: cancelled before its first decode


def test_a_cancellation_reported_while_the_request_is_in_the_inbox_stops_it(tiny: TinyGpt, prompts) -> None:
    """The sender polls a new request at once, so it can report the cancellation before the loop has moved the
    request from its inbox to the waiting queue. Forced: between the loop's collect and its cancellations, a request
    is submitted and reported cancelled at once. It must close without generating, not run to its full length."""
    engine = new_engine(tiny, slots=4)
    running, gone = Sink(name="running"), Sink(name="gone")
    sent: list[bool] = []

    class Racing(InflightScheduler):
        def _apply_cancellations(self) -> None:
            if not sent and self.stats.steps >= 2:
                sent.append(True)
                self.submit([request(prompts[1], 40)], gone)
                self._request_cancel(self._inbox[-1])  # what the sender's poll does for a client that went away
            super()._apply_cancellations()

    with Racing(engine, cancel_poll_s=0.0) as scheduler:
        scheduler.submit([request(prompts[0], 30)], running, stream=True)
        output = gone.result()[0]
        running.result()
    assert sent and output.cancelled
    assert len(tokens(output)) == len(prompts[1]), "the cancelled request generated tokens"


def test_no_streamed_update_says_every_row_finished(tiny: TinyGpt, prompts, monkeypatch) -> None:
    """An update whose snapshot the loop finished meanwhile (after the sender checked the request was open) is not
    sent: a finish reason belongs to the final response only. Forced: the loop holds after its first decode until the
    sender is inside that update's snapshot, and the snapshot waits until the row is done."""
    real_output = scheduler_module._Row.output
    snapshotting = threading.Event()

    def late_snapshot(self: object, copy: bool = True) -> RowOutput:
        if not copy:  # the sender's snapshot
            snapshotting.set()
            deadline = time.monotonic() + HOOK_WAIT_S
            while not self.done and time.monotonic() < deadline:  # type: ignore[attr-defined]  # a _Row
                time.sleep(0.001)
        return real_output(self, copy)  # type: ignore[arg-type]  # a _Row

    held: list[bool] = []

    def hold(record: StepRecord) -> None:
        if record.decoded and not held:
            held.append(snapshotting.wait(HOOK_WAIT_S))

    monkeypatch.setattr(scheduler_module._Row, "output", late_snapshot)
    sink = Sink(name="s")
    with InflightScheduler(new_engine(tiny, slots=2), on_step=hold) as scheduler:
        scheduler.submit([request(prompts[0], 3)], sink, stream=True)
        final = sink.result()
    assert held == [True], "the sender never took a snapshot during the request"
    assert final[0].finished and final[0].finish_reason == "length"
    assert not any(output.finished for update in sink.updates for output in update), [
        [(output.finished, output.finish_reason) for output in update] for update in sink.updates]


@dataclass
class TokenSink(Sink):
    """A Sink that also takes a stream's new tokens through `extend` (PassSender's path) and counts its polls."""
    pieces: list[tuple[int, int, list[int]]] = field(default_factory=list)  # (row, start, tokens)
    polls: int = 0

    def extend(self, row: int, start: int, new: np.ndarray) -> None:
        self.pieces.append((row, start, new.tolist()))

    def is_cancelled(self) -> bool:
        self.polls += 1
        return super().is_cancelled()


def test_with_after_pass_the_sinks_get_each_pass_s_tokens_on_the_loop_s_thread(tiny: TinyGpt, prompts,
                                                                                greedy) -> None:
    engine = new_engine(tiny, slots=4)
    streamed, with_log_probs, quiet = TokenSink(name="streamed"), TokenSink(name="log-probs"), TokenSink(name="quiet")
    passes: list[tuple[str, int]] = []  # (thread, pieces so far) at each after_pass

    def after_pass() -> None:
        passes.append((threading.current_thread().name, len(streamed.pieces)))

    with InflightScheduler(engine, after_pass=after_pass) as scheduler:
        assert "inflight-sender" not in {thread.name for thread in threading.enumerate()}
        scheduler.submit([request(prompts[0], 12), request(prompts[1], 5)], streamed, stream=True)
        scheduler.submit([request(prompts[2], 6, return_log_probs=True)], with_log_probs, stream=True)
        scheduler.submit([request(prompts[3], 6)], quiet)
        final = streamed.result()
        logged = with_log_probs.result()
        assert tokens(quiet.result()[0]) == greedy[3][:len(prompts[3]) + 6]
    assert {name for name, _ in passes[:-1]} == {"inflight-scheduler"}  # the last: stop's (what closed as it stopped)
    assert all(later - earlier <= 2 for (_, earlier), (_, later) in zip(passes, passes[1:]))  # a token a row a pass
    rows = {0: list(prompts[0]), 1: list(prompts[1])}
    for row, start, new in streamed.pieces:
        assert start == len(rows[row]) and len(new) == 1
        rows[row] += new
    # Row 1's last token streams (row 0 still runs); row 0's 12th comes with the final response only.
    assert rows == {0: greedy[0][:len(prompts[0]) + 11], 1: greedy[1][:len(prompts[1]) + 5]}
    assert [tokens(o) for o in final] == [greedy[0], greedy[1][:len(prompts[1]) + 5]]
    assert streamed.updates == [] and quiet.pieces == [] and quiet.updates == []
    # Log-probs go whole, through `update`, one more token each.
    assert [len(tokens(update[0])) - len(prompts[2]) for update in with_log_probs.updates] == [1, 2, 3, 4, 5]
    assert with_log_probs.pieces == [] and logged[0].output_log_probs is not None
    assert streamed.polls == with_log_probs.polls == quiet.polls == 0  # cancellations come through `cancel`


def test_cancel_stops_a_running_and_a_waiting_request(tiny: TinyGpt, prompts, long_run) -> None:
    engine = new_engine(tiny, slots=1)
    running, waiting = TokenSink(name="running"), TokenSink(name="waiting")
    long_sequence, long_end_id = long_run

    handles, submitted = [], threading.Event()

    def cancel_both() -> None:  # on the loop's thread, which waits for both handles (a toy step is ~0.1 ms)
        assert submitted.wait(HOOK_WAIT_S), "the requests were never submitted"
        for handle in handles:
            scheduler.cancel(handle)

    with InflightScheduler(engine, after_pass=lambda: None, on_step=AtDecodeStep(3, cancel_both)) as scheduler:
        handles.append(scheduler.submit([request(prompts[0], 100, end_id=long_end_id)], running, stream=True))
        handles.append(scheduler.submit([request(prompts[1], 5)], waiting))
        submitted.set()
        stopped, dropped = running.result()[0], waiting.result()[0]
        scheduler.cancel(handles[0])  # closed already: nothing happens
    generated = len(tokens(stopped)) - len(prompts[0])
    assert stopped.cancelled and 3 <= generated <= 5  # applied at the next step boundary
    assert tokens(stopped) == long_sequence[:len(prompts[0]) + generated]
    assert dropped.cancelled and tokens(dropped) == prompts[1]
    assert running.polls == waiting.polls == 0


@pytest.mark.parametrize("device", DEVICES)
def test_the_timeline_times_the_device_work_of_decode_steps_and_prefill_passes(tiny: TinyGpt, prompts,
                                                                                device: str) -> None:
    engine = new_engine(tiny, slots=4, device=device)
    sinks = [Sink(name=str(i)) for i in range(3)]
    with InflightScheduler(engine) as scheduler:
        for prompt, sink in zip(prompts, sinks):
            scheduler.submit([request(prompt, 12)], sink)
        for sink in sinks:
            sink.result()
    timeline = scheduler.stats.timeline  # after the loop stopped: no pass is half counted
    assert timeline.steps > 0 and timeline.prefill_passes > 0
    # Whole passes hold their parts (host clock); the summary says what they leave.
    parts = (timeline.select_launch_ms + timeline.wait_ms + timeline.consume_ms + timeline.admit_ms
             + timeline.pass_end_ms)
    assert timeline.pass_end_ms > 0 and timeline.pass_ms >= parts > 0, timeline
    assert ", pass end " in timeline.summary() and ", rest " in timeline.summary()
    # Every pass is counted by the path it took (the CPU has no prefill graphs: all eager).
    assert sum(timeline.prefill_paths.values()) == timeline.prefill_passes <= timeline.prefill_rows
    assert device == "cuda" or timeline.prefill_paths == {"eager": timeline.prefill_passes}
    if device == "cuda":  # CUDA events around every launch; read once they completed (all but the last few)
        assert timeline.decode_device_ms > 0 and 0 < timeline.timed_prefills <= timeline.prefill_passes
        assert timeline.prefill_device_ms > 0 and "device ms per step" in timeline.summary()
    else:  # no device clock on the CPU
        assert timeline.decode_device_ms == timeline.prefill_device_ms == timeline.timed_prefills == 0
        assert "device ms" not in timeline.summary()
