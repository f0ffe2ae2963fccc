"""Soak test: many concurrent clients against the served demo ensemble (torch engine, CPU), watching errors and memory.

Starts tritonserver itself on loopback (the demo repository, or --repository), runs --clients client threads for a
warm-up, snapshots the resident memory of tritonserver + its Python-backend stubs (from /proc), then runs the same load
for --minutes (or until --max-requests) and reports: errors, requests/s, generated tokens/s, latency percentiles, and
RSS at warm-up end and at the end (growth %, goal < --rss-goal-pct).

Clients alternate HTTP and gRPC (one `TextClient` per thread). Each request is drawn from a fixed pool of 64 requests
(counting prompts of 1-40 numbers, 1-24 new tokens; some with stop words, bad words, beams, seeded sampling, log
probs). Deterministic requests (greedy and beam search) must get the same answer every time, whatever they are batched
with: the first answer seen (during warm-up) is the oracle, and a different answer counts as an error ("mismatch").

  python bench/soak.py                        # 32 clients, 30 s warm-up, 5 minutes; writes docs/soak_results.json
  python bench/soak.py --minutes 0.5 --warmup-s 10 --output /tmp/soak.json   # smoke check
Exit status 1 when there were errors or the RSS growth reached the goal.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from builder.serve import TritonServer
from client import TextClient, TextClientError

PAGE_RSS_KEY = "VmRSS:"
POOL_SIZE = 64


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- the request pool ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SoakRequest:
    prompt: str
    max_tokens: int
    options: tuple[tuple[str, Any], ...] = ()  # sampling keyword arguments of TextClient.generate
    deterministic: bool = True  # greedy or beam search: the answer must never change


def request_pool(seed: int = 0) -> list[SoakRequest]:
    rng = random.Random(seed)
    pool = []
    for index in range(POOL_SIZE):
        start, length = rng.randint(1, 200), rng.randint(1, 40)
        prompt = " ".join(str(n) for n in range(start, start + length))
        max_tokens = rng.randint(1, 24)
        kind = index % 8
        if kind == 1:
            options: tuple[tuple[str, Any], ...] = (("stop_words", (str(start + length + 3),)),)
        elif kind == 2:
            options = (("bad_words", (f" {start + length + 1}",)),)
        elif kind == 3:
            options = (("beam_width", 2), ("return_log_probs", True))
        elif kind in (4, 5):
            options = (("top_k", 40), ("top_p", 0.9), ("temperature", 0.8), ("random_seed", index))
        else:
            options = ()
        deterministic = kind not in (4, 5)
        pool.append(SoakRequest(prompt, max_tokens, options, deterministic))
    return pool


# -- memory ----------------------------------------------------------------------------------------------------------
def rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(PAGE_RSS_KEY):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def server_rss(server: TritonServer) -> dict[str, int]:
    """Resident bytes of tritonserver and of each Python stub (by model instance), plus their total."""
    if server.process is None:
        return {"total": 0}
    usage = {"tritonserver": rss_bytes(server.process.pid)}
    for pid, instance in sorted(server.python_stubs().items(), key=lambda item: item[1]):
        usage[instance] = rss_bytes(pid)
    usage["total"] = sum(usage.values())
    return usage


# -- load ------------------------------------------------------------------------------------------------------------
@dataclass
class Tally:
    """What the client threads observed in one phase (guarded by `lock`)."""
    latencies_s: list[float] = field(default_factory=list)
    output_tokens: int = 0
    errors: Counter = field(default_factory=Counter)
    error_examples: dict[str, str] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def ok(self, latency_s: float, tokens: int) -> None:
        with self.lock:
            self.latencies_s.append(latency_s)
            self.output_tokens += tokens

    def error(self, kind: str, message: str) -> None:
        with self.lock:
            self.errors[kind] += 1
            self.error_examples.setdefault(kind, message[:300])

    @property
    def requests(self) -> int:
        return len(self.latencies_s) + sum(self.errors.values())


class Load:
    """`clients` threads sending pool requests until `stop` is set or the phase's request budget is spent."""

    def __init__(self, server: TritonServer, clients: int, pool: list[SoakRequest], seed: int):
        self.server = server
        self.clients = clients
        self.pool = pool
        self.seed = seed
        self.oracle: dict[int, str] = {}  # pool index -> first answer of a deterministic request
        self.oracle_lock = threading.Lock()

    def run(self, seconds: float, max_requests: int) -> tuple[Tally, float]:
        tally = Tally()
        stop = threading.Event()
        budget = threading.Semaphore(max_requests)
        threads = [threading.Thread(target=self._client, args=(i, tally, stop, budget), daemon=True)
                   for i in range(self.clients)]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        deadline = started + seconds
        while time.monotonic() < deadline and any(thread.is_alive() for thread in threads):
            time.sleep(0.2)
        stop.set()
        for thread in threads:
            thread.join(timeout=120)
        return tally, time.monotonic() - started

    def _client(self, index: int, tally: Tally, stop: threading.Event, budget: threading.Semaphore) -> None:
        protocol = "http" if index % 2 == 0 else "grpc"
        url = self.server.http_url if protocol == "http" else self.server.grpc_url
        rng = random.Random(self.seed * 1000 + index)
        with TextClient(url, protocol=protocol, timeout_s=120, retries=0) as client:
            while not stop.is_set() and budget.acquire(blocking=False):
                choice = rng.randrange(len(self.pool))
                request = self.pool[choice]
                started = time.monotonic()
                try:
                    result = client.generate(request.prompt, max_tokens=request.max_tokens, **dict(request.options))
                except TextClientError as err:
                    tally.error(type(err).__name__, str(err))
                    continue
                except Exception as err:  # noqa: BLE001  (a soak reports every failure, whatever its type)
                    tally.error(f"unexpected {type(err).__name__}", repr(err))
                    continue
                latency = time.monotonic() - started
                if request.deterministic and not self._matches_oracle(choice, result.text):
                    tally.error("mismatch", f"pool request {choice} ({request.prompt[:30]!r}...) answered "
                                            f"{result.text!r}, earlier {self.oracle[choice]!r}")
                    continue
                tally.ok(latency, result.num_output_tokens or 0)

    def _matches_oracle(self, choice: int, text: str) -> bool:
        with self.oracle_lock:
            return self.oracle.setdefault(choice, text) == text


def percentiles_ms(latencies_s: list[float]) -> dict[str, float]:
    if not latencies_s:
        return {}
    ordered = sorted(latencies_s)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 1)

    return {"p50": at(0.50), "p90": at(0.90), "p95": at(0.95), "p99": at(0.99), "max": round(ordered[-1] * 1000, 1),
            "mean": round(statistics.fmean(ordered) * 1000, 1)}


def phase_report(tally: Tally, seconds: float) -> dict[str, Any]:
    return {"seconds": round(seconds, 1), "requests": tally.requests, "ok": len(tally.latencies_s),
            "errors": sum(tally.errors.values()), "errors_by_kind": dict(tally.errors),
            "error_examples": tally.error_examples,
            "requests_per_s": round(len(tally.latencies_s) / seconds, 2) if seconds else 0.0,
            "output_tokens_per_s": round(tally.output_tokens / seconds, 1) if seconds else 0.0,
            "latency_ms": percentiles_ms(tally.latencies_s)}


# -- main ------------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=5.0, help="measured run length (after warm-up)")
    parser.add_argument("--warmup-s", type=float, default=30.0, help="unmeasured load before the first RSS sample")
    parser.add_argument("--clients", type=int, default=32, help="concurrent client threads")
    parser.add_argument("--max-requests", type=int, default=1_000_000, help="request budget of the measured run")
    parser.add_argument("--rss-goal-pct", type=float, default=10.0, help="RSS growth goal (warm-up end -> end)")
    parser.add_argument("--sample-s", type=float, default=15.0, help="RSS sampling interval during the run")
    parser.add_argument("--repository", type=Path, help="model repository (default: build the demo repository)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "soak_results.json")
    args = parser.parse_args(argv)
    for name in ("minutes", "warmup_s", "sample_s"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be > 0")
    if args.clients < 1 or args.max_requests < 1:
        parser.error("--clients and --max-requests must be >= 1")
    return args


def sample_rss(server: TritonServer, stop: threading.Event, interval_s: float, started: float,
               timeline: list[dict[str, Any]]) -> None:
    while not stop.wait(interval_s):
        timeline.append({"t_s": round(time.monotonic() - started, 1), "rss_mib": mib(server_rss(server)["total"])})


def mib(value: int) -> float:
    return round(value / 2**20, 1)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def stop_on_signal(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt  # so the server below is stopped, not orphaned

    signal.signal(signal.SIGTERM, stop_on_signal)
    with tempfile.TemporaryDirectory(prefix="soak-") as scratch:
        repository = args.repository
        if repository is None:
            from builder.demo import build_demo_repository  # torch-heavy
            log("building the demo repository ...")
            repository = build_demo_repository(Path(scratch) / "repository")
        log(f"starting tritonserver on {repository} (loopback) ...")
        with TritonServer.on_free_ports(repository, startup_timeout_s=300.0) as server:
            load = Load(server, args.clients, request_pool(args.seed), args.seed)
            log(f"warm-up: {args.clients} clients for {args.warmup_s:g} s")
            warm_tally, warm_s = load.run(args.warmup_s, args.max_requests)
            rss_warm = server_rss(server)
            load_warm = os.getloadavg()[0]
            log(f"warm-up: {warm_tally.requests} requests, {sum(warm_tally.errors.values())} errors; "
                f"RSS {mib(rss_warm['total'])} MiB")

            timeline: list[dict[str, Any]] = [{"t_s": 0.0, "rss_mib": mib(rss_warm["total"])}]
            sampler_stop = threading.Event()
            sampler = threading.Thread(target=sample_rss, daemon=True,
                                       args=(server, sampler_stop, args.sample_s, time.monotonic(), timeline))
            sampler.start()
            log(f"soak: {args.clients} clients for {args.minutes:g} min (at most {args.max_requests} requests)")
            tally, run_s = load.run(args.minutes * 60, args.max_requests)
            sampler_stop.set()
            rss_end = server_rss(server)
            load_end = os.getloadavg()[0]
            timeline.append({"t_s": round(run_s, 1), "rss_mib": mib(rss_end["total"])})
            alive = server.process is not None and server.process.poll() is None
            dead_stubs = server.dead_stubs()

    growth_pct = 100.0 * (rss_end["total"] - rss_warm["total"]) / rss_warm["total"] if rss_warm["total"] else 0.0
    run = phase_report(tally, run_s)
    report = {
        "command": " ".join(["python bench/soak.py", *(sys.argv[1:] if argv is None else argv)]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "host": {"platform": platform.platform(), "python": platform.python_version(),
                 "cpus": len(os.sched_getaffinity(0)),
                 "load_avg_1min": {"warm": round(load_warm, 2), "end": round(load_end, 2)}},  # shared machine?
        "config": {"clients": args.clients, "minutes": args.minutes, "warmup_s": args.warmup_s,
                   "max_requests": args.max_requests, "protocols": "clients alternate http / grpc",
                   "pool": f"{POOL_SIZE} requests, 1-40 prompt numbers, 1-24 new tokens", "seed": args.seed,
                   "repository": "demo (torch engine, CPU, fp32)" if args.repository is None else str(args.repository)},
        "warmup": phase_report(warm_tally, warm_s),
        "run": run,
        "rss": {"warm_mib": mib(rss_warm["total"]), "end_mib": mib(rss_end["total"]),
                "growth_pct": round(growth_pct, 2), "goal_pct": args.rss_goal_pct,
                "warm_by_process_mib": {k: mib(v) for k, v in rss_warm.items()},
                "end_by_process_mib": {k: mib(v) for k, v in rss_end.items()}, "timeline": timeline},
        "server_alive_at_end": alive,
        "dead_stubs": dead_stubs,
    }
    errors = run["errors"] + report["warmup"]["errors"]
    report["passed"] = errors == 0 and growth_pct < args.rss_goal_pct and alive and not dead_stubs
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    latency = run["latency_ms"]
    log(f"run: {run['requests']} requests in {run['seconds']} s, {run['errors']} errors, {run['requests_per_s']} "
        f"req/s, {run['output_tokens_per_s']} tokens/s, latency p50 {latency.get('p50')} ms p99 {latency.get('p99')} "
        f"ms; RSS {report['rss']['warm_mib']} -> {report['rss']['end_mib']} MiB ({growth_pct:+.2f} %, goal < "
        f"{args.rss_goal_pct:g} %); {'PASSED' if report['passed'] else 'FAILED'}; wrote {args.output}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
