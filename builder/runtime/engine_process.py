"""The in-flight engine in a process of its own, next to the Triton stub of a decoupled torch core.

Why: in the stub, the scheduler's loop shares one GIL with Triton's execute thread (parsing requests) and the sender
thread (building and sending responses). Every torch call releases the GIL and must take it back, and a thread that
waits for it gets it only when the holder blocks or its switch interval (scheduler.GIL_SWITCH_INTERVAL_S) runs out;
through Triton, an admission pass (~50 small torch calls) took 7.6 ms of the loop's time at 64 streams against 1.4 ms
with the scheduler alone on the same H200 (docs/benchmarks.md). Here a child process owns the engine, the loop and a
thread that forwards token deltas; the stub keeps parsing, responses and cancellation polls.

The two processes talk over a socket pair private to them (no path another local user could open), as pickled
messages framed by multiprocessing.connection.Connection:
  stub -> engine: ("start", settings, device) once; then ("submit", rid, rows, stream) | ("cancel", rid) | ("stop",)
  engine -> stub: ("ready", limits, note) or ("failed", text) once; then lists of events:
    ("update", rid, payload) | ("finish", rid, outputs) | ("fail", rid, text) | ("reject", rid, text)
    | ("log", verbose, text) | ("metrics", PendingMetrics) | ("stopped", summary)
An update's payload is, for single-beam rows without log-probs, each row's new tokens since the previous update
(("delta", [(start, tokens), ...])); otherwise the rows' whole outputs (("full", outputs)).
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
from .scheduler import MAX_CANCEL_POLLS_PER_S, PollBudget, check_rows, poll_cancelled

if TYPE_CHECKING:
    from .core_adapter import CoreSettings, _Sink
    from .metrics import EngineMetrics

STARTUP_TIMEOUT_S = 900.0  # loading and capturing the graphs of a large model takes minutes
STOP_TIMEOUT_S = 30.0
IDLE_WAKE_S = 0.02  # the stub's receiver wakes this often without events, to poll cancellations
METRICS_EVERY_S = 0.5


class EngineProcessError(RuntimeError):
    """The engine process failed to start or exited."""


# ---- the engine process ---------------------------------------------------------------------------------------------

class _Outbox:
    """Events of the engine process, sent in batches by one thread (the loop and the scheduler's sender only append);
    the scheduler's metrics go along at most every METRICS_EVERY_S."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.metrics = MetricsRecorder()
        self.events: list[tuple] = []
        self.cond = threading.Condition()
        self.closed = False

    def put(self, event: tuple) -> None:
        with self.cond:
            self.events.append(event)
            self.cond.notify()

    def run(self) -> None:
        metrics_due = time.monotonic()
        while True:
            with self.cond:
                if not (self.events or self.closed):
                    self.cond.wait(METRICS_EVERY_S)
                events, self.events = self.events, []
                closed = self.closed
            if closed or time.monotonic() >= metrics_due:
                metrics_due = time.monotonic() + METRICS_EVERY_S
                pending = self.metrics.take()
                if pending:
                    events.insert(0, ("metrics", pending))
            if events:
                self.conn.send_bytes(pickle.dumps(events, protocol=pickle.HIGHEST_PROTOCOL))
            if closed:
                return

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify()


class _ForwardSink:
    """scheduler.ResponseSink of one request in the engine process: its events go to the stub."""

    def __init__(self, rid: int, rows: Sequence[GenerationRequest], outbox: _Outbox, cancelled: set[int]) -> None:
        self.rid, self.outbox, self.cancelled = rid, outbox, cancelled
        self.deltas = all(row.beam_width == 1 and not row.return_log_probs for row in rows)
        self.sent = [len(row.input_ids) for row in rows]  # tokens of each row the stub has

    def update(self, outputs: list[RowOutput]) -> None:
        if self.deltas:
            payload: tuple = ("delta", [(sent, out.beams[0][sent:]) for out, sent in zip(outputs, self.sent)])
            self.sent = [len(out.beams[0]) for out in outputs]
        else:
            payload = ("full", outputs)
        self.outbox.put(("update", self.rid, payload))

    def finish(self, outputs: list[RowOutput]) -> None:
        self.outbox.put(("finish", self.rid, outputs))

    def fail(self, error: Exception) -> None:
        self.outbox.put(("fail", self.rid, str(error)))

    def is_cancelled(self) -> bool:
        return self.rid in self.cancelled


def serve_engine(conn: Connection) -> None:
    """The engine process: load, report ready, then run the stub's submissions until it says stop (or is gone)."""
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
                                          metrics=outbox.metrics)
    except BaseException:
        conn.send(("failed", traceback.format_exc()))
        raise
    conn.send(("ready", engine.limits, f"{settings.describe(engine, device)}; {note}"))
    threading.Thread(target=outbox.run, name="engine-outbox", daemon=True).start()
    cancelled: set[int] = set()
    try:
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):  # the stub is gone
                break
            if message[0] == "submit":
                _, rid, rows, stream = message
                try:
                    scheduler.submit(rows, _ForwardSink(rid, rows, outbox, cancelled), stream=stream)
                except (RequestError, ResourceError, RuntimeError) as err:
                    outbox.put(("reject", rid, str(err)))
            elif message[0] == "cancel":
                cancelled.add(message[1])
            elif message[0] == "stop":
                break
    finally:
        scheduler.stop()
        outbox.put(("stopped", scheduler_summary(scheduler)))
        outbox.close()


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
    tokens: list[np.ndarray] = field(default_factory=list)  # delta updates: each row's tokens so far
    lengths: list[int] = field(default_factory=list)
    latest: list[RowOutput] | None = None  # the newest outputs not yet sent
    updates: int = 0
    last_poll: float = 0.0
    cancel_sent: bool = False

    def apply(self, payload: tuple) -> None:
        kind, data = payload
        if kind == "full":
            self.latest = data
            return
        if not self.tokens:
            self.tokens = [np.empty(len(row.input_ids) + row.output_len, dtype=np.int64) for row in self.rows]
            for buffer, row in zip(self.tokens, self.rows):
                buffer[:len(row.input_ids)] = row.input_ids
            self.lengths = [len(row.input_ids) for row in self.rows]
        for i, (start, new) in enumerate(data):
            self.tokens[i][start:start + len(new)] = new
            self.lengths[i] = start + len(new)
        self.latest = [RowOutput(prompt_len=len(row.input_ids), beams=[buffer[:length]])
                       for row, buffer, length in zip(self.rows, self.tokens, self.lengths)]


class EngineProcess:
    """The stub's handle on the engine process: InflightScheduler's submit/stop, with responses sent from a receiver
    thread here (the stub's only sender)."""

    def __init__(self, settings: CoreSettings, device: str, *, log_info: Callable[[str], None],
                 log_verbose: Callable[[str], None], on_exit: Callable[[str], None] | None = None) -> None:
        from .tensor_parallel import start_module

        self.log_info, self.log_verbose, self.on_exit = log_info, log_verbose, on_exit
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
        `_pending` (oldest first)."""
        for event in events:
            kind = event[0]
            if kind == "update":
                remote = self._live.get(event[1])
                if remote is not None:
                    remote.apply(event[2])
                    if remote.updates == 0:
                        self._send_update(remote)
                    elif event[1] not in self._pending:
                        self._pending[event[1]] = remote
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
            elif kind == "log":
                (self.log_verbose if event[1] else self.log_info)(event[2])
            elif kind == "metrics":
                if self.metrics is not None:
                    self.metrics.merge(event[1])
            elif kind == "stopped":
                self.summary = event[1]

    @staticmethod
    def _send_update(remote: _Remote) -> None:
        outputs, remote.latest = remote.latest, None
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
