"""genai-perf against the OpenAI-compatible API (`serve --openai-port`), its token counts checked against ours.

    python bench/openai_genai_perf.py --genai-perf /path/to/venv/bin/genai-perf

genai-perf (pip `genai-perf==0.0.16`, best in its own virtualenv: it pulls transformers 5 and plotting stacks) drives
perf_analyzer (this environment's, from tritonclient) with `--endpoint-type completions`, streaming, on the demo
repository (streaming variant, torch engine on the CPU). Prompts are counting prompts ("1 2 ... k") sent greedily, so
every answer is counting text, whose GPT-2 re-tokenization (what genai-perf counts) equals the generated tokens (what
our `usage` reports): the two counts must agree request by request.

Writes docs/openai_genai_perf.json and docs/openai_genai_perf.md (the numbers, the exact commands).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from builder import GPT2_TOKENIZER_DIR
from builder.demo import build_demo_repository
from builder.serve import free_ports
from client.perf import perf_analyzer_env

MODEL = "ensemble"
TOKENIZER_CHECK = ("import sys; from transformers import AutoTokenizer; "
                   "t = AutoTokenizer.from_pretrained(sys.argv[1]); "
                   "print(t.encode(' world 7 8 9', add_special_tokens=False))")


def write_tokenizer(folder: Path) -> Path:
    """The repository's GPT-2 BPE as a tokenizer.json folder that genai-perf's AutoTokenizer loads offline."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE

    tokenizer = Tokenizer(BPE.from_file(str(GPT2_TOKENIZER_DIR / "vocab.json"), str(GPT2_TOKENIZER_DIR / "merges.txt")))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 1024,
        "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}))
    return folder


def write_prompts(path: Path, count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    prompts = []
    for _ in range(count):
        start, length = rng.randint(1, 40), rng.randint(4, 24)
        prompts.append(" ".join(str(n) for n in range(start, start + length)))
    path.write_text("".join(json.dumps({"text": prompt}) + "\n" for prompt in prompts))
    return prompts


def start_serve(repository: Path, port: int, log: Path) -> subprocess.Popen:
    http, grpc, metrics = free_ports(3)
    command = [sys.executable, "-m", "builder", "serve", str(repository), "--http-port", str(http),
               "--grpc-port", str(grpc), "--metrics-port", str(metrics), "--openai-port", str(port)]
    process = subprocess.Popen(command, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    with log.open("w") as out:
        for line in process.stderr:
            out.write(line)
            if line.startswith("OpenAI API:"):
                return process
            if process.poll() is not None:
                break
    raise SystemExit(f"serve did not start; see {log}")


def responses(profile_export: Path) -> list[dict[str, object]]:
    """Per request of perf_analyzer's raw export: the prompt, the answer text and our `usage` (non-streaming)."""
    data = json.loads(profile_export.read_text())
    rows = []
    for experiment in data["experiments"]:
        for request in experiment["requests"]:
            [prompt] = json.loads(request["request_inputs"]["payload"])["prompt"]
            text, usage = "", None
            for response in request["response_outputs"]:
                body = response["response"]
                if body.lstrip().startswith("{"):  # a whole JSON answer
                    events = [body]
                else:  # SSE: data lines (and `data: [DONE]`)
                    events = [line[len("data: "):] for line in body.splitlines() if line.startswith("data: {")]
                for event in map(json.loads, events):
                    text += "".join(choice.get("text", "") for choice in event.get("choices", []))
                    usage = event.get("usage") or usage
            rows.append({"prompt": prompt, "text": text, "usage": usage})
    return rows


def genai_perf(executable: Path, port: int, work: Path, tokenizer: Path, max_tokens: int, concurrency: int,
               requests: int, streaming: bool) -> tuple[list[str], dict, list[dict[str, object]]]:
    artifacts = work / ("artifacts-streaming" if streaming else "artifacts")
    # stream_options.include_usage is not asked for: genai-perf 0.0.16 fails on the usage chunk (its choices list
    # is empty, as OpenAI sends it). Our counts come from the non-streaming run's `usage`.
    command = [str(executable), "profile", "-m", MODEL, "--endpoint-type", "completions",
               *(["--streaming"] if streaming else []), "-u", f"127.0.0.1:{port}",
               "--input-file", str(work / "prompts.jsonl"), "--tokenizer", str(tokenizer),
               # genai-perf draws each request's max_tokens from this normal distribution: answers of varied lengths.
               "--extra-inputs", "temperature:0", "--output-tokens-mean", str(max_tokens),
               "--output-tokens-stddev", str(max_tokens // 4),
               "--concurrency", str(concurrency), "--request-count", str(requests), "--warmup-request-count", "0",
               "--artifact-dir", str(artifacts)]
    env = perf_analyzer_env()
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])  # our perf_analyzer
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    wall = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if run.returncode != 0:
        print(run.stdout[-4000:], run.stderr[-4000:], file=sys.stderr)
        raise SystemExit(f"genai-perf failed ({run.returncode}); artifacts in {artifacts}")
    print(run.stdout[-3000:])
    [summary] = artifacts.rglob("profile_export_genai_perf.json")
    [export] = artifacts.rglob("profile_export.json")
    # The client's CPU (genai-perf + perf_analyzer), to show it was not the bottleneck.
    client = {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "cpu_cores_busy": round(cpu / wall, 2)}
    return command, json.loads(summary.read_text()) | {"client": client}, responses(export)


def stats(values: list[int]) -> dict[str, float]:
    ordered = sorted(values)
    return {"avg": sum(values) / len(values), "min": ordered[0], "max": ordered[-1],
            "p50": ordered[len(ordered) // 2], "total": sum(values)}


SUMMARY_KEYS = ("request_throughput", "request_latency", "time_to_first_token", "inter_token_latency",
                "output_token_throughput", "output_sequence_length", "input_sequence_length")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--genai-perf", required=True, type=Path, help="genai-perf executable (its own venv)")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=24, help="mean max_tokens (stddev: a quarter of it)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    args = parser.parse_args()

    from builder.runtime.tokenizer import GptTokenizer

    work = Path(tempfile.mkdtemp(prefix="openai-genai-perf-"))
    tokenizer = write_tokenizer(work / "tokenizer")
    check = subprocess.run([str(args.genai_perf.parent / "python"), "-c", TOKENIZER_CHECK, str(tokenizer)],
                           capture_output=True, text=True, check=True).stdout.strip()
    if check != "[995, 767, 807, 860]":
        raise SystemExit(f"genai-perf's tokenizer does not load as GPT-2: ' world 7 8 9' -> {check}")
    write_prompts(work / "prompts.jsonl", args.requests, seed=0)
    repository = build_demo_repository(work / "repo", streaming=True)
    port = free_ports(1)[0]
    serve = start_serve(repository, port, work / "serve.log")
    try:
        runs = {mode: genai_perf(args.genai_perf, port, work, tokenizer, args.max_tokens, args.concurrency,
                                 args.requests, streaming=mode == "streaming")
                for mode in ("non_streaming", "streaming")}
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.wait(timeout=60)

    gpt2 = GptTokenizer.from_directory(GPT2_TOKENIZER_DIR)
    ours = {row["prompt"]: row for row in runs["non_streaming"][2]}
    result: dict[str, object] = {"genai_perf_version": "0.0.16", "requests": args.requests,
                                 "concurrency": args.concurrency, "max_tokens": args.max_tokens,
                                 "machine": f"{os.cpu_count()} CPU cores, no GPU (demo model, torch engine on CPU)",
                                 "our_usage": {
                                     "prompt_tokens": stats([r["usage"]["prompt_tokens"] for r in ours.values()]),
                                     "completion_tokens": stats([r["usage"]["completion_tokens"]
                                                                 for r in ours.values()])}}
    for mode, (command, summary, rows) in runs.items():
        # genai-perf counts by re-tokenizing each answer; here the same count is made per request and compared.
        mismatches = [row["prompt"] for row in rows
                      if len(gpt2.encode(str(row["text"]))) != ours[row["prompt"]]["usage"]["completion_tokens"]
                      or row["text"] != ours[row["prompt"]]["text"]]
        result[mode] = {"command": " ".join(command),
                        "genai_perf": {key: summary.get(key) for key in SUMMARY_KEYS},
                        "client": summary["client"],
                        "requests_whose_tokens_or_text_differ_from_our_usage": len(mismatches)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "openai_genai_perf.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
