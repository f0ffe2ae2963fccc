"""In-flight (continuous) batching over GptEngine's KV-cache slots: rows join and leave the running batch every step.

A background thread owns the engine. `InflightScheduler.submit(rows, sink, stream=...)` queues the validated rows of
one request; at every step boundary the thread
1. admits waiting requests (FIFO; all rows of a request at once) into the lowest free KV-cache slots, writes their
   per-slot state (history, lengths, sampling parameters) into preallocated device tensors and prefills only the new
   rows, into their own slots;
2. processes the logits of slots 0..highest occupied slot with sampling.py and selects one token per slot; each row
   uses its OWN step index (the tokens it generated so far) for the seeded counter-based RNG, so its tokens do not
   depend on when it joined or what runs beside it;
3. launches ONE decode step over those slots (GptEngine.decode: CUDA graphs on CUDA);
4. reads the step's new tokens and finished flags back (on CUDA: pinned memory and an event recorded before the decode
   was launched, so the host waits for the selection only while the decode keeps the device busy), sends streaming
   updates, sends a request's final response once all its rows are done, and frees their slots.
Free slots inside the decoded range compute junk that nothing reads (their finished flag stays set, so they never
advance). Beam-search requests (beam_width > 1) run through GptEngine.generate's chunk path: they wait until the
running rows drain (FIFO order is kept), then block the loop while they run.

Callbacks run on the scheduler thread; keep them short (each one delays the next step).
"""

from __future__ import annotations

import dataclasses
import heapq
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from .core_io import GenerationRequest, RequestError, RowOutput
from .generation import GptEngine, ResourceError, row_output
from .sampling import BadWords, RowState, SlotParams, WordTable, advance_rows, process_logits

log = logging.getLogger(__name__)
# Admission while rows are decoding: wait for up to this many new rows, or this many decode steps (a few ms on a
# GPU), to prefill them in one pass.
ADMIT_GATHER_ROWS = 8
ADMIT_GATHER_STEPS = 4

CANCEL_POLLS_PER_STEP = 8  # a poll may be an IPC round trip: spread them over steps
INT_PARAMS = ("top_k", "greedy", "min_length", "end_id", "seed_lo", "seed_hi")  # SlotParams columns, packed by dtype
FLOAT_PARAMS = ("temperature", "top_p", "repetition_penalty", "presence_penalty")
HOST = torch.device("cpu")


class ResponseSink(Protocol):
    """Where one request's responses go. Called from the scheduler thread."""

    def update(self, outputs: list[RowOutput]) -> None:
        """Streaming: every row's cumulative output after a step in which a row advanced (never the last step)."""

    def finish(self, outputs: list[RowOutput]) -> None:
        """Every row is done (rows with `cancelled` set were stopped early). Called once."""

    def fail(self, error: Exception) -> None:
        """Generation failed for this request. Called once, instead of finish."""

    def is_cancelled(self) -> bool:
        """Whether the client gave up; polled at most every `cancel_poll_s` seconds."""


@dataclass
class SchedulerStats:
    steps: int = 0  # decode steps run by the in-flight loop
    admissions: int = 0  # prefill passes that admitted new rows
    admitted_rows: int = 0
    joined_running_rows: int = 0  # rows admitted while other rows were mid-generation
    peak_rows: int = 0  # most rows in the batch at once
    finished_requests: int = 0
    failed_requests: int = 0


@dataclass(eq=False)
class _Request:
    sink: ResponseSink
    stream: bool
    rows: list[_Row] = field(default_factory=list)
    queued_at_step: int = 0  # the scheduler's step count when it took the request in
    cancelled: bool = False
    last_poll: float = 0.0
    closed: bool = False  # its final response (or error) went out

    @property
    def beam_width(self) -> int:
        return self.rows[0].spec.beam_width


@dataclass(eq=False)
class _Row:
    spec: GenerationRequest
    request: _Request = field(repr=False)
    tokens: np.ndarray  # [prompt + output_len] int64: the prompt, then the generated tokens
    log_probs: np.ndarray | None  # [output_len] float32, when the request asked for log-probs
    length: int  # tokens so far (prompt included)
    slot: int = -1
    issued: int = 0  # selection steps run while in its slot: bounds its decode position
    done: bool = False
    reason: str = "length"

    @classmethod
    def create(cls, spec: GenerationRequest, request: _Request, want_log_probs: bool) -> _Row:
        prompt_len = len(spec.input_ids)
        tokens = np.empty(prompt_len + spec.output_len, dtype=np.int64)
        tokens[:prompt_len] = spec.input_ids
        log_probs = np.zeros(spec.output_len, dtype=np.float32) if want_log_probs else None
        return cls(spec=spec, request=request, tokens=tokens, log_probs=log_probs, length=prompt_len)

    @property
    def prompt_len(self) -> int:
        return len(self.spec.input_ids)

    @property
    def limit(self) -> int:
        return self.prompt_len + self.spec.output_len

    def append(self, token: int, log_prob: float) -> None:
        if self.log_probs is not None:
            self.log_probs[self.length - self.prompt_len] = log_prob
        self.tokens[self.length] = token
        self.length += 1

    def output(self) -> RowOutput:
        generated = self.length - self.prompt_len
        steps = [self.log_probs[:generated].copy()] if self.log_probs is not None else None
        reason = "cancelled" if self.request.cancelled else self.reason
        return row_output(self.prompt_len, [self.tokens[:self.length].copy()], steps, finished=self.done,
                          reason=reason)


@dataclass
class _Batch:
    """What the selection needs about the rows in slots 0..span-1; rebuilt whenever a row joins or leaves."""
    span: int
    params: SlotParams
    stop_words: WordTable | None
    bad_words: BadWords | None
    want_log_probs: bool


class _SlotTable:
    """Per-slot decoding state on the device for every KV-cache slot; admission overwrites a slot's entries.

    A free slot keeps finished = True, so it never advances (its length stays inside the history).
    """

    def __init__(self, slots: int, seq_width: int, vocab: int, device: torch.device) -> None:
        def full(shape: tuple[int, ...], value: float | bool, dtype: torch.dtype) -> torch.Tensor:
            return torch.full(shape, value, dtype=dtype, device=device)

        self.device = device
        self.history = full((slots, seq_width), vocab, torch.long)  # prompt, generated, then the pad id V
        self.lengths = full((slots,), 1, torch.long)
        self.generated = full((slots,), 0, torch.long)
        self.output_len = full((slots,), 1, torch.long)
        self.finished = full((slots,), True, torch.bool)
        self.stopped = full((slots,), False, torch.bool)
        self.seen = full((slots, vocab + 1), False, torch.bool)  # + 1: the pad id's column
        defaults = SlotParams.build([GenerationRequest(input_ids=(0,), output_len=1, end_id=0)], slots, device)
        self.params = {name: getattr(defaults, name) for name in (*INT_PARAMS, *FLOAT_PARAMS)}

    def upload(self, tensor: torch.Tensor) -> torch.Tensor:
        """A host tensor on the device without a stream sync (pinned staging on CUDA)."""
        if self.device.type != "cuda":
            return tensor.to(self.device)
        return tensor.pin_memory().to(self.device, non_blocking=True)

    def write(self, rows: Sequence[_Row]) -> torch.Tensor:
        """Write the rows' state into their slots; returns their histories [k, seq_width] on the device."""
        k, (_, width), vocab = len(rows), self.history.shape, self.seen.shape[1] - 1
        specs = [row.spec for row in rows]
        host = SlotParams.build(specs, 1, HOST)  # the same per-row values the chunk path uses
        ints = torch.stack([getattr(host, name).to(torch.long) for name in INT_PARAMS] + [
            torch.tensor([row.slot for row in rows]), torch.tensor([row.prompt_len for row in rows]),
            torch.tensor([spec.output_len for spec in specs])])  # [len(INT_PARAMS) + 3, k]
        floats = torch.stack([getattr(host, name) for name in FLOAT_PARAMS])  # [len(FLOAT_PARAMS), k]
        history = torch.full((k, width), vocab, dtype=torch.long)
        for i, row in enumerate(rows):
            history[i, :row.prompt_len] = torch.from_numpy(row.tokens[:row.prompt_len])
        ints, floats, history = self.upload(ints), self.upload(floats), self.upload(history)
        slots, prompt_lens, output_lens = ints[len(INT_PARAMS):]
        for values, names in ((ints, INT_PARAMS), (floats, FLOAT_PARAMS)):
            for value, name in zip(values, names):
                param = self.params[name]
                param.index_copy_(0, slots, value.to(param.dtype))
        self.history.index_copy_(0, slots, history)
        self.lengths.index_copy_(0, slots, prompt_lens)
        self.output_len.index_copy_(0, slots, output_lens)
        self.generated.index_fill_(0, slots, 0)
        self.stopped.index_fill_(0, slots, False)
        seen = torch.zeros((k, vocab + 1), dtype=torch.bool, device=self.device)
        self.seen.index_copy_(0, slots, seen.scatter_(1, history, True))  # the prompt (and the pad column)
        self.finished.index_fill_(0, slots, False)
        return history

    def batch(self, rows: Sequence[_Row | None]) -> _Batch:
        """The selection's view of slots 0..len(rows)-1 (None = a free slot, decoded and ignored)."""
        span = len(rows)
        specs = [row.spec for row in rows if row is not None]
        host_flags = SlotParams.build(specs, 1, HOST)  # which optional work some row in the batch needs
        params = dataclasses.replace(host_flags, **{name: values[:span] for name, values in self.params.items()})
        stop_words = WordTable.build([row.spec.stop_words if row else () for row in rows], HOST)
        bad_words = BadWords.build([row.spec.bad_words if row else () for row in rows], HOST)
        if stop_words is not None:
            stop_words = WordTable(rows=self.upload(stop_words.rows), tokens=self.upload(stop_words.tokens))
        if bad_words is not None:
            prefixes = WordTable(rows=self.upload(bad_words.prefixes.rows),
                                 tokens=self.upload(bad_words.prefixes.tokens))
            bad_words = BadWords(prefixes=prefixes, banned=self.upload(bad_words.banned))
        return _Batch(span=span, params=params, stop_words=stop_words, bad_words=bad_words,
                      want_log_probs=any(row is not None and row.log_probs is not None for row in rows))


class _Readback:
    """One step's per-slot results on the host without stalling the device queue.

    On CUDA they are copied into pinned memory and an event is recorded right after; the caller launches the next
    decode before waiting on that event, so the device stays busy while the host reads. On CPU they are read directly.
    """

    def __init__(self, slots: int, device: torch.device) -> None:
        cuda = device.type == "cuda"
        # tokens, active, finished, stopped of a step over `span` slots: the first 4 * span entries, so the copy's
        # destination is contiguous (a strided one would be staged through unpinned memory, racing the async copy).
        self.flags = torch.zeros(4 * slots, dtype=torch.long, pin_memory=cuda)
        self.log_probs = torch.zeros(slots, dtype=torch.float32, pin_memory=cuda)
        self.event = torch.cuda.Event() if cuda else None
        self.span, self.with_log_probs = 0, False

    def launch(self, flags: torch.Tensor, log_probs: torch.Tensor | None) -> None:
        self.span, self.with_log_probs = flags.shape[1], log_probs is not None
        non_blocking = self.event is not None
        self.flags[:flags.numel()].view(flags.shape).copy_(flags, non_blocking=non_blocking)
        if log_probs is not None:
            self.log_probs[:self.span].copy_(log_probs, non_blocking=non_blocking)
        if self.event is not None:
            self.event.record()

    def read(self) -> tuple[list[list[int]], list[float] | None]:
        if self.event is not None:
            self.event.synchronize()  # releases the GIL while it waits
        flags = self.flags[:4 * self.span].view(4, self.span).tolist()
        return flags, self.log_probs[:self.span].tolist() if self.with_log_probs else None


class InflightScheduler:
    def __init__(self, engine: GptEngine, *, cancel_poll_s: float = 0.05,
                 event_log: Callable[[str], None] | None = None, admit_gather_rows: int = ADMIT_GATHER_ROWS,
                 admit_gather_steps: int = ADMIT_GATHER_STEPS) -> None:
        """engine: owned by the scheduler while it runs (do not call engine.generate from elsewhere meanwhile);
        cancel_poll_s: least time between two is_cancelled polls of one request;
        event_log: receives one line per admission (which rows joined how many running rows) and per cancelled
            running request;
        admit_gather_rows / admit_gather_steps: while rows decode, new requests wait until this many rows are waiting
            or the oldest has waited this many steps, and are then prefilled in one pass (0 steps: admit at once)."""
        self.engine = engine
        self.cancel_poll_s = cancel_poll_s
        self.admit_gather_rows = admit_gather_rows
        self.admit_gather_steps = admit_gather_steps
        self.event_log = event_log
        limits = engine.limits
        self.slot_count = limits.max_batch_size
        self.table = _SlotTable(self.slot_count, limits.max_seq_len + 1, engine.config.vocab_size, engine.device)
        self.readback = _Readback(self.slot_count, engine.device)
        self.stats = SchedulerStats()
        self._free = list(range(self.slot_count))  # a heap: the lowest free slot first keeps the decoded span small
        self._occupied: dict[int, _Row] = {}  # slot -> row
        self._waiting: deque[_Request] = deque()
        self._live: list[_Request] = []  # admitted, not closed
        self._logits: torch.Tensor | None = None  # [span, V]: next-token logits of slots 0..span-1
        self._batch: _Batch | None = None  # None: rebuild before the next step
        self._inbox: list[_Request] = []
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._stopping = False
        self._thread: threading.Thread | None = None

    # -- public ------------------------------------------------------------------------------------------------------
    def start(self) -> InflightScheduler:
        if self._thread is not None:
            raise RuntimeError("the scheduler was already started")
        self._thread = threading.Thread(target=self._serve, name="inflight-scheduler", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop the loop; requests still queued or running get `fail(RuntimeError)`."""
        with self._lock:
            self._stopping = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def __enter__(self) -> InflightScheduler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def submit(self, rows: Sequence[GenerationRequest], sink: ResponseSink, *, stream: bool = False) -> None:
        """Queue the rows of one request. Raises RequestError or ResourceError (and queues nothing) when they can
        never run; rows that fit wait for free slots. stream: send `sink.update` after every step."""
        if not rows:
            raise RequestError("input_ids", "must hold at least one row")
        widths = sorted({row.beam_width for row in rows})
        if len(widths) != 1:
            raise RequestError("beam_width", f"must be the same for all rows of a request, got {widths}")
        for row in rows:
            self.engine.check_request(row)
        needed = len(rows) * widths[0]
        if needed > self.slot_count:
            raise ResourceError(f"rows x beam_width = {len(rows)} x {widths[0]} = {needed} exceeds the engine's "
                                f"{self.slot_count} KV-cache slots (max_batch_size): send fewer rows")
        request = _Request(sink=sink, stream=stream)
        want_log_probs = any(row.return_log_probs for row in rows)
        request.rows = [_Row.create(spec, request, want_log_probs) for spec in rows]
        with self._lock:
            if self._stopping or self._thread is None or not self._thread.is_alive():
                raise RuntimeError("the in-flight scheduler is not running")
            self._inbox.append(request)
            self._wake.notify()

    # -- the loop ----------------------------------------------------------------------------------------------------
    def _serve(self) -> None:
        error: Exception = RuntimeError("the model is shutting down")
        try:
            device = self.engine.device
            if device.type == "cuda" and device.index is not None:  # bare "cuda" is the current device already
                torch.cuda.set_device(device.index)
            with torch.inference_mode():
                while self._collect_submissions():
                    try:
                        self._poll_cancellations()
                        self._admit()
                        if self._occupied:
                            self._step()
                    except Exception as err:  # noqa: BLE001  (the running requests fail; the loop keeps serving)
                        log.exception("in-flight step failed: failing the %d running request(s)",
                                      len({id(row.request) for row in self._occupied.values()}))
                        self._fail_running(err)
        except Exception as err:  # noqa: BLE001  (the loop itself broke: no request may wait forever)
            log.exception("the in-flight scheduler stopped")
            error = RuntimeError(f"the in-flight scheduler stopped: {err}")
        finally:
            with self._lock:
                self._stopping = True
                self._waiting.extend(self._inbox)
                self._inbox.clear()
            for request in [*self._waiting, *self._live]:
                self._close(request, error=error)

    def _collect_submissions(self) -> bool:
        """Move new submissions to the waiting queue, sleeping while there is nothing to do; False once stopping."""
        with self._lock:
            while not (self._stopping or self._inbox or self._waiting or self._occupied):
                self._wake.wait()
            for request in self._inbox:
                request.queued_at_step = self.stats.steps
            self._waiting.extend(self._inbox)
            self._inbox.clear()
            return not self._stopping

    def _poll_cancellations(self) -> None:
        now, polls = time.monotonic(), 0
        for request in [*self._waiting, *self._live]:
            if polls == CANCEL_POLLS_PER_STEP:
                break
            if request.cancelled or now - request.last_poll < self.cancel_poll_s:
                continue
            request.last_poll, polls = now, polls + 1
            try:
                cancelled = request.sink.is_cancelled()
            except Exception:  # noqa: BLE001  (a broken sink must not stop the loop)
                log.exception("is_cancelled failed")
                cancelled = False
            if cancelled:
                self._cancel(request)

    def _cancel(self, request: _Request) -> None:
        """Stop a request: a waiting one closes at once, a running one's rows finish at the next step."""
        request.cancelled = True
        if request in self._waiting:
            self._waiting.remove(request)
            for row in request.rows:
                row.done = True
            self._close(request, outputs=[row.output() for row in request.rows])
            return
        stopping = [row for row in request.rows if row.slot >= 0 and not row.done]
        for row in stopping:
            self.table.finished[row.slot] = True
        if self.event_log is not None:
            self.event_log(f"in-flight batching: a request was cancelled; its {len(stopping)} running row(s) stop")

    def _should_wait_for_more(self) -> bool:
        """While rows are decoding, gather a few arrivals into one prefill pass instead of one pass each: a pass
        costs about the same for 1 or 8 prompts (the weights are read once), and the running rows stall meanwhile."""
        if not self._occupied or not self._waiting:
            return False
        waiting_rows = sum(len(request.rows) for request in self._waiting)
        oldest_wait = self.stats.steps - self._waiting[0].queued_at_step
        return waiting_rows < min(self.admit_gather_rows, len(self._free)) and oldest_wait < self.admit_gather_steps

    def _admit(self) -> None:
        """Move waiting requests (FIFO) into free slots and prefill them; a beam request runs alone."""
        if self._should_wait_for_more():
            return
        admitted: list[_Request] = []
        while self._waiting:
            request = self._waiting[0]
            if request.beam_width > 1:
                if self._occupied or admitted:
                    break  # it waits for the running rows to drain
                self._waiting.popleft()
                self._run_chunked(request)
                continue
            if len(request.rows) > len(self._free):
                break
            self._waiting.popleft()
            for row in request.rows:
                row.slot = heapq.heappop(self._free)
                self._occupied[row.slot] = row
            admitted.append(request)
        if admitted:
            self._start(admitted)

    def _start(self, requests: list[_Request]) -> None:
        """Prefill newly admitted requests and add their first-token logits to the batch's."""
        running = len(self._occupied) - sum(len(request.rows) for request in requests)
        self._live += requests
        self._batch = None
        rows, new_logits = self._prefill_isolating_faults(requests)
        if new_logits is None:
            return
        span = max(self._occupied) + 1
        logits = torch.zeros((span, new_logits.shape[1]), dtype=new_logits.dtype, device=new_logits.device)
        if self._logits is not None:
            kept = min(span, self._logits.shape[0])
            logits[:kept] = self._logits[:kept]
        slots = self.table.upload(torch.tensor([row.slot for row in rows]))
        self._logits = logits.index_copy_(0, slots, new_logits)
        self.stats.admissions += 1
        self.stats.admitted_rows += len(rows)
        self.stats.joined_running_rows += len(rows) if running else 0
        self.stats.peak_rows = max(self.stats.peak_rows, len(self._occupied))
        if self.event_log is not None:
            self.event_log(f"in-flight batching: {len(rows)} row(s) joined {running} running row(s), "
                           f"slots {[row.slot for row in rows]}")

    def _prefill_isolating_faults(self, requests: list[_Request]) -> tuple[list[_Row], torch.Tensor | None]:
        """Prefill the requests' rows together; if that fails, one request at a time, so only the requests that fail
        on their own are failed. Returns the prefilled rows (slot order per request) and their logits [k, V]."""
        rows = sorted((row for request in requests for row in request.rows), key=lambda row: row.slot)
        try:
            return rows, self._prefill(rows)
        except Exception as err:  # noqa: BLE001
            if len(requests) == 1:
                log.exception("prefill failed for %d row(s)", len(rows))
                self._abort(requests[0], err)
                return [], None
            log.warning("prefill of %d requests failed (%s): retrying them one at a time", len(requests), err)
        kept_rows, kept_logits = [], []
        for request in requests:
            request_rows, logits = self._prefill_isolating_faults([request])
            if logits is not None:
                kept_rows += request_rows
                kept_logits.append(logits)
        return kept_rows, torch.cat(kept_logits) if kept_logits else None

    def _prefill(self, rows: list[_Row]) -> torch.Tensor:
        """Write the rows' slot state and prefill them, one pass per run of consecutive slots -> logits [k, V]."""
        history = self.table.write(rows)
        vocab = self.engine.config.vocab_size
        logits, start = [], 0
        while start < len(rows):
            end = start + 1
            while end < len(rows) and rows[end].slot == rows[end - 1].slot + 1:
                end += 1
            longest = max(row.prompt_len for row in rows[start:end])
            prompts = history[start:end, :longest]
            prompts = prompts.masked_fill(prompts == vocab, 0)  # any valid id: padding is masked
            lengths = self.table.lengths[rows[start].slot:rows[start].slot + end - start]
            logits.append(self.engine.prefill_slots(prompts, lengths, first_slot=rows[start].slot))
            start = end
        return torch.cat(logits)

    def _step(self) -> None:
        """Select one token for every row in slots 0..span-1, launch the next decode, then read the step back."""
        rows = [self._occupied.get(slot) for slot in range(max(self._occupied) + 1)]
        if self._batch is None or self._batch.span != len(rows):
            self._batch = self.table.batch(rows)
        batch, table, span = self._batch, self.table, len(rows)
        params = batch.params
        history, lengths, generated = table.history[:span], table.lengths[:span], table.generated[:span]
        finished, stopped = table.finished[:span], table.stopped[:span]
        seen = table.seen[:span] if params.uses_seen_tokens else None
        processed = process_logits(self._logits[:span], params, generated=generated, seen=seen,
                                   bad_words=batch.bad_words, history=history, lengths=lengths,
                                   vocab_limit=self.engine.vocab_limit)
        state = RowState(history=history, lengths=lengths, generated=generated, finished=finished, stopped=stopped,
                         output_len=table.output_len[:span], seen=seen)
        # Each row's own step index (tokens generated so far) keys its seeded sampling, exactly as when it runs alone;
        # finished and free slots emit end_id and stay put.
        tokens, active, step_log_probs = advance_rows(processed, params, generated, state, batch.stop_words,
                                                      batch.want_log_probs)
        self.readback.launch(torch.stack([tokens, active.long(), finished.long(), stopped.long()]), step_log_probs)

        # A running row's next position is its length - 1 < prompt + selections issued. Finished and free slots
        # decode at position 0 (junk nothing reads), so every position stays < kv_len as decode requires.
        for row in self._occupied.values():
            row.issued += 1
        kv_len = max(min(row.prompt_len + row.issued, row.limit) for row in self._occupied.values())
        self._logits = self.engine.decode(tokens, (lengths - 1).masked_fill_(finished, 0), kv_len)
        self.stats.steps += 1
        self._consume(rows, *self.readback.read())

    def _consume(self, rows: list[_Row | None], flags: list[list[int]], log_probs: list[float] | None) -> None:
        """Apply one step's host copy: append tokens, close finished requests, free slots, stream updates."""
        tokens, active, finished, stopped = flags
        touched: dict[int, _Request] = {}
        for slot, row in enumerate(rows):
            if row is None:
                continue
            if active[slot]:
                row.append(tokens[slot], log_probs[slot] if log_probs is not None else 0.0)
                touched[id(row.request)] = row.request
            if finished[slot]:
                row.done, row.reason = True, "stop" if stopped[slot] else "length"
                self._release(row)
                touched[id(row.request)] = row.request
        for request in touched.values():
            if all(row.done for row in request.rows):
                self._close(request, outputs=[row.output() for row in request.rows])
            elif request.stream and not request.cancelled:
                try:
                    request.sink.update([row.output() for row in request.rows])
                except Exception:  # noqa: BLE001  (e.g. the client went away: stop generating for it)
                    log.exception("sending a streaming update failed: cancelling the request")
                    self._cancel(request)

    def _release(self, row: _Row) -> None:
        del self._occupied[row.slot]
        heapq.heappush(self._free, row.slot)
        row.slot = -1
        self._batch = None
        if not self._occupied:
            self._logits = None

    def _close(self, request: _Request, *, outputs: list[RowOutput] | None = None,
               error: Exception | None = None) -> None:
        """Send the request's final response (outputs) or its error, once."""
        if request.closed:
            return
        request.closed = True
        if request in self._live:
            self._live.remove(request)
        try:
            if error is not None:
                self.stats.failed_requests += 1
                request.sink.fail(error)
            else:
                self.stats.finished_requests += 1
                request.sink.finish(outputs or [])
        except Exception:  # noqa: BLE001
            log.exception("sending a final response failed")

    def _abort(self, request: _Request, error: Exception) -> None:
        """Fail a request and free its slots (left inert: finished set)."""
        for row in request.rows:
            if row.slot >= 0:
                try:
                    self.table.finished[row.slot] = True
                except Exception:  # noqa: BLE001  (a broken device fails every later step anyway)
                    log.exception("could not reset slot %d", row.slot)
                self._release(row)
            row.done = True
        self._close(request, error=error)

    def _fail_running(self, error: Exception) -> None:
        requests = {id(row.request): row.request for row in self._occupied.values()}
        self._logits = None
        for request in requests.values():
            self._abort(request, error)

    # -- beam search --------------------------------------------------------------------------------------------------
    def _run_chunked(self, request: _Request) -> None:
        """A beam-search request through GptEngine.generate (needs every slot from 0: runs with no rows in flight)."""
        self._live.append(request)
        specs = [row.spec for row in request.rows]
        latest = [RowOutput(prompt_len=row.prompt_len, beams=[row.tokens[:row.prompt_len].copy()] * row.spec.beam_width)
                  for row in request.rows]

        def on_step(updates: list[tuple[int, RowOutput]]) -> None:
            for index, output in updates:
                latest[index] = output
            if not request.cancelled and not all(output.finished for output in latest):
                try:
                    request.sink.update(list(latest))
                except Exception:  # noqa: BLE001
                    log.exception("sending a streaming update failed: cancelling the request")
                    request.cancelled = True

        def is_cancelled() -> Collection[int]:  # polled by the engine every engine.cancel_poll_s
            if not request.cancelled:
                try:
                    request.cancelled = bool(request.sink.is_cancelled())
                except Exception:  # noqa: BLE001
                    log.exception("is_cancelled failed")
            return range(len(specs)) if request.cancelled else ()

        try:
            outputs = self.engine.generate(specs, on_step=on_step if request.stream else None,
                                           is_cancelled=is_cancelled)
        except Exception as err:  # noqa: BLE001  (only this request fails)
            log.exception("beam search failed")
            self._close(request, error=err)
            return
        for row in request.rows:
            row.done = True
        self._close(request, outputs=outputs)
