"""Random-weight `.nemo` checkpoints of a named shape, in the real NeMo 1.x layout (benchmarks and tests).

The canonical tensors depend only on the preset and the seed, never on `tp`, except that the word embeddings get the
extra padding rows NeMo adds for TP > 1 (a multiple of 128 x TP rows: 50432 for GPT-2 at TP 2). So a TP-2 archive
holds exactly the weights of the TP-1 archive with the same seed, plus those rows, sharded the way Megatron shards.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import torch

from builder.runtime.ft_weights import tensor_specs
from builder.runtime.model_config import GptModelConfig

from .nemo import megatron_rank_state_dicts, nemo_model_config, write_nemo
from .presets import GPT2_VOCAB, PRESETS, nemo_padded_vocab
from .source import CheckpointError

INIT_STD = 0.02  # Megatron's init_method_std: keeps fp16 activations of a random 1.3B model finite
PADDING_SEED_OFFSET = 1_000_003  # the padding rows have their own generator: the other tensors stay put


def random_canonical_tensors(config: GptModelConfig, seed: int,
                             vocab_rows: int | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Deterministic random canonical tensors (fp16). Biases and layernorms are random too, so that a layout bug
    in any tensor changes the model's output. `vocab_rows` > config.vocab_size appends random padding rows to the
    word embeddings without changing any other value."""
    generator = torch.Generator().manual_seed(seed)
    for spec in tensor_specs(config):
        noise = torch.randn(spec.shape, generator=generator) * INIT_STD
        if spec.stem.endswith("layernorm.weight"):
            noise += 1.0
        if spec.stem == "model.wte" and vocab_rows is not None and vocab_rows > config.vocab_size:
            padding = torch.Generator().manual_seed(seed + PADDING_SEED_OFFSET)
            extra = torch.randn((vocab_rows - config.vocab_size, spec.shape[1]), generator=padding) * INIT_STD
            noise = torch.cat([noise, extra])  # [vocab_rows, H]
        yield spec.stem, noise.to(torch.float16)


def write_synthetic_checkpoint(preset: str, out: str | Path, *, seed: int = 0, tp: int = 1,
                               force: bool = False) -> Path:
    """Write a random `.nemo` of a preset shape, sharded over `tp` training ranks (`mp_rank_XX/` when tp > 1), with
    the word embeddings padded as NeMo pads them for that `tp`."""
    if preset not in PRESETS:
        raise CheckpointError(f"--preset {preset!r} is unknown; choose from {', '.join(PRESETS)}")
    base = PRESETS[preset]
    out = Path(out)
    if out.exists() and not force:
        raise CheckpointError(f"--out {out} already exists; pass --force to overwrite it")
    if tp < 1:
        raise CheckpointError(f"--tp must be at least 1, got {tp}")
    for field in ("head_num", "inter_size"):
        if getattr(base, field) % tp:
            raise CheckpointError(f"--tp {tp} does not divide {field} {getattr(base, field)} of preset {preset}")
    config = dataclasses.replace(base, vocab_size=max(base.vocab_size, nemo_padded_vocab(GPT2_VOCAB, tp)))
    ranks = megatron_rank_state_dicts(random_canonical_tensors(base, seed, vocab_rows=config.vocab_size), config, tp)
    return write_nemo(out, nemo_model_config(config), ranks)
