"""Failover of local replicas: two `serve` processes on the CPU demo behind HAProxy, one SIGKILLed under load.

Starts `builder.deploy.local.LocalReplicas` (N replicas of `python -m builder serve` + HAProxy health-checking
/v2/health/ready, everything on 127.0.0.1) with its supervisor restarting exited replicas, runs --clients threads of
the project's `TextClient` (HTTP, retries on connection failures) for --duration seconds, and at --kill-at SIGKILLs
replica r0 (serve, tritonserver and its stubs at once, as a crash would). Every answer is checked against the demo
model's counting ("5 6 7 8" continues " 9 10 11 ..."). Reports: requests, failures (any exception or wrong text),
HAProxy's per-replica counts (before the kill, at rejoin, at the end), its retries and redispatches, the client's
retries, and how long r0 was out.

  python bench/failover.py                  # 60 s, 6 clients; writes docs/failover_results.json
  python bench/failover.py --duration 20 --output /tmp/failover.json
Exit status 1 when a request failed or r0 did not serve again after its restart.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from builder.deploy.local import LocalReplicas
from client import TextClient

MAX_TOKENS = 8
PROMPT_NUMBERS = 4
FIRST_NUMBERS = range(1, 25)  # prompts "k k+1 k+2 k+3", all inside what the demo model learned to count


def prompt_and_expected(start: int) -> tuple[str, str]:
    numbers = list(range(start, start + PROMPT_NUMBERS + MAX_TOKENS))
    return (" ".join(map(str, numbers[:PROMPT_NUMBERS])),
            "".join(f" {n}" for n in numbers[PROMPT_NUMBERS:]))


class RetryCounter(logging.Handler):
    """Counts the client's retries (it logs one warning per retried connection failure)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0
        self.lock = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        if "retrying" in record.getMessage():
            with self.lock:
                self.count += 1


@dataclass
class Load:
    url: str
    deadline: float
    lock: threading.Lock = field(default_factory=threading.Lock)
    ok: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)

    def client(self, index: int) -> None:
        with TextClient(self.url, timeout_s=30, retries=5, backoff_s=0.2) as text_client:
            i = index
            while time.monotonic() < self.deadline:
                prompt, expected = prompt_and_expected(FIRST_NUMBERS[i % len(FIRST_NUMBERS)])
                i += 7
                start = time.monotonic()
                try:
                    text = text_client.generate(prompt, max_tokens=MAX_TOKENS).text
                    error = None if text == expected else f"wrong text for {prompt!r}: {text!r} != {expected!r}"
                except Exception as err:  # noqa: BLE001  (every failure counts, whatever its type)
                    error = f"{type(err).__name__}: {err}"
                with self.lock:
                    if error is None:
                        self.ok += 1
                        self.latencies.append(time.monotonic() - start)
                    else:
                        self.failed += 1
                        if len(self.errors) < 20:
                            self.errors.append(error)


def counts(stats: dict[str, dict[str, str]]) -> dict[str, dict[str, Any]]:
    return {name: {"status": row["status"], "requests_2xx": int(row["hrsp_2xx"] or 0),
                   "requests_sent": int(row["stot"] or 0), "checks_down": int(row["chkdown"] or 0)}
            for name, row in stats.items()}


def kill_core_stub(cluster: LocalReplicas) -> None:
    """SIGKILL the Python stub of r0's core model (gpt3_1.3b_0_0): tritonserver stays up and keeps saying ready."""
    server = cluster.replicas[0].find_server()
    assert server is not None
    for child in Path(f"/proc/{server}/task").glob("*/children"):
        for pid in child.read_text().split():
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if argv[0].endswith(b"triton_python_backend_stub") and b"gpt3_1.3b_0_0" in argv:
                os.kill(int(pid), signal.SIGKILL)
                return
    raise RuntimeError("r0 has no stub for gpt3_1.3b_0_0")


def run_failover(repository: Path, duration_s: float = 60.0, clients: int = 6, kill_at_s: float = 15.0,
                 replicas: int = 2, kill: str = "replica", after_rejoin_s: float = 5.0,
                 max_extra_s: float = 60.0) -> dict[str, Any]:
    """Run the load, kill r0 (the whole replica, or only its core model's stub) at `kill_at_s`, let the supervisor
    restart it; return the counts.

    The load lasts `duration_s`, longer if needed (by at most `max_extra_s`) so that it still runs `after_rejoin_s`
    after r0 is back: on a busy machine a restart can take longer than the planned load."""
    if not 0 < kill_at_s < duration_s:
        raise ValueError(f"kill_at_s must be in (0, {duration_s}), got {kill_at_s}")
    retries = RetryCounter()
    logging.getLogger("client").addHandler(retries)
    started = time.monotonic()
    cluster = LocalReplicas(repository, replicas=replicas, check_interval_ms=500).start()
    startup_s = time.monotonic() - started
    stop = threading.Event()
    supervisor = threading.Thread(target=cluster.supervise, args=(stop, 0.2), daemon=True)
    supervisor.start()
    timeline: list[tuple[float, str]] = []
    try:
        t0 = time.monotonic()
        load = Load(cluster.url, deadline=t0 + duration_s)
        threads = [threading.Thread(target=load.client, args=(i,), daemon=True) for i in range(clients)]
        for thread in threads:
            thread.start()
        time.sleep(kill_at_s)
        before = counts(cluster.server_stats())
        if kill == "stub":
            kill_core_stub(cluster)
        else:
            cluster.kill(0)
        killed_at = time.monotonic() - t0
        at_rejoin: dict[str, dict[str, Any]] | None = None
        rejoined_at = None
        last = "UP"
        hard_deadline = load.deadline + max_extra_s
        while time.monotonic() < load.deadline:
            now = counts(cluster.server_stats())
            status = now["r0"]["status"]
            if status != last:
                timeline.append((round(time.monotonic() - t0, 2), status))
                last = status
            if at_rejoin is None and status == "UP" and any(s != "UP" for _, s in timeline):
                at_rejoin, rejoined_at = now, time.monotonic() - t0
            wanted = t0 + rejoined_at + after_rejoin_s if rejoined_at is not None else time.monotonic() + 1
            load.deadline = max(load.deadline, min(wanted, hard_deadline))
            time.sleep(0.1)
        for thread in threads:
            thread.join(timeout=60)
        end = counts(cluster.server_stats())
        backend = cluster.backend_stats()
        result: dict[str, Any] = {
            "replicas": replicas, "clients": clients, "duration_s": round(load.deadline - t0, 2),
            "planned_duration_s": duration_s,
            "killed": "r0 (SIGKILL)" if kill == "replica" else "r0's core-model stub (SIGKILL)",
            "kill_at_s": round(killed_at, 2), "rejoined_at_s": None if rejoined_at is None else round(rejoined_at, 2),
            "r0_status_timeline": timeline, "startup_s": round(startup_s, 2),
            "requests_ok": load.ok, "requests_failed": load.failed, "errors": load.errors,
            "latency_p50_ms": (round(1000 * sorted(load.latencies)[len(load.latencies) // 2], 1)
                               if load.latencies else None),
            "latency_max_ms": round(1000 * max(load.latencies), 1) if load.latencies else None,
            "per_replica_before_kill": before, "per_replica_at_rejoin": at_rejoin, "per_replica_end": end,
            "r0_requests_after_rejoin": (end["r0"]["requests_2xx"] - at_rejoin["r0"]["requests_2xx"]
                                         if at_rejoin else 0),
            "haproxy_retries": int(backend["wretr"] or 0), "haproxy_redispatches": int(backend["wredis"] or 0),
            "client_retries": retries.count,
            "replica_restarts": {r.name: r.starts - 1 for r in cluster.replicas},
            "replica_exit_codes": {r.name: r.exits for r in cluster.replicas},
        }
        threads_alive = sum(thread.is_alive() for thread in threads)
        if threads_alive:
            result["errors"].append(f"{threads_alive} client threads still running 60 s after the deadline")
        return result
    finally:
        stop.set()
        supervisor.join(timeout=10)
        cluster.stop()
        cluster.cleanup()
        logging.getLogger("client").removeHandler(retries)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", type=Path, help="Rendered repository (default: the demo, rendered now).")
    parser.add_argument("--duration", type=float, default=60.0, help="Seconds of load.")
    parser.add_argument("--kill-at", type=float, default=15.0, help="Seconds into the load when r0 is killed.")
    parser.add_argument("--clients", type=int, default=6, help="Client threads.")
    parser.add_argument("--kill", choices=("replica", "stub"), default="replica",
                        help="What dies: the whole replica, or only the Python stub of its core model.")
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "failover_results.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="failover-") as folder:
        repository = args.repository
        if repository is None:
            from builder.demo import build_demo_repository

            repository = build_demo_repository(Path(folder) / "repository")
        result = run_failover(repository, duration_s=args.duration, clients=args.clients, kill_at_s=args.kill_at,
                              kill=args.kill)
    result["machine"] = f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    result["command"] = "python " + " ".join(sys.argv)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if not k.startswith("per_replica")}, indent=2))
    print(f"written: {args.output}")
    return 0 if result["requests_failed"] == 0 and result["r0_requests_after_rejoin"] > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
