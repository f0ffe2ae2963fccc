"""Batch-1 first token through the in-flight scheduler alone (no Triton), two engines (KV slots 8 and 256, fp8 KV)
in one process, alternated: submit -> first update."""
import statistics, sys, threading, time
from pathlib import Path
import numpy as np, torch
sys.path.insert(0, str(Path.cwd()))
from bench.engine_cpu import random_weights
from builder.checkpoints.presets import PRESETS
from builder.runtime.core_io import GenerationRequest
from builder.runtime.generation import GptEngine
from builder.runtime.scheduler import InflightScheduler

config = PRESETS["gpt3-1.3b"]
weights = random_weights(config)
engines = {}
for slots in (8, 256):
    t = time.perf_counter()
    engines[slots] = GptEngine(config, weights, device="cuda", dtype=torch.float16, max_batch_size=slots,
                               max_seq_len=2048, vocab_limit=50257, kv_cache_dtype="fp8")
    print(slots, engines[slots].capture_graphs(), f"{time.perf_counter() - t:.1f} s", flush=True)

class Sink:
    def __init__(self): self.first = None; self.done = threading.Event()
    def update(self, outputs):
        if self.first is None: self.first = time.perf_counter()
    def finish(self, outputs):
        if self.first is None: self.first = time.perf_counter()
        self.done.set()
    def fail(self, error): print("fail", error); self.done.set()
    def is_cancelled(self): return False

rng = np.random.default_rng(0)
def one(sched, n=512, new=4):
    sink = Sink()
    row = GenerationRequest(input_ids=rng.integers(100, 50000, n), output_len=new, end_id=50256, min_length=new)
    t0 = time.perf_counter()
    sched.submit([row], sink, stream=True)
    sink.done.wait(5)
    return (sink.first - t0) * 1e3

scheds = {slots: InflightScheduler(engine).start() for slots, engine in engines.items()}
for n in (512, 128):
    times = {slots: [] for slots in scheds}
    for rep in range(-5, 60):
        for slots, sched in scheds.items():
            value = one(sched, n)
            if rep >= 0: times[slots].append(value)
    for slots, values in times.items():
        print(f"slots {slots} prompt {n}: submit -> first update p50 {statistics.median(values):.3f} ms, "
              f"min {min(values):.3f}", flush=True)
for sched in scheds.values():
    sched.stop()
