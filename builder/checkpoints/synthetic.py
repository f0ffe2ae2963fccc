"""Random-weight `.nemo` checkpoints of a named shape, in the real NeMo 1.x layout (benchmarks and tests).

The canonical tensors depend only on the preset and the seed, never on `tp`: a TP-2 archive holds exactly the
weights of the TP-1 archive with the same seed, sharded the way Megatron shards them.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from builder.runtime.ft_weights import tensor_specs
from builder.runtime.model_config import GptModelConfig

from .nemo import megatron_rank_state_dicts, nemo_model_config, write_nemo
from .presets import PRESETS
from .source import CheckpointError

INIT_STD = 0.02  # Megatron's init_method_std: keeps fp16 activations of a random 1.3B model finite


def random_canonical_tensors(config: GptModelConfig, seed: int) -> Iterator[tuple[str, torch.Tensor]]:
    """Deterministic random canonical tensors (fp16). Biases and layernorms are random too, so that a layout bug
    in any tensor changes the model's output."""
    generator = torch.Generator().manual_seed(seed)
    for spec in tensor_specs(config):
        noise = torch.randn(spec.shape, generator=generator) * INIT_STD
        if spec.stem.endswith("layernorm.weight"):
            noise += 1.0
        yield spec.stem, noise.to(torch.float16)


def write_synthetic_checkpoint(preset: str, out: str | Path, *, seed: int = 0, tp: int = 1,
                               force: bool = False) -> Path:
    """Write a random `.nemo` of a preset shape, sharded over `tp` training ranks (`mp_rank_XX/` when tp > 1)."""
    if preset not in PRESETS:
        raise CheckpointError(f"--preset {preset!r} is unknown; choose from {', '.join(PRESETS)}")
    config = PRESETS[preset]
    out = Path(out)
    if out.exists() and not force:
        raise CheckpointError(f"--out {out} already exists; pass --force to overwrite it")
    if tp < 1:
        raise CheckpointError(f"--tp must be at least 1, got {tp}")
    for field in ("head_num", "inter_size", "vocab_size"):
        if getattr(config, field) % tp:
            raise CheckpointError(f"--tp {tp} does not divide {field} {getattr(config, field)} of preset {preset}")
    ranks = megatron_rank_state_dicts(random_canonical_tensors(config, seed), config, tp)
    return write_nemo(out, nemo_model_config(config), ranks)
