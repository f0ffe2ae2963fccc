"""Write canonical tensors as FasterTransformer weight files (`builder.runtime.ft_weights` defines the layout)."""

from __future__ import annotations

from pathlib import Path

import torch

from builder.runtime.ft_weights import TensorSpec
from builder.runtime.model_config import GptModelConfig

from .source import CheckpointError

TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


class FtWeightWriter:
    """Writes one tensor at a time into `out_dir`, split across `config.tensor_para_size` ranks."""

    def __init__(self, out_dir: Path, config: GptModelConfig) -> None:
        if config.weight_data_type not in TORCH_DTYPES:
            raise CheckpointError(f"--weight-data-type {config.weight_data_type} is not supported "
                                  f"(choose from {', '.join(TORCH_DTYPES)})")
        self.out_dir = out_dir
        self.config = config
        self.dtype = TORCH_DTYPES[config.weight_data_type]

    def write(self, spec: TensorSpec, tensor: torch.Tensor) -> None:
        if tuple(tensor.shape) != spec.shape:
            raise CheckpointError(f"{spec.stem}: shape {list(tensor.shape)} does not match the model config "
                                  f"({list(spec.shape)})")
        converted = tensor.detach().to(device="cpu", dtype=self.dtype)
        if converted.dtype != tensor.dtype and not torch.isfinite(converted).all():
            raise CheckpointError(f"{spec.stem}: values overflow {self.config.weight_data_type}; "
                                  f"use --weight-data-type fp32")
        tp = self.config.tensor_para_size
        pieces = [converted] if spec.split_axis is None else converted.chunk(tp, dim=spec.split_axis)
        for name, piece in zip(spec.file_names(tp), pieces, strict=True):
            piece.contiguous().numpy().tofile(self.out_dir / name)
