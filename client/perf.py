"""`python -m client perf`: load-test the text ensemble with perf_analyzer and write a report folder.

Prompts of an exact GPT-2 token length are built from single-token words, so every request carries the same
prompt length. Each concurrency level is one perf_analyzer run (non-streaming: sync HTTP or gRPC; streaming: gRPC
`--async --streaming`); with a core model to compare, the core model is measured right after the ensemble at the
same level, with the same prompts as token ids, so both see the same machine state. A level perf_analyzer cannot
measure stably is recorded as unstable and the run goes on; any other failure still writes the report of the
levels measured before it.
"""

from __future__ import annotations

import datetime as dt
import importlib.util
import json
import os
import platform
import random
import re
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from builder import GPT2_TOKENIZER_DIR

from .connection import normalize_url
from .errors import TextClientError
from .perf_report import LevelResult, UnstableLevel, added_latency, added_latency_warnings, level_from_export, \
    load_export, markdown_table, plot, read_csv_row
from .request import ModelInfo

DEFAULT_TOKENIZER_DIR = GPT2_TOKENIZER_DIR  # the GPT-2 BPE files the builder ships in its package
WORD_PATTERN = re.compile(r"Ġ[a-z]{3,9}")  # "Ġ" marks a leading space in GPT-2's byte-level vocabulary
# perf_analyzer's exit status when the level it measured never became stable (pa::STABILITY_ERROR); it then writes
# no CSV and no profile export, and says "Failed to obtain stable measurement" on stderr.
STABILITY_ERROR_EXIT = 2


class PerfError(RuntimeError):
    """perf_analyzer is missing, failed, or the models do not fit the requested run."""


class ExportUnreadable(PerfError):
    """perf_analyzer 2.51 exited 0 but its profile export is cut short: it exports uninitialised memory for an output
    that a response does not carry (the log-probs, sent only when asked), and a NaN there truncates the JSON. Random,
    about one run in four on a small CPU host, so the level is measured again."""


# Runs of one level before a truncated export (ExportUnreadable) ends the whole run: at one bad export in four,
# six runs all fail about once in 4,000 levels.
EXPORT_ATTEMPTS = 6


def parse_concurrency(spec: str) -> tuple[int, ...]:
    """'1:16:2' (start:end:step, end inclusive, step default 1), '1,2,4,8', or '4'."""
    spec = spec.strip()
    try:
        if ":" in spec:
            parts = [int(part) for part in spec.split(":")]
            if len(parts) not in (2, 3):
                raise ValueError
            start, end, step = parts[0], parts[1], parts[2] if len(parts) == 3 else 1
            if step < 1 or end < start:
                raise PerfError(f"concurrency range {spec!r} needs end >= start and step >= 1")
            levels = tuple(range(start, end + 1, step))
        else:
            levels = tuple(int(part) for part in spec.split(","))
    except ValueError:
        raise PerfError(f"concurrency must be start:end[:step] or a comma list of integers, got {spec!r}") from None
    if not levels or min(levels) < 1:
        raise PerfError(f"concurrency levels must be >= 1, got {spec!r}")
    return levels


@dataclass(frozen=True)
class PerfConfig:
    """One benchmark run; validated once."""

    output_dir: Path
    model: str = "ensemble"
    server: str | None = None
    protocol: str = "http"
    stream: bool = False
    prompt_tokens: int = 128
    max_tokens: int = 128
    concurrency: tuple[int, ...] = (1,)
    measurement_interval_ms: int = 5000
    stability_percentage: float = 10.0
    max_trials: int = 10
    tokenizer_dir: Path = DEFAULT_TOKENIZER_DIR
    compare_core: str | None = None
    num_prompts: int = 16
    seed: int = 0
    extra_args: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.protocol not in ("http", "grpc"):
            raise PerfError(f"protocol must be http or grpc, got {self.protocol!r}")
        if self.stream and self.protocol != "grpc":
            raise PerfError("streaming runs need --protocol grpc (perf_analyzer streams only over gRPC)")
        for name, low in (("prompt_tokens", 1), ("max_tokens", 1), ("measurement_interval_ms", 100),
                          ("max_trials", 1), ("num_prompts", 1)):
            if getattr(self, name) < low:
                raise PerfError(f"{name} must be >= {low}, got {getattr(self, name)}")
        if not self.concurrency or min(self.concurrency) < 1:
            raise PerfError(f"concurrency levels must be >= 1, got {self.concurrency}")
        if self.stability_percentage <= 0:
            raise PerfError(f"stability_percentage must be > 0, got {self.stability_percentage}")
        if not self.tokenizer_dir.is_dir():
            raise PerfError(f"tokenizer directory {self.tokenizer_dir} does not exist")

    @property
    def url(self) -> str:
        return normalize_url(self.server, self.protocol)


# -- prompts -----------------------------------------------------------------------------------------------------
def load_tokenizer(directory: Path) -> Any:
    """A GPT-2 style tokenizer from tokenizer.json, or from vocab.json + merges.txt."""
    from tokenizers import Tokenizer
    from tokenizers.implementations import ByteLevelBPETokenizer

    if (directory / "tokenizer.json").is_file():
        return Tokenizer.from_file(str(directory / "tokenizer.json"))
    vocab, merges = directory / "vocab.json", directory / "merges.txt"
    if not (vocab.is_file() and merges.is_file()):
        raise PerfError(f"{directory} has neither tokenizer.json nor vocab.json + merges.txt")
    return ByteLevelBPETokenizer.from_file(str(vocab), str(merges))


def token_length_prompts(tokenizer: Any, tokens: int, count: int, seed: int = 0) -> list[tuple[str, list[int]]]:
    """`count` different prompts of exactly `tokens` tokens each, with their ids: random single-token words."""
    vocab = tokenizer.get_vocab()
    words = sorted(piece[1:] for piece in vocab if WORD_PATTERN.fullmatch(piece))
    if not words:
        raise PerfError("the tokenizer has no byte-level 'Ġword' tokens to build prompts from (not GPT-2 style?)")
    rng = random.Random(seed)
    prompts = []
    for _ in range(count):
        text = "".join(" " + word for word in rng.choices(words, k=tokens))
        ids = tokenizer.encode(text).ids
        if len(ids) != tokens:  # a word that is not one token after all: never seen with GPT-2, but be exact
            raise PerfError(f"built a prompt of {len(ids)} tokens instead of {tokens}")
        prompts.append((text, list(ids)))
    return prompts


def ensemble_input_data(prompts: list[tuple[str, list[int]]], max_tokens: int, info: ModelInfo,
                        stream: bool) -> dict[str, Any]:
    """perf_analyzer --input-data: every tensor of one batch-1 request per entry, used round-robin."""
    entries = []
    for text, _ in prompts:
        entry: dict[str, Any] = {"text_input": [text], "max_tokens": [max_tokens]}
        if "exclude_input_in_output" in info.inputs:
            entry["exclude_input_in_output"] = [True]  # never count an echoed prompt as output
        if "stream" in info.inputs:
            entry["stream"] = [stream]
        entries.append(entry)
    return {"data": entries}


def core_input_data(prompts: list[tuple[str, list[int]]], max_tokens: int, info: ModelInfo,
                    stream: bool) -> dict[str, Any]:
    """The same prompts as token ids for the FT-contract core model."""
    entries = []
    for _, ids in prompts:
        # Shapes spelled out: FT declares request_output_len (and some engines input_lengths) with dims [-1].
        entry: dict[str, Any] = {"input_ids": {"content": ids, "shape": [len(ids)]},
                                 "input_lengths": {"content": [len(ids)], "shape": [1]},
                                 "request_output_len": {"content": [max_tokens], "shape": [1]}}
        if "streaming" in info.inputs:
            entry["streaming"] = [stream]
        entries.append(entry)
    return {"data": entries}


# -- perf_analyzer -----------------------------------------------------------------------------------------------
def find_perf_analyzer() -> Path:
    """env PERF_ANALYZER, else PATH, else next to the running Python (the tritonclient wheel installs it there)."""
    candidates = [os.environ.get("PERF_ANALYZER"), shutil.which("perf_analyzer"),
                  str(Path(sys.executable).parent / "perf_analyzer")]
    for candidate in candidates:
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return Path(candidate)
    raise PerfError("perf_analyzer not found: install tritonclient[all]==2.51.0 or set PERF_ANALYZER")


def perf_analyzer_env() -> dict[str, str]:
    """perf_analyzer links libcudart.so.12 even for CPU-side runs: add the pip CUDA runtime's lib folder."""
    env = dict(os.environ)
    spec = importlib.util.find_spec("nvidia.cuda_runtime") if importlib.util.find_spec("nvidia") else None
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            lib = Path(location) / "lib"
            if (lib / "libcudart.so.12").exists():
                env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(lib), env.get("LD_LIBRARY_PATH")]))
                break
    return env


def model_info(url: str, protocol: str, model: str) -> ModelInfo:
    """The model's config through the text client (one try: perf_analyzer would fail the same way)."""
    from .text_client import TextClient  # keeps `--help` fast

    with TextClient(url, protocol, model, retries=0) as client:
        return client.model_info


@dataclass(frozen=True)
class LevelRun:
    """One perf_analyzer invocation: one model at one concurrency level."""

    model: str
    concurrency: int
    streaming: bool
    input_data: Path
    csv_path: Path
    export_path: Path

    @classmethod
    def in_folder(cls, folder: Path, model: str, concurrency: int, streaming: bool, input_data: Path) -> LevelRun:
        # Names are built whole: Path.with_suffix would treat the dot of a model name like "gpt3_1.3b" as a suffix
        # and give every level the same file.
        stem = f"{model}_c{concurrency}"
        return cls(model=model, concurrency=concurrency, streaming=streaming, input_data=input_data,
                   csv_path=folder / f"{stem}.csv", export_path=folder / f"{stem}_export.json")

    def command(self, binary: Path, config: PerfConfig) -> list[str]:
        command = [str(binary), "-m", self.model, "-u", config.url, "-i", config.protocol,
                   "--input-data", str(self.input_data), "--concurrency-range", str(self.concurrency),
                   "--measurement-interval", str(config.measurement_interval_ms),
                   "--stability-percentage", f"{config.stability_percentage:g}",
                   "--max-trials", str(config.max_trials),
                   "-f", str(self.csv_path), "--profile-export-file", str(self.export_path)]
        if self.streaming:
            command += ["--async", "--streaming"]
        return command + list(config.extra_args)


def run_level(run: LevelRun, binary: Path, config: PerfConfig, env: dict[str, str], log: Any) -> str | None:
    """Run perf_analyzer for one level: None when it measured, its own message when the level was unstable."""
    command = run.command(binary, config)
    log.write(f"$ {' '.join(command)}\n")
    log.flush()
    completed = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    log.write(completed.stdout + completed.stderr + "\n")
    log.flush()
    lines = [line.strip() for line in (completed.stdout + completed.stderr).splitlines() if line.strip()]
    if completed.returncode == STABILITY_ERROR_EXIT:
        said = [line for line in lines if "stable measurement" in line]
        return said[0] if said else f"perf_analyzer exit {STABILITY_ERROR_EXIT} (no stable measurement)"
    if completed.returncode != 0 or not run.csv_path.is_file():
        detail = lines[-5:]
        raise PerfError(f"perf_analyzer failed for {run.model} at concurrency {run.concurrency} "
                        f"(exit {completed.returncode}): " + " | ".join(detail))
    return None


def measure(run: LevelRun, tokenizer: Any) -> LevelResult:
    """Metrics of one finished perf_analyzer run; `tokenizer` counts output tokens (None: not counted)."""
    def count(texts: list[str]) -> list[int]:
        return [len(encoding.ids) for encoding in tokenizer.encode_batch(texts)]

    try:
        experiment = load_export(run.export_path)
    except ValueError as err:
        raise ExportUnreadable(f"perf_analyzer's export for {run.model} at concurrency {run.concurrency} is "
                               f"unreadable: {err}") from err
    try:
        row = read_csv_row(run.csv_path)
        return level_from_export(run.model, run.concurrency, float(row["Inferences/Second"]), experiment,
                                 count if tokenizer is not None else None, run.streaming)
    except (ValueError, KeyError) as err:
        raise PerfError(f"cannot read perf_analyzer's results for {run.model} at concurrency "
                        f"{run.concurrency}: {err}") from err


def run_perf(config: PerfConfig, echo: Any = print) -> dict[str, Any]:
    """Run every level (and the core comparison), write report.json/report.md/plot.png; return the report."""
    binary = find_perf_analyzer()
    env = perf_analyzer_env()
    try:
        ensemble = model_info(config.url, config.protocol, config.model)
        core = model_info(config.url, config.protocol, config.compare_core) if config.compare_core else None
    except TextClientError as err:  # any transport failure ends the run with one line
        raise PerfError(str(err)) from err
    for info in (ensemble, core):
        if info is not None and info.decoupled and not config.stream:
            raise PerfError(f"model '{info.name}' is decoupled (a streaming repository): run with --stream "
                            "(gRPC); perf_analyzer measures decoupled models only over a gRPC stream")
    tokenizer = load_tokenizer(config.tokenizer_dir)
    prompts = token_length_prompts(tokenizer, config.prompt_tokens, config.num_prompts, config.seed)

    out = config.output_dir
    raw = out / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    ensemble_data = raw / "inputs_ensemble.json"
    ensemble_data.write_text(json.dumps(ensemble_input_data(prompts, config.max_tokens, ensemble, config.stream)))
    core_data = raw / "inputs_core.json"
    if core is not None:
        core_data.write_text(json.dumps(core_input_data(prompts, config.max_tokens, core, config.stream)))

    results: list[LevelResult] = []
    core_results: list[LevelResult] = []
    unstable: list[UnstableLevel] = []
    failure: PerfError | None = None
    with open(raw / "perf_analyzer.log", "w") as log:
        try:
            for level in config.concurrency:
                targets = [(config.model, ensemble, ensemble_data, results)]
                if core is not None:
                    targets.append((config.compare_core, core, core_data, core_results))  # type: ignore[arg-type]  # name set with core
                for name, info, data, sink in targets:
                    run = LevelRun.in_folder(raw, name, level, config.stream or info.decoupled, data)
                    for attempt in range(1, EXPORT_ATTEMPTS + 1):
                        run.csv_path.unlink(missing_ok=True)
                        run.export_path.unlink(missing_ok=True)
                        echo(f"perf_analyzer: {name} at concurrency {level} ...")
                        detail = run_level(run, binary, config, env, log)
                        if detail is not None:  # one noisy level must not cost the others
                            echo(f"warning: {name} at concurrency {level} is unstable (recorded, no numbers): "
                                 f"{detail}")
                            unstable.append(UnstableLevel(name, level, detail))
                            break
                        try:  # the core model answers token ids: nothing to re-tokenize
                            sink.append(measure(run, tokenizer if name == config.model else None))
                            break
                        except ExportUnreadable as err:
                            if attempt == EXPORT_ATTEMPTS:
                                raise PerfError(str(err)) from err
                            echo(f"warning: {err}; measuring the level again (a perf_analyzer 2.51 fault, see "
                                 "README Troubleshooting)")
        except PerfError as err:  # keep what was measured before the failure
            failure = err

    added = added_latency(results, core_results)
    warnings = added_latency_warnings(added)
    for line in warnings:
        echo(line)
    notes = [*warnings, *([f"The run stopped early: {failure}"] if failure else [])]
    settings = {"model": config.model, "server": config.url, "protocol": config.protocol,
                "streaming": config.stream, "prompt tokens": config.prompt_tokens,
                "max tokens": config.max_tokens, "compared core model": config.compare_core or "-",
                "measurement interval ms": config.measurement_interval_ms,
                "perf_analyzer": perf_analyzer_version(binary, env)}
    report = {
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "config": {key: (str(value) if isinstance(value, Path) else value) for key, value in asdict(config).items()},
        "settings": settings,
        "results": [result.to_json() for result in results],
        "core_results": [result.to_json() for result in core_results],
        "unstable": [item.to_json() for item in unstable],
        "ensemble_added_latency_ms": added,
        "warnings": warnings,
        "error": str(failure) if failure else None,
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    title = f"perf: {config.model}{' (streaming)' if config.stream else ''}"
    (out / "report.md").write_text(markdown_table(title, settings, results, core_results, added, unstable, notes))
    plot(out / "plot.png", results, core_results)
    if failure is not None:
        raise PerfError(f"{failure} (the levels measured before it are in {out}/report.json)") from failure
    return report


def perf_analyzer_version(binary: Path, env: dict[str, str]) -> str:
    try:
        completed = subprocess.run([str(binary), "--version"], env=env, capture_output=True, text=True,
                                   timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    match = re.search(r"\d+\.\d+\.\d+", completed.stdout + completed.stderr)
    return match.group(0) if match else "unknown"
