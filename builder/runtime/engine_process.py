"""The in-flight engine in a process of its own, next to the Triton stub of a decoupled torch core.

Why: in the stub, the scheduler's loop shares one GIL with Triton's execute thread (parsing requests) and the sender
thread (building and sending responses). Every torch call releases the GIL and must take it back, and a thread that
waits for it gets it only when the holder blocks or its switch interval (scheduler.GIL_SWITCH_INTERVAL_S) runs out;
through Triton, an admission pass (~50 small torch calls) took 7.6 ms of the loop's time at 64 streams against 1.4 ms
with the scheduler alone on the same H200 (docs/benchmarks.md). Here a child process owns the engine and the loop;
the loop's sinks only record, and one message per pass carries its tokens to the stub, which keeps parsing,
responses and cancellation polls.

The two processes talk over a socket pair private to them (no path another local user could open), as pickled
messages framed by multiprocessing.connection.Connection:
  stub -> engine: ("start", settings, device) once; then ("submit", rid, rows, stream) | ("cancel", rid) | ("stop",)
  engine -> stub: ("ready", limits, note) or ("failed", text) once; then one list of events per pass of the loop:
    ("tokens", rids, rows, starts, counts, tokens) | ("update", rid, outputs) | ("finish", rid, outputs)
    | ("fail", rid, text) | ("reject", rid, text) | ("log", verbose, text) | ("metrics", PendingMetrics)
    | ("stopped", summary)
"tokens" carries the pass's new tokens of every single-beam stream without log-probs, as arrays: entry i is row
rows[i] of request rids[i], counts[i] tokens from position starts[i] (concatenated in `tokens`). Other streams get
"update"s with their whole outputs.
"""

from __future__ import annotations

import itertools
import os
import pickle
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING

import numpy as np

from .core_io import EngineLimits, GenerationRequest, RowOutput
from .metrics import MetricsRecorder
from .scheduler import MAX_CANCEL_POLLS_PER_S, PollBudget, check_rows, poll_cancelled, shorten_gil_switch_interval

if TYPE_CHECKING:
    from .core_adapter import CoreSettings, _Sink
    from .scheduler import _Request
    from .metrics import EngineMetrics

STARTUP_TIMEOUT_S = 900.0  # loading and capturing the graphs of a large model takes minutes
STOP_TIMEOUT_S = 30.0
IDLE_WAKE_S = 0.02  # the stub's receiver wakes this often without events, to poll cancellations
METRICS_EVERY_S = 0.5


class EngineProcessError(RuntimeError):
    """The engine process failed to start or exited."""


# ---- the engine process ---------------------------------------------------------------------------------------------

class _Outbox:
    """What the engine process tells the stub: the loop's sinks and log lines only record here, and `flush` sends it
    all as ONE message at the end of each pass of the loop, on the loop's thread (scheduler.PassSender). No thread
    of its own: the previous design's sender and outbox threads took the loop's GIL ~20k times a second at 64
    streams, and the loop's graph launches waited for it (docs/benchmarks.md). The scheduler's metrics go along at
    most every METRICS_EVERY_S; the process's main thread flushes them while the loop is idle."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.metrics = MetricsRecorder()
        self._lock = threading.Lock()  # the loop's flush and the main thread's (rejections, idle metrics)
        self._events: list[tuple] = []
        self._keys: list[int] = []  # stream tokens: request id, row, first position, tokens
        self._rows: list[int] = []
        self._starts: list[int] = []
        self._tokens: list[np.ndarray] = []
        self._metrics_due = time.monotonic()

    def put(self, event: tuple) -> None:
        with self._lock:
            self._events.append(event)

    def extend(self, rid: int, row: int, start: int, tokens: np.ndarray) -> None:
        with self._lock:
            self._keys.append(rid)
            self._rows.append(row)
            self._starts.append(start)
            self._tokens.append(tokens)

    def flush(self, *, metrics: bool = False) -> None:
        with self._lock:
            events, self._events = self._events, []
            if self._keys:
                counts = np.fromiter((len(tokens) for tokens in self._tokens), dtype=np.int64, count=len(self._tokens))
                events.append(("tokens", np.array(self._keys, dtype=np.int64), np.array(self._rows, dtype=np.int64),
                               np.array(self._starts, dtype=np.int64), counts, np.concatenate(self._tokens)))
                self._keys, self._rows, self._starts, self._tokens = [], [], [], []
            if metrics or time.monotonic() >= self._metrics_due:
                self._metrics_due = time.monotonic() + METRICS_EVERY_S
                pending = self.metrics.take()
                if pending:
                    events.insert(0, ("metrics", pending))
            if events:
                self.conn.send_bytes(pickle.dumps(events, protocol=pickle.HIGHEST_PROTOCOL))

    def send(self, message: tuple) -> None:
        """A message outside the event lists (the start's answer)."""
        with self._lock:
            self.conn.send(message)


class _ForwardSink:
    """scheduler.ResponseSink of one request in the engine process: records its responses in the outbox."""

    def __init__(self, rid: int, outbox: _Outbox, sinks: dict[int, _ForwardSink]) -> None:
        self.rid, self.outbox, self.sinks = rid, outbox, sinks
        self.request: _Request | None = None  # the scheduler's handle (submit's), for the stub's cancel message
        sinks[rid] = self  # until the final response

    def extend(self, row: int, start: int, tokens: np.ndarray) -> None:
        self.outbox.extend(self.rid, row, start, tokens)

    def update(self, outputs: list[RowOutput]) -> None:  # beams or log-probs: the whole outputs
        self.outbox.put(("update", self.rid, outputs))

    def finish(self, outputs: list[RowOutput]) -> None:
        self.sinks.pop(self.rid, None)
        self.outbox.put(("finish", self.rid, outputs))

    def fail(self, error: Exception) -> None:
        self.sinks.pop(self.rid, None)
        self.outbox.put(("fail", self.rid, str(error)))

    def is_cancelled(self) -> bool:  # (never polled: the stub's cancel message calls scheduler.cancel)
        return False


def serve_engine(conn: Connection) -> None:
    """The engine process: load, report ready, then run the stub's submissions until it says stop (or is gone).

    This thread reads the pipe and submits; the loop runs on its own. Reading the pipe on the loop's thread instead
    (between passes, and while idle) saved ~0.08 ms of the first token at batch 1 but serialized each submission
    with the loop's host work: 256 streams lost ~7 % on an H200 (docs/benchmarks.md, thirteenth session)."""
    from .core_adapter import scheduler_summary, start_scheduler
    from .core_io import RequestError
    from .generation import ResourceError

    kind, settings, device = conn.recv()
    if kind != "start":
        raise EngineProcessError(f"expected the stub's start message, got {kind!r}")
    outbox = _Outbox(conn)
    try:
        engine = settings.load(device)
        scheduler, note = start_scheduler(engine, settings, event_log=lambda text: outbox.put(("log", True, text)),
                                          report=lambda text: outbox.put(("log", False, text)),
                                          metrics=outbox.metrics, after_pass=outbox.flush)
    except BaseException:
        outbox.send(("failed", traceback.format_exc()))
        raise
    outbox.send(("ready", engine.limits, f"{settings.describe(engine, device)}; {note}"))
    sinks: dict[int, _ForwardSink] = {}
    try:
        while True:
            try:
                if not conn.poll(METRICS_EVERY_S):
                    outbox.flush(metrics=True)  # the loop may be idle: its last load figures
                    continue
                message = conn.recv()
            except (EOFError, OSError):  # the stub is gone
                break
            if message[0] == "submit":
                _, rid, rows, stream = message
                sink = _ForwardSink(rid, outbox, sinks)
                try:
                    sink.request = scheduler.submit(rows, sink, stream=stream)
                except (RequestError, ResourceError, RuntimeError) as err:
                    sinks.pop(rid, None)
                    outbox.put(("reject", rid, str(err)))
                    outbox.flush()
            elif message[0] == "cancel":
                cancelled = sinks.get(message[1])
                if cancelled is not None and cancelled.request is not None:
                    scheduler.cancel(cancelled.request)
            elif message[0] == "stop":
                break
    finally:
        scheduler.stop()
        outbox.put(("stopped", scheduler_summary(scheduler)))
        outbox.flush(metrics=True)


def main() -> None:
    conn = Connection(int(sys.argv[1]))
    os.dup2(2, 1)  # prints go to the server log (stderr), as the stub's do
    try:
        serve_engine(conn)
    except BaseException:  # noqa: BLE001  (whatever it was: print it for the server log, then exit non-zero)
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    sys.stderr.flush()
    os._exit(0)  # no teardown: the stub waits for this exit, and a CUDA context's teardown takes seconds


# ---- the stub's side ------------------------------------------------------------------------------------------------

@dataclass(eq=False)
class _Remote:
    """A request the engine process runs, as the stub knows it."""
    sink: _Sink
    rows: list[GenerationRequest]
    tokens: list[np.ndarray] = field(default_factory=list)  # streams: each row's tokens so far
    lengths: list[int] = field(default_factory=list)
    fresh: bool = False  # tokens came since the last response
    latest: list[RowOutput] | None = None  # beams or log-probs: the newest whole outputs not yet sent
    updates: int = 0
    last_poll: float = 0.0
    cancel_sent: bool = False

    def extend(self, row: int, start: int, new: np.ndarray) -> None:
        if not self.tokens:
            self.tokens = [np.empty(len(spec.input_ids) + spec.output_len, dtype=np.int64) for spec in self.rows]
            for buffer, spec in zip(self.tokens, self.rows):
                buffer[:len(spec.input_ids)] = spec.input_ids
            self.lengths = [len(spec.input_ids) for spec in self.rows]
        self.tokens[row][start:start + len(new)] = new
        self.lengths[row] = start + len(new)
        self.fresh = True

    def take(self) -> list[RowOutput] | None:
        """The outputs for the next response (None: nothing new)."""
        if self.latest is not None:
            outputs, self.latest = self.latest, None
            return outputs
        if not self.fresh:
            return None
        self.fresh = False
        return [RowOutput(prompt_len=len(spec.input_ids), beams=[buffer[:length]])
                for spec, buffer, length in zip(self.rows, self.tokens, self.lengths)]


class EngineProcess:
    """The stub's handle on the engine process: InflightScheduler's submit/stop, with responses sent from a receiver
    thread here (the stub's only sender)."""

    def __init__(self, settings: CoreSettings, device: str, *, log_info: Callable[[str], None],
                 log_verbose: Callable[[str], None], on_exit: Callable[[str], None] | None = None) -> None:
        from .tensor_parallel import start_module

        self.log_info, self.log_verbose, self.on_exit = log_info, log_verbose, on_exit
        # The receiver and Triton's execute threads share this stub's GIL: at Python's default 5 ms switch interval a
        # request's parsing could wait that long per hand-over behind a busy receiver.
        shorten_gil_switch_interval()
        self.metrics: EngineMetrics | None = None
        ours, theirs = socket.socketpair()
        self.process = start_module("engine_process", str(theirs.fileno()), pass_fds=(theirs.fileno(),))
        theirs.close()
        self.conn = Connection(ours.detach())
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()
        self._live: dict[int, _Remote] = {}
        self._ids = itertools.count(1)
        self._stopped = threading.Event()
        self.summary = ""
        self.exit_reason: str | None = None
        # Triton's cancellation flags: within the sender's budget, asked as often as the receiver wakes.
        self._polls = PollBudget(MAX_CANCEL_POLLS_PER_S, every_s=0.0, burst_s=IDLE_WAKE_S)
        self._pending: dict[int, _Remote] = {}  # updates not sent yet, oldest first (the receiver thread's)
        self._send(("start", settings, device))
        self.limits, self.note = self._wait_ready()
        self._receiver = threading.Thread(target=self._receive, name="engine-receiver", daemon=True)
        self._receiver.start()

    def _send(self, message: tuple) -> None:
        with self._send_lock:
            self.conn.send(message)

    def _wait_ready(self) -> tuple[EngineLimits, str]:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.conn.poll(0.5):
                try:
                    message = self.conn.recv()
                except (EOFError, OSError):
                    break
                if message[0] == "ready":
                    return message[1], message[2]
                self.process.wait(STOP_TIMEOUT_S)
                raise EngineProcessError(f"the engine process failed to load the model:\n{message[1]}")
            if self.process.poll() is not None:
                break
        self.process.kill()
        status = self.process.wait()
        raise EngineProcessError(f"the engine process exited with status {status} while loading (its traceback "
                                 "is in the log above)" if status else "the engine process did not start in time")

    # -- InflightScheduler's interface ------------------------------------------------------------------------------
    def submit(self, rows: Sequence[GenerationRequest], sink: _Sink, *, stream: bool = False) -> None:
        check_rows(rows, self.limits)
        rid = next(self._ids)
        with self._lock:
            if self.exit_reason is not None or self._stopped.is_set():
                raise RuntimeError(self.exit_reason or "the engine process is stopping")
            self._live[rid] = _Remote(sink=sink, rows=list(rows))
        try:
            self._send(("submit", rid, list(rows), stream))
        except OSError as err:
            with self._lock:
                self._live.pop(rid, None)
            raise RuntimeError(f"the engine process is gone: {err}") from err

    def stop(self) -> str:
        """Stop the engine process; requests still running fail. Returns its scheduler's summary."""
        self._stopped.set()
        try:
            self._send(("stop",))
        except OSError:
            pass
        self._receiver.join(STOP_TIMEOUT_S)
        try:
            self.process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.conn.close()
        return self.summary or f"engine process: {self.exit_reason}"

    # -- the receiver thread ------------------------------------------------------------------------------------------
    def _receive(self) -> None:
        reason = "the engine process stopped"
        try:
            while self.summary == "":
                # Wait for events only when no update is pending; take everything that arrived, send what is urgent
                # (finals, first responses), then one pending update, the one that waited longest: an update that
                # queues meanwhile merges into it (one response, its newest tokens).
                if self.conn.poll(0 if self._pending else IDLE_WAKE_S):
                    events: list[tuple] = []
                    while len(events) < 4096 and self.conn.poll(0):
                        events += self.conn.recv()
                    self._handle(events)
                if self._pending:
                    remote = self._pending.pop(next(iter(self._pending)))
                    self._send_update(remote)
                self._poll_cancellations()
        except (EOFError, OSError):
            status = self.process.wait()
            reason = f"the engine process exited with status {status} (its traceback is in the log above)"
        except Exception as err:  # noqa: BLE001  (no request may wait forever)
            reason = f"the engine process's receiver failed: {err}"
        with self._lock:
            if self.summary == "":
                self.exit_reason = reason
            live, self._live = list(self._live.values()), {}
        for remote in live:
            remote.sink.fail(RuntimeError(reason))
        if self.summary == "" and not self._stopped.is_set() and self.on_exit is not None:
            self.on_exit(reason)

    def _handle(self, events: list[tuple]) -> None:
        """Apply a batch of events: finals, failures and first responses are sent now; other updates wait in
        `_pending` (oldest first). Log lines go last: each is a round trip to the server (even a verbose line the
        server drops), and an admission's line travels with its first token (0.4 ms of a first response on the CPU
        machine when it went first)."""
        logs = [event for event in events if event[0] == "log"]
        for event in events:
            kind = event[0]
            if kind == "tokens":
                _, keys, rows, starts, counts, flat = event
                ends = np.cumsum(counts)
                for rid, row, start, end, count in zip(keys.tolist(), rows.tolist(), starts.tolist(), ends.tolist(),
                                                       counts.tolist()):
                    remote = self._live.get(rid)
                    if remote is not None:
                        remote.extend(row, start, flat[end - count:end])
                        self._updated(rid, remote)
            elif kind == "update":
                remote = self._live.get(event[1])
                if remote is not None:
                    remote.latest = event[2]
                    self._updated(event[1], remote)
            elif kind in ("finish", "fail", "reject"):
                with self._lock:
                    remote = self._live.pop(event[1], None)
                self._pending.pop(event[1], None)
                if remote is None:
                    continue
                if kind == "finish":
                    remote.sink.finish(event[2])
                elif kind == "fail":
                    remote.sink.fail(RuntimeError(event[2]))
                else:
                    remote.sink.reject(event[2])
            elif kind == "metrics":
                if self.metrics is not None:
                    self.metrics.merge(event[1])
            elif kind == "stopped":
                self.summary = event[1]
        for _, verbose, text in logs:
            (self.log_verbose if verbose else self.log_info)(text)

    def _updated(self, rid: int, remote: _Remote) -> None:
        if remote.updates == 0:
            self._send_update(remote)
        elif rid not in self._pending:
            self._pending[rid] = remote

    @staticmethod
    def _send_update(remote: _Remote) -> None:
        outputs = remote.take()
        if outputs is not None:
            remote.sink.update(outputs)
            remote.updates += 1

    def _poll_cancellations(self) -> None:
        with self._lock:
            live = [item for item in self._live.items() if not item[1].cancel_sent]
        now, chosen = self._polls.take(live, lambda item: item[1].last_poll)
        for rid, remote in chosen:
            remote.last_poll = now
            if poll_cancelled(remote.sink):
                remote.cancel_sent = True
                self._send(("cancel", rid))


if __name__ == "__main__":
    main()
