"""`python -m client`: send raw text to the Triton text ensemble, or benchmark it with perf_analyzer.

A bare prompt runs the `generate` command: `python -m client "1 2 3 4 5 6" --output-length 30`.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import click

from .errors import TextClientError

DEFAULT_COMMAND = "generate"


class DefaultCommandGroup(click.Group):
    """A group whose first argument, when it names no subcommand, goes to the default command."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ctx.help_option_names:
            args = [DEFAULT_COMMAND, *args]
        return super().parse_args(ctx, args)


@click.group(cls=DefaultCommandGroup, no_args_is_help=True, context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """Raw text in, raw text out, against a Triton text ensemble.

    \b
    Complete a prompt (a bare prompt runs `generate`):
      python -m client "1 2 3 4 5 6" --output-length 30
      python -m client "Once upon a time" --stream --protocol grpc --temperature 0.8 --seed 1
      python -m client --file prompts.txt --concurrency 8 --only-continuation
    Benchmark with perf_analyzer (report folder with JSON, markdown and plots):
      python -m client perf --model ensemble --concurrency 1:16:2 --output perf-run1

    Run `python -m client generate --help` or `python -m client perf --help` for every option.
    """
    # Retry notices ("attempt 1/4 failed: ...; retrying") go to stderr as plain lines.
    logging.basicConfig(level=logging.WARNING, format="%(message)s")


def _sampling(top_k: int | None, top_p: float | None, temperature: float | None, seed: int | None,
              repetition_penalty: float | None, stop: tuple[str, ...], bad_word: tuple[str, ...]) -> dict[str, Any]:
    options: dict[str, Any] = {"top_k": top_k, "top_p": top_p, "temperature": temperature, "random_seed": seed,
                               "repetition_penalty": repetition_penalty}
    sampling = {key: value for key, value in options.items() if value is not None}
    if stop:
        sampling["stop_words"] = stop
    if bad_word:
        sampling["bad_words"] = bad_word
    return sampling


def _fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(1)


def _read_prompts(path: Path) -> list[str]:
    prompts = [line.rstrip("\r\n") for line in path.read_text(encoding="utf-8").splitlines()]
    prompts = [prompt for prompt in prompts if prompt.strip()]
    if not prompts:
        raise click.UsageError(f"{path} holds no prompts (one prompt per non-empty line)")
    return prompts


def _result_json(result: Any) -> str:
    return json.dumps({"prompt": result.prompt, "text": result.text, "finish_reason": result.finish_reason,
                       "num_input_tokens": result.num_input_tokens, "num_output_tokens": result.num_output_tokens},
                      ensure_ascii=False)


@cli.command("generate")
@click.argument("prompt", required=False)
@click.option("-n", "--output-length", "max_tokens", type=int, default=30, show_default=True,
              help="Tokens to generate (max_tokens).")
@click.option("--server", default=None, help="host[:port]; default localhost:8000 (http) or localhost:8001 (grpc).")
@click.option("--protocol", type=click.Choice(["http", "grpc"]), default="http", show_default=True,
              help="Triton endpoint to talk to; it must match the port of --server.")
@click.option("--model", default="ensemble", show_default=True, help="Name of the text ensemble.")
@click.option("--stream", is_flag=True, help="Print text as it arrives (gRPC stream or HTTP /generate_stream).")
@click.option("--top-k", type=int, default=None,
              help="Sample among the K most likely tokens. Unset (0) with --top-p unset: greedy decoding.")
@click.option("--top-p", type=float, default=None,
              help="Sample among the most likely tokens whose probabilities add up to P, in (0, 1].")
@click.option("--temperature", type=float, default=None,
              help="Divide the logits by this before sampling (below 1 sharper, above 1 more random; 0 = greedy). "
                   "Takes effect with --top-k or --top-p.")
@click.option("--seed", type=int, default=None,
              help="random_seed (UINT64): the same seed and options give the same sampled text.")
@click.option("--repetition-penalty", type=float, default=None,
              help="> 1 makes tokens already in the text less likely (HF/CTRL style); 1 = off.")
@click.option("--stop", multiple=True, help="Stop word or phrase (repeatable).")
@click.option("--bad-word", multiple=True, help="Word or phrase never to generate (repeatable).")
@click.option("--file", "prompt_file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Prompts, one per line, sent as separate requests.")
@click.option("--concurrency", type=click.IntRange(min=1), default=4, show_default=True,
              help="Requests in flight at once with --file.")
@click.option("--only-continuation", is_flag=True, help="Print only the generated text, not the prompt.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per prompt (text, finish_reason, counts).")
@click.option("--timeout", "timeout_s", type=float, default=60.0, show_default=True, help="Seconds per request.")
@click.option("--retries", type=click.IntRange(min=0), default=3, show_default=True,
              help="Retries on connection errors (exponential backoff).")
def generate_command(prompt: str | None, max_tokens: int, server: str | None, protocol: str, model: str, stream: bool,
                     top_k: int | None, top_p: float | None, temperature: float | None, seed: int | None,
                     repetition_penalty: float | None, stop: tuple[str, ...], bad_word: tuple[str, ...],
                     prompt_file: Path | None, concurrency: int, only_continuation: bool, as_json: bool,
                     timeout_s: float, retries: int) -> None:
    """Send PROMPT (or each line of --file) to the ensemble and print the prompt and its continuation."""
    from .text_client import TextClient  # keeps `--help` fast

    if (prompt is None) == (prompt_file is None):
        raise click.UsageError("give either a PROMPT or --file")
    if stream and prompt_file is not None:
        raise click.UsageError("--stream prints one prompt as it arrives; it does not combine with --file")
    if stream and as_json:
        raise click.UsageError("--stream and --json do not combine")
    sampling = _sampling(top_k, top_p, temperature, seed, repetition_penalty, stop, bad_word)
    printed = False
    try:
        with TextClient(server, protocol=protocol, model=model, timeout_s=timeout_s, retries=retries) as client:
            if prompt_file is not None:
                _generate_file(client, _read_prompts(prompt_file), max_tokens, concurrency, only_continuation,
                               as_json, sampling)
            elif stream:
                # The prompt goes out with the first delta: a request that fails prints nothing to stdout.
                head = "" if only_continuation else prompt
                for piece in client.stream(prompt, max_tokens, **sampling):  # type: ignore[arg-type]  # no --file: PROMPT is set
                    click.echo(piece if printed else f"{head}{piece}", nl=False)
                    printed = True
                click.echo("" if printed else head)  # an empty answer still shows the prompt
            else:
                result = client.generate(prompt, max_tokens, **sampling)  # type: ignore[arg-type]  # as above
                click.echo(_result_json(result) if as_json else
                           result.text if only_continuation else prompt + result.text)  # type: ignore[operator]  # as above
    except TextClientError as err:
        if stream and printed:
            click.echo()  # end the partial line on stdout; the error goes to stderr
        _fail(str(err))
    except (ValueError, TypeError) as err:  # an option the wire format cannot carry (e.g. a negative seed)
        _fail(str(err))


def _generate_file(client: Any, prompts: list[str], max_tokens: int, concurrency: int, only_continuation: bool,
                   as_json: bool, sampling: dict[str, Any]) -> None:
    outcomes = client.generate_many(prompts, max_tokens, concurrency=concurrency, return_exceptions=True, **sampling)
    failures = 0
    for index, (prompt, outcome) in enumerate(zip(prompts, outcomes), start=1):
        if isinstance(outcome, Exception):
            failures += 1
            click.echo(f"error: prompt {index}: {outcome}", err=True)
        elif as_json:
            click.echo(_result_json(outcome))
        else:
            click.echo(outcome.text if only_continuation else prompt + outcome.text)
    if failures:
        _fail(f"{failures} of {len(prompts)} prompts failed")


@cli.command("perf")
@click.option("--model", default="ensemble", show_default=True, help="Name of the text ensemble to load-test.")
@click.option("--server", default=None, help="host[:port]; default localhost:8000 (http) or localhost:8001 (grpc).")
@click.option("--protocol", type=click.Choice(["http", "grpc"]), default=None,
              help="Default: grpc with --stream, else http.")
@click.option("--stream", is_flag=True, help="Streaming run: gRPC --async --streaming; adds TTFT and ITL.")
@click.option("--prompt-tokens", type=int, default=128, show_default=True, help="Prompt length in GPT-2 tokens.")
@click.option("--max-tokens", type=int, default=128, show_default=True, help="Tokens to generate per request.")
@click.option("--concurrency", "concurrency_spec", default="1", show_default=True,
              help="start:end[:step] (end inclusive) or a comma list, e.g. 1:16:2 or 1,2,4,8.")
@click.option("--measurement-interval", "measurement_interval_ms", type=int, default=5000, show_default=True,
              help="perf_analyzer measurement window (ms).")
@click.option("--stability-percentage", type=float, default=10.0, show_default=True,
              help="perf_analyzer's allowed variation between windows (%).")
@click.option("--max-trials", type=int, default=10, show_default=True, help="perf_analyzer windows per level.")
@click.option("--tokenizer", "tokenizer_dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              default=None, help="Tokenizer folder (tokenizer.json or vocab.json + merges.txt); default GPT-2.")
@click.option("--compare-core", default=None, metavar="MODEL",
              help="Also measure this core model (token ids in) and report the latency the ensemble adds.")
@click.option("--output", "output_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Report folder [default: a new ./perf-<model>-<timestamp> in the current directory].")
def perf_command(model: str, server: str | None, protocol: str | None, stream: bool, prompt_tokens: int,
                 max_tokens: int, concurrency_spec: str, measurement_interval_ms: int, stability_percentage: float,
                 max_trials: int, tokenizer_dir: Path | None, compare_core: str | None,
                 output_dir: Path | None) -> None:
    """Load-test the ensemble with perf_analyzer; write report.json, report.md and plot.png.

    A concurrency level that perf_analyzer cannot measure stably is marked "unstable" in the report and the run
    goes on; the exit status is 1 only when no level at all was measured.
    """
    import datetime as dt

    from .perf import DEFAULT_TOKENIZER_DIR, PerfConfig, PerfError, parse_concurrency, run_perf

    try:
        config = PerfConfig(
            output_dir=output_dir or Path(f"perf-{model}-{dt.datetime.now():%Y%m%d-%H%M%S}"),
            model=model, server=server, protocol=protocol or ("grpc" if stream else "http"), stream=stream,
            prompt_tokens=prompt_tokens, max_tokens=max_tokens, concurrency=parse_concurrency(concurrency_spec),
            measurement_interval_ms=measurement_interval_ms, stability_percentage=stability_percentage,
            max_trials=max_trials, tokenizer_dir=tokenizer_dir or DEFAULT_TOKENIZER_DIR, compare_core=compare_core)
        report = run_perf(config, echo=lambda line: click.echo(line, err=True))
    except PerfError as err:
        _fail(str(err))
        return
    click.echo((config.output_dir / "report.md").read_text())
    click.echo(f"report: {config.output_dir}/report.json, report.md, plot.png ({len(report['results'])} levels "
               f"measured, {len(report['unstable'])} unstable)", err=True)
    if not report["results"]:
        _fail(f"no level of {model} was measured stably (see {config.output_dir}/report.md)")


def main() -> None:
    prog = "python -m client" if sys.argv and sys.argv[0].endswith("__main__.py") else None
    cli.main(prog_name=prog)
