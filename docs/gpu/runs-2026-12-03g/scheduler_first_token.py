"""Batch-1 first token through the in-flight scheduler alone (no Triton): host submit -> first update, and the device's
kernels from the prefill graph's last GEMM to the first token's readback."""
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
engine = GptEngine(config, random_weights(config), device="cuda", dtype=torch.float16, max_batch_size=8,
                   max_seq_len=2048, vocab_limit=50257)
print(engine.capture_graphs(), flush=True)

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
def one(n=512, new=4):
    sink = Sink()
    row = GenerationRequest(input_ids=rng.integers(100, 50000, n), output_len=new, end_id=50256, min_length=new)
    t0 = time.perf_counter()
    sched.submit([row], sink, stream=True)
    sink.done.wait(5)
    return (sink.first - t0) * 1e3

with InflightScheduler(engine) as sched:
    for n in (512, 128):
        for _ in range(5): one(n)
        times = []
        for _ in range(40):
            time.sleep(0.02); times.append(one(n))
        print(f"prompt {n}: submit -> first update p50 {statistics.median(times):.3f} ms, min {min(times):.3f}", flush=True)
    from torch.profiler import profile, ProfilerActivity
    time.sleep(0.02)
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        one(512, 2)
    torch.cuda.synchronize()
events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
events.sort(key=lambda e: e.time_range.start)
t0 = events[0].time_range.start
big = [i for i, e in enumerate(events) if e.time_range.end - e.time_range.start > 40]  # the prefill's GEMMs etc.
last = max(i for i, e in enumerate(events) if "nvjet" in e.name and i < len(events) - 1 and (e.time_range.end - e.time_range.start) > 8) if big else 0
print(f"{len(events)} device events; first at 0; showing from the prefill's last large kernels")
start = max(0, last - 6)
for e in events[start:start + 80]:
    print(f"{(e.time_range.start - t0) / 1e3:8.3f} ms  {(e.time_range.end - e.time_range.start):7.1f} us  {e.name[:110]}")
