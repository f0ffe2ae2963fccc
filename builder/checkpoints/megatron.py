"""Megatron (legacy, non-mcore NeMo 1.x) GPT parameter names and layouts, to and from the canonical FT layout.

Megatron stores linear weights [out, in] (torch.nn.Linear) and splits them over training TP ranks: column-parallel
layers (QKV, h_to_4h, word embeddings) on `out`, row-parallel layers (attention dense, 4h_to_h) on `in`. Its fused
QKV output is head-interleaved: for each local head, [q(d) | k(d) | v(d)] (with NeMo's `megatron_legacy: true`,
each shard holds [q(all local heads) | k(...) | v(...)]). The canonical layout (see `builder.runtime.ft_weights`)
is [in, (q|k|v), heads * d].

`to_canonical` merges a tensor's training shards into the canonical TP-1 tensor; `from_canonical` is its inverse and
is how the synthetic and demo checkpoints are written.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

PREFIX = "model.language_model."
LAYER_PREFIX = PREFIX + "encoder.layers."
# NeMo with megatron_amp_O2 wraps the module once more (`model.module.language_model...`).
AMP_O2_PREFIX = "model.module."
MCORE_PATTERN = re.compile(r"(^|\.)decoder\.layers\.\d+\.|(^|\.)decoder\.final_layernorm\.|^model\.decoder\.")


class MegatronLayoutError(ValueError):
    """Weights that are not a legacy Megatron GPT of the expected shape."""


def is_mcore_state_dict(keys: Sequence[str]) -> bool:
    return any(MCORE_PATTERN.search(key) for key in keys)


def strip_amp_o2_prefix(key: str) -> str:
    return "model." + key[len(AMP_O2_PREFIX):] if key.startswith(AMP_O2_PREFIX) else key


@dataclass(frozen=True)
class Shape:
    head_num: int
    size_per_head: int
    inter_size: int

    @property
    def hidden(self) -> int:
        return self.head_num * self.size_per_head


def megatron_key(stem: str) -> str:
    """Canonical FT stem -> Megatron parameter name."""
    if stem == "model.wte":
        return PREFIX + "embedding.word_embeddings.weight"
    if stem == "model.wpe":
        return PREFIX + "embedding.position_embeddings.weight"
    if stem == "model.lm_head.weight":
        return PREFIX + "output_layer.weight"
    if stem.startswith("model.final_layernorm."):
        return PREFIX + "encoder." + stem[len("model."):]
    match = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", stem)
    if match is None:
        raise MegatronLayoutError(f"no Megatron name for tensor {stem!r}")
    index, rest = match.groups()
    return f"{LAYER_PREFIX}{index}.{rest.replace('attention.', 'self_attention.', 1)}"


def _kind(stem: str) -> str:
    """Which layout rule applies to a stem."""
    for suffix in ("query_key_value.weight", "query_key_value.bias", "attention.dense.weight",
                   "dense_h_to_4h.weight", "dense_h_to_4h.bias", "dense_4h_to_h.weight"):
        if stem.endswith(suffix):
            return suffix
    if stem in ("model.wte", "model.lm_head.weight"):
        return "vocab_parallel"
    return "replicated"


def _cat(parts: Sequence[torch.Tensor], dim: int) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(list(parts), dim=dim)  # one shard: no copy


def to_canonical(stem: str, shards: Sequence[torch.Tensor], shape: Shape, *,
                 legacy_qkv: bool = False) -> torch.Tensor:
    """Merge the training-TP shards of one Megatron tensor into its canonical TP-1 tensor. `legacy_qkv`: the yaml's
    `megatron_legacy: true`, under which each shard's fused QKV rows are [(q|k|v), heads_local, d] instead of
    [heads_local, (q|k|v), d] (NeMo's ParallelAttention transposes them back in its forward pass)."""
    kind = _kind(stem)
    h, d = shape.hidden, shape.size_per_head
    if kind == "replicated":
        return shards[0]
    if kind == "vocab_parallel":
        return _cat(shards, 0)
    if kind == "query_key_value.weight":
        if legacy_qkv:
            # each shard [3 * heads_local * d, H] -> [3, heads_local, d, H] -> [H, 3, heads_local, d]
            parts = [s.reshape(3, -1, d, h).permute(3, 0, 1, 2) for s in shards]
        else:
            # each shard [heads_local * 3 * d, H] -> [heads_local, 3, d, H] -> [H, 3, heads_local, d]
            parts = [s.reshape(-1, 3, d, h).permute(3, 1, 0, 2) for s in shards]
        return _cat(parts, 2).reshape(h, 3, h)
    if kind == "query_key_value.bias":
        if legacy_qkv:
            parts = [s.reshape(3, -1, d) for s in shards]  # each shard [3 * heads_local * d] -> [3, heads_local, d]
        else:
            # each shard [heads_local * 3 * d] -> [heads_local, 3, d] -> [3, heads_local, d]
            parts = [s.reshape(-1, 3, d).permute(1, 0, 2) for s in shards]
        return _cat(parts, 1).reshape(3, h)
    if kind in ("attention.dense.weight", "dense_4h_to_h.weight"):
        return _cat(shards, 1).t()  # row-parallel: [out, in/t] shards -> [in, out]
    if kind == "dense_h_to_4h.weight":
        return _cat(shards, 0).t()  # column-parallel: [out/t, in] shards -> [in, out]
    return _cat(shards, 0)  # dense_h_to_4h.bias


def from_canonical(stem: str, tensor: torch.Tensor, shape: Shape, tp: int) -> list[torch.Tensor]:
    """Split a canonical tensor into the `tp` Megatron training shards (contiguous, Megatron layout)."""
    kind = _kind(stem)
    h, d = shape.hidden, shape.size_per_head
    if kind == "replicated":
        return [tensor.contiguous() for _ in range(tp)]
    if kind in ("vocab_parallel", "dense_h_to_4h.bias"):
        return [c.contiguous() for c in tensor.chunk(tp, dim=0)]
    if kind == "query_key_value.weight":
        heads = tensor.reshape(h, 3, shape.head_num, d).permute(2, 1, 3, 0)  # [heads, 3, d, H]
        return [c.reshape(-1, h).contiguous() for c in heads.chunk(tp, dim=0)]
    if kind == "query_key_value.bias":
        heads = tensor.reshape(3, shape.head_num, d).permute(1, 0, 2)  # [heads, 3, d]
        return [c.reshape(-1).contiguous() for c in heads.chunk(tp, dim=0)]
    if kind in ("attention.dense.weight", "dense_4h_to_h.weight"):
        return [c.contiguous() for c in tensor.t().chunk(tp, dim=1)]
    return [c.contiguous() for c in tensor.t().chunk(tp, dim=0)]  # dense_h_to_4h.weight
