"""Latency the text ensemble adds over calling the core model with token ids, one request at a time (CPU demo).

    python bench/ensemble_overhead.py --requests 300 --out docs/perf/ensemble_overhead.json
Starts tritonserver on the demo repository (or --repository) and sends N pairs of requests over gRPC from this process:
an ensemble request (16-token prompt, 1 new token), then a core-model request with the same token ids. Reports p50/p99
of both, the median of the pairs' differences (`ensemble_adds_p50_ms`: pairing cancels the slow drifts of a shared
2-core VM, which moved the two-phase figure by 2 ms between runs), and Triton's per-model statistics (queue / compute
times), which show where the difference goes. Sequential requests keep the 2 cores free of a load generator's own
work, unlike perf_analyzer.

The same server also holds a bare Python model (`python_hop_floor`: one INT32 tensor in, the same out, no work), served
from a private view of the repository (its models linked, not copied): its Triton-side time per request is what one
Python-backend hop costs with nothing in it on this machine, the floor under each of the ensemble's two hops
(`python_hop_floor_ms`; twice that: `two_hops_floor_ms`), and its round trip from this client
(`python_hop_floor_client_p50_ms`). `--floor-only` serves the bare model alone (where the demo cannot be built:
the GPU host's kit has no transformers beside numpy 1.26).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from builder.demo import build_demo_repository
from builder.runtime.tokenizer import GptTokenizer
from builder.serve import TritonServer

PROMPT = " ".join(str(n) for n in range(1, 17))  # 16 tokens
FLOOR_MODEL = "python_hop_floor"
FLOOR_CONFIG = f"""name: "{FLOOR_MODEL}"
backend: "python"
max_batch_size: 8
dynamic_batching {{ max_queue_delay_microseconds: 0 }}
input [ {{ name: "x" data_type: TYPE_INT32 dims: [ -1 ] }} ]
output [ {{ name: "y" data_type: TYPE_INT32 dims: [ -1 ] }} ]
instance_group [ {{ count: 1 kind: KIND_CPU }} ]
"""
FLOOR_CODE = """import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        return [pb_utils.InferenceResponse([pb_utils.Tensor("y", pb_utils.get_input_tensor_by_name(r, "x").as_numpy())])
                for r in requests]
"""
STAT_KEYS = ("queue", "compute_input", "compute_infer", "compute_output")


def with_floor_model(repository: Path | None, into: Path) -> Path:
    """`into` (a fresh private folder): a link to each model of `repository` (if any), plus the bare Python model."""
    for model in repository.iterdir() if repository is not None else ():
        if model.is_dir():
            (into / model.name).symlink_to(model.resolve(), target_is_directory=True)
    (into / FLOOR_MODEL / "1").mkdir(parents=True)
    (into / FLOOR_MODEL / "config.pbtxt").write_text(FLOOR_CONFIG)
    (into / FLOOR_MODEL / "1" / "model.py").write_text(FLOOR_CODE)
    return into


def tensor(name: str, array: np.ndarray, datatype: str) -> grpcclient.InferInput:
    infer_input = grpcclient.InferInput(name, list(array.shape), datatype)
    infer_input.set_data_from_numpy(array)
    return infer_input


def timed(*calls, count: int) -> list[list[float]]:
    """ms of each call, the calls made in turn `count` times each (after 20 warm-up rounds)."""
    times: list[list[float]] = [[] for _ in calls]
    for index in range(count + 20):
        for call, into in zip(calls, times):
            start = time.perf_counter()
            call()
            if index >= 20:
                into.append((time.perf_counter() - start) * 1000)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--repository", type=Path, help="a rendered demo repository (default: build demo_repository)")
    parser.add_argument("--floor-only", action="store_true",
                        help="serve and time the bare Python model alone (a machine that cannot build the demo)")
    args = parser.parse_args()
    repo = None if args.floor_only else args.repository or build_demo_repository(Path("demo_repository"))
    ids = list(range(1000, 1016)) if repo is None else GptTokenizer.from_directory(
        repo / "preprocessing" / "1").encode(PROMPT)
    with tempfile.TemporaryDirectory(prefix="ensemble-overhead-") as view, \
            TritonServer.on_free_ports(with_floor_model(repo, Path(view))) as server:
        client = grpcclient.InferenceServerClient(server.grpc_url)
        text_inputs = [tensor("text_input", np.array([[PROMPT.encode()]], object), "BYTES"),
                       tensor("max_tokens", np.array([[1]], np.int32), "INT32")]
        core_inputs = [tensor("input_ids", np.array([ids], np.uint32), "UINT32"),
                       tensor("input_lengths", np.array([[len(ids)]], np.uint32), "UINT32"),
                       tensor("request_output_len", np.array([[1]], np.uint32), "UINT32")]
        ensemble, core = ([], []) if repo is None else timed(
            lambda: client.infer("ensemble", text_inputs), lambda: client.infer("gpt3_1.3b", core_inputs),
            count=args.requests)
        floor_inputs = [tensor("x", np.array([ids], np.int32), "INT32")]
        floor, = timed(lambda: client.infer(FLOOR_MODEL, floor_inputs), count=args.requests)
        stats = {}
        for model in client.get_inference_statistics(as_json=True)["model_stats"]:
            inference = model["inference_stats"]  # protobuf's JSON: int64 as strings, zero fields left out
            count = max(1, int(inference["success"].get("count", 0)))
            stats[model["name"]] = {f"{key}_us": round(int(inference[key].get("ns", 0)) / count / 1e3, 1)
                                    for key in STAT_KEYS}
    result: dict = {"prompt_tokens": len(ids), "new_tokens": 1, "requests": args.requests}
    if repo is not None:
        result |= {"ensemble_p50_ms": float(np.percentile(ensemble, 50)),
                   "ensemble_p99_ms": float(np.percentile(ensemble, 99)),
                   "core_p50_ms": float(np.percentile(core, 50)), "core_p99_ms": float(np.percentile(core, 99)),
                   "ensemble_adds_p50_ms": float(np.median(np.subtract(ensemble, core)))}
    result |= {"python_hop_floor_client_p50_ms": float(np.percentile(floor, 50)), "per_model_stats": stats}
    # Means over the run (Triton's statistics): queue + input + execute + output of the bare model.
    result["python_hop_floor_ms"] = sum(stats[FLOOR_MODEL][f"{key}_us"] for key in STAT_KEYS) / 1e3
    result["two_hops_floor_ms"] = 2 * result["python_hop_floor_ms"]
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
