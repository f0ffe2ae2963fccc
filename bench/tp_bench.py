"""Tensor parallelism of the torch engine through Triton: TP 2 against TP 1 on the same GPU host, one command.

On a host with two GPUs (docs/benchmarks.md, "Tensor parallelism", has the exact command):
  1. a random-weight NeMo GPT-3 1.3B checkpoint -> fp16 FT weights split for 1 and for 2 GPUs (cached in --work);
  2. for TP 1, then TP 2: the streaming (in-flight batching) repository on the torch engine, KIND_GPU fp16, served by
     tritonserver; through Triton (gRPC): batch-1 decode ms/token (slope of latency over new tokens, text ensemble),
     the streamed inter-token latency at batch 1, output tokens/s with 64 concurrent streams (128-token prompts,
     128 new tokens, min_tokens = max_tokens), and greedy tokens of 32 prompts x 64 tokens from the core model with
     token ids (the seed's request);
  3. after the servers: HF transformers fp16 on the same weights (bench/hf_peer.py, its own process) judges TP 2's
     greedy tokens; TP 2's tokens are also compared with TP 1's.
Writes <out>/tp_results.json and <out>/tp_results.md (ratios TP2/TP1 with the absolute times and the GPU's name).
NVLink multicast stays off in every process it starts (NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1; the
engine sets them in its workers too). `--smoke-on-cpu` checks the script on a machine without GPUs (tiny preset,
CPU, gloo, a few seconds per level): its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import gpu_bench  # bench/ (the sys.path entry above)

from builder.checkpoints import convert, write_synthetic_checkpoint
from builder.render import render_repository
from builder.render_config import RenderConfig
from builder.runtime.model_config import GptModelConfig
from builder.runtime.tensor_parallel import NCCL_ENV
from builder.runtime.tokenizer import GptTokenizer
from builder.serve import TritonServer

GOAL_RATIO = 0.6  # issue 15: TP 2 batch-1 ms/token <= 0.6 x TP 1
GOAL_AGREEMENT = 0.99


def split_weights(work: Path, preset: str, tp: int, data_type: str) -> Path:
    """The random `preset` checkpoint as FT weights split for `tp` GPUs (cached)."""
    nemo = work / f"{preset}.nemo"
    if not nemo.exists():
        gpu_bench.log(f"writing the random {preset} .nemo")
        write_synthetic_checkpoint(preset, nemo, seed=0)
    target = work / f"ft-{preset}-{data_type}" / f"{tp}-gpu"
    if not (target / "config.ini").exists():
        gpu_bench.log(f"converting to {data_type} FT weights split for {tp}")
        convert(nemo, target.parent, infer_gpu_num=tp, weight_data_type=data_type, progress=False)
    return target


def measure(ft: Path, tp: int, args: argparse.Namespace, shapes: dict[str, Any]) -> dict[str, Any]:
    """One repository (TP `tp`) through Triton: batch-1 decode, 64 streams, greedy tokens for the agreement check."""
    config = GptModelConfig.from_ini(ft / "config.ini")
    cpu = args.smoke_on_cpu
    repo = render_repository(RenderConfig(
        engine="torch", device="cpu" if cpu else "gpu", data_type="fp32" if cpu else "fp16", tp=tp, checkpoint=ft,
        model=config, max_batch_size=64, streaming=True, output=args.work / f"repo-tp{tp}", force=True))
    tokenizer = GptTokenizer.from_directory(repo / "preprocessing" / "1")
    result: dict[str, Any] = {"tp": tp, "gpus": [] if cpu else args.gpus.split(",")[:tp]}
    if not cpu:
        # The server sees exactly the GPUs of this TP size: a KIND_GPU group without a gpus list would otherwise put an
        # instance on every visible GPU and TP 1 would serve from two.
        os.environ.update(CUDA_DEVICE_ORDER="PCI_BUS_ID", CUDA_VISIBLE_DEVICES=",".join(result["gpus"]))
    gpu_bench.log(f"TP {tp}: starting tritonserver")
    with TritonServer.on_free_ports(repo, startup_timeout_s=900) as server:
        triton = gpu_bench.Triton(server.grpc_url, streaming=True)
        result["greedy_outputs"] = [triton.core(p, shapes["agreement_new"]) for p in shapes["agreement_prompts"]]

        prompt = gpu_bench.text_prompt(tokenizer, shapes["prompt_len"], seed=3)
        for _ in range(3):
            triton.text(prompt, 16)
        points = {n: statistics.median(triton.text(prompt, n)[-1] for _ in range(args.reps))
                  for n in shapes["slope_points"]}
        xs, ys = np.array(list(points)), np.array(list(points.values()))
        result["decode_ms_per_token_bs1"] = float(np.polyfit(xs, ys, 1)[0]) * 1000
        result["latency_ms_bs1"] = {int(k): v * 1000 for k, v in points.items()}
        streamed = [triton.text(prompt, shapes["new_len"] // 2, stream=True) for _ in range(args.reps)]
        gaps = [b - a for times in streamed for a, b in zip(times, times[1:])]
        result["streaming_inter_token_ms_p50_bs1"] = 1000 * statistics.median(gaps)
        gpu_bench.log(f"TP {tp}: decode {result['decode_ms_per_token_bs1']:.3f} ms/token at batch 1, streamed "
                      f"inter-token p50 {result['streaming_inter_token_ms_p50_bs1']:.3f} ms")

        prompts = [gpu_bench.text_prompt(tokenizer, shapes["prompt_len"], seed=100 + i) for i in range(64)]
        client = psutil.Process()
        gpu_bench.closed_loop_tokens_per_s(triton, prompts, args.streams, shapes["new_len"], min(5.0, args.seconds))
        client.cpu_percent()
        point = gpu_bench.closed_loop_tokens_per_s(triton, prompts, args.streams, shapes["new_len"], args.seconds)
        point["client_cpu_percent"] = client.cpu_percent()  # of one core; the client must not be the bottleneck
        result["streams"] = point
        gpu_bench.log(f"TP {tp}: {args.streams} streams: {point['tokens_per_s']:.0f} tokens/s "
                      f"(client CPU {point['client_cpu_percent']:.0f} %)")
        result["server_log_tail"] = server.log_text()[-3000:]
    return result


def hf_agreement(ft: Path, prompts: list[list[int]], outputs: list[list[int]], timing_prompt: list[int],
                 work: Path) -> dict[str, Any]:
    """bench/hf_peer.py on TP 2's tokens (it loads the same split files, merged, into HF's GPT2LMHeadModel)."""
    (work / "tp2_ours.json").write_text(json.dumps({"prompts": prompts, "outputs": outputs}))
    (work / "timing_prompt.json").write_text(json.dumps(timing_prompt))
    peer = subprocess.run([os.environ.get("HF_PYTHON", sys.executable), str(ROOT / "bench" / "hf_peer.py"),
                           "--ft", str(ft), "--ours", str(work / "tp2_ours.json"),
                           "--timing-prompt", str(work / "timing_prompt.json"), "--out", str(work / "tp2_hf.json")],
                          capture_output=True, text=True)
    if peer.returncode != 0:
        gpu_bench.log(peer.stderr[-2000:])
        return {"hf_peer_error": peer.stderr[-2000:]}
    return json.loads((work / "tp2_hf.json").read_text())


def markdown(result: dict[str, Any]) -> str:
    one, two = result["tp1"], result["tp2"]
    rows = [
        ("decode ms/token, batch 1 (slope, text ensemble)", one["decode_ms_per_token_bs1"],
         two["decode_ms_per_token_bs1"]),
        ("streamed inter-token ms p50, batch 1", one["streaming_inter_token_ms_p50_bs1"],
         two["streaming_inter_token_ms_p50_bs1"]),
        (f"output tokens/s, {one['streams']['clients']} streams", one["streams"]["tokens_per_s"],
         two["streams"]["tokens_per_s"]),
    ]
    lines = [f"Device: {result['device']}; torch {result['torch']}; {result['date']}.", "",
             "| | TP 1 | TP 2 | TP 2 / TP 1 |", "|---|---|---|---|"]
    lines += [f"| {name} | {a:.3f} | {b:.3f} | {b / a:.3f} |" for name, a, b in rows]
    lines += ["", f"- goal: decode ratio <= {GOAL_RATIO}: **{result['decode_ratio']:.3f}**",
              f"- TP 2 greedy sequences identical to TP 1's: {result['tp2_identical_to_tp1']} of "
              f"{len(one['greedy_outputs'])}",
              f"- TP 2 greedy agreement vs HF fp16 (goal >= {GOAL_AGREEMENT}): "
              f"{result.get('greedy_agreement_vs_hf_fp16', 'not measured')}"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, help="private scratch folder, kept across runs (checkpoints) "
                                                   f"[{gpu_bench.default_work_dir('tp-bench')}]")
    parser.add_argument("--out", type=Path, required=True, help="where tp_results.json and tp_results.md go")
    parser.add_argument("--seconds", type=float, default=15.0, help="duration of the 64-stream level")
    parser.add_argument("--streams", type=int, default=64, help="concurrent streams of the throughput level")
    parser.add_argument("--reps", type=int, default=5, help="repetitions per batch-1 point")
    parser.add_argument("--gpus", default="0,1",
                        help="GPU ids of TP 2's ranks (TP 1 runs on the first); given to the servers as "
                             "CUDA_VISIBLE_DEVICES, so the ids are as nvidia-smi numbers them")
    parser.add_argument("--skip-hf", action="store_true", help="no HF agreement (e.g. no transformers here)")
    parser.add_argument("--smoke-on-cpu", action="store_true",
                        help="check this script without GPUs: tiny preset, CPU, gloo (numbers mean nothing)")
    args = parser.parse_args()
    os.environ.update(NCCL_ENV)  # inherited by tritonserver, its stubs and their workers
    try:
        args.work = gpu_bench.private_work_dir(args.work, "tp-bench")
    except gpu_bench.WorkDirError as err:
        sys.exit(f"tp_bench: {err}")
    args.out.mkdir(parents=True, exist_ok=True)
    cpu = args.smoke_on_cpu
    args.skip_hf |= cpu
    if not cpu and torch.cuda.device_count() < 2:
        sys.exit(f"tp_bench needs two GPUs, this host has {torch.cuda.device_count()} (--smoke-on-cpu to check it)")
    preset, data_type = ("tiny", "fp32") if cpu else ("gpt3-1.3b", "fp16")
    shapes: dict[str, Any] = {"prompt_len": 16 if cpu else 128, "new_len": 16 if cpu else 128,
              "slope_points": (2, 6, 10, 18) if cpu else (8, 40, 72, 136), "agreement_new": 16 if cpu else 64,
              "agreement_prompts": gpu_bench.random_prompts(32, 32, seed=1)}
    result: dict[str, Any] = {
        "device": "cpu (smoke run)" if cpu else ", ".join(torch.cuda.get_device_name(i) for i in range(2)),
        "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "env": NCCL_ENV}
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    for tp in (1, 2):
        result[f"tp{tp}"] = measure(split_weights(args.work, preset, tp, data_type), tp, args, shapes)
    if visible is None:
        os.environ.pop("CUDA_VISIBLE_DEVICES", None)
    else:
        os.environ["CUDA_VISIBLE_DEVICES"] = visible
    one, two = result["tp1"], result["tp2"]
    result["decode_ratio"] = two["decode_ms_per_token_bs1"] / one["decode_ms_per_token_bs1"]
    result["streams_throughput_ratio"] = two["streams"]["tokens_per_s"] / one["streams"]["tokens_per_s"]
    result["tp2_identical_to_tp1"] = sum(a == b for a, b in zip(one["greedy_outputs"], two["greedy_outputs"]))
    if not args.skip_hf:  # after the servers: the GPUs are HF's alone
        result.update(hf_agreement(split_weights(args.work, preset, 2, data_type), shapes["agreement_prompts"],
                                   two["greedy_outputs"], gpu_bench.random_prompts(1, 128, seed=2)[0], args.work))
    (args.out / "tp_results.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "tp_results.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
