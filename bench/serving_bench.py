"""Serving-path benchmark (issue 17): what a user of the streaming repository gets, measured with perf_analyzer.

Against a served `--streaming` repository (torch engine; built here from a random checkpoint preset, or
`--repository`), every run a perf_analyzer process over a gRPC stream (`--async --streaming`; the models are
decoupled) to bench-only copies of the ensemble and of the core that declare only the outputs they send (see
TEXT_OUTPUTS: perf_analyzer 2.51 breaks on the others), with input data of exact token lengths and
`min_tokens = max_tokens` so random weights cannot stop early:
  1. batch 1 (this process, gRPC, sequential): decode ms/token (slope of non-streamed latency over output length),
     time to the first streamed response of a 512-token prompt through the ensemble and calling the core model with
     token ids (-> ensemble overhead), the same overhead non-streamed with 1 new token; then the two first-response
     times again from perf_analyzer at concurrency 1 (the C++ client: these feed the goals; the Python client's
     medians stay in the JSON as `*_python_client`);
  2. sweep: streamed and not-streamed ensemble at each `--levels` concurrency (128-token prompts, 128 new tokens):
     output tok/s, latency, TTFT, inter-token latency, responses per request / per token;
  3. the core model alone (token ids), streamed, at `--core-levels`;
  4. mixed workload: 64 closed-loop clients over a seeded input-data file (prompts uniform 16-1024 tokens, outputs
     uniform 16-512, each entry its own max_tokens = min_tokens), not streamed and streamed.
perf_analyzer's and the server's CPU are sampled during every run (psutil; /proc where psutil is missing), and the
GPU's SM clock, power and temperature where nvidia-smi is (GpuSampler). Writes
--out (JSON), the same name with .md (goal / measured / met, every run) and .png (tok/s, TTFT and ITL vs
concurrency); raw perf_analyzer files go to --work/raw. The JSON is rewritten after every stage, so a run cut short
keeps what it measured; --merge adds to an existing JSON (run the stages in several commands).

GPU host (see docs/serving_benchmark.md):
  source scripts/gpu/setup.sh && python bench/serving_bench.py --out docs/gpu/serving.json
CPU check (tiny synthetic model, seconds):  python bench/serving_bench.py --device cpu --out /tmp/x/serving.json \
  --levels 1,4 --seconds 1 ...  (tests/test_serving_bench.py runs it).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import gpu_bench  # bench/gpu_bench.py: the gRPC batch-1 client and the weight preparation steps
import triton_trace  # bench/triton_trace.py: Triton's request trace read into the first response's steps
from builder.render import render_repository
from builder.render_config import RenderConfig
from builder.runtime.model_config import GptModelConfig
from builder.runtime.tokenizer import GptTokenizer
from builder.serve import ServerError, TritonServer
from client.perf import (DEFAULT_TOKENIZER_DIR, find_perf_analyzer, load_tokenizer, model_info,
                         parse_concurrency, perf_analyzer_env, perf_analyzer_version, token_length_prompts)
from client.perf_report import STABLE_WINDOWS, load_export, read_csv_row
from serving_report import (ENGINE_HISTOGRAMS, GOALS, bucket_quantiles, goal_rows, histogram_buckets, markdown, plot,
                            run_metrics)

log = gpu_bench.log


# The keys issue 17 asks for by name (docs/gpu/serving.json), besides the goals' keys.
HEADLINE_KEYS = ("gpu", "streamed_tokens_per_s_c64", "not_streamed_tokens_per_s_c64", "streamed_tokens_per_s_c256",
                 "mixed_tokens_per_s_c64", "mixed_ttft_p99_ms", "responses_per_token_c1",
                 "ttft_ms_prompt512_bs1_streamed", "ensemble_overhead_ms_bs1", "client_cpu_percent_max")


MAX_WINDOW_S = 60.0
# The engine process forwards its metrics every 0.5 s (engine_process.py), the stub hands them to Triton every 1 s
# (metrics.py): a run's last observations are in /metrics this long after it.
METRICS_FLUSH_S = 1.6
# --trace-rate: Triton writes its trace file every this many traces (a streamed request is one trace per response):
# the last few of a run may be read only after the next run, or never; the run's stable windows end before them.
TRACE_LOG_EVERY = 10


class BenchError(RuntimeError):
    """A setting that cannot work, or a run that failed; the message says which."""


# -- the GPU's clock and power -----------------------------------------------------------------------------------------
GPU_QUERY = "clocks.sm,power.draw,temperature.gpu"


class GpuSampler:
    """nvidia-smi's SM clock, power draw and temperature of the first visible GPU every 200 ms while a run lasts, into
    `path` (nothing without nvidia-smi). Why: two H200 hosts answered the same 512-token first token 0.4-0.8 ms apart
    while their 128-token ones agreed (docs/gpu/runs-2026-12-04), and nvidia-smi read before a run shows only the idle
    clock; a lower clock or a power cap under load now shows in each run's JSON."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> GpuSampler:
        binary = shutil.which("nvidia-smi")
        self.path.unlink(missing_ok=True)
        if binary is not None:
            gpu = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0] or "0"
            with open(self.path, "w") as out:
                self.process = subprocess.Popen([binary, f"--query-gpu={GPU_QUERY}", "--format=csv,noheader,nounits",
                                                 "-lms", "200", "-i", gpu], stdout=out, stderr=subprocess.DEVNULL)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def summary(self) -> dict[str, float] | None:
        return gpu_summary(self.path.read_text()) if self.path.is_file() else None


def gpu_summary(text: str) -> dict[str, float] | None:
    """nvidia-smi's CSV lines (clock MHz, power W, temperature C) -> the run's median and lowest clock, median power
    and highest temperature; lines it could not read ("[N/A]", a cut last line) are left out. None: no sample."""
    samples = []
    for line in text.splitlines():
        try:
            clock, power, temperature = (float(value) for value in line.split(","))
        except ValueError:
            continue
        samples.append((clock, power, temperature))
    if not samples:
        return None
    clocks, powers, temperatures = zip(*samples)
    return {"gpu_sm_clock_mhz_p50": statistics.median(clocks), "gpu_sm_clock_mhz_min": min(clocks),
            "gpu_power_w_p50": statistics.median(powers), "gpu_temperature_c_max": max(temperatures),
            "gpu_samples": len(samples)}


# -- CPU of the client and the server ----------------------------------------------------------------------------------
class CpuSampler:
    """Samples the CPU% (100 = one core) of a process and its children every `interval_s` in a thread.

    psutil where installed; else /proc/<pid>/stat (user + system ticks), which is all psutil reads on Linux."""

    def __init__(self, pid: int, interval_s: float = 0.5, children: bool = True) -> None:
        self.pid, self.interval_s, self.children = pid, interval_s, children
        self.samples: list[float] = []
        self.spans: list[tuple[int, int]] = []  # each sample's (start, end), wall-clock ns (perf_analyzer's clock)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> CpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def max(self) -> float | None:
        return max(self.samples) if self.samples else None

    @property
    def mean(self) -> float | None:
        return float(np.mean(self.samples)) if self.samples else None

    def max_within(self, start_ns: int, end_ns: int) -> float | None:
        """The largest sample taken wholly inside [start_ns, end_ns] (wall clock), None if none was."""
        inside = [cpu for cpu, (begun, ended) in zip(self.samples, self.spans) if start_ns <= begun and ended <= end_ns]
        return max(inside) if inside else None

    def _ticks(self) -> float | None:
        """CPU seconds of the process tree so far (None once the process is gone)."""
        try:
            import psutil

            root = psutil.Process(self.pid)
            total = 0.0
            for proc in [root, *(root.children(recursive=True) if self.children else [])]:
                try:
                    times = proc.cpu_times()
                    total += times.user + times.system
                except psutil.Error:
                    pass
            return total
        except ImportError:
            return self._proc_ticks()
        except Exception:  # noqa: BLE001  (psutil.NoSuchProcess: the run ended)
            return None

    def _proc_ticks(self) -> float | None:
        hz = os.sysconf("SC_CLK_TCK")
        pids, total = [self.pid], 0.0
        seen: set[int] = set()
        while pids:
            pid = pids.pop()
            if pid in seen:
                continue
            seen.add(pid)
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / hz  # utime, stime
                for task in Path(f"/proc/{pid}/task").iterdir() if self.children else ():
                    children = (task / "children").read_text().split()
                    pids += [int(child) for child in children]
            except (OSError, ValueError, IndexError):
                if pid == self.pid:
                    return None
        return total

    def _run(self) -> None:
        last, last_t, last_ns = self._ticks(), time.perf_counter(), time.time_ns()
        while not self._stop.wait(self.interval_s):
            now, now_t, now_ns = self._ticks(), time.perf_counter(), time.time_ns()
            if now is None or last is None:
                return
            self.samples.append(100.0 * (now - last) / (now_t - last_t))
            self.spans.append((last_ns, now_ns))
            last, last_t, last_ns = now, now_t, now_ns


# -- input data --------------------------------------------------------------------------------------------------------
def ensemble_entry(text: str, new_tokens: int, stream: bool, inputs: frozenset[str]) -> dict[str, Any]:
    entry: dict[str, Any] = {"text_input": [text], "max_tokens": [new_tokens], "min_tokens": [new_tokens]}
    if "stream" in inputs:
        entry["stream"] = [stream]
    if "exclude_input_in_output" in inputs:
        entry["exclude_input_in_output"] = [True]
    return entry


def core_entry(ids: list[int], new_tokens: int, stream: bool, inputs: frozenset[str]) -> dict[str, Any]:
    """The FT-contract core request; unlike client/perf.py's core_input_data it pins min_length (random weights)."""
    entry: dict[str, Any] = {"input_ids": {"content": ids, "shape": [len(ids)]},
                             "input_lengths": {"content": [len(ids)], "shape": [1]},
                             "request_output_len": {"content": [new_tokens], "shape": [1]},
                             "min_length": {"content": [new_tokens], "shape": [1]}}
    if "stream" in inputs:
        entry["stream"] = [stream]
    return entry


def mixed_lengths(entries: int, prompt_range: tuple[int, int], output_range: tuple[int, int],
                  seed: int) -> list[tuple[int, int]]:
    """(prompt tokens, output tokens) per entry, each uniform over its inclusive range."""
    rng = np.random.default_rng(seed)
    prompts = rng.integers(prompt_range[0], prompt_range[1] + 1, size=entries)
    outputs = rng.integers(output_range[0], output_range[1] + 1, size=entries)
    return [(int(p), int(o)) for p, o in zip(prompts, outputs)]


def prompts_of_lengths(tokenizer: Any, lengths: list[int], seed: int, pool: int = 32) -> list[tuple[str, list[int]]]:
    """A prompt of exactly each length: prefixes of `pool` longest prompts made of single-token words (a prefix of
    single-token words is again exactly that many tokens; checked by re-encoding all of them)."""
    longest = max(lengths)
    bases = token_length_prompts(tokenizer, longest, pool, seed)
    prompts = []
    for index, length in enumerate(lengths):
        ids = bases[index % pool][1][:length]
        prompts.append((tokenizer.decode(ids), ids))
    encoded = tokenizer.encode_batch([text for text, _ in prompts])
    for (_, ids), encoding in zip(prompts, encoded):
        if list(encoding.ids) != ids:
            raise BenchError(f"a prompt prefix of {len(ids)} tokens re-encodes to {len(encoding.ids)} tokens")
    return prompts


# -- perf_analyzer runs ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Runner:
    url: str
    raw: Path
    seconds: float
    stability: float
    max_trials: int
    server_pid: int | None
    max_threads: int | None = None  # perf_analyzer --max-threads (its default: 16 in concurrency mode)
    metrics_url: str | None = None  # Triton's /metrics: the engine's histograms before and after each run
    trace_folder: Path | None = None  # Triton's trace files (--trace-rate): the first response's steps per run
    core: str = ""  # the core model's name in the trace
    binary: Path = dataclasses.field(default_factory=find_perf_analyzer)
    env: dict[str, str] = dataclasses.field(default_factory=perf_analyzer_env)

    def run(self, name: str, model: str, concurrency: int, streamed: bool, data: dict[str, Any],
            seconds: float | None = None) -> dict[str, Any]:
        """One perf_analyzer run at one concurrency; returns the run's metrics as JSON. perf_analyzer writes nothing
        when its windows never agree within --stability-percentage: then it is retried once with windows twice as
        long; a second failure is recorded as {"name", "concurrency", "error"} and the benchmark goes on."""
        seconds = seconds or self.seconds
        try:
            return self._run_once(name, model, concurrency, streamed, data, seconds, self.max_trials)
        except BenchError as err:
            log(f"  {err}; retrying with {2 * seconds:g} s windows")
        try:
            return self._run_once(name, model, concurrency, streamed, data, 2 * seconds, self.max_trials + 2)
        except BenchError as err:
            log(f"  {err}")
            return {"name": name, "model": model, "concurrency": concurrency, "streamed": streamed,
                    "error": str(err)}

    def _run_once(self, name: str, model: str, concurrency: int, streamed: bool, data: dict[str, Any],
                  seconds: float, max_trials: int) -> dict[str, Any]:
        stem = f"{name}_c{concurrency}"  # whole names: Path.with_suffix would cut at a dot of the name
        data_path, csv_path = self.raw / f"{stem}.input.json", self.raw / f"{stem}.csv"
        export_path = self.raw / f"{stem}.export.json"
        data_path.write_text(json.dumps(data))
        for path in (csv_path, export_path):
            path.unlink(missing_ok=True)
        command = [str(self.binary), "-m", model, "-u", self.url, "-i", "grpc", "--async", "--streaming",
                   "--input-data", str(data_path), "--concurrency-range", str(concurrency),
                   "--measurement-mode", "time_windows", "--measurement-interval", str(int(seconds * 1000)),
                   "--stability-percentage", f"{self.stability:g}", "--max-trials", str(max_trials),
                   "-f", str(csv_path), "--profile-export-file", str(export_path)]
        if self.max_threads:
            command += ["--max-threads", str(self.max_threads)]
        # Generous: every window plus start-up and the drain of requests still in flight.
        timeout = max_trials * seconds * 2 + 180
        log(f"perf_analyzer {name} ({model}) concurrency {concurrency} ...")
        with open(self.raw / "perf_analyzer.log", "a") as out:
            out.write(f"\n$ {' '.join(command)}\n")
            out.flush()
            started = time.perf_counter()
            histograms_before = self._engine_histograms()
            process = subprocess.Popen(command, env=self.env, stdout=out, stderr=subprocess.STDOUT)
            server = CpuSampler(self.server_pid) if self.server_pid else None
            with CpuSampler(process.pid) as client, GpuSampler(self.raw / f"{stem}.gpu.csv") as gpu:
                if server:
                    server.__enter__()
                try:
                    code = process.wait(timeout=timeout)
                except subprocess.TimeoutExpired as err:
                    raise BenchError(f"perf_analyzer {name} at concurrency {concurrency} ran past {timeout:.0f} s") \
                        from err
                finally:
                    if process.poll() is None:  # timed out, or we are being stopped: no orphaned load generator
                        process.kill()
                        process.wait()
                    if server:
                        server.__exit__()
        if code != 0 or not csv_path.is_file() or not export_path.is_file():
            with open(self.raw / "perf_analyzer.log") as out:
                tail = [line.strip() for line in out.readlines()[-3:] if line.strip()]
            raise BenchError(f"perf_analyzer {name} at concurrency {concurrency} failed (exit {code}): "
                             + " | ".join(tail))
        try:
            experiment = load_export(export_path)
        except ValueError as err:  # e.g. cut at a 64 KiB boundary (see TEXT_OUTPUTS): retried like a failure
            raise BenchError(f"perf_analyzer {name} at concurrency {concurrency}: unreadable profile export "
                             f"({export_path.stat().st_size} bytes): {err}") from err
        rps = float(read_csv_row(csv_path)["Inferences/Second"])
        metrics = run_metrics(name, model, concurrency, streamed, rps, experiment).to_json()
        time.sleep(METRICS_FLUSH_S)
        histograms_after = self._engine_histograms()
        # The client's CPU while perf_analyzer measured (its stable windows), apart from its start-up (reading the
        # input data) and exit (writing the profile export), where one sample can reach a whole core.
        bounds = [int(bound) for bound in experiment.get("window_boundaries") or []]
        if bounds and bounds[0] < 10**17:  # a steady clock (older perf_analyzers): to the wall clock of the samples
            bounds = [bound + time.time_ns() - time.monotonic_ns() for bound in bounds]
        measured = (client.max_within(bounds[-(STABLE_WINDOWS + 1)], bounds[-1])
                    if len(bounds) >= STABLE_WINDOWS + 1 else None)
        metrics.update(client_cpu_percent_max=measured if measured is not None else client.max,
                       client_cpu_percent_max_whole_run=client.max, client_cpu_percent_mean=client.mean,
                       server_cpu_percent_mean=server.mean if server else None, window_s=seconds,
                       wall_s=time.perf_counter() - started, **(gpu.summary() or {}))
        for key, after in histograms_after.items():
            metrics[key] = bucket_quantiles(histograms_before.get(key, {}), after) if after else None
        if self.trace_folder is not None and streamed and model == BENCH_TEXT:
            metrics["first_response_steps"] = self._traced_steps(experiment)
        log(f"  {metrics['output_tokens_per_s']:.0f} tok/s, {rps:.1f} req/s, "
            f"responses/token {metrics['responses_per_token'] or 0:.3f}, client CPU max {client.max or 0:.0f} %"
            + (f", GPU SM clock p50 {metrics['gpu_sm_clock_mhz_p50']:.0f} MHz" if "gpu_sm_clock_mhz_p50" in metrics
               else ""))
        return metrics


    def _traced_steps(self, experiment: dict[str, Any]) -> dict[str, Any] | None:
        """The traced ensemble requests that arrived inside the run's stable windows: each step of their first
        response (triton_trace.step_percentiles), or None when none was traced."""
        assert self.trace_folder is not None
        bounds = experiment.get("window_boundaries") or []
        if len(bounds) < STABLE_WINDOWS + 1:
            return None
        start, end = int(bounds[-(STABLE_WINDOWS + 1)]), int(bounds[-1])
        if start > 10**17:  # perf_analyzer's clock is the wall clock; the trace's is the server's steady clock
            offset = time.time_ns() - time.monotonic_ns()
            start, end = start - offset, end - offset
        models, events = triton_trace.read_traces(self.trace_folder)
        chosen = [stages for arrived, stages in triton_trace.first_responses(models, events, self.core)
                  if start <= arrived < end]
        return triton_trace.step_percentiles(chosen) if chosen else None

    def _engine_histograms(self) -> dict[str, dict[float, float]]:
        """The engine's histograms now, by run key ({} without a metrics URL or when the scrape fails)."""
        if not self.metrics_url:
            return {}
        try:
            with urllib.request.urlopen(self.metrics_url, timeout=10) as response:
                text = response.read().decode()
        except OSError as err:
            log(f"  could not read {self.metrics_url}: {err}")
            return {}
        return {key: histogram_buckets(text, name) for key, name in ENGINE_HISTOGRAMS.items()}


# -- batch 1, from this process ----------------------------------------------------------------------------------------
def core_call_times(triton: gpu_bench.Triton, model: str, ids: list[int], new_tokens: int,
                    stream: bool) -> list[float]:
    """Arrival times (s after sending) of the core model's responses (gpu_bench.Triton.core asks for one only)."""
    inputs = [triton._input("input_ids", np.array([ids], np.uint32), "UINT32"),
              triton._input("input_lengths", np.array([[len(ids)]], np.uint32), "UINT32"),
              triton._input("request_output_len", np.array([[new_tokens]], np.uint32), "UINT32"),
              triton._input("min_length", np.array([[new_tokens]], np.uint32), "UINT32"),
              triton._input("stream", np.array([[stream]]), "BOOL")]
    return triton._call(model, inputs)[1]


def median_ms(call: Any, reps: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        call()
    return 1000 * statistics.median(call() for _ in range(reps))


def batch1(url: str, core: str | None, tokenizer: Any, args: argparse.Namespace, result: dict[str, Any],
           runner: Runner | None = None, inputs: tuple[frozenset[str], frozenset[str]] | None = None) -> None:
    """Batch-1 timings; the core model's (token ids) only where one is served (`core`), else --baseline's. With
    `runner` (and the ensemble's and core's `inputs`), the first streamed response of the long prompt is timed by
    perf_analyzer too (`batch1_first_response`)."""
    triton = gpu_bench.Triton(url, streaming=True)
    (short_text, short_ids), = token_length_prompts(tokenizer, args.prompt_tokens, 1, seed=11)
    (long_text, long_ids), = token_length_prompts(tokenizer, args.long_prompt_tokens, 1, seed=12)
    reps = args.bs1_reps
    sampler = CpuSampler(os.getpid(), children=False)  # tritonserver is this process's child: leave it out
    with sampler:
        points = {}
        for new_tokens in sorted({max(2, round(args.new_tokens * f)) for f in (0.125, 0.375, 0.625, 1.0)}):
            points[new_tokens] = median_ms(lambda n=new_tokens: triton.text(short_text, n)[-1], max(3, reps // 4), 1)
        slope = float(np.polyfit(list(points), list(points.values()), 1)[0])
        result["decode_ms_per_token_bs1"] = slope
        result["latency_ms_bs1_not_streamed"] = {str(k): v for k, v in points.items()}
        first = 4  # a few tokens, so the stream has a first response followed by others
        result["ttft_ms_prompt512_bs1_streamed"] = median_ms(
            lambda: triton.text(long_text, first, stream=True)[0], reps)
        result["ttft_ms_prompt512_bs1_not_streamed"] = median_ms(lambda: triton.text(long_text, 1)[-1], reps)
        result["ttft_ms_prompt128_bs1_streamed"] = median_ms(
            lambda: triton.text(short_text, first, stream=True)[0], reps)
        # As bench/ensemble_overhead.py: one new token, not streamed, ensemble vs core with the same token ids.
        result["latency_ms_bs1_1token_not_streamed"] = median_ms(lambda: triton.text(short_text, 1)[-1], reps)
        if core is not None:
            result["ttft_ms_prompt512_bs1_core_streamed"] = median_ms(
                lambda: core_call_times(triton, core, long_ids, first, True)[0], reps)
            result["latency_ms_bs1_1token_core_not_streamed"] = median_ms(
                lambda: core_call_times(triton, core, short_ids, 1, False)[-1], reps)
    result["batch1_client_cpu_percent_max"] = sampler.max
    if runner is not None and inputs is not None:
        batch1_first_response(runner, args, core, (long_text, long_ids), first, inputs, result)
    core_ttft = result.get("ttft_ms_prompt512_bs1_core_streamed")
    log(f"batch 1: decode {slope:.3f} ms/token, TTFT({args.long_prompt_tokens}) streamed "
        f"{result['ttft_ms_prompt512_bs1_streamed']:.2f} ms"
        + (f" (core {core_ttft:.2f} ms)" if core_ttft is not None else " (no token-id core here)"))


def batch1_first_response(runner: Runner, args: argparse.Namespace, core: str | None, prompt: tuple[str, list[int]],
                          new_tokens: int, inputs: tuple[frozenset[str], frozenset[str]],
                          result: dict[str, Any]) -> None:
    """The first streamed response of one long prompt at batch 1, from perf_analyzer at concurrency 1 (one request
    after another over one stream, as the Python client sends them): through the model clients call, and the core
    model with the same token ids. The Python client's medians move to `*_python_client`. On one H200 host the
    Python client took 7.0 ms where perf_analyzer took 6.3 for the same 512-token request (4.9 and 4.9 at 128
    tokens; docs/gpu/runs-2026-12-03h): the C++ client is the one that does not add its own time. The model clients
    call is driven directly; where perf_analyzer fails on it (the outputs it does not send, see TEXT_OUTPUTS), its
    bench-only copy."""
    text, ids = prompt
    cases = [("ttft_ms_prompt512_bs1_streamed", "bs1_first_response", (args.ensemble, BENCH_TEXT),
              ensemble_entry(text, new_tokens, True, inputs[0]))]
    if core is not None:
        cases.append(("ttft_ms_prompt512_bs1_core_streamed", "bs1_core_first_response", (core, BENCH_CORE),
                      core_entry(ids, new_tokens, True, inputs[1])))
    runs = result.setdefault("batch1_perf_analyzer", {})
    for key, name, models, entry in cases:
        for model in models:
            run = runner.run(name, model, 1, True, {"data": [entry]})
            if run.get("ttft_ms"):
                break
        runs[name] = run
        if not run.get("ttft_ms"):
            continue  # the Python client's median stays the figure; the run's error is in the JSON
        result[f"{key}_python_client"] = result.get(key)
        result[key] = run["ttft_ms"]["p50"]
        result[f"{key}_p90"] = run["ttft_ms"]["p90"]


BASELINE_KEYS = ("ttft_ms_prompt512_bs1_core_streamed", "ttft_ms_prompt512_bs1_core_streamed_python_client",
                 "latency_ms_bs1_1token_core_not_streamed")


# -- results -----------------------------------------------------------------------------------------------------------
def _run(result: dict[str, Any], name: str, concurrency: int) -> dict[str, Any] | None:
    for run in result.get("runs", []):
        if run["name"] == name and run["concurrency"] == concurrency:
            return run
    return None


def _p(run: dict[str, Any] | None, key: str, quantile: str) -> float | None:
    return run[key][quantile] if run and run.get(key) else None


def derive(result: dict[str, Any], mixed_clients: int) -> None:
    """The headline keys (the issue's names) from the runs; the goals."""
    runs = result.get("runs", [])
    for run in runs:
        if run["name"] in ("streamed", "not_streamed", "core_streamed"):
            result[f"{run['name']}_tokens_per_s_c{run['concurrency']}"] = run["output_tokens_per_s"]
        if run["name"] in ("streamed", "core_streamed"):
            c = run["concurrency"]
            result[f"{run['name']}_ttft_p50_ms_c{c}"] = _p(run, "ttft_ms", "p50")
            result[f"{run['name']}_ttft_p99_ms_c{c}"] = _p(run, "ttft_ms", "p99")
            result[f"{run['name']}_itl_p50_ms_c{c}"] = _p(run, "itl_ms", "p50")
            result[f"{run['name']}_itl_p99_ms_c{c}"] = _p(run, "itl_ms", "p99")
            result[f"{run['name']}_responses_per_token_c{c}"] = run["responses_per_token"]
    streamed64, plain64 = _run(result, "streamed", 64), _run(result, "not_streamed", 64)
    if streamed64 and plain64 and plain64["output_tokens_per_s"]:
        result["streamed_over_not_streamed_c64"] = streamed64["output_tokens_per_s"] / plain64["output_tokens_per_s"]
    c1 = _run(result, "streamed", 1)
    if c1:
        result["responses_per_token_c1"] = c1["responses_per_token"]
        result["responses_per_request_c1"] = c1["responses_per_request"]
        result["tokens_per_request_c1"] = c1["tokens_per_request"]
        result["itl_p50_ms_c1"] = _p(c1, "itl_ms", "p50")
        result["inter_response_p50_ms_c1"] = _p(c1, "inter_response_ms", "p50")
        if result.get("decode_ms_per_token_bs1") and result["itl_p50_ms_c1"] is not None:
            result["itl_p50_over_decode_ms_c1"] = result["itl_p50_ms_c1"] / result["decode_ms_per_token_bs1"]
    # The text path's cost over token ids (the core's timings: this server's, or --baseline's for a text core).
    for overhead, text_key, core_key in (
            ("ensemble_overhead_ms_bs1", "ttft_ms_prompt512_bs1_streamed", "ttft_ms_prompt512_bs1_core_streamed"),
            ("ensemble_overhead_ms_bs1_python_client", "ttft_ms_prompt512_bs1_streamed_python_client",
             "ttft_ms_prompt512_bs1_core_streamed_python_client"),
            ("ensemble_overhead_ms_bs1_not_streamed", "latency_ms_bs1_1token_not_streamed",
             "latency_ms_bs1_1token_core_not_streamed")):
        if result.get(text_key) is not None and result.get(core_key) is not None:
            result[overhead] = result[text_key] - result[core_key]
    core1 = _run(result, "core_streamed", 1)
    if c1 and core1:
        result["ensemble_overhead_ms_c1_perf_analyzer"] = _p(c1, "latency_ms", "p50") - _p(core1, "latency_ms", "p50")
        result["ensemble_overhead_ttft_ms_c1_perf_analyzer"] = _p(c1, "ttft_ms", "p50") - _p(core1, "ttft_ms", "p50")
    for name, prefix in (("mixed_not_streamed", "mixed"), ("mixed_streamed", "mixed_streamed")):
        run = _run(result, name, mixed_clients)
        if run:
            result[f"{prefix}_tokens_per_s_c{mixed_clients}"] = run["output_tokens_per_s"]
            result[f"{prefix}_latency_p50_ms"] = _p(run, "latency_ms", "p50")
            result[f"{prefix}_latency_p99_ms"] = _p(run, "latency_ms", "p99")
            result[f"{prefix}_tokens_per_request"] = run["tokens_per_request"]
    mixed_streamed = _run(result, "mixed_streamed", mixed_clients)
    if mixed_streamed:
        result["mixed_ttft_p50_ms"] = _p(mixed_streamed, "ttft_ms", "p50")
        result["mixed_ttft_p99_ms"] = _p(mixed_streamed, "ttft_ms", "p99")
    for key in (*HEADLINE_KEYS, *(goal.key for goal in GOALS)):  # always there; null where not measured
        result.setdefault(key, None)
    cpus = [run["client_cpu_percent_max"] for run in runs if run.get("client_cpu_percent_max") is not None]
    if result.get("batch1_client_cpu_percent_max") is not None:
        cpus.append(result["batch1_client_cpu_percent_max"])
    result["client_cpu_percent_max"] = max(cpus) if cpus else None
    result["goals"] = goal_rows(result)


def write_outputs(out: Path, result: dict[str, Any], mixed_clients: int, with_plot: bool = True) -> None:
    """JSON and table (the JSON atomically replaced); the plot too unless `with_plot` is false (it takes a second)."""
    derive(result, mixed_clients)
    out.parent.mkdir(parents=True, exist_ok=True)
    if with_plot:
        drawn = plot(out.with_suffix(".png"), result.get("runs", []), f"serving benchmark: {result.get('gpu', '?')}")
        result["plot"] = str(out.with_suffix(".png").name) if drawn else "none: matplotlib is not importable here"
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, out)
    out.with_suffix(".md").write_text(markdown(result))


def add_run(result: dict[str, Any], run: dict[str, Any]) -> None:
    """Keep the newest run of each (name, concurrency); a failed one goes to failed_runs."""
    key = (run["name"], run["concurrency"])
    for group in ("runs", "failed_runs"):
        result[group] = [r for r in result.get(group, []) if (r["name"], r["concurrency"]) != key]
    result["failed_runs" if "error" in run else "runs"].append(run)


# -- repository --------------------------------------------------------------------------------------------------------
def render_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """RenderConfig fields set from the command line: --max-slots (the KV-slot field, where this version has one),
    --render-option NAME=VALUE (any field, converted to the type of its default)."""
    fields = {f.name: f for f in dataclasses.fields(RenderConfig)}
    overrides: dict[str, Any] = {}
    if args.max_slots is not None:
        slot_fields = [name for name in fields if "slot" in name]
        if not slot_fields:
            raise BenchError("--max-slots: this version's RenderConfig has no KV-slot field (fields: "
                             f"{', '.join(fields)}); KV slots follow --max-batch-size")
        overrides[slot_fields[0]] = args.max_slots
    for option in args.render_option:
        name, sep, text = option.partition("=")
        if not sep or name not in fields:
            raise BenchError(f"--render-option {option!r}: expected NAME=VALUE with NAME one of {', '.join(fields)}")
        default = fields[name].default
        if isinstance(default, bool) or "bool" in str(fields[name].type):  # also `bool | None` (None: automatic)
            value: Any = text.lower() in ("1", "true", "yes")
        elif isinstance(default, int):
            value = int(text)
        elif isinstance(default, float):
            value = float(text)
        else:
            value = text
        overrides[name] = value
    return overrides


def random_streaming_options(args: argparse.Namespace) -> tuple[str, GptModelConfig, dict[str, Any]]:
    """(preset, model, RenderConfig options) of a streaming torch repository over the random checkpoint preset's FT
    weights (as bench/gpu_bench.py makes them), --render-option applied: what every bench repository shares."""
    cpu = args.device == "cpu"
    preset = args.preset or ("tiny" if cpu else "gpt3-1.3b")
    ft, _ = gpu_bench.random_ft_weights(args.work, preset)
    model = GptModelConfig.from_ini(ft / "config.ini")
    options: dict[str, Any] = dict(engine="torch", device=args.device, data_type="fp32" if cpu else "fp16",
                                   checkpoint=ft, model=model, force=True, streaming=True, **render_overrides(args))
    return preset, model, options


def build_repository(args: argparse.Namespace, result: dict[str, Any]) -> Path:
    """Random checkpoint preset -> FT weights -> the streaming torch repository."""
    preset, model, options = random_streaming_options(args)
    config = RenderConfig(**{**dict(max_batch_size=args.max_batch_size, output=args.work / "repo",
                                    max_queue_delay_us=args.max_queue_delay_us,
                                    preprocessing_instances=args.preprocessing_instances,
                                    postprocessing_instances=args.postprocessing_instances), **options})
    result["model"] = {"preset": preset, "layers": model.num_layer, "hidden": model.hidden_size,
                       "max_pos_seq_len": model.max_pos_seq_len, "weights": "random", "data_type": config.data_type}
    result["render"] = {key: (str(value) if isinstance(value, Path) else value)
                        for key, value in dataclasses.asdict(config).items() if key != "model"}
    return render_repository(config)


# perf_analyzer 2.51 asks for every output a model declares and, for one a response does not carry, exports whatever
# its buffer pointer points at (seen: -1.7e+34, 2e-36, ...). When that garbage is a NaN, rapidjson refuses to write it
# and the profile export ends at a 64 KiB buffer boundary (0 or 65536 bytes, exit status 0). The ensemble and the core
# declare log-prob outputs that they only send when asked for. So perf_analyzer drives two bench-only ensembles from a
# second model repository: the same text ensemble without the outputs it does not send, and a one-step ensemble
# around the core exposing only the token outputs.
TEXT_OUTPUTS = ("text_output", "finish_reason", "num_input_tokens", "num_output_tokens")
CORE_TOKEN_OUTPUTS = ("output_ids", "sequence_length")
BENCH_TEXT, BENCH_CORE = "bench_text", "bench_core"


def bench_models(repo: Path, ensemble: str, core: str | None, out: Path) -> Path:
    """Write the bench-only ensembles (see above) into a model repository at `out`; return it. A text core (core
    None) gets a one-step ensemble with the text outputs, as the core does with the token outputs."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    def read(name: str) -> model_config_pb2.ModelConfig:
        return text_format.Parse((repo / name / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())

    def write(config: model_config_pb2.ModelConfig) -> None:
        (out / config.name / "1").mkdir(parents=True, exist_ok=True)  # an ensemble needs an (empty) version folder
        (out / config.name / "config.pbtxt").write_text(text_format.MessageToString(config))

    def one_step(model: str, name: str, outputs: tuple[str, ...]) -> model_config_pb2.ModelConfig:
        source = read(model)
        wrapper = model_config_pb2.ModelConfig(name=name, platform="ensemble", max_batch_size=source.max_batch_size)
        wrapper.input.extend(source.input)
        for tensor in wrapper.input:
            tensor.allow_ragged_batch = False  # a batching property of the model itself, not of an ensemble input
        wrapper.output.extend(o for o in source.output if o.name in outputs)
        step = wrapper.ensemble_scheduling.step.add(model_name=model, model_version=-1)
        for tensor in source.input:
            step.input_map[tensor.name] = tensor.name
        for output in outputs:
            step.output_map[output] = output
        return wrapper

    shutil.rmtree(out, ignore_errors=True)  # a previous run's (another repository's) models must not linger
    if core is None:
        write(one_step(ensemble, BENCH_TEXT, TEXT_OUTPUTS))
        return out
    text = read(ensemble)
    text.name = BENCH_TEXT
    kept = [o for o in text.output if o.name in TEXT_OUTPUTS]
    del text.output[:]
    text.output.extend(kept)
    for step in text.ensemble_scheduling.step:
        # Internal tensors start with "_"; the others are ensemble outputs: keep only the text ones.
        for key in [k for k, v in step.output_map.items() if not v.startswith("_") and v not in TEXT_OUTPUTS]:
            del step.output_map[key]
    write(text)
    write(one_step(core, BENCH_CORE, CORE_TOKEN_OUTPUTS))
    return out


def core_model_name(repo: Path, ensemble: str) -> str | None:
    """The token-id core model among the ensemble's steps; None where `ensemble` is a text core itself (render
    --text-in-core: no token-id model is served)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    path = repo / ensemble / "config.pbtxt"
    if not path.is_file():
        raise BenchError(f"{path} does not exist: --repository must hold the text model '{ensemble}'")
    config = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
    if config.platform != "ensemble":
        text_io = config.parameters.get("text_io")
        if text_io is None or text_io.string_value != "true":
            raise BenchError(f"{path} is neither an ensemble nor a text core model")
        return None
    steps = [step.model_name for step in config.ensemble_scheduling.step]
    core = [name for name in steps if name not in ("preprocessing", "postprocessing")]
    if len(core) != 1:
        raise BenchError(f"cannot tell the core model among the ensemble's steps {steps}")
    return core[0]


def device_name(device: str) -> str:
    if device == "gpu":
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    return f"cpu ({platform.machine()}, {os.cpu_count()} cores)"


def host_cpu(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The host's CPU model and clock: the engine loop is host-bound at 256 streams on slower GPU hosts (one 256-stream
    run carried 47.7k tok/s where the same code carried 53-54k on another host, docs/benchmarks.md), so the CPU that
    ran a result belongs beside it."""
    fallback = platform.processor() or platform.machine()
    try:
        lines = cpuinfo.read_text().splitlines()
    except OSError:  # not Linux
        return fallback
    first: dict[str, str] = {}  # each field of the first processor
    for key, _, value in (line.partition(":") for line in lines):
        first.setdefault(key.strip(), value.strip())
    model = first.get("model name") or fallback
    return f"{model}, {float(first['cpu MHz']):.0f} MHz" if first.get("cpu MHz") else model


def prompt_encoder(folders: list[Path]) -> str:
    """What the served text path encodes prompts with (tokenizer.py: tiktoken, or ~7x slower tokenizers), as this
    Python sees it: on the GPU host the stub runs the same environment (scripts/gpu/setup.sh's venv)."""
    return GptTokenizer.from_directory(folders[0]).encoder if folders else "-"


# -- main --------------------------------------------------------------------------------------------------------------
def parse_range(text: str, option: str) -> tuple[int, int]:
    try:
        low, high = (int(part) for part in text.split(":"))
    except ValueError:
        raise BenchError(f"{option} must be LOW:HIGH (inclusive token counts), got {text!r}") from None
    if not 1 <= low <= high:
        raise BenchError(f"{option} needs 1 <= LOW <= HIGH, got {text!r}")
    return low, high


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="the JSON to write (.md and .png beside it)")
    parser.add_argument("--work", type=Path,
                        help="private scratch folder, kept across runs: checkpoint, FT weights, repository, raw "
                             f"perf_analyzer files [{gpu_bench.default_work_dir('serving-bench')}]")
    parser.add_argument("--device", choices=("gpu", "cpu"), default="gpu",
                        help="where the torch engine runs when the repository is built here; names the JSON's "
                             "`gpu` [gpu]")
    parser.add_argument("--gpu", dest="device", action="store_const", const="gpu", help="same as --device gpu")
    parser.add_argument("--repository", type=Path, help="serve this rendered streaming repository instead of "
                                                         "building one")
    parser.add_argument("--ensemble", default="ensemble", help="name of the text ensemble [ensemble]")
    parser.add_argument("--preset", help="checkpoint preset to build [gpt3-1.3b on gpu, tiny on cpu]")
    parser.add_argument("--max-batch-size", type=int, default=256,
                        help="Triton max_batch_size of every model [256: 256 concurrent streams must fit]")
    parser.add_argument("--max-slots", type=int, help="KV-cache slots, passed to the render config's slot field "
                                                      "(only where this version has one)")
    parser.add_argument("--render-option", action="append", default=[], metavar="NAME=VALUE",
                        help="any other RenderConfig field (repeatable)")
    parser.add_argument("--max-queue-delay-us", type=int, default=500)
    parser.add_argument("--preprocessing-instances", type=int, default=2)
    parser.add_argument("--postprocessing-instances", type=int, default=2)
    parser.add_argument("--levels", default="1,8,32,64,128,256", help="sweep concurrencies [1,8,32,64,128,256]")
    parser.add_argument("--core-levels", default="1,64", help="core-model (token ids) streamed concurrencies")
    parser.add_argument("--seconds", type=float, default=4.0, help="perf_analyzer measurement window (s); a run "
                                                                   "takes >= 3 windows")
    parser.add_argument("--mixed-seconds", type=float, default=10.0, help="window of the mixed runs (s)")
    parser.add_argument("--stability", type=float, default=50.0, help="perf_analyzer --stability-percentage")
    parser.add_argument("--max-trials", type=int, default=6, help="perf_analyzer --max-trials")
    parser.add_argument("--max-threads", type=int, help="perf_analyzer --max-threads [its default, 16]")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--long-prompt-tokens", type=int, default=512, help="prompt of the batch-1 TTFT")
    parser.add_argument("--bs1-reps", type=int, default=20, help="repetitions of each batch-1 timing (median)")
    parser.add_argument("--mixed-clients", type=int, default=64)
    parser.add_argument("--mixed-prompt", default="16:1024", help="prompt tokens, uniform LOW:HIGH")
    parser.add_argument("--mixed-output", default="16:512", help="output tokens, uniform LOW:HIGH")
    parser.add_argument("--mixed-entries", type=int, default=1024, help="entries of the seeded input-data file")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--merge", action="store_true", help="add to --out's existing results")
    parser.add_argument("--baseline", type=Path,
                        help="a JSON of this script whose core-model batch-1 timings stand in for this repository's, "
                             "when it serves a text core (render --text-in-core: no token-id model to call); run it "
                             "on the same host just before, e.g. --skip-streamed --skip-not-streamed --skip-mixed")
    parser.add_argument("--trace-rate", type=int, default=0,
                        help="trace one request in N with Triton's request trace and record, for every streamed "
                             "ensemble run, each step of the traced first responses (percentiles, and the slowest "
                             "5 %%'s mean): where a TTFT tail is made [0: no trace; tracing costs some throughput]")
    for stage, what in (("bs1", "batch-1 timings"), ("streamed", "streamed sweep"),
                        ("not-streamed", "not-streamed sweep"), ("core", "core-model runs"),
                        ("mixed", "mixed workload")):
        parser.add_argument(f"--skip-{stage}", action="store_true", help=f"skip the {what}")
    args = parser.parse_args(argv)
    args.levels = parse_concurrency(args.levels)
    args.core_levels = parse_concurrency(args.core_levels) if args.core_levels else ()
    args.mixed_prompt = parse_range(args.mixed_prompt, "--mixed-prompt")
    args.mixed_output = parse_range(args.mixed_output, "--mixed-output")
    for name, low in (("seconds", 0.5), ("mixed_seconds", 0.5), ("max_trials", 3), ("prompt_tokens", 1),
                      ("new_tokens", 2), ("long_prompt_tokens", 1), ("bs1_reps", 1), ("mixed_clients", 1),
                      ("mixed_entries", 1), ("max_batch_size", 1)):
        if getattr(args, name) < low:
            raise BenchError(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(args, name)}")
    if max(args.levels) > args.max_batch_size and not args.repository:
        raise BenchError(f"--levels up to {max(args.levels)} need --max-batch-size >= that")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    args.work = gpu_bench.private_work_dir(args.work, "serving-bench")  # refuses one others could tamper with
    raw = args.work / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = json.loads(args.out.read_text()) if args.merge and args.out.is_file() else {}
    result.update(gpu=device_name(args.device), date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
    repo = args.repository.resolve() if args.repository else build_repository(args, result)
    # Preprocessing's tables, or a text core's own (render --text-in-core).
    folders = [repo / name / "1" for name in ("preprocessing", args.ensemble)
               if (repo / name / "1" / "vocab.json").is_file()]
    tokenizer = load_tokenizer(folders[0] if folders else DEFAULT_TOKENIZER_DIR)
    binary = find_perf_analyzer()
    # Every invocation that contributed (several with --merge), as typed.
    result["commands"] = [*result.get("commands", []), " ".join([Path(sys.executable).name, *sys.argv])]
    result["settings"] = {
        "command": " ; ".join(result["commands"]), "repository": str(repo),
        "perf_analyzer": f"{binary} ({perf_analyzer_version(binary, perf_analyzer_env())})",
        "client host cores": os.cpu_count(), "host CPU": host_cpu(), "prompt encoder": prompt_encoder(folders),
        "levels": ",".join(map(str, args.levels)),
        "core levels": ",".join(map(str, args.core_levels)), "prompt tokens": args.prompt_tokens,
        "new tokens (= min tokens)": args.new_tokens, "window s": args.seconds, "mixed window s": args.mixed_seconds,
        "stability %": args.stability, "max trials": args.max_trials,
        "mixed": f"{args.mixed_clients} clients, prompts {args.mixed_prompt}, outputs {args.mixed_output}, "
                 f"{args.mixed_entries} entries, seed {args.seed}"}

    core = core_model_name(repo, args.ensemble)
    if args.baseline is not None:
        baseline = json.loads(args.baseline.read_text())
        result.update({key: baseline[key] for key in BASELINE_KEYS if baseline.get(key) is not None})
        result["baseline"] = {"json": str(args.baseline), "commands": baseline.get("commands")}
    extra = bench_models(repo, args.ensemble, core, args.work / "bench_models")
    log(f"starting tritonserver on {repo} (+ {extra})")
    trace_folder = raw / "trace" if args.trace_rate else None  # inside the private work folder: traces hold prompts
    trace_args = []
    if trace_folder is not None:
        shutil.rmtree(trace_folder, ignore_errors=True)
        trace_folder.mkdir(mode=0o700)
        trace_args = triton_trace.server_args(trace_folder, rate=args.trace_rate, log_every=TRACE_LOG_EVERY)
    with TritonServer.on_free_ports(repo, startup_timeout_s=900,
                                    extra_args=[f"--model-repository={extra}", *trace_args]) as server:
        url = server.grpc_url
        ensemble = model_info(url, "grpc", args.ensemble)
        if not ensemble.decoupled:
            raise BenchError(f"{repo} is not a streaming repository (render with --streaming)")
        core_inputs = model_info(url, "grpc", core).inputs if core is not None else frozenset()
        runner = Runner(url=url, raw=raw, seconds=args.seconds, stability=args.stability,
                        max_trials=args.max_trials, server_pid=server.process.pid if server.process else None,
                        max_threads=args.max_threads, metrics_url=server.metrics_url, trace_folder=trace_folder,
                        core=core or "")
        def write(with_plot: bool = False) -> None:  # after every run; the plot after every stage
            write_outputs(args.out, result, args.mixed_clients, with_plot)

        if not args.skip_bs1:
            batch1(url, core, tokenizer, args, result, runner, (ensemble.inputs, core_inputs))
            write()
        prompts = token_length_prompts(tokenizer, args.prompt_tokens, 64, seed=args.seed)
        for stage, name, stream in (("streamed", "streamed", True), ("not_streamed", "not_streamed", False)):
            if getattr(args, f"skip_{stage}"):
                continue
            data = {"data": [ensemble_entry(text, args.new_tokens, stream, ensemble.inputs) for text, _ in prompts]}
            window, previous = args.seconds, None
            for level in args.levels:
                if previous and previous.get("latency_ms"):
                    # perf_analyzer counts requests that complete inside a window: keep a window a few latencies
                    # long as latency grows with concurrency (else "No valid requests recorded" and a retry);
                    # a saturated server's latency grows at most ~linearly with the level.
                    ratio = min(level / previous["concurrency"], 2.0)
                    grown = 2 * previous["latency_ms"]["p99"] / 1000 * ratio
                    window = min(max(args.seconds, grown), MAX_WINDOW_S)
                previous = runner.run(name, BENCH_TEXT, level, stream, data, window)
                add_run(result, previous)
                write()
            write(with_plot=True)
        if not args.skip_core and core is not None:
            data = {"data": [core_entry(ids, args.new_tokens, True, core_inputs) for _, ids in prompts]}
            for level in args.core_levels:
                add_run(result, runner.run("core_streamed", BENCH_CORE, level, True, data))
                write()
            write(with_plot=True)
        if not args.skip_mixed:
            lengths = mixed_lengths(args.mixed_entries, args.mixed_prompt, args.mixed_output, args.seed)
            texts = prompts_of_lengths(tokenizer, [p for p, _ in lengths], seed=args.seed + 1)
            result["mixed_entries_mean_prompt_tokens"] = float(np.mean([p for p, _ in lengths]))
            result["mixed_entries_mean_output_tokens"] = float(np.mean([o for _, o in lengths]))
            for name, stream in (("mixed_not_streamed", False), ("mixed_streamed", True)):
                data = {"data": [ensemble_entry(text, out, stream, ensemble.inputs)
                                 for (text, _), (_, out) in zip(texts, lengths)]}
                add_run(result, runner.run(name, BENCH_TEXT, args.mixed_clients, stream, data, args.mixed_seconds))
                write()
        (raw / "server.log").write_text(server.log_text())
    write_outputs(args.out, result, args.mixed_clients)
    log(f"wrote {args.out} (+ .md, .png)")
    print(json.dumps({goal["key"]: goal["measured"] for goal in result["goals"]}
                     | {"client_cpu_percent_max": result["client_cpu_percent_max"]}, indent=2))
    return result


def _stop(signum: int, _frame: object) -> None:
    # tritonserver runs in its own session: unwind the `with` so it is stopped, not orphaned (the JSON already holds
    # every finished run).
    raise SystemExit(f"serving_bench: stopped by signal {signum}")


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _stop)
    try:
        main()
    except (BenchError, ServerError, gpu_bench.WorkDirError) as err:
        sys.exit(f"serving_bench: {err}")
