"""`.nemo` / HF GPT-2 checkpoint -> `<saved_dir>/<N>-gpu/{config.ini, model.*.bin, vocab.json, merges.txt}`.

Tensors stream one at a time from the memory-mapped source through the writer, so converting the 1.3B model holds
about one tensor in anonymous memory. The output is built in a hidden sibling folder and renamed into place at the
end: an interrupted conversion never leaves a half-written `N-gpu` directory behind.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tqdm import tqdm

from builder.runtime.ft_weights import CONFIG_FILE, check_weight_dir, tensor_specs
from builder.runtime.model_config import GptModelConfig

from .ft_writer import TORCH_DTYPES, FtWeightWriter
from .hf import HfGpt2Checkpoint
from .nemo import CONFIG_NAME, NemoCheckpoint, extract_nemo
from .source import CheckpointError, CheckpointSource


def _model_name(path: Path) -> str:
    # config.ini is read with interpolation on: keep the name to characters that cannot trip it.
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", path.name.removesuffix(".nemo")) or "gpt"


@contextmanager
def open_checkpoint(in_path: Path, scratch_dir: Path) -> Iterator[CheckpointSource]:
    """Open a `.nemo` file, an extracted `.nemo` folder or an HF GPT-2 folder as a `CheckpointSource`."""
    if in_path.is_file():
        with tempfile.TemporaryDirectory(dir=scratch_dir, prefix=".nemo-extract-") as extracted:
            extract_nemo(in_path, Path(extracted))
            yield NemoCheckpoint(Path(extracted), model_name=_model_name(in_path))
    elif (in_path / "config.json").is_file():
        with HfGpt2Checkpoint(in_path) as source:
            yield source
    elif in_path.is_dir() and any(in_path.rglob(CONFIG_NAME)):
        yield NemoCheckpoint(in_path, model_name=_model_name(in_path))
    elif in_path.exists():
        raise CheckpointError(f"--in-file {in_path}: neither a .nemo archive, an extracted .nemo folder "
                              f"({CONFIG_NAME}) nor an HF GPT-2 folder (config.json)")
    else:
        raise CheckpointError(f"--in-file {in_path} does not exist")


def target_config(source: GptModelConfig, infer_gpu_num: int, weight_data_type: str) -> GptModelConfig:
    if infer_gpu_num < 1:
        raise CheckpointError(f"--infer-gpu-num must be at least 1, got {infer_gpu_num}")
    for field in ("head_num", "inter_size"):
        value = getattr(source, field)
        if value % infer_gpu_num:
            raise CheckpointError(f"--infer-gpu-num {infer_gpu_num} does not divide {field} {value}")
    return dataclasses.replace(source, tensor_para_size=infer_gpu_num, weight_data_type=weight_data_type)


def convert(in_path: str | Path, saved_dir: str | Path, infer_gpu_num: int = 1, weight_data_type: str = "fp32",
            force: bool = False, progress: bool = True) -> Path:
    """Convert a checkpoint to FT weights and return the `<saved_dir>/<infer_gpu_num>-gpu` directory."""
    in_path, saved_dir = Path(in_path), Path(saved_dir)
    if weight_data_type not in TORCH_DTYPES:
        raise CheckpointError(f"--weight-data-type {weight_data_type!r} is not one of {', '.join(TORCH_DTYPES)}")
    target = saved_dir / f"{infer_gpu_num}-gpu"
    if target.exists() and not force:
        raise CheckpointError(f"{target} already exists; pass --force to overwrite it")
    saved_dir.mkdir(parents=True, exist_ok=True)
    with open_checkpoint(in_path, saved_dir) as source:
        config = target_config(source.config, infer_gpu_num, weight_data_type)
        partial = Path(tempfile.mkdtemp(dir=saved_dir, prefix=f".{target.name}.partial-"))
        try:
            _write_weight_dir(source, config, partial, progress)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
    partial.chmod(0o755)  # mkdtemp makes it owner-only; the weights are meant to be shared with the server
    if target.exists():
        shutil.rmtree(target)
    partial.rename(target)
    return target


def _write_weight_dir(source: CheckpointSource, config: GptModelConfig, out_dir: Path, progress: bool) -> None:
    writer = FtWeightWriter(out_dir, config)
    specs = tensor_specs(config, with_lm_head=source.has_lm_head)
    for spec in tqdm(specs, desc=f"convert -> {config.tensor_para_size}-gpu", unit="tensor", disable=not progress):
        writer.write(spec, source.read(spec.stem))
    config.to_ini(out_dir / CONFIG_FILE)
    shutil.copyfile(source.tokenizer.vocab, out_dir / "vocab.json")
    shutil.copyfile(source.tokenizer.merges, out_dir / "merges.txt")
    problems = check_weight_dir(out_dir)
    if problems:  # the writer and the reader disagree: a bug here, not in the checkpoint
        raise RuntimeError("converted weights fail their own check:\n" + "\n".join(problems))
