"""`python -m builder render`: write the text-in/text-out Triton model repository.

Layout written (model folder names are what Triton serves):
  <output>/<ensemble-name>/config.pbtxt, 1/
  <output>/preprocessing/config.pbtxt, 1/{model.py, gpt_runtime/, vocab.json, merges.txt}
  <output>/<model-name>/config.pbtxt, 1/[model.py, gpt_runtime/ (torch engine)], 1/<tp>-gpu/ (weights, if given)
  <output>/postprocessing/config.pbtxt, 1/{model.py, gpt_runtime/, vocab.json, merges.txt}
With --text-in-core (torch engine) only the core model, under the ensemble's name, with the tokenizer files too:
  <output>/<ensemble-name>/config.pbtxt, 1/{model.py, gpt_runtime/, vocab.json, merges.txt, <tp>-gpu/}
The repository is self-contained: the runtime modules and tokenizer files the models need are copied in.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tarfile
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import click
import jinja2
from google.protobuf import text_format
from tqdm import tqdm
from tritonclient.grpc import model_config_pb2

from . import GPT2_TOKENIZER_DIR, PACKAGE_ROOT, TEMPLATES_DIR
from .render_config import DATA_TYPES, DEVICES, ENGINES, RenderConfig, RenderError
from .runtime.model_config import KV_CACHE_DTYPES, WEIGHT_QUANTIZATIONS, GptModelConfig, ModelConfigError

RUNTIME_PACKAGE = PACKAGE_ROOT / "runtime"
RUNTIME_FOLDER = "gpt_runtime"  # the runtime package's name inside a rendered model's version folder
TOKENIZER_FILES = ("vocab.json", "merges.txt")
MARKER = ".gpt-triton-repository"
MAX_TOKENIZER_BYTES = 64 << 20  # lets --force delete only folders this tool wrote


def template_environment() -> jinja2.Environment:
    return jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES_DIR), undefined=jinja2.StrictUndefined,
                              trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
                              autoescape=False)


def parse_model_config(text: str, source: str) -> model_config_pb2.ModelConfig:
    try:
        return text_format.Parse(text, model_config_pb2.ModelConfig())
    except text_format.ParseError as err:
        raise RenderError(f"{source}: not a valid Triton model config: {err}") from err


def find_tokenizer(config: RenderConfig) -> Path:
    """--tokenizer (folder or .nemo), else the checkpoint folder, else the packaged GPT-2 tables."""
    if config.tokenizer is not None:
        if config.tokenizer.is_file():
            return tokenizer_from_nemo(config.tokenizer)
        return config.tokenizer
    if config.checkpoint is not None and all((config.checkpoint / f).is_file() for f in TOKENIZER_FILES):
        return config.checkpoint
    return GPT2_TOKENIZER_DIR


def tokenizer_from_nemo(nemo: Path) -> Path:
    """Read only the GPT-2 tables out of a .nemo archive (hashed names like `<hash>_vocab.json`) into a temp folder.

    Nothing else is extracted, and the member names never become paths, so a hostile archive cannot write outside.
    """
    target = Path(tempfile.mkdtemp(prefix="gpt-triton-tokenizer-"))
    wanted: dict[str, bytes | None] = {"vocab.json": None, "merges.txt": None}
    try:
        with tarfile.open(nemo, "r:*") as archive:
            for member in archive:
                base = member.name.rsplit("/", 1)[-1]
                for name in wanted:
                    if base.endswith(name) and member.isfile() and member.size < MAX_TOKENIZER_BYTES:
                        wanted[name] = archive.extractfile(member).read()  # type: ignore[union-attr]  # isfile()
    except (tarfile.TarError, OSError) as err:
        raise RenderError(f"--tokenizer {nemo}: not a readable .nemo archive: {err}") from err
    missing = [name for name, data in wanted.items() if data is None]
    if missing:
        raise RenderError(f"--tokenizer {nemo}: the archive holds no *{' or *'.join(missing)}")
    for name, data in wanted.items():
        (target / name).write_bytes(data)  # type: ignore[arg-type]  # none missing (checked above)
    return target


def _link_or_copy(source: Path, target: Path) -> None:
    if source.suffix == ".bin":
        try:
            os.link(source, target)  # same file system: no second copy of multi-GB weights (read-only at serve time)
            return
        except OSError:
            pass
    shutil.copy2(source, target)


def _copy_weights(source: Path, target: Path) -> None:
    files = sorted(p for p in source.iterdir() if p.is_file())
    target.mkdir(parents=True)
    for path in tqdm(files, desc=f"weights -> {target}", unit="file", disable=len(files) < 20, file=sys.stderr):
        _link_or_copy(path, target / path.name)


def _prepare_output(config: RenderConfig) -> Path:
    output = config.output
    if output.exists() and any(output.iterdir()):
        if not config.force:
            raise RenderError(f"--output {output} exists and is not empty; pass --force to replace it")
        if not (output / MARKER).is_file():
            raise RenderError(f"--output {output} was not written by `builder render` (no {MARKER}); "
                              "refusing to delete it even with --force")
        shutil.rmtree(output)
    output.mkdir(parents=True, exist_ok=True)
    return output


def render_repository(config: RenderConfig) -> Path:
    """Render every model of the repository; returns the output folder."""
    env = template_environment()
    tokenizer_dir = find_tokenizer(config)
    missing = [f for f in TOKENIZER_FILES if not (tokenizer_dir / f).is_file()]
    if missing:
        raise RenderError(f"tokenizer folder {tokenizer_dir} lacks {', '.join(missing)}")
    rendered = {}
    core_template = "gpt_torch" if config.engine == "torch" else "fastertransformer"
    models = {config.ensemble_name: "ensemble", "preprocessing": "preprocessing",
              config.model_name: core_template, "postprocessing": "postprocessing"}
    if config.text_in_core:  # one model, text in and out, under the ensemble's name
        models = {config.core_name: core_template}
    # Ids past the tokenizer's table exist only as padding rows of the embedding: never generate them.
    tokenizer_vocab_size = len(json.loads((tokenizer_dir / "vocab.json").read_text(encoding="utf-8")))
    for model_name, template in models.items():
        text = env.get_template(f"{template}/config.pbtxt.j2").render(cfg=config,
                                                                       tokenizer_vocab_size=tokenizer_vocab_size)
        parse_model_config(text, f"{template}/config.pbtxt.j2")
        rendered[model_name] = (template, text)

    output = _prepare_output(config)
    for model_name, (template, text) in rendered.items():
        model_dir = output / model_name
        version_dir = model_dir / "1"
        version_dir.mkdir(parents=True)
        (model_dir / "config.pbtxt").write_text(text)
        static = TEMPLATES_DIR / template / "1"
        if static.is_dir():
            shutil.copytree(static, version_dir, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        if (version_dir / "model.py").is_file():
            shutil.copytree(RUNTIME_PACKAGE, version_dir / RUNTIME_FOLDER,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        if template in ("preprocessing", "postprocessing") or config.text_in_core:
            for name in TOKENIZER_FILES:
                shutil.copy2(tokenizer_dir / name, version_dir / name)
            write_hf_tokenizer_files(tokenizer_dir, version_dir, config.model.max_pos_seq_len)
    if config.checkpoint is not None:
        _copy_weights(config.checkpoint, output / config.core_name / "1" / config.weights_folder)
    manifest = {key: str(value) if isinstance(value, Path) else value for key, value in asdict(config).items()}
    (output / MARKER).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    return output


def write_hf_tokenizer_files(tokenizer_dir: Path, folder: Path, max_length: int) -> None:
    """tokenizer.json + tokenizer_config.json + special_tokens_map.json beside vocab.json/merges.txt, so the folder
    loads with `transformers.AutoTokenizer.from_pretrained` (what genai-perf's --tokenizer and TRT-LLM's
    --tokenizer-dir use). GPT2Tokenizer: the fast one from tokenizer.json in transformers 4 and 5 alike."""
    from .runtime.tokenizer import EOS_TOKEN, GptTokenizer  # loads the Rust tokenizer

    (folder / "tokenizer.json").write_text(GptTokenizer.from_directory(tokenizer_dir).tokenizer_json(),
                                           encoding="utf-8")
    special = {"bos_token": EOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN}
    config = {"tokenizer_class": "GPT2Tokenizer", "model_max_length": max_length, "add_prefix_space": False,
              "add_bos_token": False, "clean_up_tokenization_spaces": False, **special}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")


def _gpu_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",")) if text.strip() else ()
    except ValueError:
        raise click.BadParameter(f"must be comma-separated GPU ids such as 0,1, got {text!r}") from None


def config_from_options(checkpoint: Path | None, **options: Any) -> RenderConfig:
    """Build the render config; the model limits come from the checkpoint's config.ini when one is given.

    The checkpoint is read first, so that every limit (--tp against head_num, --pp against num_layer) is checked
    against this model and not against the 1.3B defaults.
    """
    if checkpoint is None:
        return RenderConfig(**options)
    try:
        model = GptModelConfig.from_ini(checkpoint / "config.ini")
    except ModelConfigError as err:
        raise RenderError(f"--checkpoint: {err}") from err
    config = RenderConfig(checkpoint=checkpoint, model=model, **options)
    # The torch engine merges any split at --tp 1; with --tp N each rank loads its own shard files as written.
    if (config.engine == "fastertransformer" or config.tp > 1) and model.tensor_para_size != config.tp:
        raise RenderError(f"--checkpoint {checkpoint} holds weights split for {model.tensor_para_size} GPU(s) but "
                          f"--tp is {config.tp}; convert with --infer-gpu-num {config.tp}")
    return config


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--tp", default=1, show_default=True, type=click.IntRange(1), help="Tensor-parallel size.")
@click.option("--pp", default=1, show_default=True, type=click.IntRange(1),
              help="Pipeline-parallel size (FasterTransformer engine).")
@click.option("--engine", type=click.Choice(ENGINES), default="fastertransformer", show_default=True,
              help="Core GPT model: Triton's FasterTransformer backend (NGC FT containers), or our PyTorch engine "
                   "(Python backend, CPU or CUDA).")
@click.option("--checkpoint", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="FT weight folder (`<saved-dir>/<N>-gpu` from `builder convert`); copied (hard-linked when "
                   "possible) into the repository. Without it the limits of NeMo GPT-3 1.3B are assumed and the "
                   "weights are expected at <output>/<model-name>/1/<tp>-gpu.")
@click.option("--tokenizer", type=click.Path(exists=True, path_type=Path),
              help="Folder with vocab.json + merges.txt, or a .nemo [default: the checkpoint's, else GPT-2's].")
@click.option("--model-name", default="gpt3_1.3b", show_default=True, help="Name of the core GPT model.")
@click.option("--ensemble-name", default="ensemble", show_default=True, help="Name of the text ensemble.")
@click.option("--max-batch-size", default=256, show_default=True, type=int, help="Triton max_batch_size.")
@click.option("--data-type", type=click.Choice(DATA_TYPES), default="fp16", show_default=True,
              help="Compute type of the core model (weights are cast at load).")
@click.option("--device", type=click.Choice(DEVICES), default="gpu", show_default=True,
              help="Where the torch engine runs (KIND_GPU / KIND_CPU).")
@click.option("--streaming", is_flag=True, help="Decoupled core model: token streaming over gRPC and "
                                               "/generate_stream.")
@click.option("--gpus", default="", callback=lambda _c, _p, v: _gpu_list(v),
              help="Torch engine with --tp N on GPUs: the GPU id of each rank, e.g. 2,3 [default: 0..N-1]. The "
                   "core model's instance (rank 0) is placed on the first; it starts the other ranks.")
@click.option("--instances", default=1, show_default=True, type=int, help="Core model instances.")
@click.option("--kv-slots", default=0, show_default=True, type=int,
              help="Torch engine: KV-cache slots (sequences decoded at once). 0: with --streaming on a GPU as many as "
                   "fit the free memory, up to 256, whatever --max-batch-size; otherwise --max-batch-size.")
@click.option("--step-prompt-tokens", default=0, show_default=True, type=int,
              help="Torch engine with --streaming: prompt tokens prefilled per step while other rows decode; longer "
                   "prompts join in chunks over several steps (chunked prefill), so running streams never stall for "
                   "a whole long prompt. Larger: faster prefill, longer stalls. 0: the engine's default (2048). With "
                   "no row decoding a prompt is prefilled whole.")
@click.option("--kv-cache-dtype", type=click.Choice(KV_CACHE_DTYPES), default="auto", show_default=True,
              help="Torch engine: dtype of the KV cache. auto: --data-type. fp8 (GPUs of compute capability 8.9+, "
                   "e.g. H100/H200/L40S): e4m3, half the bytes per cached token (twice the sequences fit in the "
                   "same memory), and decode steps over long or many sequences read half the data; keys and values "
                   "are rounded to 3 mantissa bits (a small change in the logits: measure your model's quality "
                   "with it).")
@click.option("--weight-quantization", type=click.Choice(WEIGHT_QUANTIZATIONS), default="none", show_default=True,
              help="Torch engine, --tp 1: int8 keeps each layer's four matrices (QKV, attention output, FC1, FC2) as "
                   "int8 with one scale per output row, quantized at load from the --data-type weights (the "
                   "embeddings and the LM head stay in --data-type): half their memory, and a decode step, which "
                   "streams the weights once, reads about half the bytes. On a GPU every GEMM over them is a Triton "
                   "kernel (it needs Triton). Each weight moves by up to half its row's step (max |w| / 127): "
                   "measure your model's quality with it (bench/gpu_bench.py --weight-quantization int8 reports "
                   "greedy agreement with HF transformers in fp16).")
@click.option("--engine-process/--no-engine-process", default=None,
              help="Torch engine with --streaming: run the engine and its in-flight loop in a process of their own, "
                   "next to the core model's Python stub, so the loop never waits for the stub's threads (request "
                   "parsing, responses) to hand back the GIL. [default: on with --engine torch --streaming --tp 1] "
                   "GPT_TRITON_ENGINE_PROCESS=0 or 1 in the server's environment overrides it (A/B runs).")
@click.option("--text-in-core", is_flag=True,
              help="Torch engine: the core model tokenizes the text and detokenizes its tokens itself and is served "
                   "as --ensemble-name, with the ensemble's inputs and outputs; no preprocessing/postprocessing "
                   "models. Each of those Python-backend hops costs ~0.5 ms or more per request (and per streamed "
                   "response): on an H200 host the first token came 1.4-1.5 ms sooner. The token-id model "
                   "(--model-name) is then not served.")
@click.option("--max-queue-delay-us", default=1000, show_default=True, type=int,
              help="Dynamic-batching queue delay of the core model (microseconds).")
@click.option("--ft-checkpoint-path", help="FT engine: where the weights are inside the FT container "
                                           "[default: their absolute path in the rendered repository].")
@click.option("--output", default=Path("model_repository"), show_default=True, type=click.Path(path_type=Path),
              help="Repository folder to write.")
@click.option("--force", is_flag=True, help="Replace an existing repository written by this command.")
def render_command(checkpoint: Path | None, **options: object) -> None:
    """Render the Triton model repository in which clients send text and get text back.

    \b
    Examples:
      python -m builder render --tp 1                      # FasterTransformer engine, as NVIDIA's NeMo 1.3B guide
      python -m builder render --engine torch --device cpu --data-type fp32 --checkpoint ft/1-gpu
      python -m builder render --engine torch --checkpoint ft/1-gpu --streaming --force
      python -m builder render --engine torch --tp 2 --checkpoint ft/2-gpu --streaming   # two GPUs, one model
    """
    try:
        config = config_from_options(checkpoint, **options)
        output = render_repository(config)
    except (RenderError, ModelConfigError) as err:
        raise click.ClickException(str(err)) from err
    click.echo(f"rendered {config.engine} repository: {output}")
    for name in sorted(p.name for p in output.iterdir() if p.is_dir()):
        click.echo(f"  {name}/")
    if checkpoint is None:
        click.echo(f"weights: place the FT `{config.weights_folder}` folder at "
                   f"{output / config.core_name / '1' / config.weights_folder}")
    click.echo(f"next: python -m builder validate {output} && python -m builder serve {output}")
