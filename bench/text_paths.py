"""The three ways to the engine, one request at a time, in ONE tritonserver: what text costs over token ids.

    python bench/text_paths.py --out docs/gpu/text_paths.json            # GPU host: random 1.3B, fp8 KV cache
    python bench/text_paths.py --device cpu --out /tmp/x/text_paths.json  # tiny random model (tests run it)

Two repositories rendered from the same random weights (`--preset`) are served by one tritonserver:
  - `ensemble`: the classic text ensemble (preprocessing -> core -> postprocessing) over the core `gpt3_1.3b`;
  - `text_core`: the same engine rendered with `--text-in-core` (it tokenizes and detokenizes itself);
  - `gpt3_1.3b` called directly with token ids: the floor both are compared to.
Each repetition sends the same request down the three paths one after the other, in a rotating order, so slow drifts
of the host and the order of the calls cancel out of the paired differences. Per prompt length (`--prompt-tokens`):
the first streamed response (4 new tokens) and, with one new token, the whole request not streamed. Reports each
path's median and p90 and the median of the paired differences (`*_over_ids_ms`), which is what issue 17 asks of the
ensemble's hops (<= 0.5 ms). Both engines keep `--kv-slots` slots (a few: they share one GPU and only one request
runs at a time). Writes --out (JSON), .md and .png beside it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

import gpu_bench  # bench/gpu_bench.py (bench/ on sys.path above)
from builder.render import render_repository
from builder.render_config import RenderConfig
from builder.runtime.tokenizer import GptTokenizer
from builder.serve import TritonServer
from serving_bench import core_call_times, device_name, host_cpu, random_streaming_options

ENSEMBLE, TEXT_CORE, CORE = "ensemble", "text_core", "gpt3_1.3b"
PATHS = (ENSEMBLE, TEXT_CORE, CORE)
FIRST_TOKENS = 4  # streamed: a first response followed by others


def build(args: argparse.Namespace, result: dict[str, Any]) -> tuple[Path, Path]:
    preset, model, options = random_streaming_options(args)
    options = {**dict(max_batch_size=8, kv_slots=args.kv_slots, model_name=CORE), **options}
    classic = RenderConfig(ensemble_name=ENSEMBLE, output=args.work / "classic", **options)
    text = RenderConfig(ensemble_name=TEXT_CORE, text_in_core=True, output=args.work / "text", **options)
    result["model"] = {"preset": preset, "layers": model.num_layer, "hidden": model.hidden_size, "weights": "random",
                       "data_type": classic.data_type, "kv_cache_dtype": classic.kv_cache_dtype,
                       "kv_slots": classic.kv_slots}
    return render_repository(classic), render_repository(text)


def measure(triton: gpu_bench.Triton, text: str, ids: list[int], reps: int) -> dict[str, Any]:
    """Interleaved repetitions: path -> (first streamed response, not-streamed 1-token latency) times in ms."""
    def call(path: str, stream: bool) -> float:
        new = FIRST_TOKENS if stream else 1
        if path == CORE:
            return core_call_times(triton, CORE, ids, new, stream)[0] * 1e3
        times = triton.text(text, new, stream=stream, model=path)
        return (times[0] if stream else times[-1]) * 1e3

    samples: dict[str, dict[str, list[float]]] = {kind: {path: [] for path in PATHS} for kind in ("ttft", "latency")}
    for rep in range(-2, reps):  # two warm-up rounds
        order = PATHS[rep % 3:] + PATHS[:rep % 3]  # rotating: no path always goes first
        for kind, stream in (("ttft", True), ("latency", False)):
            for path in order:
                value = call(path, stream)
                if rep >= 0:
                    samples[kind][path].append(value)
    out: dict[str, Any] = {}
    for kind, by_path in samples.items():
        for path, values in by_path.items():
            out[f"{kind}_ms_{path}"] = {"p50": statistics.median(values), "p90": float(np.percentile(values, 90))}
        for path in (ENSEMBLE, TEXT_CORE):  # the median of the paired differences
            pairs = [a - b for a, b in zip(by_path[path], by_path[CORE])]
            out[f"{kind}_{path}_over_ids_ms"] = statistics.median(pairs)
    return out


def markdown(result: dict[str, Any]) -> str:
    lines = [f"# Text paths vs token ids, one request at a time: {result['gpu']}", "",
             f"`{result['command']}` ({result['date']}; {result['reps']} interleaved repetitions; model "
             f"{result['model']})", "",
             "| prompt tokens | measure | ensemble ms | text core ms | token ids ms | ensemble adds | text core adds |",
             "|---|---|---|---|---|---|---|"]
    for tokens, found in result["prompts"].items():
        for kind, label in (("ttft", f"first streamed response ({FIRST_TOKENS} new)"),
                            ("latency", "1 new token, not streamed")):
            cells = [f"{found[f'{kind}_ms_{path}']['p50']:.2f}" for path in PATHS]
            adds = [f"{found[f'{kind}_{path}_over_ids_ms']:+.2f}" for path in (ENSEMBLE, TEXT_CORE)]
            lines.append(f"| {tokens} | {label} | {' | '.join(cells)} | {' | '.join(adds)} |")
    lines += ["", "Medians; \"adds\": the median of each repetition's difference to the token-id call."]
    return "\n".join(lines) + "\n"


def plot(path: Path, result: dict[str, Any]) -> None:
    try:
        import matplotlib
    except ImportError:
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    prompts = list(result["prompts"])
    for ax, kind, title in ((axes[0], "ttft", "first streamed response"),
                            (axes[1], "latency", "1 token, not streamed")):
        for index, name in enumerate(PATHS):
            values = [result["prompts"][p][f"{kind}_ms_{name}"]["p50"] for p in prompts]
            ax.bar(np.arange(len(prompts)) + (index - 1) * 0.27, values, width=0.27, label=name)
        ax.set_xticks(range(len(prompts)), [f"{p} prompt tokens" for p in prompts])
        ax.set_ylabel("ms (median)")
        ax.set_title(title)
        ax.legend()
    figure.suptitle(f"text paths vs token ids: {result['gpu']}")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="the JSON to write (.md and .png beside it)")
    parser.add_argument("--work", type=Path, help="private scratch folder, kept across runs (checkpoint, weights, "
                                                  f"repositories) [{gpu_bench.default_work_dir('text-paths')}]")
    parser.add_argument("--device", choices=("gpu", "cpu"), default="gpu")
    parser.add_argument("--preset", help="checkpoint preset [gpt3-1.3b on gpu, tiny on cpu]")
    parser.add_argument("--prompt-tokens", type=int, nargs="+", default=[512, 128])
    parser.add_argument("--reps", type=int, default=30, help="interleaved repetitions per measure [30]")
    parser.add_argument("--kv-slots", type=int, default=8, help="KV-cache slots of each engine [8]")
    parser.add_argument("--max-slots", type=int, help=argparse.SUPPRESS)  # render_overrides reads it
    parser.add_argument("--render-option", action="append", default=[], metavar="NAME=VALUE",
                        help="any other RenderConfig field of both repositories (repeatable)")
    args = parser.parse_args(argv)
    if args.reps < 1 or args.kv_slots < 1 or min(args.prompt_tokens) < 1:
        parser.error("--reps, --kv-slots and --prompt-tokens must be >= 1")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    args.work = gpu_bench.private_work_dir(args.work, "text-paths")
    result: dict[str, Any] = {"gpu": device_name(args.device), "host_cpu": host_cpu(), "reps": args.reps,
                              "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                              "command": " ".join([Path(sys.executable).name, *sys.argv])}
    classic, text = build(args, result)
    tokenizer = GptTokenizer.from_directory(text / TEXT_CORE / "1")
    result["prompt_encoder"] = tokenizer.encoder  # the stub's too: the same environment
    with TritonServer.on_free_ports(classic, startup_timeout_s=900,
                                    extra_args=[f"--model-repository={text}"]) as server:
        triton = gpu_bench.Triton(server.grpc_url, streaming=True)
        result["prompts"] = {}
        for tokens in args.prompt_tokens:
            prompt = gpu_bench.text_prompt(tokenizer, tokens, seed=tokens)
            result["prompts"][str(tokens)] = measure(triton, prompt, tokenizer.encode(prompt), args.reps)
            gpu_bench.log(f"{tokens} tokens: {json.dumps(result['prompts'][str(tokens)])}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result))
    plot(args.out.with_suffix(".png"), result)
    return result


if __name__ == "__main__":
    main()
