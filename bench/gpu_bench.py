"""GPU benchmark of the 1.3B GPT served through Triton, with HF transformers on the same GPU as the peer.

Runs end to end on a GPU host (see docs/benchmarks.md for the exact command):
  1. a random-weight NeMo GPT-3 1.3B checkpoint (`builder checkpoint --preset gpt3-1.3b`) -> fp16 FT weights;
  2. the text ensemble rendered on the torch engine (KIND_GPU, fp16), served by tritonserver;
  3. through Triton (gRPC): batch-1 decode time per token (slope of latency over output length), time to first token
     for a 512-token prompt, output tokens/s with 1/8/32/64 concurrent clients (128-token prompts, 128 new tokens);
  4. in the same run, on the same GPU: HF `GPT2LMHeadModel` `generate` (eager and static cache) at batch 1, the
     device copy bandwidth (-> the batch-1 bandwidth floor), and greedy agreement between our engine (called through
     Triton with token ids) and HF fp16 on 32 prompts x 64 tokens.
Output lengths are pinned with min_tokens = max_tokens, so random weights cannot stop early.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import stat
import subprocess
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from builder.checkpoints import convert, write_synthetic_checkpoint
from builder.render import render_repository
from builder.render_config import RenderConfig
from builder.runtime.model_config import WEIGHT_QUANTIZATIONS, GptModelConfig
from builder.runtime.tokenizer import GptTokenizer
from builder.serve import TritonServer

MODEL = "gpt3_1.3b"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


WORK_ROOT = "gpt-triton-bench"  # the benchmarks' scratch folders: <cache>/gpt-triton-bench/<script>


class WorkDirError(RuntimeError):
    """A scratch folder other local users could tamper with, or one that cannot be made; the message says which."""


def default_work_dir(name: str) -> Path:
    """The per-user default scratch folder `name`: $XDG_CACHE_HOME (else ~/.cache)/gpt-triton-bench/<name>."""
    cache = os.environ.get("XDG_CACHE_HOME", "")
    return (Path(cache) if os.path.isabs(cache) else Path.home() / ".cache") / WORK_ROOT / name


def private_work_dir(work: Path | None, name: str) -> Path:
    """The scratch folder to use (`work`, else default_work_dir(name)), made with mode 0700 where missing (its
    missing parents too) and kept across runs (cached conversions); its resolved path. Refuses (WorkDirError) a
    folder that is a symlink, not a directory, not owned by this user or group/world-writable, and one under a
    folder that another user could replace it in (owned by neither this user nor root, or writable by others
    without the sticky bit): the folder holds converted weights a run skips converting again and rendered model.py
    files tritonserver runs, so nobody else may plant or swap them."""
    path = (work.expanduser() if work is not None else default_work_dir(name)).absolute()
    if path.name in ("", ".", ".."):
        path = Path(os.path.realpath(path))
    path = Path(os.path.realpath(path.parent)) / path.name  # resolved parents; the folder itself is never followed
    uid = os.geteuid()
    for folder in [*reversed(path.parents), path]:
        try:
            try:
                info = os.lstat(folder)
            except FileNotFoundError:
                try:
                    os.mkdir(folder, 0o700)
                except FileExistsError:
                    pass  # made meanwhile (by whom: the checks below tell)
                info = os.lstat(folder)
        except OSError as err:
            raise WorkDirError(f"cannot create or inspect {folder} (scratch folder {path}): {err}") from err
        if folder != path:
            if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
                raise WorkDirError(f"{folder} (a parent of the scratch folder {path}) is not a plain directory")
            if info.st_uid not in (uid, 0):
                raise WorkDirError(f"{folder} (a parent of the scratch folder {path}) is owned by uid {info.st_uid}, "
                                   f"neither you (uid {uid}) nor root; give --work a private folder")
            if info.st_mode & 0o022 and not info.st_mode & stat.S_ISVTX:
                raise WorkDirError(f"{folder} (a parent of the scratch folder {path}) is writable by others "
                                   f"(mode {stat.S_IMODE(info.st_mode):o}, no sticky bit); give --work a private "
                                   "folder")
            continue
        if stat.S_ISLNK(info.st_mode):
            raise WorkDirError(f"refusing the scratch folder {path}: it is a symlink")
        if not stat.S_ISDIR(info.st_mode):
            raise WorkDirError(f"refusing the scratch folder {path}: it is not a directory")
        if info.st_uid != uid:
            raise WorkDirError(f"refusing the scratch folder {path}: it is owned by uid {info.st_uid}, not by you "
                               f"(uid {uid})")
        if info.st_mode & 0o022:
            raise WorkDirError(f"refusing the scratch folder {path}: it is group/world-writable (mode "
                               f"{stat.S_IMODE(info.st_mode):o}); chmod go-w it or pick another --work")
    return path


def copy_bandwidth_gbps() -> float:
    """Device-to-device copy, counting bytes read + written (the bandwidth a decode step can hope for)."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    start = time.perf_counter()
    reps = 20
    for _ in range(reps):
        dst.copy_(src)
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / reps
    del src, dst
    return 2 * (1 << 30) / seconds / 1e9


def weight_bytes_per_step(config: GptModelConfig, weight_quantization: str = "none") -> int:
    """Bytes of weights a decode step reads: fp16, or with int8 layer matrices (a byte each, an fp32 scale a row;
    builder/runtime/quantize.py). The LM head reads all of wte, in fp16 either way."""
    h, f = config.hidden_size, config.inter_size
    per_layer = 3 * h * h + h * h + 2 * h * f
    if weight_quantization == "int8":
        layers = config.num_layer * (per_layer + 4 * (3 * h + h + f + h))
    else:
        layers = 2 * config.num_layer * per_layer
    return layers + 2 * config.vocab_size * h


def random_prompts(n: int, length: int, seed: int, vocab: int = 50257) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab - 1, size=length).tolist() for _ in range(n)]


# ---- through Triton ------------------------------------------------------------------------------------------------


class Triton:
    """gRPC calls to the served repository. With `streaming`, every call goes over a gRPC stream (the models are
    decoupled); `stream` then asks the core for one response per token, else for one final response."""

    def __init__(self, url: str, streaming: bool) -> None:
        import tritonclient.grpc as grpcclient

        self.grpc = grpcclient
        self.url = url
        self.streaming = streaming
        self.local = threading.local()

    @property
    def client(self):  # one channel (and, streaming, one open stream) per thread
        local = self.local
        if not hasattr(local, "client"):
            local.client = self.grpc.InferenceServerClient(self.url)
            if self.streaming:
                events: queue.Queue = queue.Queue()  # the callback runs on the stream's own thread
                local.events = events
                local.client.start_stream(callback=lambda result, error: events.put(
                    (time.perf_counter(), result, error)))
        return local.client

    def _input(self, name: str, array: np.ndarray, dtype: str):
        tensor = self.grpc.InferInput(name, list(array.shape), dtype)
        tensor.set_data_from_numpy(array)
        return tensor

    def _call(self, model: str, inputs: list) -> tuple[object, list[float]]:
        """(last result, arrival time of each response in seconds after sending)."""
        client = self.client
        start = time.perf_counter()
        if not self.streaming:
            result = client.infer(model, inputs)
            return result, [time.perf_counter() - start]
        client.async_stream_infer(model, inputs, enable_empty_final_response=True)
        times, last = [], None
        while True:
            arrived, result, error = self.local.events.get(timeout=600)
            if error is not None:
                raise RuntimeError(str(error))
            response = result.get_response()
            if response.outputs:
                times.append(arrived - start)
                last = result
            if response.parameters["triton_final_response"].bool_param:
                return last, times

    def core(self, prompt: list[int], new_tokens: int) -> list[int]:
        """The core model with token ids (the seed's own client request)."""
        inputs = [self._input("input_ids", np.array([prompt], np.uint32), "UINT32"),
                  self._input("input_lengths", np.array([[len(prompt)]], np.uint32), "UINT32"),
                  self._input("request_output_len", np.array([[new_tokens]], np.uint32), "UINT32"),
                  self._input("min_length", np.array([[new_tokens]], np.uint32), "UINT32")]
        if self.streaming:
            inputs.append(self._input("stream", np.array([[False]]), "BOOL"))
        result, _ = self._call(MODEL, inputs)
        length = int(result.as_numpy("sequence_length")[0, 0])
        return result.as_numpy("output_ids")[0, 0, len(prompt):length].tolist()

    def text(self, prompt: str, new_tokens: int, stream: bool = False, model: str = "ensemble") -> list[float]:
        """One text request to `model` (the ensemble, or a text core); returns each response's arrival time (s); the
        last = latency."""
        inputs = [self._input("text_input", np.array([[prompt.encode()]], object), "BYTES"),
                  self._input("max_tokens", np.array([[new_tokens]], np.int32), "INT32"),
                  self._input("min_tokens", np.array([[new_tokens]], np.int32), "INT32")]
        if self.streaming:
            inputs.append(self._input("stream", np.array([[stream]]), "BOOL"))
        result, times = self._call(model, inputs)
        produced = int(result.as_numpy("num_output_tokens").reshape(-1)[0])
        if produced != new_tokens:
            raise RuntimeError(f"asked for {new_tokens} tokens, got {produced}")
        return times


def text_prompt(tokenizer, n_tokens: int, seed: int) -> str:
    """A text that tokenizes to exactly n_tokens GPT-2 tokens (numbers separated by spaces: one token each)."""
    rng = np.random.default_rng(seed)
    words = [str(rng.integers(10, 99)) for _ in range(n_tokens)]
    text = " ".join(words)
    if len(tokenizer.encode(text)) != n_tokens:
        raise RuntimeError(f"prompt should be {n_tokens} tokens, is {len(tokenizer.encode(text))}")
    return text


def closed_loop_tokens_per_s(triton: Triton, prompts: list[str], clients: int, new_tokens: int,
                             seconds: float) -> dict[str, float]:
    latencies: list[float] = []
    lock = threading.Lock()
    stop_at = time.perf_counter() + seconds

    def worker(index: int) -> None:
        i = index
        while time.perf_counter() < stop_at:
            latency = triton.text(prompts[i % len(prompts)], new_tokens)[-1]
            with lock:
                latencies.append(latency)
            i += clients

    start = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(c,)) for c in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    return {"clients": clients, "requests": len(latencies), "seconds": elapsed,
            "tokens_per_s": len(latencies) * new_tokens / elapsed,
            "latency_p50_ms": 1000 * statistics.median(latencies),
            "latency_p99_ms": 1000 * float(np.percentile(latencies, 99))}


def random_ft_weights(work: Path, preset: str) -> tuple[Path, float | None]:
    """The random `preset` checkpoint as fp16 FT weights under `work` (cached): (the 1-gpu folder, seconds the
    conversion took, None when cached)."""
    nemo = work / f"{preset}.nemo"
    if not nemo.exists():
        log(f"writing the random {preset} .nemo")
        write_synthetic_checkpoint(preset, nemo, seed=0)
    ft = work / f"ft-{preset}" / "1-gpu"
    if (ft / "config.ini").exists():
        return ft, None
    log("converting to fp16 FT weights")
    t0 = time.perf_counter()
    convert(nemo, ft.parent, infer_gpu_num=1, weight_data_type="fp16", progress=False)
    return ft, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, help="private scratch folder, kept across runs (checkpoints) "
                                                   f"[{default_work_dir('gpu-bench')}]")
    parser.add_argument("--out", type=Path, required=True, help="where results.json goes")
    parser.add_argument("--seconds", type=float, default=20.0, help="duration of each concurrency level")
    parser.add_argument("--concurrency", default="1,8,32,64")
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--smoke-on-cpu", action="store_true",
                        help="check this script on a CPU machine: tiny preset, torch engine on CPU, no HF peer")
    parser.add_argument("--max-queue-delay-us", type=int, default=500)
    parser.add_argument("--weight-quantization", choices=WEIGHT_QUANTIZATIONS, default="none",
                        help="render --weight-quantization: int8 layer matrices (the floor is then that of their "
                             "bytes; the HF peer stays fp16, so its greedy agreement measures the quantization)")
    parser.add_argument("--streaming", action="store_true",
                        help="render the decoupled (streaming) repository and measure over gRPC streams; adds TTFT "
                             "and inter-token latency from streamed responses")
    args = parser.parse_args()
    try:
        args.work = private_work_dir(args.work, "gpu-bench")
    except WorkDirError as err:
        sys.exit(f"gpu_bench: {err}")
    args.out.mkdir(parents=True, exist_ok=True)
    cpu = args.smoke_on_cpu
    preset = "tiny" if cpu else "gpt3-1.3b"
    args.skip_hf |= cpu
    result: dict[str, object] = {"gpu": "cpu (smoke run)" if cpu else torch.cuda.get_device_name(0),
                                 "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__}

    ft, convert_seconds = random_ft_weights(args.work, preset)
    if convert_seconds is not None:
        result["convert_seconds"] = convert_seconds
    config = GptModelConfig.from_ini(ft / "config.ini")

    bandwidth = 10.0 if cpu else copy_bandwidth_gbps()
    weight_bytes = weight_bytes_per_step(config, args.weight_quantization)
    floor_ms = weight_bytes / (bandwidth * 1e9) * 1000
    result.update(copy_bandwidth_gbps=bandwidth, weight_bytes_per_step=weight_bytes, floor_ms_per_token=floor_ms,
                  weight_quantization=args.weight_quantization)
    log(f"copy bandwidth {bandwidth:.0f} GB/s -> floor {floor_ms:.3f} ms/token")

    # Shapes of the measurements (the smoke run shrinks them to the tiny preset's 128 positions).
    prompt_len, new_len, long_prompt = (16, 16, 64) if cpu else (128, 128, 512)
    slope_points = (2, 6, 10, 18) if cpu else (8, 40, 72, 136)
    agreement_new = 16 if cpu else 64
    agreement_prompts = random_prompts(32, 32, seed=1)
    timing_prompt = random_prompts(1, 128, seed=2)[0]
    repo = render_repository(RenderConfig(engine="torch", device="cpu" if cpu else "gpu",
                                          data_type="fp32" if cpu else "fp16", checkpoint=ft,
                                          model=config, max_batch_size=64, output=args.work / "repo", force=True,
                                          max_queue_delay_us=args.max_queue_delay_us, streaming=args.streaming,
                                          weight_quantization=args.weight_quantization))
    result["repository"] = "streaming (decoupled core)" if args.streaming else "non-streaming"
    tokenizer = GptTokenizer.from_directory(repo / "preprocessing" / "1")
    log("starting tritonserver")
    with TritonServer.on_free_ports(repo, startup_timeout_s=600) as server:
        triton = Triton(server.grpc_url, streaming=args.streaming)
        ours = [triton.core(p, agreement_new) for p in agreement_prompts]
        (args.work / "ours.json").write_text(json.dumps({"prompts": agreement_prompts, "outputs": ours}))
        (args.work / "timing_prompt.json").write_text(json.dumps(timing_prompt))

        p128 = text_prompt(tokenizer, prompt_len, seed=3)
        for _ in range(3):
            triton.text(p128, 16)
        points = {}
        for new_tokens in slope_points:
            points[new_tokens] = statistics.median(triton.text(p128, new_tokens)[-1] for _ in range(5))
        xs, ys = np.array(list(points)), np.array(list(points.values()))
        slope = float(np.polyfit(xs, ys, 1)[0]) * 1000
        result["decode_ms_per_token_bs1"] = slope
        result["latency_ms_bs1_prompt128"] = {int(k): v * 1000 for k, v in points.items()}
        log(f"decode {slope:.3f} ms/token at batch 1 (slope of latency over new tokens)")

        p512 = text_prompt(tokenizer, long_prompt, seed=4)
        prompt_ids = random_prompts(1, long_prompt, seed=5)[0]
        triton.text(p512, 1)
        triton.core(prompt_ids, 1)
        result["ttft_ms_prompt512_bs1"] = 1000 * statistics.median(triton.text(p512, 1)[-1] for _ in range(10))
        core_times = []
        for _ in range(10):
            start = time.perf_counter()
            triton.core(prompt_ids, 1)
            core_times.append(time.perf_counter() - start)
        result["ttft_ms_prompt512_bs1_core_token_ids"] = 1000 * statistics.median(core_times)
        log(f"TTFT(512) {result['ttft_ms_prompt512_bs1']:.2f} ms through the ensemble, "
            f"{result['ttft_ms_prompt512_bs1_core_token_ids']:.2f} ms calling the core model with token ids")
        if args.streaming:
            streamed = [triton.text(p128, new_len // 2, stream=True) for _ in range(5)]
            gaps = [b - a for times in streamed for a, b in zip(times, times[1:])]
            result["streaming_ttft_ms_prompt128_bs1"] = 1000 * statistics.median(t[0] for t in streamed)
            result["streaming_inter_token_ms_p50_bs1"] = 1000 * statistics.median(gaps)
            result["streaming_inter_token_ms_p99_bs1"] = 1000 * float(np.percentile(gaps, 99))
            log(f"streaming: TTFT(128) {result['streaming_ttft_ms_prompt128_bs1']:.2f} ms, inter-token p50 "
                f"{result['streaming_inter_token_ms_p50_bs1']:.3f} ms")

        prompts = [text_prompt(tokenizer, prompt_len, seed=100 + i) for i in range(64)]
        sweep = []
        for clients in (int(c) for c in args.concurrency.split(",")):
            closed_loop_tokens_per_s(triton, prompts, clients, new_len, min(5.0, args.seconds))  # warm-up
            point = closed_loop_tokens_per_s(triton, prompts, clients, new_len, args.seconds)
            sweep.append(point)
            log(f"concurrency {clients}: {point['tokens_per_s']:.0f} tok/s, p50 {point['latency_p50_ms']:.0f} ms")
            result[f"tokens_per_s_concurrency{clients}"] = point["tokens_per_s"]
        result["concurrency_sweep"] = sweep
        log_lines = server.log_text().splitlines()
        result["server_log_tail"] = "\n".join(log_lines)[-3000:]
        # The core's load line: what served (KV cache, and whether the batch-1 steps ran as one launch).
        result["core_loaded"] = next((line for line in log_lines if "KV-cache slots x" in line), None)

    if not args.skip_hf:  # after the server is gone: the GPU is HF's alone
        log("HF transformers peer (own process)")
        peer = subprocess.run([os.environ.get("HF_PYTHON", sys.executable), str(ROOT / "bench" / "hf_peer.py"),
                               "--ft", str(ft), "--ours", str(args.work / "ours.json"),
                               "--timing-prompt", str(args.work / "timing_prompt.json"),
                               "--out", str(args.work / "hf.json")], capture_output=True, text=True)
        if peer.returncode == 0:
            result.update(json.loads((args.work / "hf.json").read_text()))
        else:
            result["hf_peer_error"] = peer.stderr[-2000:]
            log(peer.stderr[-2000:])
    if "hf_static_ms_per_token_bs1" in result:
        result["speedup_vs_hf_static_bs1"] = result["hf_static_ms_per_token_bs1"] / result["decode_ms_per_token_bs1"]
    if "hf_eager_ms_per_token_bs1" in result:
        result["speedup_vs_hf_eager_bs1"] = result["hf_eager_ms_per_token_bs1"] / result["decode_ms_per_token_bs1"]
    result["fraction_of_floor"] = floor_ms / result["decode_ms_per_token_bs1"]
    (args.out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("server_log_tail", "concurrency_sweep")},
                     indent=2))


if __name__ == "__main__":
    main()
