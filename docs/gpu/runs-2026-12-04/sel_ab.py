"""The fused greedy selection on and off, two engines in one process (same weights, fp8 KV, 16 slots), through the
in-flight scheduler alone (no Triton), alternated: batch-1 first token (512-token prompt, submit -> first update),
batch-1 time per token (128 new tokens), 16 rows' step time; then the device's kernels of one fused step."""
import dataclasses, statistics, sys, threading, time
from pathlib import Path
import numpy as np, torch
sys.path.insert(0, str(Path.cwd()))
from bench.engine_cpu import random_weights
from builder.checkpoints.presets import PRESETS
from builder.runtime.core_io import GenerationRequest
from builder.runtime.generation import GptEngine
from builder.runtime.scheduler import InflightScheduler

DEV = "cuda" if torch.cuda.is_available() else "cpu"
config = PRESETS["gpt3-1.3b"] if DEV == "cuda" else PRESETS["tiny"]
weights = random_weights(config)
engines = {}
for fused in (True, False):
    engine = GptEngine(config, weights, device=DEV, dtype=torch.float16, max_batch_size=16, max_seq_len=2048,
                       vocab_limit=50257, kv_cache_dtype="fp8")
    engine.model.kernels = dataclasses.replace(engine.model.kernels, fused_select=fused)
    print("fused" if fused else "ops  ", engine.capture_graphs(), flush=True)
    engines[fused] = engine

class Sink:
    def __init__(self, n): self.times = []; self.done = threading.Event(); self.n = n; self.tokens = None
    def update(self, outputs): self.times.append(time.perf_counter())
    def finish(self, outputs):
        self.times.append(time.perf_counter()); self.tokens = [o.beams[0].tolist() for o in outputs]; self.done.set()
    def fail(self, error): print("fail", error); self.done.set()
    def is_cancelled(self): return False

rng = np.random.default_rng(0)
def run(sched, rows, n, new):
    sinks = []
    t0 = time.perf_counter()
    for _ in range(rows):
        sink = Sink(new)
        sched.submit([GenerationRequest(input_ids=rng.integers(100, 50000, n), output_len=new, end_id=50256,
                                        min_length=new)], sink, stream=True)
        sinks.append(sink)
    for sink in sinks: sink.done.wait(30)
    return t0, sinks

scheds = {fused: InflightScheduler(engine).start() for fused, engine in engines.items()}
results = {fused: {"ttft512": [], "ms_per_token_bs1": [], "ms_per_step_16": []} for fused in scheds}
for rep in range(-2, 10):
    for fused, sched in scheds.items():
        t0, (sink,) = run(sched, 1, 512, 4)
        ttft = (sink.times[0] - t0) * 1e3
        _, (sink,) = run(sched, 1, 128, 128)
        per_token = (sink.times[-2] - sink.times[0]) * 1e3 / (len(sink.times) - 2)
        t0, sinks = run(sched, 16, 128, 64)
        per_step = statistics.median((s.times[-2] - s.times[8]) * 1e3 / (len(s.times) - 10) for s in sinks)
        if rep >= 0:
            for key, value in (("ttft512", ttft), ("ms_per_token_bs1", per_token), ("ms_per_step_16", per_step)):
                results[fused][key].append(value)
for fused, values in results.items():
    print(("fused" if fused else "ops  "), {k: round(statistics.median(v), 4) for k, v in values.items()},
          {k + "_min": round(min(v), 4) for k, v in values.items()}, flush=True)
# Same greedy tokens either way (one prompt, 64 tokens).
prompt = rng.integers(100, 50000, 200)
outs = {}
for fused, sched in scheds.items():
    sink = Sink(64)
    sched.submit([GenerationRequest(input_ids=prompt, output_len=64, end_id=50256)], sink, stream=False)
    sink.done.wait(30); outs[fused] = sink.tokens
print("same tokens fused vs ops:", outs[True] == outs[False], flush=True)
from torch.profiler import profile, ProfilerActivity
with profile(activities=[ProfilerActivity.CUDA]) as prof:
    run(scheds[True], 1, 128, 3)
    torch.cuda.synchronize()
for sched in scheds.values(): sched.stop()
events = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA), key=lambda e: e.time_range.start)
t0 = events[0].time_range.start if events else 0
i = max((k for k, e in enumerate(events) if "_greedy_step_kernel" in e.name), default=0)
for e in events[max(0, i - 8): i + 6]:
    print(f"{(e.time_range.start - t0) / 1e3:8.3f} ms {(e.time_range.end - e.time_range.start):7.1f} us  {e.name[:100]}")
