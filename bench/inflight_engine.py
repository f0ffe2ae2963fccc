"""The in-flight scheduler without Triton: 64 closed-loop "clients" (128-token prompts, 128 new tokens) on the
1.3B shape (random fp16 weights). Separates the scheduler/engine's own throughput from Triton's request path.

    python bench/inflight_engine.py --clients 64 --seconds 15
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.engine_cpu import random_weights
from builder.checkpoints.presets import PRESETS
from builder.runtime.core_io import GenerationRequest, RowOutput
from builder.runtime.generation import GptEngine
from builder.runtime.scheduler import InflightScheduler


class LoopingClient:
    """A ResponseSink that resubmits a new request as soon as its previous one finishes (closed loop)."""

    def __init__(self, index: int, scheduler: InflightScheduler, prompt_len: int, new_tokens: int,
                 stop_at: float) -> None:
        self.index, self.scheduler, self.stop_at = index, scheduler, stop_at
        self.prompt = tuple(100 + (index * 7 + i) % 50000 for i in range(prompt_len))
        self.new_tokens = new_tokens
        self.completed = 0
        self.idle = threading.Event()

    def submit(self) -> None:
        row = GenerationRequest(input_ids=self.prompt, output_len=self.new_tokens, end_id=50256,
                                min_length=self.new_tokens)
        self.scheduler.submit([row], self, stream=False)

    def update(self, outputs: list[RowOutput]) -> None:
        pass

    def finish(self, outputs: list[RowOutput]) -> None:
        self.completed += 1
        if time.perf_counter() < self.stop_at:
            self.submit()
        else:
            self.idle.set()

    def fail(self, error: Exception) -> None:
        print(f"client {self.index} failed: {error}", file=sys.stderr)
        self.idle.set()

    def is_cancelled(self) -> bool:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--gather-steps", type=int, default=4)
    args = parser.parse_args()
    config = PRESETS["gpt3-1.3b"]
    engine = GptEngine(config, random_weights(config), device="cuda:0", dtype=torch.float16, max_batch_size=64,
                       max_seq_len=1024, vocab_limit=50257)
    with InflightScheduler(engine, admit_gather_steps=args.gather_steps) as scheduler:
        warm = [LoopingClient(i, scheduler, 128, 128, 0.0) for i in range(args.clients)]
        for client in warm:
            client.submit()
        for client in warm:
            client.idle.wait()
        start = time.perf_counter()
        steps_before = scheduler.stats.steps
        clients = [LoopingClient(i, scheduler, 128, 128, start + args.seconds) for i in range(args.clients)]
        for client in clients:
            client.submit()
        for client in clients:
            client.idle.wait()
        elapsed = time.perf_counter() - start
        steps = scheduler.stats.steps - steps_before
        result = {"clients": args.clients, "gather_steps": args.gather_steps,
                  "tokens_per_s": sum(c.completed for c in clients) * 128 / elapsed,
                  "ms_per_step": elapsed / steps * 1000, "stats": vars(scheduler.stats)}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
