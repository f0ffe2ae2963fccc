"""Postprocessing acknowledges each streamed response to the core model, so the core can tell an abandoned stream.

Why: Triton 2.51 gives a model inside an ensemble no signal when the client goes away. The HTTP frontend (request fini
hook) and gRPC cancel the ENSEMBLE request; core's ensemble_scheduler.cc (EnsembleContext::ScheduleSteps) then cancels
only the steps it schedules after that, and the dynamic batcher drops those cancelled requests before any model sees
them (scheduler_utils.cc, PolicyQueue::ApplyPolicy). The core model's own request, already running, is never cancelled,
so `is_cancelled()` stays false and its responses still "send" fine. What does stop is postprocessing: it runs once per
core response while the client listens, and never again once the ensemble request is cancelled or failed.

So every streamed core response carries `stream_ack` = (port, key): a UDP port on 127.0.0.1 where the core listens and
a random 63-bit key of that request. Postprocessing sends the keys of the requests it executes to that port. The core
treats a stream as abandoned when postprocessing acknowledged it before (so it runs behind an ensemble) but nothing
acknowledged any of its responses for `abandon_after_s` since the first unacknowledged one. A request called without
postprocessing (the core model directly) is never acknowledged and never judged abandoned; Triton cancels it itself.

Other local users can send datagrams to the port; the keys are unguessable, so they can neither cancel nor keep alive
someone else's stream, and unknown keys cost one dictionary lookup each.
"""

from __future__ import annotations

import logging
import secrets
import socket
import struct
import threading
import time
from collections.abc import Iterable

log = logging.getLogger(__name__)

ABANDON_AFTER_S = 1.0  # far above postprocessing's per-response latency, even queued behind 256 streams
KEY_FORMAT = "<Q"  # one datagram: a run of little-endian uint64 keys
MAX_DATAGRAM = 8 * 1024


class AckListener:
    """The core side: a receiver thread on an ephemeral loopback UDP port."""

    def __init__(self, abandon_after_s: float = ABANDON_AFTER_S) -> None:
        self.abandon_after_s = abandon_after_s
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._socket.bind(("127.0.0.1", 0))
        self.port: int = self._socket.getsockname()[1]
        self._lock = threading.Lock()
        self._acked: dict[int, bool] = {}  # key -> acknowledged since its first unacknowledged send
        self._ever_acked: set[int] = set()
        self._unacked_since: dict[int, float] = {}
        self._closed = False
        self._thread = threading.Thread(target=self._receive, name="stream-ack", daemon=True)
        self._thread.start()

    def new_key(self) -> int:
        key = secrets.randbits(63) or 1
        with self._lock:
            self._acked[key] = False
        return key

    def sent(self, key: int, now: float | None = None) -> None:
        """A response of `key` went out."""
        with self._lock:
            if key in self._acked and key not in self._unacked_since:
                self._unacked_since[key] = time.monotonic() if now is None else now

    def acknowledge(self, keys: Iterable[int]) -> None:
        with self._lock:
            for key in keys:
                if key in self._acked:
                    self._ever_acked.add(key)
                    self._unacked_since.pop(key, None)

    def acknowledged(self, key: int) -> bool:
        """Whether postprocessing acknowledged `key` at least once: its request runs behind the ensemble."""
        with self._lock:
            return key in self._ever_acked

    def abandoned(self, key: int, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        with self._lock:
            since = self._unacked_since.get(key)
            return key in self._ever_acked and since is not None and now - since > self.abandon_after_s

    def forget(self, key: int) -> None:
        with self._lock:
            self._acked.pop(key, None)
            self._ever_acked.discard(key)
            self._unacked_since.pop(key, None)

    def close(self) -> None:
        self._closed = True
        self._socket.close()

    def _receive(self) -> None:
        while not self._closed:
            try:
                data = self._socket.recv(MAX_DATAGRAM)
            except OSError:
                return
            count = len(data) // 8
            self.acknowledge(struct.unpack(f"<{count}Q", data[:count * 8]))


class AckSender:
    """The postprocessing side: one datagram per port with the keys of the requests in an execute() call."""

    def __init__(self) -> None:
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)

    def send(self, port_keys: Iterable[tuple[int, int]]) -> None:
        by_port: dict[int, list[int]] = {}
        for port, key in port_keys:
            if 0 < port < 65536 and 0 < key < 1 << 64:
                by_port.setdefault(int(port), []).append(int(key))
        for port, keys in by_port.items():
            for start in range(0, len(keys), MAX_DATAGRAM // 8):
                chunk = keys[start:start + MAX_DATAGRAM // 8]
                try:
                    self._socket.sendto(struct.pack(f"<{len(chunk)}Q", *chunk), ("127.0.0.1", port))
                except OSError as err:  # the core went away (unloading): nothing to keep alive
                    log.debug("stream ack to port %d failed: %s", port, err)
