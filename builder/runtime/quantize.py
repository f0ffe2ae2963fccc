"""Weight-only int8 for the torch engine (render --weight-quantization int8): each linear layer's weight [N, K] kept as
int8 values with one fp32 scale per output row, symmetric (no zero point): W ~ values * scale[:, None], scale =
max |W[row]| / 127. A decode step at batch 1 streams its weights once, so half the bytes is up to half the step.

Activations stay in the model's dtype: the GEMMs widen the int8 values (gpt_kernels' skinny GEMM in its loop on a GPU;
a widened copy on CPU) and scale their fp32 products by row. Which weights: the four matrices of every layer (QKV,
attention output, FC1, FC2: 92 % of the 1.3B model's bytes a step, the LM head the rest); the embeddings and the LM
head (often the embedding table itself) stay in the model's dtype.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

# model_config.WEIGHT_QUANTIZATIONS' "int8": the range of the values (symmetric: -128 is never used).
INT8_MAX = 127


class Int8Weight(NamedTuple):
    """A linear layer's weight [N, K] (nn.Linear layout) as int8 values and per-row fp32 scales."""

    values: torch.Tensor  # int8 [N, K]
    scale: torch.Tensor  # fp32 [N]

    @property
    def shape(self) -> torch.Size:
        return self.values.shape

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight the int8 values stand for, [N, K] in dtype (what the eager path multiplies by)."""
        return (self.values.float() * self.scale[:, None]).to(dtype)


Weight = torch.Tensor | Int8Weight  # what a linear layer of GptModel holds


def quantize_int8(weight: torch.Tensor) -> Int8Weight:
    """weight [N, K] -> Int8Weight: per row, scale = max |w| / 127 and values = round(w / scale) (a row of zeros gets
    scale 1). Each element's error is at most scale / 2."""
    wide = weight.float()
    scale = wide.abs().amax(dim=1) / INT8_MAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    values = torch.round(wide / scale[:, None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return Int8Weight(values.contiguous(), scale.contiguous())
