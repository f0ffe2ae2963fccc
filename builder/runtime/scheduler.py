"""In-flight (continuous) batching over GptEngine's KV-cache slots: rows join and leave the running batch every step.

A background thread owns the engine. `InflightScheduler.submit(rows, sink, stream=...)` queues the validated rows of
one request; at every step boundary the thread
1. runs this step's prefill within a per-step prompt-token budget (`step_prompt_tokens`): first the next chunk of
   the rows whose prompts are partly cached (oldest first), then waiting requests (FIFO; all rows of a request get
   slots at once) in the lowest free KV-cache slots, each with its first chunk. A prompt longer than what is left of
   the budget is prefilled in chunks over several steps while the running rows keep decoding (chunked prefill: a
   chunk attends to its slot's cached positions, GptModel.prefill). When a row's last chunk is done its per-slot state
   (history, lengths, sampling parameters) is written into preallocated device tensors and that chunk's logits give
   its first token at this step's selection. While no row decodes, nothing waits on the prefill: the budget is then
   IDLE_PREFILL_TOKENS, so a lone request at low load prefills its whole prompt in one pass (lowest TTFT);
2. processes the logits of slots 0..highest occupied slot with sampling.py and selects one token per slot; each row
   uses its OWN step index (the tokens it generated so far) for the seeded counter-based RNG, so its tokens do not
   depend on when it joined or what runs beside it;
3. launches ONE decode step over those slots (GptEngine.decode: CUDA graphs on CUDA);
4. reads the step's new tokens and finished flags back (on CUDA: pinned memory and an event recorded before the decode
   was launched, so the host waits for the selection only while the decode keeps the device busy), marks the streaming
   requests that advanced, hands a request's final response to the sender once all its rows are done, and frees
   their slots.
Free slots inside the decoded range compute junk that nothing reads (their finished flag stays set, so they never
advance); so do slots whose prompt is still being prefilled, parked at their next uncached position (the next chunk
overwrites what the junk step wrote there). Beam-search requests (beam_width > 1) run through GptEngine.generate's
chunk path: they wait until the running rows drain (FIFO order is kept), then block the loop while they run.

The loop never waits on the transport: a sender thread calls the sinks (`update`, `finish`, `fail`) and polls
`is_cancelled`. Streaming is coalesced: the loop only marks a request as advanced; the sender sends each marked request
one update with everything produced since its previous one. When sending keeps up, that is one token per update;
when it falls behind (many streams, a slow transport), updates carry several tokens and the decode rate is kept.
"""

from __future__ import annotations

import heapq
import logging
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import numpy as np
import torch

from .core_io import EngineLimits, GenerationRequest, RequestError, RowOutput
from .generation import STEP_PROMPT_TOKENS, GptEngine, ResourceError, check_request, row_output
from .gpt import GptModel
from .metrics import MetricsRecorder, StepClock
from .sampling import (COLUMN_DTYPES, TOPK_FAST_LIMIT, BadWords, SlotParams, WordTable, effective_temperature,
                       is_greedy, topk_width)
from .step_graphs import StepGraphs, select_tokens

log = logging.getLogger(__name__)
# Admission while rows are decoding: wait for up to this many new rows, or this many decode steps (a few ms on a
# GPU), to prefill them in one pass.
ADMIT_GATHER_ROWS = 8
# ... or until the waiting prompts fill this many tokens. Only prompts of at most this many tokens share the passes
# that replay a prefill graph, of up to its width (generation.PREFILL_GRAPH_TOKENS): every such prompt that waits
# joins, up to that width; longer ones get the step's whole budget. On an H200 (one host, fp8 cache, 128-token
# prompts), gathering up to 1024 tokens instead of 512 made passes of 7.6 prompts instead of 4.0 at 256 streams
# (+4.3 % tokens/s: each pass reads the weights once) but raised the TTFT median at 64 streams from 14 to 19 ms; so
# gathering stops at 512 here, and only prompts already waiting fill a pass beyond it (docs/benchmarks.md).
GATHER_PROMPT_TOKENS = 512
ADMIT_GATHER_STEPS = int(os.environ.get("GPT_TRITON_ADMIT_GATHER_STEPS", "4"))  # A/B runs
if ADMIT_GATHER_STEPS < 0:
    raise ValueError(f"GPT_TRITON_ADMIT_GATHER_STEPS must be >= 0, got {ADMIT_GATHER_STEPS}")
# Prompt tokens prefilled per step while rows decode (prompts beyond it are chunked): generation.STEP_PROMPT_TOKENS,
# 512 (why: there) by default; while no row decodes (no one to stall): whole prompts, up to this many tokens per pass.
IDLE_PREFILL_TOKENS = 8192
# Steps replay a CUDA graph of the selection, then the decode graph, where they can (step_graphs.py); "0" runs the
# selection op by op (A/B runs).
STEP_GRAPHS = os.environ.get("GPT_TRITON_STEP_GRAPHS", "1") != "0"
# The sender thread and the loop share the GIL: while streams keep the sender busy, it rests after each
# SENDER_SLICE_S of work so that it holds the GIL at most SENDER_DUTY of the time (first responses and finals still go
# out during a rest); the streams' next updates just carry more tokens. "1" never rests (A/B runs).
SENDER_SLICE_S = 0.002
SENDER_DUTY = float(os.environ.get("GPT_TRITON_SENDER_DUTY", "0.5"))
if not 0 < SENDER_DUTY <= 1:
    raise ValueError(f"GPT_TRITON_SENDER_DUTY must be in (0, 1], got {SENDER_DUTY}")
SENDER_MAX_REST_S = 0.025
# is_cancelled is an IPC round trip to Triton (~0.1-0.5 ms of the sender's time, GIL waits included): at 256 streams a
# poll of each every 50 ms would be ~5k round trips a second, a large share of the time the sender has for responses.
# Polls are spread so that all the live requests together take at most this many a second (a cancelled request is
# then seen within len(live) / this seconds: ~0.5 s at 256 streams).
MAX_CANCEL_POLLS_PER_S = 500
PREFILL_PAD = 64  # prompt lengths of one prefill pass are padded to a multiple of this
# ... but only while the batch is this full: below it a prefill pass is cheap next to the TTFT a wait adds.
ADMIT_GATHER_MIN_RUNNING = 16
# The sender thread and the loop share the GIL: CPython's default 5 ms switch interval would let a busy sender hold
# the loop for a whole decode step; 0.5 ms keeps the loop's wait short.
GIL_SWITCH_INTERVAL_S = float(os.environ.get("GPT_TRITON_SWITCH_INTERVAL_US", "500")) * 1e-6  # A/B runs

# A slot's state beside its SlotParams columns, as a free slot holds it (an admitted row overrides lengths,
# output_len and finished), and every column's dtype; _SlotTable keeps the columns of one dtype in one table.
_SLOT_STATE: dict[str, int | bool] = {"lengths": 1, "generated": 0, "output_len": 1, "park": 0, "finished": True,
                                      "stopped": False}
_DTYPES = {**COLUMN_DTYPES, **{name: torch.bool if isinstance(value, bool) else torch.long
                               for name, value in _SLOT_STATE.items()}}
_COLUMNS = {dtype: tuple(name for name, kind in _DTYPES.items() if kind == dtype)
            for dtype in (torch.long, torch.float32, torch.bool)}
HOST = torch.device("cpu")
T = TypeVar("T")


class ResponseSink(Protocol):
    """Where one request's responses go. Called from the scheduler's sender thread (or, with `after_pass`, on the
    loop's thread at the end of each pass: PassSender), one call at a time.

    A sink may also have `extend(row, start, tokens)`: a single-beam stream without log-probs then gets each row's
    new tokens that way (a view of positions start.. of the row's tokens) instead of `update` (PassSender only)."""

    def update(self, outputs: list[RowOutput]) -> None:
        """Streaming: every row's cumulative output (token arrays are read-only views) after one or more steps in
        which a row advanced; never after the final step."""

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
    max_admission_wait_steps: int = 0  # most decode steps a request spent queued before its prefill
    finished_requests: int = 0
    failed_requests: int = 0
    prefill_chunks: int = 0  # row chunks prefilled (a prompt prefilled in one pass counts one)
    chunked_rows: int = 0  # rows whose prompt took more than one chunk
    timeline: Timeline = field(default_factory=lambda: Timeline())


@dataclass
class StepRecord:
    """What one pass of the loop did, for InflightScheduler's `on_step` hook (tests, traces)."""
    chunks: list[tuple[int, int, int]] = field(default_factory=list)  # (slot, first prompt position, end) prefilled
    decoded: bool = False  # a decode step ran
    advanced: list[int] = field(default_factory=list)  # slots whose row appended a token


@dataclass
class Timeline:
    """Where the loop's time goes (host clock, ms totals), and, for requests admitted while nothing ran, where their
    time to first response goes: queued (submit -> admission), admitting (writing slot state + launching the prefill),
    to_first_token (admission -> first token read on the host: prefill + first selection on the device), to_send
    (first token read -> first response handed to the transport and returned)."""
    steps: int = 0
    rows: int = 0  # running rows, summed over steps
    select_launch_ms: float = 0.0  # selection + decode launches
    wait_ms: float = 0.0  # waiting for the selection's tokens (the device is behind)
    consume_ms: float = 0.0  # appending tokens, closing requests, marking streams
    admit_ms: float = 0.0  # admission passes (slot writes, prefill launches)
    pass_end_ms: float = 0.0  # the end of each pass (PassSender: the sinks' records, the engine process's message)
    pass_ms: float = 0.0  # whole passes of the loop (what the parts above leave is the rest of its bookkeeping)
    prefill_passes: int = 0  # engine prefill calls (one per step that prefilled)
    prefill_tokens: int = 0  # prompt tokens they prefilled (chunks included)
    prefill_rows: int = 0  # rows (chunks) they prefilled
    prefill_paths: dict[str, int] = field(default_factory=dict)  # passes by GptEngine.prefill_chunks's path
    updates: int = 0  # streamed updates the sender sent
    sender_busy_ms: float = 0.0  # the sender's time sending them and polling
    polls: int = 0  # is_cancelled polls
    poll_ms: float = 0.0  # the sender's time in them
    idle_requests: int = 0
    queued_ms: float = 0.0
    admitting_ms: float = 0.0
    to_first_token_ms: float = 0.0
    to_send_ms: float = 0.0
    # Device time (CUDA events around the launches; DeviceSpans): the steps' selection + decode, the prefill passes.
    decode_device_ms: float = 0.0
    prefill_device_ms: float = 0.0
    timed_prefills: int = 0

    def summary(self) -> str:
        steps, idle = max(1, self.steps), max(1, self.idle_requests)
        device = ""
        if self.decode_device_ms or self.prefill_device_ms:
            per_pass = self.prefill_device_ms / max(1, self.timed_prefills)
            device = (f"; device ms per step: selection + decode {self.decode_device_ms / steps:.3f}, prefill "
                      f"{self.prefill_device_ms / steps:.3f} ({per_pass:.3f} per pass)")
        rest = self.pass_ms - self.select_launch_ms - self.wait_ms - self.consume_ms - self.admit_ms - self.pass_end_ms
        return (f"per step (host ms, {self.steps} steps, {self.rows / steps:.1f} rows): select+launch "
                f"{self.select_launch_ms / steps:.3f}, wait for device {self.wait_ms / steps:.3f}, consume "
                f"{self.consume_ms / steps:.3f}, pass end {self.pass_end_ms / steps:.3f}, rest {rest / steps:.3f}, "
                f"admission {self.admit_ms / steps:.3f} ({self.prefill_passes} prefill "
                f"passes, {self.prefill_tokens / max(1, self.prefill_passes):.0f} prompt tokens and "
                f"{self.prefill_rows / max(1, self.prefill_passes):.1f} rows each; "
                + ", ".join(f"{path}: {count}" for path, count in sorted(self.prefill_paths.items())) + "); sender "
                f"{self.updates} updates, {self.polls} cancellation polls ({self.poll_ms:.0f} ms), "
                f"busy {self.sender_busy_ms / steps:.3f} "
                f"per step; first response of a request into an idle batch (ms, mean of "
                f"{self.idle_requests}): queued {self.queued_ms / idle:.3f}, admitting {self.admitting_ms / idle:.3f}, "
                f"to first token {self.to_first_token_ms / idle:.3f}, to send {self.to_send_ms / idle:.3f}" + device)

    def reset(self) -> None:
        for name, value in vars(Timeline()).items():
            setattr(self, name, value)


class DeviceSpans:
    """Device time of the loop's launches (CUDA only), for the timeline: a CUDA event is recorded before and after
    each decode step and each prefill pass; a span is read once its end event has completed (a query, never a sync).
    A span also holds any time the device idled inside it waiting for the host's next launch (an eager pass)."""

    def __init__(self, device: torch.device) -> None:
        self.enabled = device.type == "cuda"
        self._pending: deque[tuple[str, torch.cuda.Event, torch.cuda.Event]] = deque()
        self._free: list[torch.cuda.Event] = []

    def begin(self) -> torch.cuda.Event | None:
        return self._record() if self.enabled else None

    def end(self, kind: str, begun: torch.cuda.Event | None) -> None:
        if begun is not None:
            self._pending.append((kind, begun, self._record()))

    def collect(self, timeline: Timeline) -> None:
        """Add the completed spans (in launch order, so the first incomplete one stops the sweep) to `timeline`."""
        while self._pending and self._pending[0][2].query():
            kind, begun, ended = self._pending.popleft()
            ms = begun.elapsed_time(ended)
            if kind == "decode":
                timeline.decode_device_ms += ms
            else:
                timeline.prefill_device_ms += ms
                timeline.timed_prefills += 1
            self._free += [begun, ended]

    def _record(self) -> torch.cuda.Event:
        event = self._free.pop() if self._free else torch.cuda.Event(enable_timing=True)
        event.record()
        return event


@dataclass(eq=False)
class _Request:
    sink: ResponseSink
    stream: bool
    rows: list[_Row] = field(default_factory=list)
    queued_at_step: int = 0  # the scheduler's step count when it took the request in
    cancelled: bool = False
    last_poll: float = 0.0
    closed: bool = False  # its final response (or error) was handed to the sender
    latest: list[RowOutput] | None = None  # beam search: the engine's latest outputs (rows have no token buffers)
    submitted_at: float = 0.0  # perf_counter() times for the timeline
    admitted_at: float = 0.0
    first_token_at: float = 0.0
    idle_admission: bool = False  # admitted while no other row ran
    updates_sent: int = 0

    def snapshot(self) -> list[RowOutput]:
        """Every row's output so far (for an update: views, not copies; called from the sender thread)."""
        if self.latest is not None:
            return list(self.latest)
        return [row.output(copy=False) for row in self.rows]

    @property
    def beam_width(self) -> int:
        return self.rows[0].spec.beam_width


@dataclass(frozen=True)
class _RowFlags:
    """What optional selection work a row needs (SlotParams' host flags), computed once per row: rebuilding them from
    every spec whenever a row joins or leaves cost ~1 ms per step at 256 rows."""
    sampling: bool
    top_k: int
    temperature: bool
    repetition: bool
    presence: bool
    min_length: bool
    frequency: bool = False

    @classmethod
    def of(cls, spec: GenerationRequest) -> _RowFlags:
        return cls(sampling=not is_greedy(spec), top_k=spec.top_k, temperature=effective_temperature(spec) != 1.0,
                   repetition=spec.repetition_penalty != 1.0, presence=spec.presence_penalty != 0.0,
                   min_length=spec.min_length > 0, frequency=spec.frequency_penalty != 0.0)


@dataclass(eq=False)
class _Row:
    spec: GenerationRequest
    request: _Request = field(repr=False)
    tokens: np.ndarray  # [prompt + output_len] int64: the prompt, then the generated tokens
    log_probs: np.ndarray | None  # [output_len] float32, when the request asked for log-probs
    length: int  # tokens so far (prompt included)
    slot: int = -1
    prefilled: int = 0  # prompt positions in its slot's KV cache; the row decodes once all are
    issued: int = 0  # selection steps run while in its slot: bounds its decode position
    done: bool = False
    reason: str = "length"
    flags: _RowFlags | None = None

    @classmethod
    def create(cls, spec: GenerationRequest, request: _Request, want_log_probs: bool) -> _Row:
        prompt_len = len(spec.input_ids)
        tokens = np.empty(prompt_len + spec.output_len, dtype=np.int64)
        tokens[:prompt_len] = spec.input_ids
        log_probs = np.zeros(spec.output_len, dtype=np.float32) if want_log_probs else None
        return cls(spec=spec, request=request, tokens=tokens, log_probs=log_probs, length=prompt_len,
                   flags=_RowFlags.of(spec))

    @property
    def prompt_len(self) -> int:
        return len(self.spec.input_ids)

    @property
    def limit(self) -> int:
        return self.prompt_len + self.spec.output_len

    @property
    def prefilling(self) -> bool:
        return self.prefilled < self.prompt_len

    def append(self, token: int, log_prob: float) -> None:
        if self.log_probs is not None:
            self.log_probs[self.length - self.prompt_len] = log_prob
        self.tokens[self.length] = token
        self.length += 1

    def output(self, copy: bool = True) -> RowOutput:
        """copy=False: views of the buffers, safe to read from another thread (a position below `length` is written
        before `length` moves past it, and never again)."""
        length = self.length
        generated = length - self.prompt_len
        tokens = self.tokens[:length]
        steps = [self.log_probs[:generated]] if self.log_probs is not None else None
        if copy:
            tokens, steps = tokens.copy(), [s.copy() for s in steps] if steps is not None else None
        reason = "cancelled" if self.request.cancelled else self.reason
        return row_output(self.prompt_len, [tokens], steps, finished=self.done, reason=reason)


@dataclass
class _Batch:
    """What the selection needs about the rows in slots 0..span-1; rebuilt whenever a row joins or leaves."""
    span: int
    params: SlotParams
    stop_words: WordTable | None
    bad_words: BadWords | None
    want_log_probs: bool

    @property
    def graphable(self) -> bool:
        """A step graph runs it: no per-batch host data (word lists) and no log-probs to read back."""
        return self.stop_words is None and self.bad_words is None and not self.want_log_probs


class _SlotTable:
    """Per-slot decoding state on the device for every KV-cache slot; admission overwrites a slot's entries.

    A free slot keeps finished = True, so it never advances (its length stays inside the history).
    """

    def __init__(self, slots: int, seq_width: int, vocab: int, device: torch.device) -> None:
        def full(shape: tuple[int, ...], value: float | bool, dtype: torch.dtype) -> torch.Tensor:
            return torch.full(shape, value, dtype=dtype, device=device)

        self.device = device
        self.history = full((slots, seq_width), vocab, torch.long)  # prompt, generated, then the pad id V
        self.seen = full((slots, vocab + 1), False, torch.bool)  # + 1: the pad id's column
        # The per-slot columns live in one [columns, slots] table per dtype, so admitting rows writes each table with
        # one copy and one index_copy_ (a row's 20 separate writes cost ~0.85 ms of host time before the first token
        # on an H200 host); `lengths`, `params["top_k"]`, ... are views of their rows.
        unused = SlotParams.values(GenerationRequest(input_ids=np.zeros(1, dtype=np.int64), output_len=1, end_id=0))
        # A free slot: length 1, nothing generated, finished (so it never advances), parked at position 0.
        defaults = {**unused, **_SLOT_STATE}
        self.columns = {dtype: full((len(names), slots), 0, dtype) for dtype, names in _COLUMNS.items()}
        views: dict[str, torch.Tensor] = {}
        for dtype, names in _COLUMNS.items():
            for i, name in enumerate(names):
                views[name] = self.columns[dtype][i]
                views[name].fill_(defaults[name])
        self.lengths, self.generated, self.output_len = views["lengths"], views["generated"], views["output_len"]
        self.finished, self.stopped = views["finished"], views["stopped"]
        # Where a finished or free slot's junk decode step writes its K/V: 0, or for a row still being prefilled its
        # next uncached prompt position (its next chunk overwrites it; position 0 holds its first chunk).
        self.park = views["park"]
        self.params = {name: views[name] for name in COLUMN_DTYPES}

    def upload(self, tensor: torch.Tensor) -> torch.Tensor:
        """A host tensor on the device without a stream sync (pinned staging on CUDA)."""
        if self.device.type != "cuda":
            return tensor.to(self.device)
        return tensor.pin_memory().to(self.device, non_blocking=True)

    def write(self, rows: Sequence[_Row]) -> torch.Tensor:
        """Write the rows' state into their slots (once their prompts are cached: a prefilling row's slot stays
        finished, so the selection's junk writes never touch its state); returns their histories [k, seq_width]."""
        k, (_, width), vocab = len(rows), self.history.shape, self.seen.shape[1] - 1
        entries = [{**_SLOT_STATE, **SlotParams.values(row.spec), "lengths": row.prompt_len,
                    "output_len": row.spec.output_len, "finished": False} for row in rows]
        slots = self.upload(torch.tensor([row.slot for row in rows]))
        for dtype, names in _COLUMNS.items():  # [columns, k] each
            values = self.upload(torch.tensor([[entry[name] for entry in entries] for name in names], dtype=dtype))
            self.columns[dtype].index_copy_(1, slots, values)
        history = torch.full((k, width), vocab, dtype=torch.long)
        for i, row in enumerate(rows):
            history[i, :row.prompt_len] = torch.from_numpy(row.tokens[:row.prompt_len])
        history = self.upload(history)
        self.history.index_copy_(0, slots, history)
        seen = torch.zeros((k, vocab + 1), dtype=torch.bool, device=self.device)
        self.seen.index_copy_(0, slots, seen.scatter_(1, history, True))  # the prompt (and the pad column)
        return history

    def batch(self, rows: Sequence[_Row | None]) -> _Batch:
        """The selection's view of slots 0..len(rows)-1 (None = a free slot, decoded and ignored)."""
        span = len(rows)
        flags = [row.flags for row in rows if row is not None and row.flags is not None]
        top_ks = [f.top_k for f in flags if f.sampling]
        params = SlotParams(  # the device columns of slots 0..span-1, and which optional work some row needs
            **{name: values[:span] for name, values in self.params.items()},
            any_sampling=bool(top_ks), any_greedy=len(top_ks) < len(flags),
            max_top_k=(topk_width(max(top_ks)) if top_ks and all(0 < k <= TOPK_FAST_LIMIT for k in top_ks)
                       else None),
            use_temperature=any(f.temperature for f in flags), use_repetition=any(f.repetition for f in flags),
            use_presence=any(f.presence for f in flags), use_min_length=any(f.min_length for f in flags),
            use_frequency=any(f.frequency for f in flags))
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

    On CUDA they are copied into pinned memory right after the selection and an event is recorded there; the caller
    launches the step's decode before waiting on that event, so the device stays busy while the host reads and
    consumes. On CPU they are read directly.
    """

    def __init__(self, slots: int, device: torch.device) -> None:
        cuda = device.type == "cuda"
        # tokens, active, finished, stopped of a step over `span` slots: the first 4 * span entries, so the copy's
        # destination is contiguous (a strided one would be staged through unpinned memory, racing the async copy).
        self.flags = torch.zeros(4 * slots, dtype=torch.long, pin_memory=cuda)
        self.log_probs = torch.zeros(slots, dtype=torch.float32, pin_memory=cuda)
        self.event = torch.cuda.Event() if cuda else None
        self.span, self.rows, self.with_log_probs = 0, 0, False

    def launch(self, flags: torch.Tensor, log_probs: torch.Tensor | None) -> None:
        self.span, self.with_log_probs = flags.shape[1], log_probs is not None
        self.rows = self.span
        non_blocking = self.event is not None
        self.flags[:flags.numel()].view(flags.shape).copy_(flags, non_blocking=non_blocking)
        if log_probs is not None:
            self.log_probs[:self.span].copy_(log_probs, non_blocking=non_blocking)
        if self.event is not None:
            self.event.record()

    def launched(self, span: int, rows: int) -> None:
        """A step graph wrote [4, rows] results (rows >= span) into `flags` on the current stream."""
        self.span, self.rows, self.with_log_probs = span, rows, False
        if self.event is not None:
            self.event.record()

    def read(self) -> tuple[list[list[int]], list[float] | None]:
        if self.event is not None:
            self.event.synchronize()  # releases the GIL while it waits
        flags = self.flags[:4 * self.rows].view(4, self.rows)[:, :self.span].tolist()
        return flags, self.log_probs[:self.span].tolist() if self.with_log_probs else None


class PollBudget:
    """Which requests to ask `is_cancelled` now (through Triton, an IPC round trip each): those not asked in the last
    `every_s`, least recently asked first, within `per_s` for all of them together (a token bucket holding `burst_s`
    worth). Used by the sender here and by the engine process's handle in the stub (engine_process.py)."""

    def __init__(self, per_s: float, every_s: float, burst_s: float) -> None:
        self.per_s, self.every_s, self.burst_s = per_s, every_s, burst_s
        self._credit, self._refilled_at = 1.0, time.monotonic()

    def take(self, candidates: Collection[T], last_poll: Callable[[T], float]) -> tuple[float, list[T]]:
        """(now, the candidates to poll now); the caller records `now` as their last poll."""
        now = time.monotonic()
        self._credit = min(self.per_s * self.burst_s, self._credit + (now - self._refilled_at) * self.per_s)
        self._refilled_at = now
        due = [item for item in candidates if now - last_poll(item) >= self.every_s]
        chosen = heapq.nsmallest(int(self._credit), due, key=last_poll)
        self._credit -= len(chosen)
        return now, chosen


def poll_cancelled(sink: ResponseSink) -> bool:
    """sink.is_cancelled(), False if it fails: a broken sink must not stop the thread that polls."""
    try:
        return bool(sink.is_cancelled())
    except Exception:
        log.exception("is_cancelled failed")
        return False


class _Delivery:
    """Calls a request's sink: an update, its final response or error (what both senders share)."""

    def __init__(self, on_cancel: Callable[[_Request], None], timeline: Timeline) -> None:
        self.on_cancel, self.timeline = on_cancel, timeline
        self.updates_sent = 0

    def _update(self, request: _Request) -> None:
        outputs = request.snapshot()
        if all(output.finished for output in outputs):
            return  # the loop finished it after the sender checked: its final response carries these tokens
        try:
            request.sink.update(outputs)
        except Exception:  # e.g. the client went away: stop generating for it
            log.exception("sending a streaming update failed: cancelling the request")
            self.on_cancel(request)
            return
        self._sent_update(request)

    def _sent_update(self, request: _Request) -> None:
        request.updates_sent += 1
        self.updates_sent += 1
        self.timeline.updates += 1
        self._sent_first(request)

    def _finish(self, request: _Request, outputs: list[RowOutput] | None, error: Exception | None) -> None:
        try:
            if error is not None:
                request.sink.fail(error)
            else:
                request.sink.finish(outputs or [])
                self._sent_first(request)
        except Exception:
            log.exception("sending a final response failed")

    def _sent_first(self, request: _Request) -> None:
        if request.idle_admission and request.first_token_at:
            request.idle_admission = False
            timeline = self.timeline
            timeline.idle_requests += 1
            timeline.queued_ms += (request.admitted_at - request.submitted_at) * 1e3
            timeline.to_first_token_ms += (request.first_token_at - request.admitted_at) * 1e3
            timeline.to_send_ms += (time.perf_counter() - request.first_token_at) * 1e3


class _Sender(_Delivery):
    """The sender thread: calls the sinks so that the decode loop never waits on the transport.

    Updates are coalesced per request (a request marked several times before the sender reaches it gets one update
    with all its new tokens); a request's final response goes after its updates and no update follows it. The sender
    also polls `is_cancelled` (an IPC round trip in Triton), rate-limited per request, and reports cancellations
    through `on_cancel`.
    """

    def __init__(self, on_cancel: Callable[[_Request], None], cancel_poll_s: float, timeline: Timeline) -> None:
        super().__init__(on_cancel, timeline)
        self.cancel_poll_s = cancel_poll_s
        self._cond = threading.Condition()
        self._marked: dict[int, _Request] = {}  # id -> request with new tokens to send (insertion ordered)
        self._finals: list[tuple[_Request, list[RowOutput] | None, Exception | None]] = []
        self._live: dict[int, _Request] = {}  # submitted and not closed: polled for cancellation
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="inflight-sender", daemon=True)
        self._urgent = False  # a final or a first response is waiting: send it, even during a rest
        self._polls = PollBudget(MAX_CANCEL_POLLS_PER_S, cancel_poll_s, burst_s=0.1)
        self._slice_started = time.perf_counter()  # when the current run of work began (_rest_if_due)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float) -> None:
        """Send what is queued (finals included), then end the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout_s)

    def pass_done(self) -> None:
        """(The loop's passes are not this sender's business: it sends from its own thread.)"""

    def track(self, request: _Request) -> None:
        with self._cond:
            self._live[id(request)] = request
            self._cond.notify()  # an idle sender sleeps without a timeout: it must start polling this one

    def mark(self, requests: Collection[_Request]) -> None:
        with self._cond:
            for request in requests:
                self._marked[id(request)] = request
                self._urgent = self._urgent or request.updates_sent == 0
            self._cond.notify()

    def close(self, request: _Request, outputs: list[RowOutput] | None, error: Exception | None) -> None:
        with self._cond:
            self._finals.append((request, outputs, error))
            self._urgent = True
            self._live.pop(id(request), None)
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                if not (self._marked or self._finals or self._stopping):
                    # (at least one poll's worth of the budget: a cancel_poll_s of 0 must not spin)
                    self._cond.wait(max(self.cancel_poll_s, 1 / MAX_CANCEL_POLLS_PER_S) if self._live else None)
                    self._slice_started = time.perf_counter()  # it was idle: a new slice of work
                marked, self._marked = list(self._marked.values()), {}
                finals, self._finals = self._finals, []
                stopping = self._stopping
                live = list(self._live.values())
                self._urgent = False
            started = time.perf_counter()
            self._sweep(finals, marked)
            if stopping and not finals and not marked:
                return
            self._poll(live)
            self.timeline.sender_busy_ms += (time.perf_counter() - started) * 1e3
            self._rest_if_due(set())

    def _sweep(self, finals: list[tuple[_Request, list[RowOutput] | None, Exception | None]],
               marked: list[_Request]) -> None:
        """Finals first (an update of a closing request is skipped: its final holds those tokens), then first
        responses, then the other updates in arrival order. A final or a first response that comes during the sweep
        goes out after the update in progress (or during a rest): at hundreds of streams a sweep takes tens of
        milliseconds, which would otherwise be added to that request's time to first token or latency."""
        for request, outputs, error in finals:
            self._finish(request, outputs, error)
        queue = deque(sorted(marked, key=lambda request: request.updates_sent > 0))  # stable: arrival order
        pending = {id(request) for request in queue}
        while queue:
            request = queue.popleft()
            pending.discard(id(request))
            if not request.closed and not request.cancelled:
                self._update(request)
            firsts = self._take_urgent(pending) if self._urgent else []
            queue.extendleft(reversed(firsts))
            pending.update(id(later) for later in firsts)
            if not firsts:
                resting = time.perf_counter()
                self._rest_if_due(pending)
                self.timeline.sender_busy_ms -= (time.perf_counter() - resting) * 1e3  # resting is not busy

    def _take_urgent(self, pending: set[int]) -> list[_Request]:
        """Send the finals that came meanwhile; return the requests whose first update came meanwhile (those still
        `pending` in this sweep excepted: their update, when it comes, carries these tokens too)."""
        with self._cond:
            finals, self._finals = self._finals, []
            firsts = [later for later in self._marked.values() if later.updates_sent == 0 and id(later) not in pending]
            for later in firsts:
                del self._marked[id(later)]
            self._urgent = False
        for request, outputs, error in finals:
            self._finish(request, outputs, error)
        return firsts

    def _rest_if_due(self, pending: set[int]) -> None:
        """After SENDER_SLICE_S of work in a row, rest until the sender has held the GIL at most SENDER_DUTY of the
        time (at most SENDER_MAX_REST_S), sending finals and first responses as they come."""
        busy = time.perf_counter() - self._slice_started
        if SENDER_DUTY >= 1 or busy < SENDER_SLICE_S:
            return
        deadline = time.perf_counter() + min(busy * (1 / SENDER_DUTY - 1), SENDER_MAX_REST_S)
        while True:
            with self._cond:
                while not (self._urgent or self._stopping):
                    left = deadline - time.perf_counter()
                    if left <= 0:
                        self._slice_started = time.perf_counter()
                        return
                    self._cond.wait(left)
                if self._stopping:
                    return
            for request in self._take_urgent(pending):
                if not request.closed and not request.cancelled:
                    self._update(request)

    def _poll(self, live: list[_Request]) -> None:
        """Poll the live requests for cancellation, within `_polls`' budget."""
        now, chosen = self._polls.take([request for request in live if not (request.cancelled or request.closed)],
                                       lambda request: request.last_poll)
        for request in chosen:
            request.last_poll = now
            started = time.perf_counter()
            cancelled = poll_cancelled(request.sink)
            self.timeline.polls += 1
            self.timeline.poll_ms += (time.perf_counter() - started) * 1e3
            if cancelled:
                self.on_cancel(request)


class PassSender(_Delivery):
    """The sender of a scheduler whose sinks only record (the engine process's, engine_process.py): no thread; at the
    end of each pass of the loop it calls the sinks with that pass's finals and new tokens, on the loop's thread, then
    `after_pass` (which sends the records as one message). Nothing shares the loop's GIL; the loop's extra work, the
    message included, was 0.9 ms per pass at 240 streams on an H200 host (docs/benchmarks.md), run while the device
    decodes. Cancellations come from InflightScheduler.cancel: it polls nothing."""

    def __init__(self, on_cancel: Callable[[_Request], None], timeline: Timeline,
                 after_pass: Callable[[], None]) -> None:
        super().__init__(on_cancel, timeline)
        self.after_pass = after_pass
        self._marked: dict[int, _Request] = {}
        self._finals: list[tuple[_Request, list[RowOutput] | None, Exception | None]] = []
        self._sent: dict[int, list[int]] = {}  # request id -> each row's length when it last got tokens (extend)

    def start(self) -> None:
        pass

    def stop(self, timeout_s: float) -> None:
        self.pass_done()  # the finals of the requests the loop closed as it stopped

    def track(self, request: _Request) -> None:
        pass

    def mark(self, requests: Collection[_Request]) -> None:
        for request in requests:
            self._marked[id(request)] = request

    def close(self, request: _Request, outputs: list[RowOutput] | None, error: Exception | None) -> None:
        self._finals.append((request, outputs, error))
        self._sent.pop(id(request), None)

    def pass_done(self) -> None:
        started = time.perf_counter()
        finals, self._finals = self._finals, []
        marked, self._marked = self._marked, {}
        for request, outputs, error in finals:
            self._finish(request, outputs, error)
        for request in marked.values():
            if request.closed or request.cancelled:
                continue
            extend = getattr(request.sink, "extend", None)
            if extend is None or request.latest is not None or request.rows[0].log_probs is not None:
                self._update(request)
                continue
            sent = self._sent.setdefault(id(request), [row.prompt_len for row in request.rows])
            try:
                for i, row in enumerate(request.rows):
                    if row.length > sent[i]:
                        extend(i, sent[i], row.tokens[sent[i]:row.length])
                        sent[i] = row.length
            except Exception:  # as in _update
                log.exception("sending a streaming update failed: cancelling the request")
                self.on_cancel(request)
                continue
            self._sent_update(request)
        self.after_pass()
        self.timeline.sender_busy_ms += (time.perf_counter() - started) * 1e3


def shorten_gil_switch_interval() -> None:
    """Threads of this process hand the GIL over at least every GIL_SWITCH_INTERVAL_S, not Python's default 5 ms:
    a thread waiting for it (the loop after each torch call, the stub's request parsing) waits at most that long."""
    if sys.getswitchinterval() > GIL_SWITCH_INTERVAL_S:
        sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)


def check_rows(rows: Sequence[GenerationRequest], limits: EngineLimits) -> None:
    """The rows of one request can run (`InflightScheduler.submit`'s checks): raises RequestError or ResourceError."""
    if not rows:
        raise RequestError("input_ids", "must hold at least one row")
    widths = sorted({row.beam_width for row in rows})
    if len(widths) != 1:
        raise RequestError("beam_width", f"must be the same for all rows of a request, got {widths}")
    for row in rows:
        check_request(row, limits)
    needed = len(rows) * widths[0]
    if needed > limits.max_batch_size:
        raise ResourceError(f"rows x beam_width = {len(rows)} x {widths[0]} = {needed} exceeds the engine's "
                            f"{limits.max_batch_size} KV-cache slots (max_batch_size): send fewer rows")


class InflightScheduler:
    def __init__(self, engine: GptEngine, *, cancel_poll_s: float = 0.05,
                 event_log: Callable[[str], None] | None = None, admit_gather_rows: int = ADMIT_GATHER_ROWS,
                 admit_gather_steps: int = ADMIT_GATHER_STEPS, report: Callable[[str], None] | None = None,
                 report_every_s: float = 10.0, step_prompt_tokens: int = STEP_PROMPT_TOKENS,
                 metrics: MetricsRecorder | None = None, on_step: Callable[[StepRecord], None] | None = None,
                 after_pass: Callable[[], None] | None = None, graph_prompt_tokens: int | None = None,
                 gather_prompt_tokens: int = GATHER_PROMPT_TOKENS) -> None:
        """engine: owned by the scheduler while it runs (do not call engine.generate from elsewhere meanwhile);
        cancel_poll_s: least time between two is_cancelled polls of one request;
        event_log: receives one line per admission (which rows joined how many running rows) and per cancelled
            running request;
        admit_gather_rows / admit_gather_steps: while rows decode, new requests wait until this many rows are waiting
            or the oldest has waited this many steps, and are then prefilled in one pass (0 steps: admit at once);
        step_prompt_tokens: while rows decode, each step prefills at most this many prompt tokens (chunks of one or
            several prompts), so long prompts join over several steps while the running rows keep decoding (>= 1);
        graph_prompt_tokens: while every prompt waiting or being prefilled has at most this many tokens left, a step
            prefills at most this many (a pass that replays a prefill CUDA graph); None: the engine's prefill graph
            width (0, no such cap, without prefill graphs);
        gather_prompt_tokens: gathering stops once the waiting prompts have this many tokens, and only prompts of
            at most this many (and graph_prompt_tokens) tokens left keep a step to graph_prompt_tokens;
        report: receives the timeline (Timeline.summary) of each `report_every_s` window in which steps ran;
        on_step: called on the loop's thread after each pass with what it prefilled and decoded (keep it cheap);
        after_pass: the sinks only record (PassSender): they are called on the loop's thread at the end of each pass,
            then this; no sender thread, no `is_cancelled` polls (cancel through `cancel`)."""
        if step_prompt_tokens < 1:
            raise ValueError(f"step_prompt_tokens must be >= 1, got {step_prompt_tokens}")
        self.report, self.report_every_s, self._reported_at = report, report_every_s, time.monotonic()
        self.engine = engine
        self.metrics, self._step_clock = metrics, StepClock()
        self.cancel_poll_s = cancel_poll_s
        self.admit_gather_rows = admit_gather_rows
        self.admit_gather_steps = admit_gather_steps
        self.step_prompt_tokens = step_prompt_tokens
        self.graph_prompt_tokens = graph_prompt_tokens
        self.gather_prompt_tokens = gather_prompt_tokens
        self.event_log = event_log
        self.on_step = on_step
        self._record: StepRecord | None = None  # this pass's, while on_step is set
        limits = engine.limits
        self.slot_count = limits.max_batch_size
        self.table = _SlotTable(self.slot_count, limits.max_seq_len + 1, engine.config.vocab_size, engine.device)
        self.readback = _Readback(self.slot_count, engine.device)
        self._spans = DeviceSpans(engine.device)  # the timeline's device time
        # A tensor-parallel engine's model is a proxy that mirrors each call to the other ranks: its steps stay eager.
        self.step_graphs = (StepGraphs.for_decode_graphs(engine.model, engine.graphs, self.table, self.readback.flags,
                                                         engine.vocab_limit)
                            if STEP_GRAPHS and engine.graphs is not None and isinstance(engine.model, GptModel)
                            else None)
        self.stats = SchedulerStats()
        self._free = list(range(self.slot_count))  # a heap: the lowest free slot first keeps the decoded span small
        self._occupied: dict[int, _Row] = {}  # slot -> row
        self._prefilling: list[_Row] = []  # rows in slots whose prompt is not all cached yet, oldest first
        self._waiting: deque[_Request] = deque()
        self._live: list[_Request] = []  # admitted, not closed
        # [>= span, V]: next-token logits of slots 0..span-1 (with step graphs: their persistent buffer, every slot)
        self._logits: torch.Tensor | None = self._persistent_logits()
        self._batch: _Batch | None = None  # None: rebuild before the next step
        self._inbox: list[_Request] = []
        self._cancels: list[_Request] = []  # reported by the sender, applied at the next step boundary
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._sender: _Sender | PassSender = (
            _Sender(self._request_cancel, cancel_poll_s, self.stats.timeline) if after_pass is None
            else PassSender(self._request_cancel, self.stats.timeline, after_pass))

    # -- public ------------------------------------------------------------------------------------------------------
    def start(self) -> InflightScheduler:
        if self._thread is not None:
            raise RuntimeError("the scheduler was already started")
        shorten_gil_switch_interval()
        self._sender.start()
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
        self._sender.stop(timeout_s)

    def __enter__(self) -> InflightScheduler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def submit(self, rows: Sequence[GenerationRequest], sink: ResponseSink, *, stream: bool = False) -> _Request:
        """Queue the rows of one request; returns its handle for `cancel`. Raises RequestError or ResourceError (and
        queues nothing) when they can never run; rows that fit wait for free slots. stream: send `sink.update` after
        every step."""
        check_rows(rows, self.engine.limits)
        request = _Request(sink=sink, stream=stream, submitted_at=time.perf_counter())
        want_log_probs = any(row.return_log_probs for row in rows)
        request.rows = [_Row.create(spec, request, want_log_probs) for spec in rows]
        with self._lock:
            if self._stopping or self._thread is None or not self._thread.is_alive():
                raise RuntimeError("the in-flight scheduler is not running")
            self._sender.track(request)
            self._inbox.append(request)
            self._wake.notify()
        return request

    @property
    def sender_stats(self) -> tuple[int, int]:
        """(streaming updates sent, finals handed over): coalescing shows as fewer updates than tokens."""
        return self._sender.updates_sent, self.stats.finished_requests + self.stats.failed_requests

    def cancel(self, request: _Request) -> None:
        """Cancel a request `submit` returned at the next step boundary (nothing once it closed)."""
        self._request_cancel(request)

    def _request_cancel(self, request: _Request) -> None:
        """From the sender thread (or `cancel`): cancel at the next step boundary."""
        with self._lock:
            self._cancels.append(request)
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
                    pass_started = time.perf_counter()
                    try:
                        self._apply_cancellations()
                        if self.on_step is not None:
                            self._record = StepRecord()
                        started = time.perf_counter()
                        self._admit()
                        self.stats.timeline.admit_ms += (time.perf_counter() - started) * 1e3
                        if len(self._occupied) > len(self._prefilling):  # some row decodes
                            self._step()
                        if self.on_step is not None and self._record is not None:
                            self.on_step(self._record)
                        self._maybe_report()
                        if self.metrics is not None:
                            self.metrics.set_load(slots_in_use=len(self._occupied), waiting=len(self._waiting),
                                                  running=len(self._live))
                    except Exception as err:  # the running requests fail; the loop keeps serving
                        log.exception("in-flight step failed: failing the %d running request(s)",
                                      len({id(row.request) for row in self._occupied.values()}))
                        self._fail_running(err)
                    ending = time.perf_counter()
                    # (PassSender) this pass's responses, failures included. Here, before the next pass's launches:
                    # sending after them, while the device decodes, made 256 streams 20 % slower on one H200 host (the
                    # same sends took twice as long there; docs/gpu/runs-2026-12-04c).
                    self._sender.pass_done()
                    timeline, ended = self.stats.timeline, time.perf_counter()
                    timeline.pass_end_ms += (ended - ending) * 1e3
                    timeline.pass_ms += (ended - pass_started) * 1e3
        except Exception as err:  # the loop itself broke: no request may wait forever
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
            while not (self._stopping or self._inbox or self._waiting or self._occupied or self._cancels):
                self._wake.wait()
            self._take_inbox()
            return not self._stopping

    def _take_inbox(self) -> None:
        """(Lock held.) Submissions join the waiting queue."""
        for request in self._inbox:
            request.queued_at_step = self.stats.steps
        self._waiting.extend(self._inbox)
        self._inbox.clear()

    def _maybe_report(self) -> None:
        now = time.monotonic()
        if self.report is None or now - self._reported_at < self.report_every_s:
            return
        self._reported_at = now
        if self.stats.timeline.steps:
            self.report(f"in-flight scheduler, last {self.report_every_s:.0f} s: {self.stats.timeline.summary()}")
            self.stats.timeline.reset()

    def _apply_cancellations(self) -> None:
        with self._lock:
            # A request submitted since _collect_submissions may already be reported cancelled (the sender polls a
            # new request at once): it must be in the waiting queue for _cancel to close it, not left in the inbox.
            self._take_inbox()
            cancels, self._cancels = self._cancels, []
        for request in cancels:
            if not request.cancelled and not request.closed:
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
            if row.prefilling:  # never decoded: its slot frees now
                row.done = True
                self._release(row)
            else:
                self.table.finished[row.slot] = True  # stops at the next step
        if all(row.done for row in request.rows):
            self._close(request, outputs=[row.output() for row in request.rows])
        if self.event_log is not None:
            generated = [row.length - row.prompt_len for row in stopping]
            self.event_log(f"in-flight batching: a request was cancelled; its {len(stopping)} running row(s) stop "
                           f"after {generated} generated tokens")

    def _step_budget(self, decoding: int) -> int:
        """This step's prompt tokens: whole prompts while nothing decodes (IDLE_PREFILL_TOKENS). While rows decode,
        step_prompt_tokens if a prompt with more than gather_prompt_tokens (at most the prefill graph width) left
        waits or is being prefilled (a pass of it runs eagerly whatever its size, and a wide eager pass costs less per
        token: ~8 us against ~12 us per token for ~400-token chunk passes of the mixed workload on an H200); else the
        graph width: short prompts then share passes that replay a prefill graph (6.7 us per token at 511 tokens,
        against 8-11 us in eager passes of 1,000-1,600 tokens at 64-256 streams of 128-token prompts;
        docs/benchmarks.md)."""
        if not decoding:
            return max(self.step_prompt_tokens, IDLE_PREFILL_TOKENS)
        graphs = self.engine.prefill_graphs
        width = self.graph_prompt_tokens if self.graph_prompt_tokens is not None else (
            graphs.chunk_width if graphs is not None else 0)
        if not width or width >= self.step_prompt_tokens:
            return self.step_prompt_tokens
        short = min(width, self.gather_prompt_tokens)
        if (any(row.prompt_len - row.prefilled > short for row in self._prefilling)
                or any(row.prompt_len > short for request in self._waiting for row in request.rows)):
            return self.step_prompt_tokens
        return width

    def _should_wait_for_more(self, budget: int) -> bool:
        """While many rows decode, gather a few arrivals into one prefill pass instead of one pass each: a pass of
        short prompts costs about the same for 1 or 8 of them (it reads the 2.6 GB of weights once, and eager passes
        are launch-bound), and the running rows stall meanwhile. Measured on an H200 at 256 streams: one graph prefill
        per arrival instead lost ~25 % of tokens/s (docs/benchmarks.md). A pass of one prompt (low load) runs from
        the prefill CUDA graphs (generation.py). Arrivals that fill what is left of the step's prompt-token budget
        (`budget`, after the chunks of prompts already being prefilled) never wait: the pass would be no fuller for
        it."""
        if len(self._occupied) - len(self._prefilling) < ADMIT_GATHER_MIN_RUNNING or not self._waiting:
            return False
        if sum(row.prompt_len for request in self._waiting for row in request.rows) >= min(budget,
                                                                                        self.gather_prompt_tokens):
            return False
        waiting_rows = sum(len(request.rows) for request in self._waiting)
        oldest_wait = self.stats.steps - self._waiting[0].queued_at_step
        return waiting_rows < min(self.admit_gather_rows, len(self._free)) and oldest_wait < self.admit_gather_steps

    def _admit(self) -> None:
        """This step's prefill, within its prompt-token budget: the next chunk of each partly cached row (oldest
        first), then waiting requests (FIFO) into free slots with their first chunk. A beam request runs alone."""
        decoding = len(self._occupied) - len(self._prefilling)
        budget = self._step_budget(decoding)
        work: list[tuple[_Row, int]] = []  # (row, prompt tokens to prefill this step)
        for row in self._prefilling:
            if budget <= 0:
                break
            take = min(budget, row.prompt_len - row.prefilled)
            work.append((row, take))
            budget -= take
        admitted: list[_Request] = []
        gather = self._should_wait_for_more(budget)
        while budget > 0 and self._waiting and not gather:
            request = self._waiting[0]
            if request.beam_width > 1:
                if self._occupied or admitted:
                    break  # it waits for the running rows to drain
                self._waiting.popleft()
                self._admitted(request)
                self._run_chunked(request)
                continue
            if len(request.rows) > len(self._free):
                break
            self._waiting.popleft()
            self._admitted(request)
            request.idle_admission = not self._occupied and not admitted
            for row in request.rows:
                row.slot = heapq.heappop(self._free)
                self._occupied[row.slot] = row
                self._prefilling.append(row)
                take = min(budget, row.prompt_len)
                if take > 0:  # else its first chunk comes at the next step
                    work.append((row, take))
                    budget -= take
            admitted.append(request)
        if admitted:
            self._live += admitted
            rows = [row for request in admitted for row in request.rows]
            self.stats.admissions += 1
            self.stats.admitted_rows += len(rows)
            self.stats.joined_running_rows += len(rows) if decoding else 0
            self.stats.peak_rows = max(self.stats.peak_rows, len(self._occupied))
            if self.event_log is not None:
                self.event_log(f"in-flight batching: {len(rows)} row(s) joined {decoding} running row(s), "
                               f"slots {[row.slot for row in rows]}")
        if work:
            self._start(work)

    def _admitted(self, request: _Request) -> None:
        request.admitted_at = time.perf_counter()
        self.stats.max_admission_wait_steps = max(self.stats.max_admission_wait_steps,
                                                  self.stats.steps - request.queued_at_step)
        if self.metrics is not None:
            self.metrics.observe_queue_time(request.admitted_at - request.submitted_at)

    def _start(self, work: list[tuple[_Row, int]]) -> None:
        """Prefill this step's chunks; rows whose prompts are now cached add their first-token logits to the batch's."""
        started = time.perf_counter()
        if self._record is not None:
            self._record.chunks += [(row.slot, row.prefilled, row.prefilled + take) for row, take in work]
        begun = self._spans.begin()
        rows, new_logits = self._prefill_isolating_faults(work)
        self._spans.end("prefill", begun)
        if new_logits is None:
            return
        idle = {id(row.request) for row in rows if row.request.idle_admission}
        self.stats.timeline.admitting_ms += (time.perf_counter() - started) * 1e3 * len(idle)
        span = max(self._occupied) + 1
        slots = self.table.upload(torch.tensor([row.slot for row in rows]))
        if self.step_graphs is not None:
            self.step_graphs.logits.index_copy_(0, slots, new_logits.to(self.step_graphs.logits.dtype))
        else:
            logits = torch.zeros((span, new_logits.shape[1]), dtype=new_logits.dtype, device=new_logits.device)
            if self._logits is not None:
                kept = min(span, self._logits.shape[0])
                logits[:kept] = self._logits[:kept]
            self._logits = logits.index_copy_(0, slots, new_logits)
        self._batch = None

    def _prefill_isolating_faults(self, work: list[tuple[_Row, int]]) -> tuple[list[_Row], torch.Tensor | None]:
        """Prefill the chunks together; if that fails, one request at a time, so only the requests that fail on their
        own are failed. Returns the rows whose prompts are now all cached and their logits [k, V]."""
        try:
            return self._prefill(work)
        except Exception as err:
            requests = list({id(row.request): row.request for row, _ in work}.values())
            if len(requests) == 1:
                log.exception("prefill failed for %d row(s)", len(work))
                self._abort(requests[0], err)
                return [], None
            log.warning("prefill of %d requests failed (%s): retrying them one at a time", len(requests), err)
        kept_rows, kept_logits = [], []
        for request in requests:
            request_rows, logits = self._prefill_isolating_faults([item for item in work if item[0].request is request])
            if logits is not None:
                kept_rows += request_rows
                kept_logits.append(logits)
        return kept_rows, torch.cat(kept_logits) if kept_logits else None

    def _prefill(self, work: list[tuple[_Row, int]]) -> tuple[list[_Row], torch.Tensor | None]:
        """One engine pass over one chunk per row -> (rows whose prompts are now all cached, their logits [k, V])."""
        takes = [take for _, take in work]
        starts = [row.prefilled for row, _ in work]
        # Padded to a multiple of PREFILL_PAD so the attention sees few distinct shapes (a new shape may cost a
        # kernel plan); padding is masked. At most max_seq_len: the KV cache's length.
        width = min(-(-max(takes) // PREFILL_PAD) * PREFILL_PAD, self.engine.limits.max_seq_len)
        tokens = np.zeros((len(work), width), dtype=np.int64)  # 0: any valid id as padding
        for i, (row, take) in enumerate(work):
            tokens[i, :take] = row.tokens[row.prefilled:row.prefilled + take]
        logits = self.engine.prefill_chunks(torch.from_numpy(tokens), starts, takes, [row.slot for row, _ in work])
        # Device state first, rows' host state last: if anything here fails, the fault isolation above retries the
        # same chunks.
        parked = [(row, row.prefilled + take) for row, take in work if row.prefilled + take < row.prompt_len]
        complete = [i for i, (row, take) in enumerate(work) if row.prefilled + take == row.prompt_len]
        if parked:  # their slots' junk decode steps write at the next chunk's first position, never into the prompt
            at = self.table.upload(torch.tensor([[row.slot for row, _ in parked], [end for _, end in parked]]))
            self.table.park.index_copy_(0, at[0], at[1])
        rows = [work[i][0] for i in complete]
        if rows:
            self.table.write(rows)
            if len(complete) < len(work):  # (all complete: the logits are theirs already, in order)
                logits = logits.index_select(0, self.table.upload(torch.tensor(complete)))
        if self.metrics is not None:
            self.metrics.add_prompt_tokens(sum(takes))
        self.stats.prefill_chunks += len(work)
        timeline = self.stats.timeline
        timeline.prefill_passes += 1
        timeline.prefill_tokens += sum(takes)
        timeline.prefill_rows += len(work)
        path = self.engine.last_prefill_path
        timeline.prefill_paths[path] = timeline.prefill_paths.get(path, 0) + 1
        for row, take in work:
            row.prefilled += take
        for row, take in (work[i] for i in complete):
            self._prefilling.remove(row)
            if take < row.prompt_len:
                self.stats.chunked_rows += 1
                if self.event_log is not None:
                    self.event_log(f"in-flight batching: a prompt of {row.prompt_len} tokens was prefilled in chunks "
                                   f"(slot {row.slot}, last chunk {take} tokens)")
        return (rows, logits) if rows else ([], None)

    def _step(self) -> None:
        """Select one token for every row in slots 0..span-1 and decode them; the host reads the selection back and
        consumes it while the decode runs (on CUDA; on the CPU the decode follows the consumption, so a row's token
        is sent before the decode that extends it, and a step whose rows all finished skips its decode)."""
        started = time.perf_counter()
        # A row still being prefilled takes no part (None, as a free slot): it is finished on the device until then.
        rows: list[_Row | None] = [self._occupied.get(slot) for slot in range(max(self._occupied) + 1)]
        if self._prefilling:
            rows = [None if row is None or row.prefilling else row for row in rows]
        if self._batch is None or self._batch.span != len(rows):
            self._batch = self.table.batch(rows)
        batch = self._batch
        # A running row's next position is its length - 1 < prompt + selections issued. Finished and free slots
        # decode at their parking position (junk nothing reads): 0, or a prefilling row's next uncached position, so
        # every position stays < kv_len as decode requires.
        kv_len = max((row.prefilled + 1 for row in self._prefilling), default=1)
        for row in rows:
            if row is not None:
                row.issued += 1
                kv_len = max(kv_len, min(row.prompt_len + row.issued, row.limit))
        begun = self._spans.begin()
        decode = self._select(batch, kv_len)
        overlapped = self.readback.event is not None
        if overlapped:
            decode()
            self._spans.end("decode", begun)
        self.stats.steps += 1
        timeline, launched = self.stats.timeline, time.perf_counter()
        flags, log_probs = self.readback.read()
        read = time.perf_counter()
        self._step_clock.tick(self.metrics)  # before _consume, whose _release may mark the engine idle
        self._consume(rows, flags, log_probs)
        if not overlapped and self._occupied:
            decode()
        self._spans.collect(timeline)
        timeline.steps += 1
        timeline.rows += len(self._occupied)
        timeline.select_launch_ms += (launched - started) * 1e3
        timeline.wait_ms += (read - launched) * 1e3
        timeline.consume_ms += (time.perf_counter() - read) * 1e3

    def _select(self, batch: _Batch, kv_len: int) -> Callable[[], None]:
        """Launch this step's selection and the copy of its results to the host (recording the readback event after
        it); returns the step's decode, to launch next."""
        span = batch.span
        if self.step_graphs is not None and batch.graphable:
            graphs = self.step_graphs
            rows = graphs.select(span, batch.params)
            self.readback.launched(span, rows)
            if graphs.failure is not None:  # this selection ran; the next steps go op by op
                log.warning("%s: the in-flight steps run op by op from now on", graphs.failure)
                self.step_graphs = None
            return lambda: graphs.decode(rows, kv_len)
        if self._logits is None or self._logits.shape[0] < span:  # slots up to a prefilling row's: never read
            logits = torch.zeros((span, self.engine.config.vocab_size), device=self.table.device,
                                 dtype=torch.float32 if self._logits is None else self._logits.dtype)
            if self._logits is not None:
                logits[:self._logits.shape[0]] = self._logits
            self._logits = logits
        step_flags, step_log_probs, tokens, positions = select_tokens(
            self.table, span, self._logits, batch.params, self.engine.vocab_limit, stop_words=batch.stop_words,
            bad_words=batch.bad_words, want_log_probs=batch.want_log_probs)
        self.readback.launch(step_flags, step_log_probs)
        return lambda: self._decode(tokens, positions, kv_len)

    def _decode(self, tokens: torch.Tensor, positions: torch.Tensor, kv_len: int) -> None:
        """The op-by-op step's decode: the next logits of slots 0..len(tokens)-1."""
        logits = self.engine.decode(tokens, positions, kv_len)
        if self.step_graphs is not None:  # keep the persistent buffer current for the next graph-replayed step
            self.step_graphs.logits[:tokens.shape[0]].copy_(logits)
        else:
            self._logits = logits

    def _persistent_logits(self) -> torch.Tensor | None:
        return self.step_graphs.logits if self.step_graphs is not None else None

    def _consume(self, rows: list[_Row | None], flags: list[list[int]], log_probs: list[float] | None) -> None:
        """Apply one step's host copy: append tokens, close finished requests, free slots, stream updates."""
        tokens, active, finished, stopped = flags
        if self._record is not None:
            self._record.decoded = True
            self._record.advanced = [slot for slot, row in enumerate(rows) if row is not None and active[slot]]
        if self.metrics is not None:
            self.metrics.add_generated_tokens(sum(1 for s, row in enumerate(rows) if row is not None and active[s]))
        touched: dict[int, _Request] = {}
        for slot, row in enumerate(rows):
            if row is None:
                continue
            if active[slot]:
                if row.length == row.prompt_len and not row.request.first_token_at:
                    row.request.first_token_at = time.perf_counter()
                    if self.metrics is not None:
                        request = row.request
                        self.metrics.observe_time_to_first_token(request.first_token_at - request.submitted_at)
                row.append(tokens[slot], log_probs[slot] if log_probs is not None else 0.0)
                touched[id(row.request)] = row.request
            if finished[slot]:
                row.done, row.reason = True, "stop" if stopped[slot] else "length"
                self._release(row)
                touched[id(row.request)] = row.request
        advanced = []
        for request in touched.values():
            if all(row.done for row in request.rows):
                self._close(request, outputs=[row.output() for row in request.rows])
            elif request.stream and not request.cancelled:
                advanced.append(request)
        if advanced:
            self._sender.mark(advanced)

    def _release(self, row: _Row) -> None:
        if row.prefilling:  # left mid-prefill (cancelled or failed): its junk steps park at 0 again
            self._prefilling.remove(row)
            try:
                self.table.park[row.slot] = 0
            except Exception:  # a broken device fails every later step anyway
                log.exception("could not reset slot %d", row.slot)
        del self._occupied[row.slot]
        heapq.heappush(self._free, row.slot)
        row.slot = -1
        self._batch = None
        if not self._occupied:
            self._logits = self._persistent_logits()
            self._step_clock.idle()

    def _close(self, request: _Request, *, outputs: list[RowOutput] | None = None,
               error: Exception | None = None) -> None:
        """Send the request's final response (outputs) or its error, once."""
        if request.closed:
            return
        request.closed = True
        if request in self._live:
            self._live.remove(request)
        if error is not None:
            self.stats.failed_requests += 1
        else:
            self.stats.finished_requests += 1
        self._sender.close(request, outputs, error)

    def _abort(self, request: _Request, error: Exception) -> None:
        """Fail a request and free its slots (left inert: finished set)."""
        for row in request.rows:
            if row.slot >= 0:
                try:
                    self.table.finished[row.slot] = True
                except Exception:  # a broken device fails every later step anyway
                    log.exception("could not reset slot %d", row.slot)
                self._release(row)
            row.done = True
        self._close(request, error=error)

    def _fail_running(self, error: Exception) -> None:
        requests = {id(row.request): row.request for row in self._occupied.values()}
        self._logits = self._persistent_logits()
        for request in requests.values():
            self._abort(request, error)

    # -- beam search --------------------------------------------------------------------------------------------------
    def _run_chunked(self, request: _Request) -> None:
        """A beam-search request through GptEngine.generate (needs every slot from 0: runs with no rows in flight)."""
        self._live.append(request)
        specs = [row.spec for row in request.rows]
        latest = [RowOutput(prompt_len=row.prompt_len, beams=[row.tokens[:row.prompt_len].copy()] * row.spec.beam_width)
                  for row in request.rows]

        request.latest = latest

        def on_step(updates: list[tuple[int, RowOutput]]) -> None:
            for index, output in updates:
                latest[index] = output
            if not request.cancelled and not all(output.finished for output in latest):
                self._sender.mark([request])
                self._sender.pass_done()  # a beam request's whole run is one pass of the loop

        def is_cancelled() -> Collection[int]:  # polled by the engine; the sender reports cancellations
            with self._lock:
                if request in self._cancels:
                    request.cancelled = True
            return range(len(specs)) if request.cancelled else ()

        try:
            outputs = self.engine.generate(specs, on_step=on_step if request.stream else None,
                                           is_cancelled=is_cancelled)
        except Exception as err:  # only this request fails
            log.exception("beam search failed")
            self._close(request, error=err)
            return
        for row in request.rows:
            row.done = True
        self._close(request, outputs=outputs)
