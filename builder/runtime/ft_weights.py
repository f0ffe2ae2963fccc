"""FasterTransformer GPT weight directories: the file list a config implies, a size check, and a loader.

A weight directory is `config.ini` plus one raw little-endian `.tofile()` dump per tensor (no header, no pickle):
`model.<stem>.bin` for tensors every rank holds whole and `model.<stem>.<rank>.bin` for tensors split across
tensor-parallel ranks. Linear weights are stored [in, out]. This module is the single description of that layout:
the converter writes through `TensorSpec` and the engine reads through `load_ft_weights` (shards merged) or,
tensor-parallel, `load_ft_shard` (one rank's files as they are).

FasterTransformer itself only warns about a missing or short file and then serves random weights; we refuse to load
instead, naming every bad file.

Copied into rendered model repositories: relative imports only, numpy + torch only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .model_config import GptModelConfig, ModelConfigError

if TYPE_CHECKING:
    import torch

CONFIG_FILE = "config.ini"
LM_HEAD_STEM = "model.lm_head.weight"  # optional: absent means the output layer is tied to wte
WEIGHT_FILE_PATTERN = re.compile(r"^model\..+\.bin$")
# numpy has no bfloat16: bf16 files are read as raw 16-bit words and reinterpreted by torch.
FILE_DTYPES: dict[str, np.dtype] = {
    "fp32": np.dtype("<f4"),
    "fp16": np.dtype("<f2"),
    "bf16": np.dtype("<u2"),
}


class WeightFileError(RuntimeError):
    """A weight directory that cannot be loaded: missing, mis-sized or unexpected files, or a bad config.ini."""

    def __init__(self, model_dir: Path, problems: list[str]) -> None:
        self.model_dir = model_dir
        self.problems = problems
        listing = "\n  - ".join(problems)
        super().__init__(f"{model_dir}: {len(problems)} problem(s) with the FasterTransformer weights:\n  - {listing}")


@dataclass(frozen=True)
class TensorSpec:
    """One canonical tensor: its FT file stem, its TP-1 shape and the axis split across TP ranks (None = whole)."""

    stem: str
    shape: tuple[int, ...]
    split_axis: int | None = None

    def rank_shape(self, tensor_para_size: int) -> tuple[int, ...]:
        if self.split_axis is None:
            return self.shape
        shape = list(self.shape)
        shape[self.split_axis] //= tensor_para_size
        return tuple(shape)

    def file_names(self, tensor_para_size: int) -> list[str]:
        if self.split_axis is None:
            return [f"{self.stem}.bin"]
        return [f"{self.stem}.{rank}.bin" for rank in range(tensor_para_size)]


def tensor_specs(config: GptModelConfig, *, with_lm_head: bool = False) -> list[TensorSpec]:
    """Every tensor of the model in canonical (TP-1) shape, in file-writing order."""
    h, f = config.hidden_size, config.inter_size
    specs = [
        TensorSpec("model.wte", (config.vocab_size, h)),
        TensorSpec("model.wpe", (config.max_pos_seq_len, h)),
    ]
    for i in range(config.num_layer):
        layer = f"model.layers.{i}"
        specs += [
            TensorSpec(f"{layer}.input_layernorm.weight", (h,)),
            TensorSpec(f"{layer}.input_layernorm.bias", (h,)),
            # [in, (q|k|v), heads * size_per_head]: ranks take whole heads of each of q, k and v.
            TensorSpec(f"{layer}.attention.query_key_value.weight", (h, 3, h), split_axis=2),
            TensorSpec(f"{layer}.attention.query_key_value.bias", (3, h), split_axis=1),
            TensorSpec(f"{layer}.attention.dense.weight", (h, h), split_axis=0),
            TensorSpec(f"{layer}.attention.dense.bias", (h,)),
            TensorSpec(f"{layer}.post_attention_layernorm.weight", (h,)),
            TensorSpec(f"{layer}.post_attention_layernorm.bias", (h,)),
            TensorSpec(f"{layer}.mlp.dense_h_to_4h.weight", (h, f), split_axis=1),
            TensorSpec(f"{layer}.mlp.dense_h_to_4h.bias", (f,), split_axis=0),
            TensorSpec(f"{layer}.mlp.dense_4h_to_h.weight", (f, h), split_axis=0),
            TensorSpec(f"{layer}.mlp.dense_4h_to_h.bias", (h,)),
        ]
    specs += [
        TensorSpec("model.final_layernorm.weight", (h,)),
        TensorSpec("model.final_layernorm.bias", (h,)),
    ]
    if with_lm_head:
        specs.append(TensorSpec(LM_HEAD_STEM, (config.vocab_size, h)))
    return specs


def expected_files(config: GptModelConfig) -> dict[str, tuple[int, ...]]:
    """File name -> shape in that file, for every required file of every TP rank (the optional lm_head excluded)."""
    tp = config.tensor_para_size
    return {name: spec.rank_shape(tp) for spec in tensor_specs(config) for name in spec.file_names(tp)}


def _nbytes(shape: tuple[int, ...], config: GptModelConfig) -> int:
    return int(np.prod(shape)) * FILE_DTYPES[config.weight_data_type].itemsize


def _size_problem(path: Path, shape: tuple[int, ...], config: GptModelConfig) -> str | None:
    expected, actual = _nbytes(shape, config), path.stat().st_size
    if actual == expected:
        return None
    return (f"{path.name}: {actual} bytes, expected {expected} "
            f"(shape {list(shape)} x {config.weight_data_type})")


def check_weight_dir(model_dir: str | Path) -> list[str]:
    """Every problem with a weight directory (missing, mis-sized or unexpected files); an empty list means OK."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        return [f"{model_dir} is not a directory"]
    try:
        config = GptModelConfig.from_ini(model_dir / CONFIG_FILE)
    except ModelConfigError as err:
        return [str(err)]
    problems: list[str] = []
    expected = expected_files(config)
    for name, shape in expected.items():
        path = model_dir / name
        if not path.is_file():
            problems.append(f"missing {name} (shape {list(shape)} x {config.weight_data_type})")
        elif (problem := _size_problem(path, shape, config)) is not None:
            problems.append(problem)
    lm_head = TensorSpec(LM_HEAD_STEM, (config.vocab_size, config.hidden_size))
    lm_head_file = lm_head.file_names(config.tensor_para_size)[0]
    for path in sorted(model_dir.iterdir()):
        if not WEIGHT_FILE_PATTERN.match(path.name) or path.name in expected:
            continue
        if path.name == lm_head_file:
            if (problem := _size_problem(path, lm_head.shape, config)) is not None:
                problems.append(problem)
            continue
        problems.append(f"unexpected {path.name}: not a file of a model with num_layer={config.num_layer} and "
                        f"tensor_para_size={config.tensor_para_size} (left over from another conversion?)")
    return problems


def _read_file(path: Path, shape: tuple[int, ...], config: GptModelConfig) -> torch.Tensor:
    import torch

    array = np.fromfile(path, dtype=FILE_DTYPES[config.weight_data_type]).reshape(shape)
    tensor = torch.from_numpy(array)
    if config.weight_data_type == "bf16":
        tensor = tensor.view(torch.bfloat16)
    return tensor


def _load(model_dir: str | Path, rank: int | None, dtype: torch.dtype | None,
          device: str | torch.device) -> tuple[GptModelConfig, dict[str, torch.Tensor]]:
    import torch

    model_dir = Path(model_dir)
    problems = check_weight_dir(model_dir)
    if problems:
        raise WeightFileError(model_dir, problems)
    dtype = torch.float32 if dtype is None else dtype
    config = GptModelConfig.from_ini(model_dir / CONFIG_FILE)
    tp = config.tensor_para_size
    if rank is not None and not 0 <= rank < tp:
        raise WeightFileError(model_dir, [f"rank {rank} is outside tensor_para_size={tp}"])
    with_lm_head = (model_dir / f"{LM_HEAD_STEM}.bin").is_file()
    tensors: dict[str, torch.Tensor] = {}
    for spec in tensor_specs(config, with_lm_head=with_lm_head):
        names = spec.file_names(tp)
        if spec.split_axis is not None and rank is not None:
            names = [names[rank]]  # this rank's shard, as it is on disk
        shards = [_read_file(model_dir / name, spec.rank_shape(tp), config) for name in names]
        merged = shards[0] if spec.split_axis is None or len(shards) == 1 else torch.cat(shards, dim=spec.split_axis)
        tensors[spec.stem] = merged.to(device=device, dtype=dtype)
    return config, tensors


def load_ft_weights(model_dir: str | Path, *, dtype: torch.dtype | None = None,
                    device: str | torch.device = "cpu") -> tuple[GptModelConfig, dict[str, torch.Tensor]]:
    """Read a weight directory into the canonical dict (TP shards concatenated back, TP-1 shapes).

    `dtype` defaults to torch.float32. Raises `WeightFileError` listing every problem `check_weight_dir` finds.
    """
    return _load(model_dir, None, dtype, device)


def load_ft_shard(model_dir: str | Path, rank: int, *, dtype: torch.dtype | None = None,
                  device: str | torch.device = "cpu") -> tuple[GptModelConfig, dict[str, torch.Tensor]]:
    """Read what tensor-parallel rank `rank` holds: its `.<rank>.bin` shard of every split tensor, as written (shape
    `TensorSpec.rank_shape`, nothing merged), and the whole tensors every rank holds. For tensor_parallel.py."""
    return _load(model_dir, rank, dtype, device)
