"""`python -m builder demo`: the whole product on the embedded default, offline, on a CPU.

demo checkpoint (a tiny GPT trained here to count, cached) -> FT weights -> text ensemble on the torch engine (CPU)
-> tritonserver -> "1 2 3 4 5 6" answered through Triton -> keeps serving until Ctrl-C.
"""

from __future__ import annotations

import shutil
import signal
import sys
from pathlib import Path

import click

from .render import render_repository
from .render_config import RenderConfig
from .runtime.model_config import GptModelConfig
from .serve import ServerConfig, ServerError, TritonServer
from .serve_cli import stop_on_signal, serve_until_signal

SEED_PROMPT = "1 2 3 4 5 6"
SEED_OUTPUT_LENGTH = 30


def build_demo_repository(output: Path, streaming: bool = False) -> Path:
    """Demo checkpoint -> fp32 FT weights -> rendered torch/CPU repository at `output` (replaced if it exists)."""
    from .checkpoints import convert  # torch-heavy; only needed here
    from .checkpoints.demo import demo_checkpoint

    nemo = demo_checkpoint()
    weights_root = nemo.parent / f"{nemo.stem}-ft"
    weights = weights_root / "1-gpu"
    if not (weights / "config.ini").is_file():
        shutil.rmtree(weights_root, ignore_errors=True)
        weights = convert(nemo, weights_root, infer_gpu_num=1, weight_data_type="fp32")
    model = GptModelConfig.from_ini(weights / "config.ini")
    config = RenderConfig(engine="torch", device="cpu", data_type="fp32", checkpoint=weights, model=model,
                          max_batch_size=64, streaming=streaming, output=output, force=True)
    return render_repository(config)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--output", default=Path("demo_repository"), show_default=True, type=click.Path(path_type=Path),
              help="Where to render the demo repository (replaced).")
@click.option("--http-port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@click.option("--grpc-port", default=8001, show_default=True, type=click.IntRange(1, 65535))
@click.option("--metrics-port", default=8002, show_default=True, type=click.IntRange(1, 65535))
@click.option("--streaming", is_flag=True, help="Render the streaming (decoupled) variant.")
@click.option("--prompt", default=SEED_PROMPT, show_default=True, help="The prompt answered once the server is up.")
@click.option("--no-wait", is_flag=True, help="Stop the server after answering instead of serving until Ctrl-C.")
def demo_command(output: Path, http_port: int, grpc_port: int, metrics_port: int, streaming: bool, prompt: str,
                 no_wait: bool) -> None:
    """Serve the demo model through a real tritonserver and answer the seed example.

    The demo model is a tiny GPT trained on this machine to count (about a minute the first time, then cached), so
    "1 2 3 4 5 6" continues with " 7 8 9 ... 36". Everything runs offline on the CPU.
    """
    from client import TextClient

    # SIGTERM takes the graceful path from the start: tritonserver runs in its own session and would outlive us.
    signal.signal(signal.SIGTERM, stop_on_signal)
    click.echo("[1/3] demo checkpoint -> FT weights -> model repository (torch engine, CPU) ...", err=True)
    repository = build_demo_repository(output, streaming=streaming)
    click.echo(f"[2/3] starting tritonserver on {repository} ...", err=True)
    try:
        server = TritonServer(ServerConfig(repository, http_port=http_port, grpc_port=grpc_port,
                                           metrics_port=metrics_port)).start()
    except ServerError as err:
        raise click.ClickException(str(err)) from err
    try:
        click.echo(f"[3/3] asking the ensemble: {prompt!r} ({SEED_OUTPUT_LENGTH} new tokens)", err=True)
        protocol = "grpc" if streaming else "http"
        url = server.grpc_url if streaming else server.http_url
        with TextClient(url, protocol=protocol) as text_client:
            result = text_client.generate(prompt, max_tokens=SEED_OUTPUT_LENGTH)
        click.echo(f"{prompt}{result.text}")
    except BaseException:
        server.stop()
        raise
    if no_wait:
        server.stop()
        return
    click.echo(f"""
Serving at HTTP http://{server.http_url}, gRPC {server.grpc_url}. Try, in another shell:
  .venv/bin/python -m client "10 11 12" --output-length 8 --server {server.http_url}
  curl -s -X POST http://{server.http_url}/v2/models/ensemble/generate \\
       -d '{{"text_input": "40 41 42", "max_tokens": 8}}'
Ctrl-C stops the server.""", err=True)
    sys.exit(serve_until_signal(server))
