"""The in-flight scheduler without Triton: 64 closed-loop "clients" (128-token prompts, 128 new tokens) on the
1.3B shape (random fp16 weights). Separates the scheduler/engine's own throughput from Triton's request path.

    python bench/inflight_engine.py --clients 64 --seconds 15
    python bench/inflight_engine.py --clients 64 256 --seconds 6 --profile   # + where the loop's host time goes
    python bench/inflight_engine.py --clients 64 --seconds 8 --mixed --profile  # the mixed workload's entries

--profile records 2 s of the steady state with torch.profiler (CPU ops and CUDA kernels): the share of wall time the
GPU was busy, and the host-side ops that took the most CPU time. --stream makes every client a streaming one (its
updates are counted, as a sink that sends nothing would). --mixed gives the clients serving_bench.py's mixed workload
(its seeded entries: prompts uniform 16-1024 tokens, outputs 16-512; client i takes entries i, i + clients, ...).
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.engine_cpu import random_weights
from builder.checkpoints.presets import PRESETS
from builder.runtime.core_io import GenerationRequest, RowOutput
from builder.runtime.generation import GptEngine
from builder.runtime.scheduler import STEP_PROMPT_TOKENS, InflightScheduler


class LoopingClient:
    """A ResponseSink that resubmits a new request as soon as its previous one finishes (closed loop)."""

    def __init__(self, index: int, scheduler: InflightScheduler, lengths: list[tuple[int, int]],
                 stop_at: float) -> None:
        """lengths: the (prompt tokens, new tokens) of its requests, in turn."""
        self.index, self.scheduler, self.stop_at = index, scheduler, stop_at
        self.lengths = lengths
        self.new_tokens = 0  # of the request in flight
        self.submitted_at = 0.0
        self.first_token_ms: list[float] = []  # per streamed request after the client's first (the opening wave)
        self.waiting_first = False
        self.completed = 0
        self.tokens = 0
        self.updates = 0
        self.finished_at = 0.0  # perf_counter of its last finish
        self.stream = False
        self.idle = threading.Event()

    def submit(self) -> None:
        prompt_len, self.new_tokens = self.lengths[self.completed % len(self.lengths)]
        prompt = tuple(100 + (self.index * 7 + self.completed * 13 + i) % 50000 for i in range(prompt_len))
        row = GenerationRequest(input_ids=prompt, output_len=self.new_tokens, end_id=50256,
                                min_length=self.new_tokens)
        self.submitted_at, self.waiting_first = time.perf_counter(), self.completed > 0
        self.scheduler.submit([row], self, stream=self.stream)

    def update(self, outputs: list[RowOutput]) -> None:
        self.updates += 1
        if self.waiting_first:
            self.first_token_ms.append((time.perf_counter() - self.submitted_at) * 1e3)
            self.waiting_first = False

    def finish(self, outputs: list[RowOutput]) -> None:
        self.completed += 1
        self.tokens += self.new_tokens
        self.finished_at = time.perf_counter()
        if time.perf_counter() < self.stop_at:
            self.submit()
        else:
            self.idle.set()

    def fail(self, error: Exception) -> None:
        print(f"client {self.index} failed: {error}", file=sys.stderr)
        self.idle.set()

    def is_cancelled(self) -> bool:
        return False


def sample_stacks(thread_name: str, seconds: float, interval_s: float = 0.0005) -> list[tuple[str, float]]:
    """A sampling profiler of one Python thread (the scheduler's loop): share of samples per innermost frame of our
    code (file:function:line), which places the host time, C calls included, at the Python line that made them."""
    thread = next(t for t in threading.enumerate() if t.name == thread_name)
    counts: collections.Counter[str] = collections.Counter()
    samples, deadline = 0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        frame = sys._current_frames().get(thread.ident or -1)
        # The innermost frame inside the project (torch/stdlib frames are attributed to the line that called them).
        while frame is not None and "/builder/" not in frame.f_code.co_filename:
            frame = frame.f_back
        if frame is not None:
            code = frame.f_code
            counts[f"{Path(code.co_filename).name}:{code.co_name}:{frame.f_lineno}"] += 1
        samples += 1
        time.sleep(interval_s)
    return [(where, n / samples) for where, n in counts.most_common(30)]


def profile_window(seconds: float) -> dict[str, object]:
    """torch.profiler over `seconds` of whatever the scheduler is doing (every thread where the profiler can): GPU
    busy share and the top host ops, with a stack sample of the scheduler's thread over the same window (both add
    overhead: a profiled level's tokens/s is lower than an unprofiled one's). The tables print after the window."""
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    try:
        config = torch.profiler._ExperimentalConfig(profile_all_threads=True)
    except TypeError:  # older torch: the profiling thread only (GPU kernels are recorded from every thread)
        config = None
    sampled: list[list[tuple[str, float]]] = []
    sampler = threading.Thread(target=lambda: sampled.append(sample_stacks("inflight-scheduler", seconds)))
    start = time.perf_counter()
    with torch.profiler.profile(activities=activities, experimental_config=config) as prof:
        sampler.start()
        sampler.join()
    wall_us = (time.perf_counter() - start) * 1e6
    events = prof.key_averages()
    # Kernels of several streams can overlap, so this can exceed 1: an upper bound of the busy share.
    gpu_us = sum(e.self_device_time_total for e in events)
    print(events.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60), flush=True)
    print(events.table(sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=60), flush=True)
    stacks = sampled[0] if sampled else []
    for where, share in stacks:
        print(f"scheduler thread {share:6.1%}  {where}", flush=True)
    return {"profile_seconds": seconds, "gpu_busy_share": gpu_us / wall_us, "scheduler_thread_samples": stacks}


def run_level(engine: GptEngine, clients_count: int, seconds: float, gather_steps: int, stream: bool,
              profile: bool, entries: list[tuple[int, int]],
              step_tokens: int = STEP_PROMPT_TOKENS) -> dict[str, object]:
    """entries: the (prompt tokens, new tokens) the clients take in turn. Streamed, the result has the time to the
    first token (submit -> first update) of every request but each client's first."""
    def own(i: int) -> list[tuple[int, int]]:
        return entries[i::clients_count] or entries
    timelines: list[str] = []
    with InflightScheduler(engine, admit_gather_steps=gather_steps, report=timelines.append,
                           report_every_s=max(1.0, seconds / 2), step_prompt_tokens=step_tokens) as scheduler:
        warm = [LoopingClient(i, scheduler, own(i), 0.0) for i in range(clients_count)]
        for client in warm:
            client.submit()
        for client in warm:
            client.idle.wait()
        start = time.perf_counter()
        steps_before = scheduler.stats.steps
        clients = [LoopingClient(i, scheduler, own(i), start + seconds) for i in range(clients_count)]
        for client in clients:
            client.stream = stream
            client.submit()
        extra: dict[str, object] = {}
        if profile:
            time.sleep(min(1.0, seconds / 4))  # into the steady state
            extra = profile_window(min(2.0, seconds / 2))
        for client in clients:
            client.idle.wait()
        # Up to the last finish, not to now: printing a profile after the clients stopped is not their time.
        elapsed = max(client.finished_at for client in clients) - start
        steps = scheduler.stats.steps - steps_before
        tokens = sum(c.tokens for c in clients)
        firsts = [ms for c in clients for ms in c.first_token_ms]
        if firsts:
            extra["first_token_ms"] = {f"p{q}": float(np.percentile(firsts, q)) for q in (50, 90, 99)}
        return {"clients": clients_count, "stream": stream, "gather_steps": gather_steps, "step_tokens": step_tokens,
                "tokens_per_s": tokens / elapsed, "ms_per_step": elapsed / steps * 1000,
                "updates_per_token": sum(c.updates for c in clients) / max(1, tokens), **extra,
                "timeline": timelines, "stats": {k: v for k, v in vars(scheduler.stats).items() if k != "timeline"}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[64])
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--gather-steps", type=int, default=4)
    parser.add_argument("--stream", action="store_true", help="streaming requests (updates counted, not sent)")
    parser.add_argument("--profile", action="store_true", help="torch.profiler over 2 s of each level")
    parser.add_argument("--preset", default="gpt3-1.3b", help="model shape (tiny: a CPU smoke run)")
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--prompt", type=int, help="prompt tokens per request (default: 128, at most half the "
                                                   "preset's positions)")
    parser.add_argument("--new-tokens", type=int, help="new tokens per request (default: as --prompt's)")
    parser.add_argument("--step-tokens", type=int, nargs="+", default=[STEP_PROMPT_TOKENS],
                        help="the scheduler's prompt tokens per step (chunked prefill); each value a run per level")
    parser.add_argument("--mixed", action="store_true",
                        help="serving_bench.py's mixed workload instead of --prompt/--new-tokens (1.3B preset)")
    args = parser.parse_args()
    config = PRESETS[args.preset]
    if args.mixed:
        from bench.serving_bench import mixed_lengths

        entries = mixed_lengths(1024, (16, 1024), (16, 512), seed=0)
        max_seq = min(2048, config.max_pos_seq_len)
    else:
        max_seq = min(1024, config.max_pos_seq_len)
        args.prompt = args.prompt or min(128, max_seq // 2)
        args.new_tokens = args.new_tokens or min(128, max_seq // 2)
        entries = [(args.prompt, args.new_tokens)]
    if max(p + o for p, o in entries) > max_seq:
        parser.error(f"prompts + new tokens exceed the {max_seq} positions of preset {args.preset}")
    cuda = args.device.startswith("cuda")
    engine = GptEngine(config, random_weights(config), device=args.device,
                       dtype=torch.float16 if cuda else torch.float32,
                       max_batch_size=max(args.clients), max_seq_len=max_seq,
                       vocab_limit=min(50257, config.vocab_size))
    if cuda:  # every decode and prefill graph now, as a server does at load: no level waits for captures
        print(engine.capture_graphs(), flush=True)
    for clients in args.clients:
        for step_tokens in args.step_tokens:
            result = run_level(engine, clients, args.seconds, args.gather_steps, args.stream, args.profile, entries,
                               step_tokens)
            print(json.dumps(result, indent=2, default=str), flush=True)


if __name__ == "__main__":
    main()
