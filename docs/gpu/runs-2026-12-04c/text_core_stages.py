"""Where the text core's extra time over token ids goes: Triton's request trace of both, one request at a time.

    python docs/gpu/runs-2026-12-04/text_core_stages.py --out OUT/text_core_stages.json [text_paths.py options]

One tritonserver serves bench/text_paths.py's repositories (the same random weights as `text_core`, rendered
--text-in-core, and the core `gpt3_1.3b` taking token ids), with Triton's trace at TIMESTAMPS level for every request.
Interleaved, one at a time over a gRPC stream: a streamed text_core request (a prompt of exactly --prompt-tokens
tokens, 4 new tokens), then the same token ids to gpt3_1.3b. Per model, the median of each trace event's first
timestamp after the request's REQUEST_START (a decoupled model's COMPUTE_END is its `execute` returning: for the text
core that includes tokenizing and validating; GRPC_SEND_START is the first response handed to gRPC), and the
client's first-response medians. With --instrument, the rendered copies of the runtime are patched (here only,
never the product) to time, inside each stub: execute's entry, the text core's preprocessing (its encode apart), the
core's parse_request, the scheduler's submit; per model, the medians of each span go to the JSON (PATCHES names the
marks). A GPU-run helper, not part of the product.

This copy (2026-12-04, eighteenth session) is docs/gpu/runs-2026-12-04/text_core_stages.py with its text-core mark
moved to the current `TextCore.submit` line, and marks on each streamed update's way out of the stub too: u the
receiver hands the update to the sink, r the text core's transport (after the FT arrays; text core only), y
model.py's sender.send, U sent. It ran on the project VM only (`--device cpu`: text_core_stages_cpu.txt).
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import gpu_bench  # noqa: E402
import text_paths  # noqa: E402
from builder.runtime.tokenizer import GptTokenizer  # noqa: E402
from builder.serve import TritonServer  # noqa: E402
from serving_bench import core_call_times, device_name  # noqa: E402
from triton_trace import read_traces, server_args  # noqa: E402

WARMUP, TRAILING, NEW = 10, 20, 4

# (file in the rendered model folder, line to find, lines put before it): perf_counter marks, appended per request
# to a JSON-lines file by the stub. Marks: x execute's entry, t the text core's submit, e/E around the encode, s the
# core's parse_request (token ids), p the rows handed to submit_parsed, q/Q around the scheduler's submit.
PATCHES = (
    ("model.py", "            for request in requests:\n", "            _mark('x')\n"),
    ("gpt_runtime/text_core.py", "        (request,) = _or_replies(1, lambda: core_requests(", "        _mark('t')\n"),
    ("gpt_runtime/preprocess.py", "    encoded = tokenizer.encode_batch(texts)\n", "    _mark('e')\n"),
    ("gpt_runtime/preprocess.py", "    results: list[Result | RequestError] = []\n", "    _mark('E')\n"),
    ("gpt_runtime/core_adapter.py", "            parsed = parse_request(inputs, self.limits)\n", "            _mark('s')\n"),
    ("gpt_runtime/core_adapter.py", "        from .generation import ResourceError\n\n        try:\n            sink",
     "        _mark('p')\n"),
    ("gpt_runtime/core_adapter.py", "            self.queue.submit(parsed.rows, sink,", "            _mark('q')\n"),
    ("gpt_runtime/core_adapter.py", "        except (RequestError, ResourceError) as err:\n", "            _mark('Q', True)\n"),
    ("gpt_runtime/engine_process.py", "            remote.sink.update(outputs)\n", "            _mark('u')\n"),
    ("gpt_runtime/engine_process.py", "            remote.updates += 1\n", "            _mark('U', True)\n"),
    ("model.py", "        self.sender.send(_response(reply), flags=", "        _mark('y')\n"),
)
TEXT_ONLY = ("gpt_runtime/text_core.py", "        self.transport.send(self.codec.reply(reply, self.passed), final)\n", "        _mark('r')\n")
MARKER = """
import builtins as _builtins, json as _json, threading as _threading, time as _time
_MARKS = _builtins.__dict__.setdefault("_bench_marks", {{}})  # one store for every patched module of the stub
def _mark(name, last=False):
    _MARKS[name] = _time.perf_counter()
    _MARKS["thread_" + name] = _threading.get_ident()  # execute may run on another thread each time
    if last:
        with open({path!r}, "a") as _f:
            _f.write(_json.dumps(_MARKS) + "\\n")
        _MARKS.clear()
"""


def instrument(folder: Path, log: Path, text: bool) -> None:
    """Patch the rendered copies (model.py and gpt_runtime/) under folder: see PATCHES."""
    for name, anchor, before in PATCHES + ((TEXT_ONLY,) if text else ()):
        path = folder / name
        source = path.read_text()
        if "def _mark(" not in source:
            head, _, tail = source.partition("\nfrom __future__ import annotations\n")
            body = tail if _ else source
            prefix = head + "\nfrom __future__ import annotations\n" if _ else ""
            source = prefix + MARKER.format(path=str(log)) + body
        if source.count(anchor) != 1:
            raise SystemExit(f"{path}: {anchor!r} found {source.count(anchor)} times")
        source = source.replace(anchor, before + anchor)
        path.write_text(source)


def spans(log: Path) -> dict[str, float]:
    """Medians in ms of each span between the marks, over the requests after the warm-up."""
    records = [json.loads(line) for line in log.read_text().splitlines()][WARMUP:]
    pairs = {"execute entry -> text core": ("x", "t"), "text core -> encode": ("t", "e"), "encode": ("e", "E"),
             "encode -> rows": ("E", "p"), "execute entry -> parse_request": ("x", "s"), "parse_request": ("s", "p"),
             "rows -> scheduler": ("p", "q"), "scheduler submit": ("q", "Q"), "execute entry -> submitted": ("x", "Q"),
             "update: FT arrays": ("u", "r"), "update: text reply": ("r", "y"), "update: to the response": ("u", "y"),
             "update: response + send": ("y", "U"), "update: whole": ("u", "U")}
    out = {}
    for label, (a, b) in pairs.items():
        values = [(r[b] - r[a]) * 1e3 for r in records if a in r and b in r]
        if values:
            out[label] = statistics.median(values)
    return out


def main() -> None:
    args = text_paths.parse_args([a for a in sys.argv[1:] if a != "--instrument"])
    args.work = gpu_bench.private_work_dir(args.work, "text-paths")
    tokens = args.prompt_tokens[0]
    result: dict = {"gpu": device_name(args.device), "prompt_tokens": tokens, "requests": args.reps,
                    "command": " ".join(["python", *sys.argv])}
    instrumented = "--instrument" in sys.argv
    classic, text = text_paths.build(args, result)
    logs = {text_paths.TEXT_CORE: args.work / "marks_text.jsonl", text_paths.CORE: args.work / "marks_ids.jsonl"}
    if instrumented:
        for model, repo in ((text_paths.TEXT_CORE, text), (text_paths.CORE, classic)):
            logs[model].unlink(missing_ok=True)
            instrument(repo / model / "1", logs[model], model == text_paths.TEXT_CORE)
    tokenizer = GptTokenizer.from_directory(text / text_paths.TEXT_CORE / "1")
    prompt = gpu_bench.text_prompt(tokenizer, tokens, seed=tokens)
    ids = tokenizer.encode(prompt)
    client: dict[str, list[float]] = defaultdict(list)
    with tempfile.TemporaryDirectory(prefix="text-core-trace-") as folder:  # private: traces hold prompts
        trace_args = server_args(Path(folder), rate=1, log_every=10)
        with TritonServer.on_free_ports(classic, startup_timeout_s=900,
                                        extra_args=[f"--model-repository={text}", *trace_args]) as server:
            triton = gpu_bench.Triton(server.grpc_url, streaming=True)
            for index in range(WARMUP + args.reps + TRAILING):
                first_text = triton.text(prompt, NEW, stream=True, model=text_paths.TEXT_CORE)[0] * 1e3
                first_ids = core_call_times(triton, text_paths.CORE, ids, NEW, stream=True)[0] * 1e3
                if WARMUP <= index < WARMUP + args.reps:
                    client[text_paths.TEXT_CORE].append(first_text)
                    client[text_paths.CORE].append(first_ids)
        models, events = read_traces(Path(folder))
    stages: dict[str, dict[str, list[float]]] = {}
    for model in (text_paths.TEXT_CORE, text_paths.CORE):
        requests = sorted((events[i]["REQUEST_START"][0], i) for i, entry in models.items()
                          if entry["model_name"] == model and "parent_id" not in entry and events[i]["REQUEST_START"])
        per_event: dict[str, list[float]] = defaultdict(list)
        for start, trace_id in requests[WARMUP:WARMUP + args.reps]:
            for name, stamps in events[trace_id].items():
                per_event[name].append((stamps[0] - start) / 1e6)
        stages[model] = per_event
    result["events_ms_after_request_start"] = {
        model: dict(sorted(((name, statistics.median(values)) for name, values in per_event.items()),
                           key=lambda item: item[1])) for model, per_event in stages.items()}
    result["client_first_response_ms"] = {model: statistics.median(values) for model, values in client.items()}
    result["client_text_over_ids_ms"] = statistics.median(
        a - b for a, b in zip(client[text_paths.TEXT_CORE], client[text_paths.CORE]))
    if instrumented:
        result["stub_spans_ms"] = {model: spans(log) for model, log in logs.items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    text_ev, ids_ev = (result["events_ms_after_request_start"][m] for m in (text_paths.TEXT_CORE, text_paths.CORE))
    print(f"| event (first timestamp) | {text_paths.TEXT_CORE} ms | {text_paths.CORE} ms | difference |")
    print("|---|---|---|---|")
    for name, value in text_ev.items():
        other = ids_ev.get(name)
        print(f"| {name} | {value:.3f} | {'-' if other is None else f'{other:.3f}'} | "
              f"{'-' if other is None else f'{value - other:+.3f}'} |")
    print(f"\nclient first response: {json.dumps(result['client_first_response_ms'])}; text - ids (paired median) "
          f"{result['client_text_over_ids_ms']:.3f} ms")
    if instrumented:
        print(json.dumps(result["stub_spans_ms"], indent=1))


if __name__ == "__main__":
    main()
