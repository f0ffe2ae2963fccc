"""Click commands: `convert`, `checkpoint`, `demo-checkpoint` (registered lazily by `builder.cli`)."""

from __future__ import annotations

from pathlib import Path

import click

from .presets import PRESETS

PATH = click.Path(path_type=Path)


@click.command("convert")
@click.option("--in-file", "-i", "in_file", type=click.Path(exists=True, path_type=Path), required=True,
              help=".nemo archive, extracted .nemo folder, or HF GPT-2 folder (config.json + weights).")
@click.option("--saved-dir", "-o", type=PATH, required=True, help="Output root; weights go to SAVED_DIR/<N>-gpu.")
@click.option("--infer-gpu-num", "-i_g", type=click.IntRange(min=1), default=1, show_default=True,
              help="Inference tensor-parallel size N (must divide the head count).")
@click.option("--weight-data-type", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True,
              help="Precision of the written weight files; fp16 halves their size (the engine's data type is "
                   "chosen at render time).")
@click.option("--force", is_flag=True, help="Overwrite an existing SAVED_DIR/<N>-gpu.")
def convert_command(in_file: Path, saved_dir: Path, infer_gpu_num: int, weight_data_type: str, force: bool) -> None:
    """Convert a checkpoint to FasterTransformer weights (config.ini + model.*.bin + tokenizer files)."""
    from .converter import convert

    target = convert(in_file, saved_dir, infer_gpu_num, weight_data_type, force)
    click.echo(f"wrote {target}")


@click.command("checkpoint")
@click.option("--preset", type=click.Choice(list(PRESETS)), required=True, help="Model shape.")
@click.option("--out", type=PATH, required=True, help="The .nemo file to write.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random weights.")
@click.option("--tp", type=click.IntRange(min=1), default=1, show_default=True,
              help="Training tensor-parallel shards (mp_rank_XX/ folders when > 1).")
@click.option("--force", is_flag=True, help="Overwrite an existing --out file.")
def checkpoint_command(preset: str, out: Path, seed: int, tp: int, force: bool) -> None:
    """Write a random-weight NeMo 1.x .nemo checkpoint of a named shape."""
    from .synthetic import write_synthetic_checkpoint

    click.echo(f"wrote {write_synthetic_checkpoint(preset, out, seed=seed, tp=tp, force=force)}")


@click.command("demo-checkpoint")
@click.option("--out", type=PATH, default=None,
              help="Where to copy the .nemo (default: print the cached file's path).")
def demo_checkpoint_command(out: Path | None) -> None:
    """Train (once; cached) a tiny GPT that continues runs of integers, and write it as a .nemo."""
    from .demo import demo_checkpoint

    click.echo(f"wrote {demo_checkpoint(out)}")
