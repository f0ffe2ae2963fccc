"""What the torch core's Triton model.py does, without Triton: load the engine from the model config, run a dynamic
batch statically, or queue decoupled requests on the in-flight scheduler with their response sinks.

model.py only turns Triton requests into input dicts and `Reply`s into pb_utils responses (`Transport`).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from .core_io import (EngineLimits, GenerationRequest, ParsedRequest, RequestError, RowOutput, StreamState, ft_outputs,
                      parse_request)
from .metrics import EngineMetrics, MetricsRecorder
from .model_config import KV_CACHE_DTYPES, WEIGHT_QUANTIZATIONS
from .stream_ack import ABANDON_AFTER_S

if TYPE_CHECKING:  # torch-heavy: imported at run time only where an engine is built
    from .generation import GptEngine
    from .scheduler import InflightScheduler
    from .stream_ack import AckListener

DATA_TYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
AUTO_GPU_SLOTS = 256  # 256 x 2048 tokens of the 1.3B model: ~100 GB of KV (an H200's worth after the weights)
# A broken tensor-parallel group or engine process: time for the failed requests' errors to reach Triton before
# the stub exits.
ENGINE_FAILURE_EXIT_S = 2.0
# Error kinds, mapped to Triton's codes by model.py.
INVALID, UNAVAILABLE, INTERNAL, CANCELLED = "invalid", "unavailable", "internal", "cancelled"


@dataclass(frozen=True)
class Reply:
    arrays: dict[str, np.ndarray] | None = None
    error: str | None = None
    kind: str = ""  # one of the error kinds when `error` is set


class Transport(Protocol):
    """One decoupled request's way back to the client (a Triton response sender)."""

    def send(self, reply: Reply, final: bool) -> None: ...

    def is_cancelled(self) -> bool: ...


class ResponseState(Protocol):
    """A decoupled request's response arrays, in the order they are sent: core_io.StreamState (FT's tensors), or a
    text core's own for streamed text (text_core.py)."""

    def update(self, outputs: Sequence[RowOutput]) -> dict[str, np.ndarray]: ...

    def final(self, outputs: Sequence[RowOutput]) -> dict[str, np.ndarray]: ...


def cpu_threads() -> int | None:
    """The torch threads of a CPU core model: GPT_TRITON_CPU_THREADS (A/B runs), else every core but one, unless
    OMP_NUM_THREADS is set (torch has taken it: None).

    One core is left to tritonserver and the pre/postprocessing stubs: with every core, torch's OpenMP threads spin
    at their barriers while those run. On the 2-core CI machine, with one other busy process, a 120-token request
    took 2.83 s with 2 threads and 0.41 s with 1 (16 rows: 17.5 s and 0.85 s); quiet, 2 threads were 25-35 % faster
    (docs/perf/cpu_threads.md)."""
    chosen = os.environ.get("GPT_TRITON_CPU_THREADS", "").strip()
    if chosen:
        if not chosen.isdigit() or int(chosen) < 1:
            raise ValueError(f"GPT_TRITON_CPU_THREADS must be a whole number >= 1, got {chosen!r}")
        return int(chosen)
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    return max(1, (os.cpu_count() or 1) - 1)


def _choice(params: Mapping[str, str], name: str, choices: Sequence[str]) -> str:
    """The config.pbtxt parameter name, one of choices (absent or empty: the first, the default), else a ValueError
    naming it and them."""
    value = params.get(name, "") or choices[0]
    if value not in choices:
        raise ValueError(f"parameter {name} must be one of {', '.join(choices)}, got {value!r}")
    return value


@dataclass(frozen=True)
class CoreSettings:
    model_dir: Path
    data_type: str
    kv_slots: int  # 0: automatic (see slots_for)
    triton_max_batch_size: int
    max_seq_len: int | None
    vocab_limit: int | None
    decoupled: bool
    stream_abandon_s: float = ABANDON_AFTER_S
    tp: int = 1  # tensor-parallel ranks: this process is rank 0 and starts the others (tensor_parallel.py)
    tp_devices: tuple[int, ...] = ()  # GPU ids of ranks 0..tp-1 (KIND_GPU); rank 0's is the instance's
    step_prompt_tokens: int = 0  # in-flight scheduler's prompt tokens per step (chunked prefill); 0: its default
    engine_process: bool = False  # decoupled: the engine and its loop in a child process (engine_process.py)
    kv_cache_dtype: str = "auto"  # model_config.KV_CACHE_DTYPES
    weight_quantization: str = "none"  # model_config.WEIGHT_QUANTIZATIONS

    @classmethod
    def from_args(cls, args: Mapping[str, str]) -> CoreSettings:
        """From TritonPythonModel.initialize's args. Parameters: model_dir (relative to the version folder), data_type,
        kv_slots (KV-cache slots, 0 = automatic), max_seq_len, vocab_limit, stream_abandon_s (stream_ack.py),
        tensor_para_size and tp_devices (GPU ids, comma-separated, one per rank), step_prompt_tokens (scheduler.py),
        engine_process ("1": engine_process.py, decoupled and one rank only; the GPT_TRITON_ENGINE_PROCESS environment
        variable, 0 or 1, overrides it for A/B runs), kv_cache_dtype (model_config.KV_CACHE_DTYPES),
        weight_quantization (model_config.WEIGHT_QUANTIZATIONS)."""
        config = json.loads(args["model_config"])
        params = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        model_dir = Path(params.get("model_dir", f"{params.get('tensor_para_size', '1')}-gpu"))
        if not model_dir.is_absolute():
            model_dir = Path(args["model_repository"]) / args["model_version"] / model_dir
        data_type = params.get("data_type", "fp32")
        if data_type not in DATA_TYPES:
            raise ValueError(f"parameter data_type must be one of {sorted(DATA_TYPES)}, got {data_type!r}")
        slots = params.get("kv_slots", params.get("max_batch_size", "0")) or "0"
        if not slots.isdigit():
            raise ValueError(f"parameter kv_slots must be a whole number (0 = automatic), got {slots!r}")
        decoupled = bool(config.get("model_transaction_policy", {}).get("decoupled", False))
        step_tokens = params.get("step_prompt_tokens", "0") or "0"
        if not step_tokens.isdigit():
            raise ValueError(f"parameter step_prompt_tokens must be a whole number (0 = default), got {step_tokens!r}")
        own_process = params.get("engine_process", "0") or "0"
        if own_process not in ("0", "1"):
            raise ValueError(f"parameter engine_process must be 0 or 1, got {own_process!r}")
        # A/B runs switch a rendered repository's placement from the server's environment.
        own_process = os.environ.get("GPT_TRITON_ENGINE_PROCESS", own_process)
        if own_process not in ("0", "1"):
            raise ValueError(f"GPT_TRITON_ENGINE_PROCESS must be 0 or 1, got {own_process!r}")
        kv_cache_dtype = _choice(params, "kv_cache_dtype", KV_CACHE_DTYPES)
        weight_quantization = _choice(params, "weight_quantization", WEIGHT_QUANTIZATIONS)
        tp_text, devices_text = params.get("tensor_para_size", "1") or "1", params.get("tp_devices", "")
        if not tp_text.isdigit() or int(tp_text) < 1:
            raise ValueError(f"parameter tensor_para_size must be a positive whole number, got {tp_text!r}")
        devices = tuple(int(d) for d in devices_text.split(",") if d.strip().isdigit())
        if devices_text and (len(devices) != int(tp_text) or len(set(devices)) != len(devices)):
            raise ValueError(f"parameter tp_devices must list {tp_text} distinct GPU ids (one per rank), "
                             f"got {devices_text!r}")
        return cls(tp=int(tp_text), tp_devices=devices, model_dir=model_dir, data_type=data_type, kv_slots=int(slots),
                   triton_max_batch_size=int(config.get("max_batch_size") or 1),
                   max_seq_len=int(params["max_seq_len"]) if "max_seq_len" in params else None,
                   vocab_limit=int(params["vocab_limit"]) if "vocab_limit" in params else None, decoupled=decoupled,
                   stream_abandon_s=float(params.get("stream_abandon_s", ABANDON_AFTER_S)),
                   step_prompt_tokens=int(step_tokens), kv_cache_dtype=kv_cache_dtype,
                   weight_quantization=weight_quantization,
                   engine_process=decoupled and own_process == "1" and int(tp_text) == 1)

    def slots_for(self, device: str) -> tuple[int, bool]:
        """(KV-cache slots wanted, whether to shrink them to the free memory). Given: exactly that many. Automatic:
        the in-flight (decoupled) core on a GPU takes as many as fit, up to AUTO_GPU_SLOTS, whatever Triton's
        max_batch_size (which only bounds the rows of one request there); otherwise Triton's max_batch_size (the
        dynamic batch of the static path), shrunk to fit on a GPU."""
        if self.kv_slots:
            return self.kv_slots, False
        gpu = device.startswith("cuda")
        return (AUTO_GPU_SLOTS if self.decoupled and gpu else self.triton_max_batch_size), gpu

    def load(self, device: str) -> GptEngine:
        import torch

        from .generation import GptEngine

        slots, shrink = self.slots_for(device)
        if self.tp > 1:
            return self._load_tensor_parallel(device, slots, shrink)
        threads = cpu_threads() if device == "cpu" else None
        if threads is not None:
            torch.set_num_threads(threads)
        return GptEngine.from_ft_dir(self.model_dir, device=device, dtype=getattr(torch, DATA_TYPES[self.data_type]),
                                     max_batch_size=slots, max_seq_len=self.max_seq_len,
                                     vocab_limit=self.vocab_limit, shrink_to_fit=shrink,
                                     kv_cache_dtype=self.kv_cache_dtype, weight_quantization=self.weight_quantization)

    def worker_devices(self, device: str) -> list[str]:
        """Devices of ranks 1..tp-1: on CPU the CPU; on a GPU the other ids of tp_devices (rank 0 is the one
        Triton gave this instance), or the next GPUs after it when the list is not given."""
        if not device.startswith("cuda"):
            return ["cpu"] * (self.tp - 1)
        mine = int(device.split(":")[1])
        ids = list(self.tp_devices) or [mine + rank for rank in range(self.tp)]
        if ids[0] != mine:
            raise ValueError(f"parameter tp_devices {ids} puts rank 0 on GPU {ids[0]} but Triton placed this "
                             f"instance on GPU {mine}: the instance group's gpus must be [{ids[0]}]")
        return [f"cuda:{i}" for i in ids[1:]]

    def _load_tensor_parallel(self, device: str, slots: int, shrink: bool) -> GptEngine:
        import torch

        from .tensor_parallel import launch_engine

        return launch_engine(self.model_dir, self.tp, device=device, worker_devices=self.worker_devices(device),
                             dtype=getattr(torch, DATA_TYPES[self.data_type]), on_failure=exit_after_engine_failure,
                             max_batch_size=slots, max_seq_len=self.max_seq_len, vocab_limit=self.vocab_limit,
                             shrink_to_fit=shrink, kv_cache_dtype=self.kv_cache_dtype,
                             weight_quantization=self.weight_quantization)

    def describe(self, engine: GptEngine, device: str) -> str:
        """The load line of the model's log: where the weights came from and the KV cache they got."""
        limits = engine.limits
        where = device if self.tp == 1 else f"{device} + {', '.join(self.worker_devices(device))} (tensor-parallel)"
        cache = "" if self.kv_cache_dtype == "auto" else f" ({self.kv_cache_dtype})"
        weights = "" if self.weight_quantization == "none" else f", weights {self.weight_quantization}"
        # Said where GPT_TRITON_ONE_LAUNCH=1 took effect (GptModel logs why where it could not).
        one_launch = ", batch-1 steps in one launch" if getattr(engine.model, "one_launch", None) is not None else ""
        return (f"{self.model_dir} on {where} ({self.data_type}), {limits.max_batch_size} KV-cache slots x "
                f"{limits.max_seq_len} tokens{cache} = {engine.kv_cache_bytes / 2**30:.2f} GiB, "
                f"decoupled={self.decoupled}{weights}{one_launch}")


def release(engine: GptEngine | None) -> None:
    """Drop the engine at unload; a tensor-parallel one first stops its workers."""
    close = getattr(engine, "close", None)
    if close is not None:
        close()


def exit_after_engine_failure(reason: str) -> None:
    """A tensor-parallel worker or the engine process died: the requests in flight fail with `reason`, then this
    Python stub exits, so that `serve` sees a dead stub and stops the server (exit 3) for its supervisor to restart
    (Triton 2.51 would keep the instance 'ready' while every request failed)."""
    print(f"{reason}: the model instance stops in {ENGINE_FAILURE_EXIT_S:.0f} s", file=sys.stderr, flush=True)
    timer = threading.Timer(ENGINE_FAILURE_EXIT_S, os._exit, args=(1,))  # no teardown: a broken group aborts in it
    timer.daemon = True
    timer.start()


def run_static(engine: GptEngine, inputs: Sequence[Mapping[str, np.ndarray]],
               cancelled: Sequence[Callable[[], bool]], metrics: EngineMetrics | None = None) -> list[Reply]:
    """Not decoupled: every valid request of the dynamic batch in one engine call; one reply each."""
    replies: list[Reply | None] = [None] * len(inputs)
    parsed = {}
    for i, request_inputs in enumerate(inputs):
        try:
            parsed[i] = parse_request(request_inputs, engine.limits)
        except RequestError as err:
            replies[i] = Reply(error=str(err), kind=INVALID)
    rows: list[GenerationRequest] = []
    owner: list[int] = []  # engine row -> request
    first_row: dict[int, int] = {}
    for i, request in parsed.items():
        first_row[i] = len(rows)
        rows += request.rows
        owner += [i] * len(request.rows)
    gone: set[int] = set()

    def cancelled_rows() -> list[int]:  # polled by the engine a few times a second
        gone.update(i for i in parsed if i not in gone and cancelled[i]())
        return [row for row, i in enumerate(owner) if i in gone]

    if metrics is not None:  # the static path has no per-step view: tokens and load only
        metrics.set_load(slots_in_use=len(rows), running=len(parsed))
        metrics.add_prompt_tokens(sum(len(row.input_ids) for row in rows))
    try:
        outputs = engine.generate(rows, is_cancelled=cancelled_rows) if rows else []
    except Exception as err:  # noqa: BLE001  (one failed batch must not take the server down)
        return [reply or Reply(error=f"generation failed: {err}", kind=INTERNAL) for reply in replies]
    finally:
        if metrics is not None:
            metrics.set_load(slots_in_use=0, running=0)
    if metrics is not None:
        metrics.add_generated_tokens(sum(len(output.beams[0]) - output.prompt_len for output in outputs))
    for i, request in parsed.items():
        mine = outputs[first_row[i]:first_row[i] + len(request.rows)]
        if any(output.cancelled for output in mine):
            replies[i] = Reply(error="request cancelled", kind=CANCELLED)
        else:
            replies[i] = Reply(arrays=ft_outputs(request.rows, mine, with_log_probs=request.return_log_probs))
    return replies  # type: ignore[return-value]  # every index was set above


def start_scheduler(engine: GptEngine, settings: CoreSettings | None, *, event_log: Callable[[str], None] | None,
                    report: Callable[[str], None] | None, metrics: MetricsRecorder | None,
                    after_pass: Callable[[], None] | None = None) -> tuple[InflightScheduler, str]:
    """The in-flight scheduler over a loaded engine, its CUDA graphs captured first (at load, so no request waits
    ~0.1 s for a capture); returns it running, with a note on the capture."""
    from .scheduler import STEP_PROMPT_TOKENS, InflightScheduler

    note = "no CUDA graphs"
    if getattr(engine, "graphs", None) is not None:
        started = time.monotonic()
        try:
            note = engine.capture_graphs()
        except RuntimeError as err:  # graphs are then captured on first use, as without this step
            note = f"capturing CUDA graphs at load failed ({err}); they are captured on first use"
        note = f"{note} ({time.monotonic() - started:.1f} s)"
    step_tokens = settings.step_prompt_tokens if settings is not None else 0
    scheduler = InflightScheduler(engine, event_log=event_log, report=report, metrics=metrics,
                                  step_prompt_tokens=step_tokens or STEP_PROMPT_TOKENS, after_pass=after_pass).start()
    return scheduler, note


def scheduler_summary(scheduler: InflightScheduler) -> str:
    """The unload line of the model's log."""
    stats = scheduler.stats
    return (f"in-flight scheduler: {stats.steps} steps, {stats.admitted_rows} rows admitted "
            f"({stats.joined_running_rows} joined a running batch), peak {stats.peak_rows} rows, "
            f"{stats.finished_requests} requests finished, {stats.failed_requests} failed, "
            f"{scheduler.sender_stats[0]} streamed updates; {stats.timeline.summary()}")


def start_model(settings: CoreSettings, device: str, new_metrics: Callable[[int], EngineMetrics],
                log_verbose: Callable[[str], None], log_info: Callable[[str], None]
                ) -> tuple[GptEngine | None, StreamingCore | None, EngineMetrics]:
    """model.py's initialize: (the engine, if it runs in this process; the decoupled core; the metrics). The engine
    runs in a child process when settings.engine_process says so (decoupled only), else here."""
    if settings.engine_process:
        from .engine_process import EngineProcess

        remote = EngineProcess(settings, device, log_info=log_info, log_verbose=log_verbose,
                               on_exit=exit_after_engine_failure)
        remote.metrics = metrics = new_metrics(remote.limits.max_batch_size).start()
        log_info(f"{remote.note} (engine process {remote.process.pid})")
        return None, StreamingCore(remote, remote.limits, remote.stop, settings), metrics
    engine = settings.load(device)
    metrics = new_metrics(engine.limits.max_batch_size).start()
    log_info(settings.describe(engine, device))
    if not settings.decoupled:
        return engine, None, metrics
    # Verbose: a line per admission and cancellation; info: the scheduler's timeline every 10 s of work.
    scheduler, note = start_scheduler(engine, settings, event_log=log_verbose, report=log_info, metrics=metrics)
    log_info(note)
    return engine, StreamingCore(scheduler, engine.limits, lambda: _stop_local(scheduler), settings), metrics


def _stop_local(scheduler: InflightScheduler) -> str:
    scheduler.stop()
    return scheduler_summary(scheduler)


class RequestQueue(Protocol):
    """Where StreamingCore queues requests: the in-flight scheduler here, or the engine process's handle."""

    def submit(self, rows: Sequence[GenerationRequest], sink: _Sink, *, stream: bool = False) -> object: ...


class StreamingCore:
    """Decoupled: validate each request and queue it on the in-flight scheduler; replies come from its sender."""

    def __init__(self, queue: RequestQueue, limits: EngineLimits, stop: Callable[[], str],
                 settings: CoreSettings | None = None) -> None:
        from .stream_ack import AckListener

        self.queue, self.limits, self._stop = queue, limits, stop
        self.acks = AckListener(settings.stream_abandon_s if settings is not None else ABANDON_AFTER_S)

    def submit(self, inputs: Mapping[str, np.ndarray], transport: Transport) -> None:
        try:
            parsed = parse_request(inputs, self.limits)
        except RequestError as err:
            transport.send(Reply(error=str(err), kind=INVALID), final=True)
            return
        self.submit_parsed(parsed, transport)

    def submit_parsed(self, parsed: ParsedRequest, transport: Transport, state: ResponseState | None = None) -> None:
        """Queue a request already split into rows (a text core's preprocessing makes them from its text); its
        responses' arrays come from `state` (default: FT's tensors, core_io.StreamState)."""
        from .generation import ResourceError

        try:
            sink = _Sink(transport, parsed.rows, self.acks, stream=parsed.stream, log_probs=parsed.return_log_probs,
                         exclude_input=parsed.exclude_input, ft_stream=parsed.ft_stream,
                         count_per_response=parsed.count_per_response, state=state)
            self.queue.submit(parsed.rows, sink, stream=parsed.stream or parsed.ft_stream)
        except (RequestError, ResourceError) as err:
            transport.send(Reply(error=str(err), kind=INVALID), final=True)
        except RuntimeError as err:  # the scheduler stopped (model unloading)
            transport.send(Reply(error=str(err), kind=UNAVAILABLE), final=True)

    def stop(self) -> str:
        summary = self._stop()
        self.acks.close()
        return summary


class _Sink:
    """scheduler.ResponseSink over a Transport; called from the scheduler's sender thread."""

    def __init__(self, transport: Transport, rows: list[GenerationRequest], acks: AckListener, *, stream: bool,
                 log_probs: bool, exclude_input: bool = True, ft_stream: bool = False,
                 count_per_response: bool = False, state: ResponseState | None = None) -> None:
        self.transport, self.acks = transport, acks
        # Only our postprocessing acknowledges (stream_ack.py); an FT client's stream has no such partner, nor has a
        # text core's own state (no postprocessing behind it).
        self.key = acks.new_key() if stream and state is None else 0
        self.state = state or StreamState(rows, stream=stream, log_probs=log_probs, exclude_input=exclude_input,
                                          cumulative=ft_stream, count_per_response=count_per_response,
                                          ack=(acks.port, self.key) if stream else (0, 0))

    def update(self, outputs: list[RowOutput]) -> None:
        self.transport.send(Reply(arrays=self.state.update(outputs)), final=False)
        if self.key:
            self.acks.sent(self.key)

    def finish(self, outputs: list[RowOutput]) -> None:
        self.acks.forget(self.key)
        if any(output.cancelled for output in outputs):
            self.transport.send(Reply(error="request cancelled", kind=CANCELLED), final=True)
        else:
            self.transport.send(Reply(arrays=self.state.final(outputs)), final=True)

    def fail(self, error: Exception) -> None:
        self.acks.forget(self.key)
        self.transport.send(Reply(error=f"generation failed: {error}", kind=INTERNAL), final=True)

    def reject(self, message: str) -> None:
        """The engine process refused the request (as InflightScheduler.submit's RequestError or ResourceError)."""
        self.acks.forget(self.key)
        self.transport.send(Reply(error=message, kind=INVALID), final=True)

    def is_cancelled(self) -> bool:
        if self.key != 0 and self.acks.acknowledged(self.key):
            # Behind the ensemble Triton never cancels this request (stream_ack.py): only the acknowledgements tell,
            # and the transport's poll (an IPC round trip on the sender thread) is skipped.
            return self.acks.abandoned(self.key)
        return bool(self.transport.is_cancelled()) or (self.key != 0 and self.acks.abandoned(self.key))
