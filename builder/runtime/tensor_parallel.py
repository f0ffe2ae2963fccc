"""Tensor parallelism for the PyTorch engine: one process per rank, rank 0 leads, ranks 1..N-1 mirror it.

Megatron-style split (the converter's FT `N-gpu` files, loaded per rank as they are: ft_weights.load_ft_shard):
QKV and FC1 by output columns (each rank holds head_num/N heads and inter_size/N FC1 units), attention-out and FC2 by
input rows, so each layer needs one all-reduce after each of those two products (gpt.py `_linear_into_residual` in
decode, `_row_linear` in prefill; the bias is added once, after it). The LM head is split by vocabulary rows and the
logits gathered; the embedding lookup reads the whole table, which every rank keeps (n rows a step: cheaper than an
all-reduce). Collectives run over NCCL on CUDA (capturable, so decode keeps its CUDA graphs) and gloo on CPU.

Process layout. Rank 0 is the engine the Triton model instance (or a benchmark) holds: `launch_engine` starts the
workers (`python -m <this package>.tensor_parallel`, stdin: a JSON spec), joins them in a process group whose
rendezvous file lives in a private 0700 folder, and watches them. Every engine call that touches the model (decode,
prefill, slot copies, graph capture) is first broadcast to the workers (`_Channel`: a small JSON header over a gloo
group with no timeout, its tensors over the data group, stream-ordered on CUDA: no host sync), then run by rank 0 on
its own shard; each worker runs the same call on its shard, so the collectives pair up. Sampling, stop words and
everything else of `GptEngine.generate` and the scheduler run on rank 0 only, on the gathered logits: tokens do not
depend on the TP size.

Failure: a worker that dies (killed, OOM, an exception: it prints its traceback and exits) breaks the group. Rank 0's
call in flight then fails with `TensorParallelError` naming the rank, pid and signal or exit status; so does every
later call, and `on_failure` is told once (the Triton core then ends its stub: see core_adapter.py). Workers end when
rank 0 does (the control group's connection closes, and a watchdog notices the parent is gone).

Copied into rendered model repositories: relative imports only.
"""

from __future__ import annotations

import datetime
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .ft_weights import WeightFileError, check_weight_dir, load_ft_shard
from .generation import GptEngine, ResourceError

# NVLink SHARP / multicast stay off (the GPU hosts' fabric manager setup does not allow them); set in every rank.
NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
# All ranks run on one host: rendezvous and gloo over loopback unless the user chose an interface.
LOOPBACK_ENV = {"GLOO_SOCKET_IFNAME": "lo", "NCCL_SOCKET_IFNAME": "lo"}
STARTUP_TIMEOUT_S = 300.0  # workers import torch and load their shard before the group forms
STEP_TIMEOUT = datetime.timedelta(minutes=5)  # a data collective waiting this long means a hung peer
IDLE_TIMEOUT = datetime.timedelta(days=3650)  # the control group: workers wait for rank 0's next call indefinitely
READY = b"R"  # a worker's first byte on stdout: imported and configured
DEVICE_SET = "tp-device-set/"  # + rank: a store key a worker sets once its device is set, just before it joins
JOIN_POLL_S = 0.1
HEADER_BYTES = 1024  # the first broadcast of a call; longer headers follow in a second one
PARENT_POLL_S = 0.5
# Engine methods whose calls the workers mirror (where the engine has them: chunked prefill is newer), and the
# model methods rank 0's engine calls directly.
ENGINE_CALLS = ("decode", "prefill_slots", "prefill_chunks", "capture_graphs")
MODEL_CALLS = ("prefill", "decode", "copy_slots")


class TensorParallelError(RuntimeError):
    """The tensor-parallel group is broken (a worker died or a mirrored call failed): this engine cannot continue."""


# ---- the math of one rank --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TensorShard:
    """What gpt.GptModel needs to run rank `rank` of `size`: the data group's all-reduce and the logits gather."""

    rank: int
    size: int
    vocab_size: int
    group: Any = None  # a torch.distributed process group; None: the default group

    @property
    def vocab_per_rank(self) -> int:
        return -(-self.vocab_size // self.size)

    def vocab_rows(self, table: torch.Tensor) -> torch.Tensor:
        """This rank's rows of the LM head [V, H] -> [ceil(V / size), H]; the last rank's are zero-padded."""
        per = self.vocab_per_rank
        rows = table[self.rank * per:(self.rank + 1) * per]
        return F.pad(rows, (0, 0, 0, per - rows.shape[0])).contiguous()

    def all_reduce(self, partial: torch.Tensor) -> torch.Tensor:
        """Sum a row-parallel product over the ranks, in place."""
        dist.all_reduce(partial, group=self.group)
        return partial

    def gather_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        """[n, V/size] of every rank -> [n, V] (rank order = vocabulary order; the padding columns dropped)."""
        n, per = logits.shape
        out = torch.empty((self.size * n, per), dtype=logits.dtype, device=logits.device)
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.13
        gather(out, logits.contiguous(), group=self.group)
        return out.view(self.size, n, per).permute(1, 0, 2).reshape(n, self.size * per)[:, :self.vocab_size]


class RankWeights(dict[str, torch.Tensor]):
    """One rank's canonical weight dict (rank shapes); GptModel reads `shard` from it, so GptEngine needs no new
    argument to build a sharded model."""

    def __init__(self, tensors: dict[str, torch.Tensor], shard: TensorShard) -> None:
        super().__init__(tensors)
        self.shard = shard


# ---- the call channel -----------------------------------------------------------------------------------------------

_DTYPES = {str(t): t for t in (torch.int64, torch.int32, torch.bool, torch.float32, torch.float16, torch.bfloat16,
                               torch.uint8)}


class _Channel:
    """Rank 0 -> workers: (target, method, args, kwargs). Scalars, None and lists of numbers travel in the JSON
    header (control group); tensors after it: device tensors over the data group (NCCL: ordered on the stream, no
    host sync), host tensors over the control group."""

    def __init__(self, control: Any, data: Any, device: torch.device) -> None:
        self.control, self.data, self.device = control, data, device

    def _encode(self, value: Any, tensors: list[torch.Tensor]) -> Any:
        if isinstance(value, torch.Tensor):
            tensors.append(value.contiguous())
            return {"tensor": len(tensors) - 1, "shape": list(value.shape), "dtype": str(value.dtype),
                    "host": value.device.type == "cpu" and self.device.type != "cpu"}
        if isinstance(value, (list, tuple)) and all(isinstance(v, (bool, int, float)) for v in value):
            return {"value": list(value)}  # the common case (slot and position lists): plain JSON
        if isinstance(value, (list, tuple)):
            return {"list": [self._encode(v, tensors) for v in value]}
        if value is None or isinstance(value, (bool, int, float, str)):
            return {"value": value}
        raise TypeError(f"tensor-parallel call argument of type {type(value).__name__} cannot be sent to workers")

    def send(self, target: str, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        tensors: list[torch.Tensor] = []
        header = json.dumps({"target": target, "method": method, "args": [self._encode(a, tensors) for a in args],
                             "kwargs": {k: self._encode(v, tensors) for k, v in kwargs.items()}}).encode()
        first = torch.zeros(HEADER_BYTES, dtype=torch.uint8)
        first[:8] = torch.tensor([len(header)], dtype=torch.int64).view(torch.uint8)
        head = header[:HEADER_BYTES - 8]
        first[8:8 + len(head)] = torch.frombuffer(bytearray(head), dtype=torch.uint8)
        dist.broadcast(first, 0, group=self.control)
        if len(header) > len(head):
            dist.broadcast(torch.frombuffer(bytearray(header[len(head):]), dtype=torch.uint8), 0, group=self.control)
        for tensor in tensors:
            host = tensor.device.type == "cpu" and self.device.type != "cpu"
            dist.broadcast(tensor, 0, group=self.control if host else self.data)

    def receive(self) -> tuple[str, str, list[Any], dict[str, Any]]:
        first = torch.zeros(HEADER_BYTES, dtype=torch.uint8)
        dist.broadcast(first, 0, group=self.control)
        length = int(first[:8].view(torch.int64)[0])
        header = bytes(first[8:8 + min(length, HEADER_BYTES - 8)].tolist())
        if length > HEADER_BYTES - 8:
            rest = torch.zeros(length - (HEADER_BYTES - 8), dtype=torch.uint8)
            dist.broadcast(rest, 0, group=self.control)
            header += bytes(rest.tolist())
        call = json.loads(header)
        tensors: dict[int, torch.Tensor] = {}
        specs: list[dict[str, Any]] = []

        def collect(node: dict[str, Any]) -> None:
            if "tensor" in node:
                specs.append(node)
            for child in node.get("list", ()):
                collect(child)

        for node in [*call["args"], *call["kwargs"].values()]:
            collect(node)
        for spec in sorted(specs, key=lambda s: s["tensor"]):  # in the order rank 0 sent them
            device = torch.device("cpu") if spec["host"] else self.device
            tensor = torch.empty(spec["shape"], dtype=_DTYPES[spec["dtype"]], device=device)
            dist.broadcast(tensor, 0, group=self.control if spec["host"] else self.data)
            tensors[spec["tensor"]] = tensor

        def decode(node: dict[str, Any]) -> Any:
            if "tensor" in node:
                return tensors[node["tensor"]]
            if "list" in node:
                return [decode(child) for child in node["list"]]
            return node["value"]

        return (call["target"], call["method"], [decode(a) for a in call["args"]],
                {k: decode(v) for k, v in call["kwargs"].items()})


def _died(rank: int, worker: subprocess.Popen[bytes]) -> str:
    """What rank 0 says of an exited worker."""
    code = worker.returncode
    how = f"killed by signal {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
    return f"tensor-parallel worker rank {rank} (pid {worker.pid}) died ({how})"


def _free_process_group(broken: bool) -> None:
    """Free this process's group so that another engine may start in it. A broken NCCL group is aborted instead
    (destroying it would wait for collectives that never finish)."""
    abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
    if broken and dist.get_backend() == "nccl" and abort is not None:
        abort()
    elif not broken or dist.get_backend() != "nccl":
        dist.destroy_process_group()


# ---- rank 0: mirroring and supervision ------------------------------------------------------------------------------

class _Leader:
    """Rank 0's side: broadcast each outermost call, then run it; supervise the workers."""

    def __init__(self, channel: _Channel, workers: list[subprocess.Popen[bytes]],
                 on_failure: Callable[[str], None] | None) -> None:
        self.channel, self.workers, self.on_failure = channel, workers, on_failure
        self.lock = threading.RLock()  # one call at a time, whole (a nested call runs inside its outer one)
        self.depth = 0
        self.failure: str | None = None
        self.failed = threading.Event()
        self._fail_lock = threading.Lock()
        self.closing = False
        self.private: Path | None = None  # the rendezvous folder
        for rank, worker in enumerate(workers, start=1):
            threading.Thread(target=self._watch, args=(rank, worker), name=f"tp-watch-{rank}", daemon=True).start()

    def _watch(self, rank: int, worker: subprocess.Popen[bytes]) -> None:
        worker.wait()
        if not self.closing:
            self.fail(_died(rank, worker))

    def fail(self, reason: str) -> None:
        with self._fail_lock:
            if self.failure is not None:
                return
            self.failure = reason
        self.failed.set()
        if self.private is not None:  # the group is over; the stub may exit without close()
            shutil.rmtree(self.private, ignore_errors=True)
        if self.on_failure is not None:
            self.on_failure(reason)

    def check(self) -> None:
        if self.failure is not None:
            raise TensorParallelError(f"{self.failure}; this model instance cannot generate any more: restart it")

    def call(self, target: str, method: str, run: Callable[..., Any], args: tuple[Any, ...],
             kwargs: dict[str, Any]) -> Any:
        with self.lock:
            if self.depth:  # inside a mirrored call: the workers run this nested call themselves
                return run(*args, **kwargs)
            self.check()
            if self.channel.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                # A replay would run rank 0's half of the collectives without telling the workers: a hang.
                raise TensorParallelError(f"{target}.{method} called inside a CUDA graph capture: a tensor-parallel "
                                          "step must be mirrored outside graphs (capture below the engine's calls)")
            self.depth += 1
            try:
                self.channel.send(target, method, args, kwargs)
                return run(*args, **kwargs)
            except Exception as err:
                # A collective that fails usually means a worker died: give its watcher a moment to say which.
                if not isinstance(err, TensorParallelError):
                    self.failed.wait(2.0)
                    self.fail(self.failure or f"tensor-parallel {target}.{method} failed on rank 0: {err}")
                self.check()
                raise
            finally:
                self.depth -= 1

    def close(self, timeout_s: float = 10.0) -> None:
        """Tell the workers to exit (if the group still works), then make sure they have."""
        with self.lock:
            if self.closing:
                return
            self.closing = True
            if self.failure is None:
                try:
                    self.channel.send("stop", "stop", (), {})
                except Exception:  # noqa: BLE001  (a broken group: the workers are stopped below anyway)
                    pass
        deadline = time.monotonic() + timeout_s
        for worker in self.workers:
            try:
                worker.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()
        _free_process_group(broken=self.failure is not None)
        if self.private is not None:
            shutil.rmtree(self.private, ignore_errors=True)


class _MirroredModel:
    """Rank 0's engine.model: the calls in MODEL_CALLS are mirrored; everything else is the shard's GptModel."""

    def __init__(self, model: Any, leader: _Leader) -> None:
        object.__setattr__(self, "_model", model)
        object.__setattr__(self, "_leader", leader)

    def __setattr__(self, name: str, value: Any) -> None:  # e.g. a benchmark choosing `kernels`: the shard's
        setattr(self._model, name, value)

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._model, name)
        if name not in MODEL_CALLS:
            return attribute
        return lambda *args, **kwargs: self._leader.call("model", name, attribute, args, kwargs)


# ---- the engine of one rank -----------------------------------------------------------------------------------------

class TensorParallelEngine(GptEngine):
    """GptEngine over one rank's shard. On rank 0 (`leader` set) the model-touching calls are mirrored to the
    workers first; on a worker they run as called (from `serve_worker`'s loop)."""

    def __init__(self, config: Any, weights: RankWeights, *, control: Any, leader: _Leader | None = None,
                 **kwargs: Any) -> None:
        self._control, self._leader = control, leader
        self.shard = weights.shard
        super().__init__(config, weights, **kwargs)  # sized by this rank's model: heads/size of the heads
        self.raw_model = self.model  # the worker loop and the graphs run this one directly
        if leader is not None:
            self.model = _MirroredModel(self.model, leader)  # type: ignore[assignment]  # same interface

    def _slots_that_fit(self, wanted: int, max_seq_len: int, shrink: bool) -> int:
        """Every rank must have the same slots: the fewest that fit on any (0 on a rank that raised: all raise)."""
        try:
            mine = super()._slots_that_fit(wanted, max_seq_len, shrink)
            error = ""
        except ResourceError as err:
            mine, error = 0, str(err)
        agreed = torch.tensor([mine], dtype=torch.int64)
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN, group=self._control)
        if int(agreed[0]) < 1:
            raise ResourceError(error or "the KV cache does not fit on another tensor-parallel rank (see its log)")
        return int(agreed[0])

    def capture_graphs(self, check: bool = True) -> str:
        # No eager-vs-graph check: its random prompt would differ per rank, and so could its verdict.
        return self._mirrored("capture_graphs", super().capture_graphs, (), {"check": False})

    def _mirrored(self, name: str, run: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if self._leader is None:
            return run(*args, **kwargs)
        return self._leader.call("engine", name, run, args, kwargs)

    def close(self) -> None:
        if self._leader is not None:
            self._leader.close()


def _mirror_engine_method(name: str) -> None:
    base = getattr(GptEngine, name)

    def method(self: TensorParallelEngine, *args: Any, **kwargs: Any) -> Any:
        return self._mirrored(name, lambda *a, **k: base(self, *a, **k), args, kwargs)

    method.__name__ = name
    method.__doc__ = base.__doc__
    setattr(TensorParallelEngine, name, method)


for _name in ENGINE_CALLS:
    if hasattr(GptEngine, _name) and _name != "capture_graphs":
        _mirror_engine_method(_name)


# ---- process group set-up -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RankSpec:
    """Everything a rank needs to build its engine; rank 0 sends it to each worker as JSON."""

    model_dir: str
    world: int
    rank: int
    device: str  # "cpu" or "cuda:<id>"
    dtype: str  # torch dtype name, e.g. "float16"
    store_path: str
    engine_kwargs: dict[str, Any]

    def to_json(self) -> str:
        return json.dumps(self.__dict__)


def set_process_env() -> None:
    for key, value in NCCL_ENV.items():
        os.environ[key] = value
    for key, value in LOOPBACK_ENV.items():
        os.environ.setdefault(key, value)


def _join_group(spec: RankSpec, workers: Sequence[subprocess.Popen[bytes]] = ()) -> tuple[Any, Any, torch.device]:
    """(control group, data group, device) of this rank; the data group is the default group. Rank 0 passes the
    worker processes: it joins once each has set its device, and names one that dies before."""
    set_process_env()
    device = torch.device(spec.device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    options: dict[str, Any] = {}
    if device.type == "cuda":
        torch.cuda.set_device(device)
        options["device_id"] = device
    store = dist.FileStore(spec.store_path, spec.world)
    if spec.rank:
        store.set(f"{DEVICE_SET}{spec.rank}", "1")
    else:
        _wait_devices_set(store, workers)
    dist.init_process_group(backend, store=store, rank=spec.rank, world_size=spec.world, timeout=STEP_TIMEOUT,
                            **options)
    control = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
    return control, dist.group.WORLD, device


def _wait_devices_set(store: Any, workers: Sequence[subprocess.Popen[bytes]]) -> None:
    """Rank 0: wait until every worker has set its device (a GPU id past the host's fails there), watching them:
    init_process_group would wait STEP_TIMEOUT for one that died, then fail naming nothing."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while True:
        pending = [rank for rank in range(1, len(workers) + 1) if not store.check([f"{DEVICE_SET}{rank}"])]
        if not pending:
            return
        for rank in pending:
            if workers[rank - 1].poll() is not None:
                raise TensorParallelError(f"{_died(rank, workers[rank - 1])} before joining the process group "
                                          "(its traceback is in the log above)")
        if time.monotonic() > deadline:
            raise TensorParallelError(f"tensor-parallel worker rank(s) {pending} did not join the process group "
                                      f"within {STARTUP_TIMEOUT_S:.0f} s")
        time.sleep(JOIN_POLL_S)


def _communication_failure(err: BaseException) -> bool:
    """An error of a collective (a peer gone) rather than of this rank's own work: gloo reports a closed connection
    as a plain RuntimeError, NCCL as a DistBackendError."""
    return isinstance(err, dist.DistError) or type(err) is RuntimeError


def _build_engine(spec: RankSpec, control: Any, data: Any, leader: _Leader | None) -> TensorParallelEngine:
    dtype = getattr(torch, spec.dtype)
    config, tensors = load_ft_shard(spec.model_dir, spec.rank, dtype=dtype, device=spec.device)
    if config.tensor_para_size != spec.world:
        raise ValueError(f"{spec.model_dir} holds weights split for tensor_para_size={config.tensor_para_size}, "
                         f"not {spec.world}: convert with --infer-gpu-num {spec.world}")
    shard = TensorShard(rank=spec.rank, size=spec.world, vocab_size=config.vocab_size, group=data)
    return TensorParallelEngine(config, RankWeights(tensors, shard), control=control, leader=leader,
                                device=spec.device, dtype=dtype, **spec.engine_kwargs)


def worker_python() -> str:
    """The interpreter for workers: this one, unless it is embedded (Triton's Python-backend stub), then the first
    python3 on PATH (what the stub itself embeds; `serve` puts this environment's first)."""
    executable = Path(sys.executable or "")
    if executable.name.startswith("python") and executable.is_file():
        return str(executable)
    found = shutil.which("python3")
    if found is None:
        raise TensorParallelError("no python3 on PATH to start the tensor-parallel workers")
    return found


def start_module(module: str, *args: str, extra_env: Mapping[str, str] | None = None,
                 **popen: Any) -> subprocess.Popen[bytes]:
    """`python -m <this package>.<module> args` in a new process (worker_python), with this package's copy first on
    its path (the rendered repository's gpt_runtime, or builder.runtime), in its root folder, with this environment
    plus extra_env; popen: subprocess.Popen's other options."""
    package_root = Path(__file__).resolve().parents[len(__package__.split("."))]
    env = {**os.environ, **(extra_env or {}), "PYTHONPATH": os.pathsep.join(
        [str(package_root), *filter(None, [os.environ.get("PYTHONPATH")])])}
    return subprocess.Popen([worker_python(), "-m", f"{__package__}.{module}", *args], env=env,
                            cwd=str(package_root), **popen)


def launch_engine(model_dir: str | Path, world: int, *, device: str, worker_devices: list[str], dtype: torch.dtype,
                  on_failure: Callable[[str], None] | None = None, **engine_kwargs: Any) -> TensorParallelEngine:
    """Rank 0: start workers 1..world-1 (on worker_devices), form the group, load every shard; returns rank 0's
    engine. `on_failure(reason)` is called once if the group breaks later (from a watcher thread)."""
    if dist.is_initialized():
        raise TensorParallelError("this process already runs a tensor-parallel engine (its process group is "
                                  "per process): close() it first")
    if len(worker_devices) != world - 1:
        raise ValueError(f"tensor parallelism over {world} ranks needs {world - 1} worker device(s), "
                         f"got {worker_devices}")
    # Every rank would refuse the same files: say so before any worker starts. Found later, a worker could exit while
    # rank 0 still connects the group, and rank 0 would report a closed connection instead.
    problems = check_weight_dir(model_dir)
    if problems:
        raise WeightFileError(Path(model_dir), problems)
    private = Path(tempfile.mkdtemp(prefix="gpt-tp-"))  # 0700: no other local user can join the rendezvous
    spec0 = RankSpec(model_dir=str(model_dir), world=world, rank=0, device=device,
                     dtype=str(dtype).removeprefix("torch."), store_path=str(private / "store"),
                     engine_kwargs=engine_kwargs)
    workers: list[subprocess.Popen[bytes]] = []
    try:
        for rank in range(1, world):
            spec = replace(spec0, rank=rank, device=worker_devices[rank - 1])
            worker = start_module("tensor_parallel", extra_env=NCCL_ENV, stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE)
            workers.append(worker)
            assert worker.stdin is not None
            try:
                worker.stdin.write(spec.to_json().encode())
                worker.stdin.close()
            except BrokenPipeError:  # it exited already: _wait_ready says how
                pass
        for rank, worker in enumerate(workers, start=1):
            _wait_ready(rank, worker)
        control, data, torch_device = _join_group(spec0, workers)
        leader = _Leader(_Channel(control, data, torch_device), workers, None)
        try:
            engine = _build_engine(spec0, control, data, leader)
        except Exception as err:
            # Rank 0's own error (a bad shard file every rank reads, memory): the workers die of the same; say it.
            if not _communication_failure(err):
                raise
            leader.failed.wait(2.0)  # a worker that died while loading broke rank 0's collective: name it
            if leader.failure is not None:  # rank 0's error too, in case it was its own after all
                raise TensorParallelError(f"{leader.failure} while the ranks loaded their shards (its traceback "
                                          f"is in the log above); rank 0 got: {err}") from err
            raise
        leader.on_failure = on_failure
        if torch_device.type == "cpu":  # gloo's pairs are connected: nothing reads the store any more
            shutil.rmtree(private, ignore_errors=True)
        else:  # NCCL's monitor may still read it while the group lives: removed at close or failure
            leader.private = private
        return engine
    except BaseException:
        for worker in workers:
            worker.kill()
            worker.wait()
        if dist.is_initialized():  # else every later launch in this process is refused
            try:
                _free_process_group(broken=True)
            except Exception:  # noqa: BLE001  (the launch's own error, re-raised below, is the one to report)
                pass
        shutil.rmtree(private, ignore_errors=True)
        raise


def _wait_ready(rank: int, worker: subprocess.Popen[bytes]) -> None:
    """A worker writes one byte once it has imported torch and read its spec: one that fails before that (a missing
    module, a bad interpreter) is reported here instead of leaving rank 0 waiting for it to join the group."""
    assert worker.stdout is not None
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        ready, _, _ = select.select([worker.stdout], [], [], 0.5)
        if ready and worker.stdout.read(1) == READY:
            worker.stdout.close()
            return
        if worker.poll() is not None:
            raise TensorParallelError(f"tensor-parallel worker rank {rank} exited with status {worker.returncode} "
                                      "while starting (its traceback is in the log above)")
    raise TensorParallelError(f"tensor-parallel worker rank {rank} did not start within {STARTUP_TIMEOUT_S:.0f} s")


# ---- a worker process -----------------------------------------------------------------------------------------------

def _watch_parent(rendezvous: Path) -> None:
    """Exit when rank 0 is gone (reparented), whatever this process is blocked in; its rendezvous folder goes too."""
    parent = os.getppid()
    while True:
        time.sleep(PARENT_POLL_S)
        if os.getppid() != parent:
            shutil.rmtree(rendezvous, ignore_errors=True)
            os._exit(0)


def serve_worker(spec: RankSpec) -> None:
    """Build this rank's engine, then run every call rank 0 broadcasts until it says stop."""
    threading.Thread(target=_watch_parent, args=(Path(spec.store_path).parent,), name="tp-parent",
                     daemon=True).start()
    if spec.device == "cpu":  # share the cores with the other ranks instead of oversubscribing them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // spec.world))
    control, data, device = _join_group(spec)
    engine = _build_engine(spec, control, data, None)
    channel = _Channel(control, data, device)
    targets = {"engine": engine, "model": engine.raw_model}
    with torch.inference_mode():
        while True:
            target, method, args, kwargs = channel.receive()
            if target == "stop":
                return
            allowed = ENGINE_CALLS if target == "engine" else MODEL_CALLS
            if method not in allowed:
                raise TensorParallelError(f"rank 0 asked for {target}.{method}, which workers do not run")
            getattr(targets[target], method)(*args, **kwargs)


def main() -> None:
    spec = RankSpec(**json.loads(sys.stdin.read()))
    os.write(1, READY)
    os.dup2(2, 1)  # later output goes to stderr (the server log), not to the pipe rank 0 stopped reading
    try:
        serve_worker(spec)
    except BaseException:  # noqa: BLE001  (whatever it was: print it, then leave without teardown)
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)  # no interpreter teardown: a broken process group aborts in its destructor
    os._exit(0)


if __name__ == "__main__":
    main()
