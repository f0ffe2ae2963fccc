"""The GPT forward pass (pre-LN, learned positions, tied LM head) over a static KV cache.

`GptModel` holds the weights (canonical dict, see ft_weights.py) on one device in one dtype and a preallocated KV
cache of `slots` rows x `max_seq_len` positions per layer, shape (slots, heads, max_seq_len, head_dim). Rows of a
batch live in cache slots 0..n-1:
- `prefill` runs right-padded prompts of different lengths in one causal pass (positions 0..T-1) and returns the
  logits at each row's last prompt token;
- `decode` feeds one token per row at its own position (rows advance independently) and attends to the cached keys
  up to that position, so a ragged batch keeps decoding without re-padding.
`decode` has static shapes for a given (rows, kv_len) and never syncs with the host, so `DecodeGraphs` (bottom of
this file, CUDA only) can capture it in CUDA graphs.

The cache holds K/V in the model's dtype, or in fp8 (e4m3, `CACHE_TORCH_DTYPES`): half the bytes, so a decode step
over long or many sequences, which reads every cached key, moves half the data. Values are rounded to fp8 (saturating at
+-448, no scale: the K/V of a LayerNorm'd GPT stay far inside that range) when written, and every query attends to
the rounded keys, the step's own and a prompt's own included, so a row's result does not depend on whether a key
came from the cache or from this pass.

On CUDA, `DecodeKernels` swaps eager ops for fused ones (gpt_kernels.py: Triton residual add + LayerNorm, decode
attention that also writes the KV cache, a skinny GEMM for small batches, which there also adds the residual and
applies the LayerNorms, folded into QKV's and FC1's weights at load; cuBLASLt's bias + activation epilogue): a decode
step is memory-bound and the small kernels between the weight GEMMs cost about as much as the weights. On CPU every
op stays the eager PyTorch one, so fp32 results match HF there exactly. `DecodeKernels.one_launch_step` (off until
a GPU run measures it) runs a batch-1 step as one persistent kernel instead (step_kernel.py); for it each per-layer
tensor lives in a [layers, ...] stack (`GptModel.stacked`, the layers hold views) and the K and V caches in one
tensor each.

Weight-only int8 (`weight_quantization="int8"`, quantize.py): the layers' four matrices become `Int8Weight`s (int8
values, a scale per output row, views of int8 and scale stacks) once the norms are folded; every GEMM over them goes
through `_linear`, which runs the skinny GEMM on a GPU (it widens the values in its loop, at any number of rows:
cuBLAS has no int8-weight fp16 GEMM) and the eager product of the widened weight on CPU; the one-launch step reads
the stacks.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .model_config import KV_CACHE_DTYPES, WEIGHT_QUANTIZATIONS, GptModelConfig
from .quantize import Int8Weight, Weight, quantize_int8

if TYPE_CHECKING:
    from .gpt_kernels import LayerNormIn
    from .step_kernel import OneLaunchStep, StepLaunch, StepShape
    from .tensor_parallel import TensorShard

log = logging.getLogger(__name__)

# One layer's attention of a step: (layer, qkv [n, 3H], positions [n], kv_len) -> [n, H].
Attention = Callable[[int, torch.Tensor, torch.Tensor, int], torch.Tensor]


class WeightError(ValueError):
    """A canonical weight dict that does not match the model config."""


# model_config.KV_CACHE_DTYPES as torch dtypes (None: the model's). fp8 is e4m3: 3 mantissa bits, finite max 448.
CACHE_TORCH_DTYPES: dict[str, torch.dtype | None] = dict(zip(KV_CACHE_DTYPES, (None, torch.float8_e4m3fn),
                                                              strict=True))
FP8_MAX = 448.0


@dataclass
class _Layer:
    ln1_weight: torch.Tensor
    ln1_bias: torch.Tensor
    qkv_weight: Weight  # [3H, H] (nn.Linear layout: out, in); out = q heads | k heads | v heads
    qkv_bias: torch.Tensor  # [3H]
    attn_out_weight: Weight  # [H, H]
    attn_out_bias: torch.Tensor
    ln2_weight: torch.Tensor
    ln2_bias: torch.Tensor
    fc1_weight: Weight  # [F, H]
    fc1_bias: torch.Tensor
    fc2_weight: Weight  # [H, F]
    fc2_bias: torch.Tensor
    # With the LayerNorms folded into QKV and FC1 (GptModel.norms_folded): those weights' row sums, fp32 [3H], [F]
    qkv_column_sums: torch.Tensor | None = None
    fc1_column_sums: torch.Tensor | None = None


# The _Layer tensors held in GptModel.stacked (all but the fp32 row sums of folded norms).
STACKED = ("ln1_weight", "ln1_bias", "qkv_weight", "qkv_bias", "attn_out_weight", "attn_out_bias", "ln2_weight",
           "ln2_bias", "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias")
# The _Layer matrices weight-only int8 quantizes: their stacks become int8, with a stack of scales each
# (GptModel.stacked[SCALES[name]]), and the layers hold Int8Weights of views of both.
MATRICES = ("qkv_weight", "attn_out_weight", "fc1_weight", "fc2_weight")
SCALES = {name: name.replace("_weight", "_scale") for name in MATRICES}


def expected_shapes(config: GptModelConfig, tp: int = 1) -> dict[str, tuple[int, ...]]:
    """The canonical weight names and shapes a config implies (lm_head excluded: optional); with tp > 1, those of
    one tensor-parallel rank (ft_weights.TensorSpec.split_axis: QKV and FC1 by columns, attention-out and FC2 by
    rows; the embedding whole)."""
    h, f, v = config.hidden_size, config.inter_size, config.vocab_size
    hs, fs = h // tp, f // tp
    shapes = {"model.wte": (v, h), "model.wpe": (config.max_pos_seq_len, h),
              "model.final_layernorm.weight": (h,), "model.final_layernorm.bias": (h,)}
    for i in range(config.num_layer):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (h,), p + "input_layernorm.bias": (h,),
            p + "attention.query_key_value.weight": (h, 3, hs), p + "attention.query_key_value.bias": (3, hs),
            p + "attention.dense.weight": (hs, h), p + "attention.dense.bias": (h,),
            p + "post_attention_layernorm.weight": (h,), p + "post_attention_layernorm.bias": (h,),
            p + "mlp.dense_h_to_4h.weight": (h, fs), p + "mlp.dense_h_to_4h.bias": (fs,),
            p + "mlp.dense_4h_to_h.weight": (fs, h), p + "mlp.dense_4h_to_h.bias": (h,),
        })
    return shapes


def check_weights(config: GptModelConfig, weights: dict[str, torch.Tensor], tp: int = 1) -> None:
    """Raise WeightError listing every missing or mis-shaped tensor (of one rank of `tp`)."""
    problems = []
    expected = expected_shapes(config, tp)
    expected_optional = {"model.lm_head.weight": (config.vocab_size, config.hidden_size)}
    for name, shape in {**expected, **expected_optional}.items():
        tensor = weights.get(name)
        if tensor is None:
            if name in expected:
                problems.append(f"{name}: missing")
        elif tuple(tensor.shape) != shape:
            problems.append(f"{name}: shape {list(tensor.shape)}, expected {list(shape)}")
    if problems:
        raise WeightError("weights do not match the model config:\n  " + "\n  ".join(problems))


# Decode steps with more (rows x kv_len) than this would use cuDNN's SDPA instead of the Triton attention. With its
# H200 launch shapes (gpt_kernels.attention_launch) the Triton kernel was faster at every shape measured, up to 256
# rows x 1024 keys (442 vs 518 us), so no step is excluded unless a run asks (A/B runs).
FUSED_ATTENTION_MAX_ROW_KEYS = int(os.environ.get("GPT_TRITON_FUSED_ATTENTION_MAX_ROW_KEYS", str(1 << 62)))


# DecodeKernels.skinny_residual_rows's default. Past one tile of 64 rows the split GEMM reads the weights once per
# tile: 9-25 % slower steps at 80-256 rows on an H200 (docs/gpu/runs-2026-12-02f/split_residual_past_64.txt).
SPLIT_RESIDUAL_ROWS = 64
# Past this many rows (a tile of 64 rows) the split-K GEMMs into the residual take 64-column blocks and ~128 programs
# ("out_wide", "fc2_wide"): one wave on an H200's 132 SMs, where 32-column blocks made 256 programs, two waves. The
# step at 64 rows 2.09 -> 1.95 ms; at 32 rows the narrow plan stayed faster, 1.62 vs 1.65 ms (bench/profile_decode.py
# --tune-skinny, docs/gpu/runs-2026-12-03/tune_skinny.txt).
WIDE_SPLIT_ROWS = 32


def _row_sums(weight: Weight) -> torch.Tensor:
    """A weight's row sums in fp32 [N] (`gpt_kernels.LayerNormIn.column_sums`): of the widened weight if int8."""
    if isinstance(weight, Int8Weight):
        return weight.values.float().sum(1) * weight.scale
    return weight.float().sum(1)


def fold_layer_norm(weight: torch.Tensor, bias: torch.Tensor, gain: torch.Tensor,
                    shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """linear(layer_norm(x, gain, shift), weight, bias) = linear(layer_norm(x), weight * gain, bias + weight @ shift)
    -> (that weight, that bias, the weight's row sums in fp32: `gpt_kernels.LayerNormIn.column_sums`); weight [N, K]."""
    wide = weight.float()  # one fp32 copy of the matrix for both products
    folded = (wide * gain.float()[None, :]).to(weight.dtype)
    return folded, (bias.float() + wide @ shift.float()).to(bias.dtype), _row_sums(folded)


@dataclass(frozen=True)
class DecodeKernels:
    """Which fused CUDA kernels the model uses; all off is the eager PyTorch path (the only one on CPU)."""

    fused_norm: bool = False  # Triton residual add (+ bias, + split-K partials) and LayerNorm in one kernel
    attention: bool = False  # Triton decode attention that also writes the step's K/V (for small enough steps)
    gemm_epilogue: bool = False  # cuBLASLt bias + GELU(tanh)/ReLU epilogue on the MLP's first GEMM
    skinny_rows: int = 0  # decode batches of at most this many rows run the Triton skinny GEMM
    # ... and of at most this many for the two GEMMs into the residual (attention output, FC2) only, as split-K
    # partials that the add + LayerNorm kernel sums. At 24-64 rows cuBLAS's kernel (64x64 tiles) gives their 2048
    # output columns 32 tiles for 132 SMs; the split runs 256 programs: -3.5 to -5.5 % of the step at 24-64 rows on
    # an H200 (docs/gpu/runs-2026-12-02f). QKV and FC1 stay on cuBLAS there.
    skinny_residual_rows: int = 0
    # Up to skinny_rows rows, each GEMV into the residual (attention output, FC2) also adds the residual and leaves the
    # sums the next LayerNorm needs, and the GEMV after that LayerNorm (FC1, the next QKV) applies it to its product:
    # 5 kernels a layer instead of 7. Needs the LayerNorms' gains and biases folded into the weights (norms_folded).
    # On an H200: -2.9 % of the step at 1 row, -3.6 % at 8, -4.1 % at 16 (docs/gpu/runs-2026-12-04e).
    norm_in_gemv: bool = False
    pdl: bool = False  # launch the Triton kernels as programmatic dependents (Hopper): no launch gap between them
    # A plain greedy step's token selection in two Triton kernels instead of ~30 PyTorch ops (select_kernels.py; the
    # in-flight scheduler's step graphs use it).
    fused_select: bool = False
    # A batch-1 step as one persistent kernel (step_kernel.py), built with the cache (`GptModel.one_launch`) where it
    # can serve. Off by default until a GPU run measures it against the kernels above; GPT_TRITON_ONE_LAUNCH=1 turns
    # it on (benchmarks that switch it on later set `one_launch` themselves: `GptModel.build_one_launch`).
    one_launch_step: bool = False

    @classmethod
    def for_model(cls, config: GptModelConfig, device: torch.device, dtype: torch.dtype) -> DecodeKernels:
        """Every kernel that applies: CUDA with Triton installed; the attention kernel needs a power-of-two head
        size; the skinny GEMM runs fp16/bf16 only (fp32 would need slow IEEE dots: cuBLAS is better there)."""
        if device.type != "cuda" or importlib.util.find_spec("triton") is None:
            return cls()
        from . import gpt_kernels

        d = config.size_per_head
        pdl = gpt_kernels.pdl_supported(device) and os.environ.get("GPT_TRITON_PDL", "1") != "0"  # A/B runs
        half = dtype in (torch.float16, torch.bfloat16)
        return cls(fused_norm=True, attention=d >= 16 and d & (d - 1) == 0, gemm_epilogue=True,
                   skinny_rows=16 if half else 0, skinny_residual_rows=SPLIT_RESIDUAL_ROWS if half else 0,
                   norm_in_gemv=half and os.environ.get("GPT_TRITON_NORM_IN_GEMV", "1") != "0",  # "0": A/B runs
                   pdl=pdl, fused_select=os.environ.get("GPT_TRITON_FUSED_SELECT", "1") != "0",  # "0": A/B runs
                   one_launch_step=os.environ.get("GPT_TRITON_ONE_LAUNCH", "0") == "1")


@dataclass(frozen=True)
class _SkinnyPlan:
    """Launch shape of the skinny GEMM for one weight: split_k > 1 leaves fp32 partials for add_layer_norm."""

    split_k: int
    block_k: int
    block_n: int = 32
    num_stages: int = 5
    num_warps: int = 2


def _skinny_plan(out_features: int, in_features: int, *, may_split: bool, block_n: int = 32,
                 target_programs: int = 256, num_warps: int = 2) -> _SkinnyPlan | None:
    """Split K until the grid has ~target_programs programs (enough loads in flight to stream the weights).

    The defaults were the fastest launch shapes for the 1.3B matrices on an H100 (bench/profile_decode.py --tune),
    but for the warps: on an H200, 2 warps a program made the whole step 1.141 -> 1.112 ms at 1 row and 1.215 -> 1.199
    at 8 (32 rows: 1.619 -> 1.611; docs/gpu/runs-2026-12-04b/call3_tune_skinny.txt)."""
    block_k = next((b for b in (128, 64, 32, 16) if in_features % b == 0), None)
    if block_k is None:
        return None
    split = 1
    blocks_n = -(-out_features // block_n)
    while (may_split and blocks_n * split * 2 <= target_programs
           and in_features % (split * 2 * block_k) == 0 and in_features // (split * 2) >= 4 * block_k):
        split *= 2
    return _SkinnyPlan(split_k=split, block_k=block_k, block_n=block_n, num_warps=num_warps)


class GptModel:
    def __init__(self, config: GptModelConfig, weights: dict[str, torch.Tensor], *, device: torch.device,
                 dtype: torch.dtype, kv_cache_dtype: str = "auto", weight_quantization: str = "none") -> None:
        """Loads the weights; call `allocate_cache` before running anything. kv_cache_dtype: a
        model_config.KV_CACHE_DTYPES name ("fp8" on a GPU needs compute capability 8.9+: the kernels' conversions).
        weight_quantization: a model_config.WEIGHT_QUANTIZATIONS name ("int8": quantize.py; on a GPU it needs Triton).

        Tensor parallelism: weights of one rank (tensor_parallel.RankWeights) carry their `shard` (rank, size,
        process group); this model then holds heads/size of the heads and FC1 columns, all-reduces the row-parallel
        outputs and gathers the vocabulary-split logits. Without a shard (tp 1) none of that code runs."""
        self.shard: TensorShard | None = getattr(weights, "shard", None)
        tp = 1 if self.shard is None else self.shard.size
        check_weights(config, weights, tp)
        self.config = config
        self.device, self.dtype = torch.device(device), dtype
        if kv_cache_dtype not in CACHE_TORCH_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {kv_cache_dtype!r}")
        if weight_quantization not in WEIGHT_QUANTIZATIONS:
            raise ValueError(f"weight_quantization must be one of {', '.join(WEIGHT_QUANTIZATIONS)}, "
                             f"got {weight_quantization!r}")
        if (weight_quantization != "none" and torch.device(device).type == "cuda"
                and importlib.util.find_spec("triton") is None):
            raise ValueError(f"weight_quantization {weight_quantization} on a GPU needs Triton (its GEMMs are the "
                             f"skinny Triton kernel's)")
        self.cache_dtype = CACHE_TORCH_DTYPES[kv_cache_dtype] or dtype
        self._fp8_cache = self.cache_dtype == torch.float8_e4m3fn
        if self._fp8_cache and self.device.type == "cuda" and torch.cuda.get_device_capability(self.device) < (8, 9):
            raise ValueError(f"kv_cache_dtype fp8 needs a GPU of compute capability 8.9 or newer (Ada, Hopper); "
                             f"{torch.cuda.get_device_name(self.device)} is "
                             f"{'.'.join(map(str, torch.cuda.get_device_capability(self.device)))}")
        self.slots, self.max_seq_len = 0, 0
        self.heads, self.head_dim, self.hidden = config.head_num // tp, config.size_per_head, config.hidden_size

        def load(name: str) -> torch.Tensor:
            return weights[name].to(device=device, dtype=dtype)

        def linear(name: str) -> torch.Tensor:  # canonical [in, out] -> nn.Linear [out, in], contiguous for GEMMs
            return load(name).reshape(weights[name].shape[0], -1).t().contiguous()

        h = self.hidden
        self.wte = load("model.wte")
        self.wpe = load("model.wpe")
        self.lm_head = load("model.lm_head.weight") if "model.lm_head.weight" in weights else self.wte
        if self.shard is not None:  # this rank's vocabulary rows; the embedding lookup keeps the whole table
            self.lm_head = self.shard.vocab_rows(self.lm_head)
        self.final_ln = (load("model.final_layernorm.weight"), load("model.final_layernorm.bias"))
        self.layers: list[_Layer] = []
        # Each per-layer tensor lives in a [layers, ...] stack (`stacked`), the layer holding a view: the one-launch
        # step (step_kernel.py) indexes every layer from one base address. Stacked as loaded: one layer's copy extra.
        self.stacked: dict[str, torch.Tensor] = {}
        for i in range(config.num_layer):
            p = f"model.layers.{i}."
            layer = _Layer(
                ln1_weight=load(p + "input_layernorm.weight"), ln1_bias=load(p + "input_layernorm.bias"),
                qkv_weight=linear(p + "attention.query_key_value.weight"),  # [H, 3, H] -> [H, 3H] -> [3H, H]
                qkv_bias=load(p + "attention.query_key_value.bias").reshape(-1),  # [3, H/tp] -> [3H/tp]
                attn_out_weight=linear(p + "attention.dense.weight"), attn_out_bias=load(p + "attention.dense.bias"),
                ln2_weight=load(p + "post_attention_layernorm.weight"),
                ln2_bias=load(p + "post_attention_layernorm.bias"),
                fc1_weight=linear(p + "mlp.dense_h_to_4h.weight"), fc1_bias=load(p + "mlp.dense_h_to_4h.bias"),
                fc2_weight=linear(p + "mlp.dense_4h_to_h.weight"), fc2_bias=load(p + "mlp.dense_4h_to_h.bias"),
            )
            for name in STACKED:
                part = getattr(layer, name)
                if i == 0:
                    self.stacked[name] = torch.empty((config.num_layer, *part.shape), dtype=dtype, device=self.device)
                self.stacked[name][i].copy_(part)
                setattr(layer, name, self.stacked[name][i])
            self.layers.append(layer)
        self.k_cache: list[torch.Tensor] = []
        self.v_cache: list[torch.Tensor] = []
        self.one_launch: OneLaunchStep | None = None  # built with the cache
        self._gelu = config.activation_type == "Gelu"
        self._activation = (lambda x: F.gelu(x, approximate="tanh")) if self._gelu else F.relu
        f, hs = config.inter_size // tp, self.heads * self.head_dim  # this rank's FC1 columns and attention width
        # Launch shapes of the skinny GEMM per weight (benchmarks may replace them); None: it does not apply.
        self.skinny_plans: dict[str, _SkinnyPlan | None] = {
            "qkv": _skinny_plan(3 * hs, h, may_split=False), "out": _skinny_plan(h, hs, may_split=True),
            "fc1": _skinny_plan(f, h, may_split=False), "fc2": _skinny_plan(h, f, may_split=True),
            "lm_head": _skinny_plan(self.lm_head.shape[0], h, may_split=False),
            "out_wide": _skinny_plan(h, hs, may_split=True, block_n=64, target_programs=128, num_warps=4),
            "fc2_wide": _skinny_plan(h, f, may_split=True, block_n=64, target_programs=128, num_warps=4)}
        kernels = DecodeKernels.for_model(config, self.device, dtype)
        if any(plan is None for plan in self.skinny_plans.values()):
            kernels = replace(kernels, skinny_rows=0, skinny_residual_rows=0)
        if self._fp8_cache and self.device.type == "cuda" and not kernels.attention:
            # The eager ops widen a layer's whole cache at every step: 3-5x the fp16 cache's eager step on an H200.
            raise ValueError("kv_cache_dtype fp8 on a GPU needs the Triton attention kernels: Triton installed and a "
                             f"power-of-two head size (this model's is {config.size_per_head})")
        self.kernels = kernels  # settable (benchmarks compare choices); read by each decode call and graph capture
        # The skinny GEMVs into the residual count their split-K programs per output tile here (left zero again).
        self._tile_counters = torch.zeros(-(-h // 16), dtype=torch.int32, device=self.device)
        # Where norm_in_gemv may run (fp16/bf16 on CUDA, one rank), the LayerNorms are folded into the weights.
        self.norms_folded = False
        self.weight_quantization = "none"  # until _quantize_matrices
        if kernels.norm_in_gemv and self.shard is None:
            self.fold_norms()
        if weight_quantization == "int8":
            self._quantize_matrices()

    def _quantize_matrices(self) -> None:
        """Each layer's four matrices as Int8Weights (after `fold_norms`: the folded weights are what is quantized, and
        the row sums the norm-applying GEMMs subtract are the quantized weights'), held in int8 stacks with stacks of
        scales beside them (`stacked`: the one-launch step reads every layer from one base)."""
        for name in MATRICES:
            plain = self.stacked[name]  # [layers, N, K]
            values = torch.empty(plain.shape, dtype=torch.int8, device=self.device)
            scales = torch.empty(plain.shape[:2], dtype=torch.float32, device=self.device)
            for i, layer in enumerate(self.layers):  # a layer at a time: one fp32 copy of one matrix at most
                quantized = quantize_int8(plain[i])
                values[i].copy_(quantized.values)
                scales[i].copy_(quantized.scale)
                setattr(layer, name, Int8Weight(values[i], scales[i]))
            self.stacked[name], self.stacked[SCALES[name]] = values, scales  # the unquantized stack is freed
        if self.norms_folded:
            for layer in self.layers:
                layer.qkv_column_sums, layer.fc1_column_sums = (_row_sums(layer.qkv_weight),
                                                                _row_sums(layer.fc1_weight))
        self.weight_quantization = "int8"

    def fold_norms(self) -> None:
        """Folds each layer's two LayerNorm gains and biases into QKV and FC1 (`fold_layer_norm`): the norms keep gain 1
        and bias 0, so every path (prefill, eager, cuBLAS) computes the same function, and the skinny GEMVs of
        `DecodeKernels.norm_in_gemv` can apply a norm to their product. Not the final norm: the LM head may be the
        embedding table itself. Only before the weights are quantized (they are folded in the model's dtype)."""
        if self.weight_quantization != "none":
            raise ValueError("fold_norms folds weights in the model's dtype: call it before they are quantized")
        for layer in self.layers:  # in place: the layers' tensors are views of `stacked`
            assert isinstance(layer.qkv_weight, torch.Tensor) and isinstance(layer.fc1_weight, torch.Tensor)
            qkv = fold_layer_norm(layer.qkv_weight, layer.qkv_bias, layer.ln1_weight, layer.ln1_bias)
            fc1 = fold_layer_norm(layer.fc1_weight, layer.fc1_bias, layer.ln2_weight, layer.ln2_bias)
            for (weight, bias), (folded, moved, _) in (((layer.qkv_weight, layer.qkv_bias), qkv),
                                                       ((layer.fc1_weight, layer.fc1_bias), fc1)):
                weight.copy_(folded)
                bias.copy_(moved)
            layer.qkv_column_sums, layer.fc1_column_sums = qkv[2], fc1[2]
            for gain, shift in ((layer.ln1_weight, layer.ln1_bias), (layer.ln2_weight, layer.ln2_bias)):
                gain.fill_(1)
                shift.zero_()
        self.norms_folded = True

    def allocate_cache(self, slots: int, max_seq_len: int) -> None:
        if not 1 <= max_seq_len <= self.config.max_pos_seq_len:
            raise ValueError(f"max_seq_len must be in [1, max_pos_seq_len={self.config.max_pos_seq_len}], "
                             f"got {max_seq_len}")
        self.k_cache, self.v_cache, self.one_launch = [], [], None  # free the old cache first
        # One tensor per K and V, a layer a view of it: the one-launch step indexes every layer from one base.
        shape = (len(self.layers), slots, self.heads, max_seq_len, self.head_dim)
        self._k_stack = torch.zeros(shape, device=self.device, dtype=self.cache_dtype)
        self._v_stack = torch.zeros(shape, device=self.device, dtype=self.cache_dtype)
        self.k_cache, self.v_cache = list(self._k_stack.unbind(0)), list(self._v_stack.unbind(0))
        self.slots, self.max_seq_len = slots, max_seq_len
        self.one_launch = self._one_launch_step()

    def step_shape(self) -> StepShape:
        from .step_kernel import StepShape

        c = self.config
        return StepShape(hidden=self.hidden, inter=c.inter_size, heads=self.heads, head_dim=self.head_dim,
                         layers=len(self.layers), vocab=self.lm_head.shape[0], max_seq=self.max_seq_len,
                         activation="gelu_tanh" if self._gelu else "relu", eps=c.layernorm_eps)

    def step_weights(self) -> dict[str, torch.Tensor]:
        """The tensors of `step_kernel.OneLaunchStep`: the layers' stacks and the rest of the model."""
        return {**self.stacked, "wte": self.wte, "wpe": self.wpe, "final_ln_weight": self.final_ln[0],
                "final_ln_bias": self.final_ln[1], "lm_head": self.lm_head}

    def build_one_launch(self, launch: StepLaunch | None = None, programs: int | None = None) -> OneLaunchStep:
        """The batch-1 step as one kernel over this model's weights and cache (step_kernel.py; Triton's interpreter
        runs it on CPU); launch: default StepLaunch.from_environment(). ValueError where the model does not fit it."""
        from . import step_kernel

        return step_kernel.OneLaunchStep(self.step_shape(), self.step_weights(), self._k_stack, self._v_stack,
                                         launch or step_kernel.StepLaunch.from_environment(), programs)

    def _one_launch_step(self) -> OneLaunchStep | None:
        """`build_one_launch` where DecodeKernels.one_launch_step asks for it and it can serve: CUDA with Triton, one
        rank, fp16 or bf16 with the cache in the same dtype, a shape step_kernel.py takes; else None (a warning where
        asked). Not built while off: its workspace (~22 MB at the 1.3B shape) would sit unused."""
        if not self.kernels.one_launch_step:
            return None
        if (self.device.type != "cuda" or self.shard is not None or self.cache_dtype != self.dtype
                or self.dtype not in (torch.float16, torch.bfloat16) or importlib.util.find_spec("triton") is None):
            why = "it needs CUDA with Triton, one rank, and fp16 or bf16 weights with the KV cache in their dtype"
        else:
            try:
                return self.build_one_launch()
            except ValueError as error:
                why = str(error)
        log.warning("the one-launch decode step is off for this model: %s", why)
        return None

    @property
    def cache_bytes(self) -> int:
        """Bytes of the KV cache this model holds (a tensor-parallel shard: its own heads only)."""
        return sum(t.numel() * t.element_size() for t in (*self.k_cache, *self.v_cache))

    def slot_bytes(self, max_seq_len: int) -> int:
        """Bytes one KV-cache slot of `max_seq_len` tokens takes in this model (a shard: its own heads only)."""
        itemsize = torch.empty((), dtype=self.cache_dtype).element_size()
        return 2 * len(self.layers) * self.heads * self.head_dim * max_seq_len * itemsize

    # -- the eager paths' view of the cache: fp8 caches are indexed as bytes (index_copy_ and index_select have no
    # float8 kernels on every device), values are rounded on the way in and widened to the model's dtype on the way out

    def _bits(self, cache: torch.Tensor) -> torch.Tensor:
        return cache.view(torch.uint8) if self._fp8_cache else cache

    def _to_cache(self, x: torch.Tensor) -> torch.Tensor:
        """x in the cache's storage form (for `_bits` views)."""
        if not self._fp8_cache:
            return x
        return x.clamp(-FP8_MAX, FP8_MAX).to(self.cache_dtype).view(torch.uint8)  # a plain cast overflows to NaN

    def _from_cache(self, bits: torch.Tensor) -> torch.Tensor:
        """A `_bits` view (or a selection from one) in the model's dtype."""
        return bits.view(self.cache_dtype).to(self.dtype) if self._fp8_cache else bits

    # -- building blocks: each picks the fused kernel when `self.kernels` enables it, else the eager ops ------------

    def _add_norm(self, x: torch.Tensor, delta: torch.Tensor, bias: torch.Tensor | None, weight: torch.Tensor,
                  ln_bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + delta (+ bias), layer_norm of that); x [n, H]; delta [n, H], or the skinny GEMM's fp32 split-K
        partials [S, n, H] of the product (summed here)."""
        eps = self.config.layernorm_eps
        partials = delta.dim() == x.dim() + 1
        if self.kernels.fused_norm:
            from . import gpt_kernels  # Triton: CUDA only

            return gpt_kernels.add_layer_norm(x, delta, bias, weight, ln_bias, eps, pdl=self.kernels.pdl)
        if partials:  # the skinny GEMM's split-K partials without the fused norm
            delta = delta.sum(0).to(x.dtype)
        x = x + (delta if bias is None else delta + bias)
        return x, F.layer_norm(x, (self.hidden,), weight, ln_bias, eps)

    def _linear(self, x: torch.Tensor, weight: Weight, bias: torch.Tensor | None, plan: str, *,
                skinny: bool, activation: bool = False, norm: LayerNormIn | None = None) -> torch.Tensor:
        """x [..., K] @ weight^T + bias (then the MLP activation if asked): the skinny GEMM, cuBLASLt epilogue, or
        eager. norm (skinny only): x is the residual stream, normalized inside the GEMM (`gpt_kernels.LayerNormIn`).
        An Int8Weight: the skinny GEMM on a GPU whatever the rows (prefill's too), else the widened weight's product."""
        int8_gemm = isinstance(weight, Int8Weight) and x.is_cuda and self.skinny_plans[plan] is not None
        if skinny or int8_gemm:
            from . import gpt_kernels

            act = ("gelu_tanh" if self._gelu else "relu") if activation else "none"
            shape = self.skinny_plans[plan]
            assert shape is not None  # skinny is off (skinny_rows=0) when any weight has no plan: see __init__
            y = gpt_kernels.skinny_linear(x.reshape(-1, x.shape[-1]).contiguous(), weight, bias, activation=act,
                                          block_k=shape.block_k, block_n=shape.block_n, num_stages=shape.num_stages,
                                          num_warps=shape.num_warps, pdl=self.kernels.pdl, norm=norm)
            return y.view(*x.shape[:-1], -1)  # [rows, N] -> [..., N]
        if isinstance(weight, Int8Weight):
            weight = weight.dequantize(x.dtype)
        if activation and self.kernels.gemm_epilogue and bias is not None:
            # cuBLASLt's GELU epilogue is the tanh approximation (ATen's own fallback for it is gelu(tanh)); on an
            # H100 it was closer to fp32 gelu(tanh) than fp16 linear + gelu (bench/profile_decode.py).
            return torch._addmm_activation(bias, x, weight.t(), use_gelu=self._gelu)
        y = F.linear(x, weight, bias)
        return self._activation(y) if activation else y

    def _linear_into_residual(self, x: torch.Tensor, weight: Weight, bias: torch.Tensor, plan: str, *,
                              skinny: bool, split: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(delta, bias still to add): with `split`, the skinny GEMM's split-K partials (where the plan splits)
        leave the reduction and bias to `_add_norm`; otherwise `_linear` (skinny or not)."""
        if self.shard is not None:  # a row-parallel partial product: whole (no split-K), summed over the ranks
            return self.shard.all_reduce(self._linear(x, weight, None, plan, skinny=skinny)), bias
        shape = self.skinny_plans[plan]
        if split and shape is not None and shape.split_k > 1:
            from . import gpt_kernels

            return gpt_kernels.skinny_linear(x, weight, split_k=shape.split_k, block_k=shape.block_k,
                                             block_n=shape.block_n, num_stages=shape.num_stages,
                                             num_warps=shape.num_warps, pdl=self.kernels.pdl), bias
        return self._linear(x, weight, bias, plan, skinny=skinny), None

    def prefill(self, tokens: torch.Tensor, lengths: torch.Tensor, first_slot: int = 0,
                slot_index: torch.Tensor | None = None, starts: torch.Tensor | None = None,
                kv_len: int = 0) -> torch.Tensor:
        """tokens [n, T] right-padded, lengths [n] -> logits [n, V] at each row's last prompt token.

        Writes K/V of positions 0..T-1 into cache slots first_slot..first_slot+n-1 (padding positions too; decode
        overwrites them), or into the slots slot_index [n] names (a device tensor: capturable in a CUDA graph).
        The GEMMs are cuBLAS's kernels (never the skinny GEMV: at T x n rows they are compute-bound); with
        `kernels.gemm_epilogue` the MLP's first one adds its bias and GELU in cuBLASLt's epilogue: on an H200 the graph
        of 1 x 512 tokens took 2.61 ms against 2.68, 1 x 2048 9.66 against 10.25 (bench/profile_prefill.py
        --gelu-epilogue on off; on an H100 it had been slower at 512 rows). With `kernels.attention` the
        attention is `gpt_kernels.prefill_attention` (K/V written into the cache in the same kernel, no copies out of
        the QKV product); otherwise PyTorch's SDPA after writing the cache.

        Chunked prefill: with `starts` [n] (device), row i's tokens are the prompt positions starts[i].. of a slot
        whose cache already holds positions [0, starts[i]); its queries attend to those cached keys and causally to
        the chunk (an explicit mask over cache positions [0, kv_len), kv_len >= every starts[i] + lengths[i]), and
        its K/V go to positions starts[i]..starts[i]+T-1. Padding positions past the position embeddings are clamped
        to the last one, and past the cache clamped (eager) or dropped (kernel): only padding lands there, and a
        prompt never reaches it (a request generates at least one token). The kernel reads the cached keys by each
        row's start and ignores kv_len. No host sync either way: capturable with starts and kv_len fixed per graph.
        """
        n, t = tokens.shape
        chunk_slots = torch.arange(first_slot, first_slot + n, device=self.device) if slot_index is None else slot_index
        positions = None if starts is None else starts[:, None] + torch.arange(t, device=self.device)[None, :]  # [n, T]
        if positions is not None:
            embedded = F.embedding(positions.clamp(max=self.config.max_pos_seq_len - 1), self.wpe)
        else:
            embedded = F.embedding(torch.arange(t, device=self.device), self.wpe)
        attend = self._prefill_attention(chunk_slots, first_slot, slot_index, starts, positions, kv_len)
        x = F.embedding(tokens, self.wte) + embedded  # [n, T, H]
        # In a CUDA graph, each residual add and the LayerNorm after it run as one kernel (the decode step's, over
        # n x T rows): 5-10 % off a graph's pass on an H200 (1 x 512 tokens 3.33 -> 3.15 ms). An eager pass keeps the
        # eager ops: launching the Triton kernel from Python cost it more (4.6 -> 6.6 ms at 1 x 512) than it saved.
        fused = self.kernels.fused_norm and self.shard is None and torch.cuda.is_current_stream_capturing()
        h = F.layer_norm(x, (self.hidden,), self.layers[0].ln1_weight, self.layers[0].ln1_bias,
                         self.config.layernorm_eps)
        # Clamped: a graph's warm-up runs with whatever length its static buffer holds (replays copy the real one).
        last = (torch.arange(n, device=self.device), (lengths - 1).clamp(0, t - 1))
        for i, layer in enumerate(self.layers):
            qkv = self._linear(h, layer.qkv_weight, layer.qkv_bias, "qkv", skinny=False)  # [n, T, 3H]
            attended = attend(i, qkv)  # writes every position's K/V
            if i + 1 == len(self.layers):  # past the last attention only each row's last token matters: [n, 1, H]
                attended, x = attended[last][:, None], x[last][:, None]
            delta = self._row_linear(attended, layer.attn_out_weight, layer.attn_out_bias, "out")
            x, h = self._prefill_add_norm(x, delta, layer.ln2_weight, layer.ln2_bias, fused)
            up = self._linear(h.reshape(-1, self.hidden), layer.fc1_weight, layer.fc1_bias, "fc1", skinny=False,
                              activation=True).view(*h.shape[:2], -1)  # [n*T, H] -> [n, T, 4H]
            delta = self._row_linear(up, layer.fc2_weight, layer.fc2_bias, "fc2")
            x, h = self._prefill_add_norm(x, delta, *self._next_norm(i), fused)
        h = h[:, 0]  # [n, H]
        logits = F.linear(h, self.lm_head)
        return logits if self.shard is None else self.shard.gather_vocab(logits)

    def _prefill_attention(self, chunk_slots: torch.Tensor, first_slot: int, slot_index: torch.Tensor | None,
                           starts: torch.Tensor | None, positions: torch.Tensor | None,
                           kv_len: int) -> Callable[[int, torch.Tensor], torch.Tensor]:
        """`prefill`'s attention, which also writes the K/V cache: layer i, qkv [n, T, 3H] -> [n, T, H]. The Triton
        kernel with `kernels.attention`, else PyTorch ops (CPU, or no Triton)."""
        if self.kernels.attention:
            from . import gpt_kernels

            return lambda i, qkv: gpt_kernels.prefill_attention(qkv, self.k_cache[i], self.v_cache[i], chunk_slots,
                                                                starts)
        if starts is not None:
            assert positions is not None
            kv_len = kv_len or self.max_seq_len
            mask = (torch.arange(kv_len, device=self.device)[None, None, :] <= positions[:, :, None])[:, None]
            head_rows = chunk_slots[:, None] * self.heads + torch.arange(self.heads, device=self.device)[None, :]
            write_rows = (head_rows[:, :, None] * self.max_seq_len  # [n, heads, T] -> flat cache rows
                          + positions.clamp(max=self.max_seq_len - 1)[:, None, :]).reshape(-1)

        def attend(i: int, qkv: torch.Tensor) -> torch.Tensor:
            n, t, _ = qkv.shape
            q, k, v = qkv.view(n, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)  # [n, heads, T, d]
            k_cache, v_cache = self._bits(self.k_cache[i]), self._bits(self.v_cache[i])
            if starts is not None:
                k_cache.view(-1, self.head_dim).index_copy_(0, write_rows, self._to_cache(k).reshape(-1, self.head_dim))
                v_cache.view(-1, self.head_dim).index_copy_(0, write_rows, self._to_cache(v).reshape(-1, self.head_dim))
                # [n, heads, kv_len, d]: cached + chunk
                keys = self._from_cache(k_cache[:, :, :kv_len].index_select(0, chunk_slots))
                values = self._from_cache(v_cache[:, :, :kv_len].index_select(0, chunk_slots))
                with prefill_attention_backends():
                    attn = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)  # [n, heads, T, d]
            else:
                stored_k, stored_v = self._to_cache(k), self._to_cache(v)
                if slot_index is None:
                    k_cache[first_slot:first_slot + n, :, :t] = stored_k
                    v_cache[first_slot:first_slot + n, :, :t] = stored_v
                else:
                    k_cache.narrow(2, 0, t).index_copy_(0, slot_index, stored_k)
                    v_cache.narrow(2, 0, t).index_copy_(0, slot_index, stored_v)
                # The chunk's own keys as the cache holds them (rounded, with an fp8 cache), as later queries see them.
                k, v = self._from_cache(stored_k), self._from_cache(stored_v)
                # Plain causal attention is exact for right padding: a real token never sees a later (padding)
                # position, and decode overwrites padding K/V before any query can reach it.
                with prefill_attention_backends():
                    attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [n, heads, T, d]
            return attn.transpose(1, 2).reshape(n, t, -1)

        return attend

    def _prefill_add_norm(self, x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                          fused: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + delta, layer_norm of that) over [n, T, H]: one Triton kernel if `fused`, else the eager ops."""
        if not fused:
            x = x + delta
            return x, F.layer_norm(x, (self.hidden,), weight, bias, self.config.layernorm_eps)
        from . import gpt_kernels

        summed, normed = gpt_kernels.add_layer_norm(x.reshape(-1, self.hidden), delta.reshape(-1, self.hidden), None,
                                                    weight, bias, self.config.layernorm_eps)
        return summed.view(x.shape), normed.view(x.shape)

    def _row_linear(self, x: torch.Tensor, weight: Weight, bias: torch.Tensor, plan: str) -> torch.Tensor:
        """x @ weight^T + bias; tensor-parallel: this rank's partial product summed over the ranks, then the bias."""
        if self.shard is None:
            return self._linear(x, weight, bias, plan, skinny=False)
        return self.shard.all_reduce(self._linear(x, weight, None, plan, skinny=False)) + bias

    def _next_norm(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The LayerNorm after layer i's residual stream: layer i+1's input norm, or the final norm."""
        if i + 1 < len(self.layers):
            return self.layers[i + 1].ln1_weight, self.layers[i + 1].ln1_bias
        return self.final_ln

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, kv_len: int) -> torch.Tensor:
        """tokens [n], positions [n] (each row's own position) -> logits [n, V]; attends to cache[:, :, :kv_len].

        Needs every position < kv_len <= max_seq_len. No host sync: capturable in a CUDA graph.
        """
        n = tokens.shape[0]
        if n == 1 and self.kernels.one_launch_step and self.one_launch is not None:
            return self.one_launch(tokens, positions, kv_len)
        skinny = n <= self.kernels.skinny_rows
        split = skinny or n <= self.kernels.skinny_residual_rows
        wide = "_wide" if n > WIDE_SPLIT_ROWS else ""  # out's and FC2's plans for a tile of 64 rows
        fused_attention = self.kernels.attention and n * kv_len <= FUSED_ATTENTION_MAX_ROW_KEYS
        attend = self._fused_attention if fused_attention else self._eager_attention(positions, kv_len)
        first = self.layers[0]
        x, h = self._add_norm(F.embedding(tokens, self.wte), F.embedding(positions, self.wpe), None,
                              first.ln1_weight, first.ln1_bias)  # [n, H] each
        if skinny and self.kernels.norm_in_gemv and self.norms_folded:
            return self._layers_with_norms_in_gemvs(x, h, attend, positions, kv_len)
        for i, layer in enumerate(self.layers):
            qkv = self._linear(h, layer.qkv_weight, layer.qkv_bias, "qkv", skinny=skinny)  # [n, 3H]
            attn = attend(i, qkv, positions, kv_len)  # [n, H]
            delta, bias = self._linear_into_residual(attn, layer.attn_out_weight, layer.attn_out_bias, "out" + wide,
                                                     skinny=skinny, split=split)
            x, h = self._add_norm(x, delta, bias, layer.ln2_weight, layer.ln2_bias)
            up = self._linear(h, layer.fc1_weight, layer.fc1_bias, "fc1", skinny=skinny, activation=True)
            delta, bias = self._linear_into_residual(up, layer.fc2_weight, layer.fc2_bias, "fc2" + wide,
                                                     skinny=skinny, split=split)
            x, h = self._add_norm(x, delta, bias, *self._next_norm(i))
        logits = self._linear(h, self.lm_head, None, "lm_head", skinny=skinny)
        return logits if self.shard is None else self.shard.gather_vocab(logits)

    def _layers_with_norms_in_gemvs(self, x: torch.Tensor, h: torch.Tensor, attend: Attention, positions: torch.Tensor,
                                    kv_len: int) -> torch.Tensor:
        """`decode`'s layers and LM head for `DecodeKernels.norm_in_gemv`: x [n, H] the residual stream, h its first
        LayerNorm -> logits [n, V]. Each GEMV into the residual leaves the new stream and its block sums (`stats`), from
        which the GEMV after the next LayerNorm normalizes its product (the norms' affine parts are in its weights)."""
        from . import gpt_kernels

        eps = self.config.layernorm_eps

        def into_residual(x: torch.Tensor, delta_in: torch.Tensor, weight: Weight, bias: torch.Tensor,
                          plan: str) -> tuple[torch.Tensor, torch.Tensor]:
            shape = self.skinny_plans[plan]
            assert shape is not None  # see _linear
            return gpt_kernels.skinny_linear_residual(
                delta_in, weight, bias, x, self._tile_counters, split_k=shape.split_k, block_n=shape.block_n,
                block_k=shape.block_k, num_stages=shape.num_stages, num_warps=shape.num_warps, pdl=self.kernels.pdl)

        stats = None  # layer 0's QKV reads h (the first add + LayerNorm kernel's)
        for i, layer in enumerate(self.layers):
            assert layer.qkv_column_sums is not None and layer.fc1_column_sums is not None  # norms_folded
            norm = None if stats is None else gpt_kernels.LayerNormIn(stats, layer.qkv_column_sums, eps)
            qkv = self._linear(h if norm is None else x, layer.qkv_weight, layer.qkv_bias, "qkv", skinny=True,
                               norm=norm)  # [n, 3H]
            attn = attend(i, qkv, positions, kv_len)  # [n, H]
            x, stats = into_residual(x, attn, layer.attn_out_weight, layer.attn_out_bias, "out")
            up = self._linear(x, layer.fc1_weight, layer.fc1_bias, "fc1", skinny=True, activation=True,
                              norm=gpt_kernels.LayerNormIn(stats, layer.fc1_column_sums, eps))
            if i + 1 < len(self.layers):
                x, stats = into_residual(x, up, layer.fc2_weight, layer.fc2_bias, "fc2")
        # The final norm, not folded (see __init__), as the add + LayerNorm kernel.
        delta, bias = self._linear_into_residual(up, layer.fc2_weight, layer.fc2_bias, "fc2", skinny=True, split=True)
        _, h = self._add_norm(x, delta, bias, *self.final_ln)
        return self._linear(h, self.lm_head, None, "lm_head", skinny=True)

    def _fused_attention(self, i: int, qkv: torch.Tensor, positions: torch.Tensor, kv_len: int) -> torch.Tensor:
        from . import gpt_kernels

        return gpt_kernels.decode_attention(qkv, self.k_cache[i], self.v_cache[i], positions, kv_len,
                                            pdl=self.kernels.pdl)

    def _eager_attention(self, positions: torch.Tensor, kv_len: int) -> Attention:
        """The eager step attention: index_copy_ the new K/V into the cache, then masked SDPA over kv_len keys."""
        n = positions.shape[0]
        key_pos = torch.arange(kv_len, device=self.device)
        mask = (key_pos[None, :] <= positions[:, None]).view(n, 1, 1, kv_len)
        # Flat row index of (slot b, head h, position pos_b) in a cache viewed as [slots * heads * max_seq, d].
        head_rows = torch.arange(n, device=self.device)[:, None] * self.heads + torch.arange(
            self.heads, device=self.device)[None, :]  # [n, heads]
        write_rows = (head_rows * self.max_seq_len + positions[:, None]).reshape(-1)  # [n * heads]

        def attend(i: int, qkv: torch.Tensor, positions: torch.Tensor, kv_len: int) -> torch.Tensor:
            q, k, v = qkv.view(n, 3, self.heads, self.head_dim).unbind(1)  # each [n, heads, d]
            k_cache, v_cache = self._bits(self.k_cache[i]), self._bits(self.v_cache[i])
            k_cache.view(-1, self.head_dim).index_copy_(0, write_rows, self._to_cache(k).reshape(-1, self.head_dim))
            v_cache.view(-1, self.head_dim).index_copy_(0, write_rows, self._to_cache(v).reshape(-1, self.head_dim))
            attn = F.scaled_dot_product_attention(q[:, :, None], self._from_cache(k_cache[:n, :, :kv_len]),
                                                  self._from_cache(v_cache[:n, :, :kv_len]),
                                                  attn_mask=mask)  # [n, heads, 1, d]
            return attn.reshape(n, -1)  # [n, heads * d] (this rank's heads)

        return attend

    def copy_slots(self, sources: torch.Tensor, length: int) -> None:
        """Cache slot i <- slot sources[i] (positions < length), for i < len(sources): beam expansion/reordering."""
        m = sources.shape[0]
        for cache in map(self._bits, (*self.k_cache, *self.v_cache)):
            cache[:m, :, :length] = cache[:, :, :length].index_select(0, sources)  # a copy: safe to overlap


# ---------------------------------------------------------------------------------------------------------------------
# CUDA graphs of the decode step (CUDA only). One graph per (batch bucket, kv-length bucket), captured the first time
# that shape is needed: the capturing call's warm-up run IS the real step (same inputs, same cache writes), so no
# decode is ever run on made-up inputs. Padding rows of a bucket decode token 0 at position 0 into their own (unused)
# cache slots. All graphs share one memory pool; they never run concurrently and each result is consumed (by stream
# order) before the next replay.


def prefill_attention_backends() -> contextlib.AbstractContextManager[None]:
    """Prefill attention without cuDNN's SDPA: it builds an execution plan per new prompt length (prompts of every
    length arrive in serving), where flash / memory-efficient attention need none."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


HOST_BLOCKS = 8  # PrefillGraphs' pinned input blocks


class PrefillGraphs:
    """The prefill of ONE prompt, or one chunk of it, from CUDA graphs, one per padded length (a multiple of `step`
    tokens).

    An eager prefill launches ~300 kernels; on an H200 that took ~5.7 ms whatever the prompt length (512 or 1024
    tokens), where the math of 512 tokens is ~2 ms: launches, not compute, set the time to first token at low load.
    Padding positions write K/V that decode overwrites, as in a batched eager prefill.

    A chunk at prompt position start > 0 (chunked prefill, scheduler.py) replays a graph keyed by (width, kv bucket)
    with the start in a device tensor: a graph per offset would be one per (width, start), thousands. The number of
    cached keys the chunk attends to must be fixed in a graph (it is the attention's shape), so it is rounded up to a
    multiple of `kv_step`; the causal mask hides the keys past each query (with the Triton prefill attention, which
    reads the start on the device, one bucket serves all). `capture_all` captures the chunk graphs of widths up to
    `chunk_width` (8 for 512 tokens; ~50 with PyTorch's attention: 8 widths x up to 8 kv buckets of 2048 positions);
    wider chunks (a larger per-step budget) are captured on first use.

    Several whole prompts admitted together (all at position 0) replay ONE graph keyed by (rows, width) when rows x
    width <= `chunk_width` (12 graphs for 512 tokens): a graph per row would read the 2.6 GB of weights once per row,
    and an eager pass is launch-bound. Rows are exact (no padding rows: a padding row would need a slot to write into).
    """

    def __init__(self, model: GptModel, step: int = 64, kv_step: int = 256, chunk_width: int = 0) -> None:
        self.model, self.step, self.kv_step, self.chunk_width = model, step, kv_step, chunk_width
        device, width = model.device, model.max_seq_len
        # One row's inputs (tokens, then its length, slot and first position) are ONE device block, filled by ONE
        # copy from a pinned host block: on an H200 host, uploading them as separate pinned tensors and copying
        # them into place took ~0.6 ms of the first token's path before the graph ran (stage timestamps,
        # docs/benchmarks.md). The host blocks take turns; each is rewritten only once the copy that last read it
        # has run (its event). HOST_BLOCKS exceeds the rows of one pass (generation.GRAPH_PREFILL_ROWS), so that
        # wait is for a copy of an earlier pass, which that pass's read-back of its step has usually waited for.
        self._inputs = torch.zeros(width + 3, dtype=torch.long, device=device)
        self.tokens = self._inputs[:width].view(1, width)
        self.lengths, self.slot, self.start = (self._inputs[width + i:width + i + 1] for i in range(3))
        self._host_blocks = [torch.zeros(width + 3, dtype=torch.long, pin_memory=device.type == "cuda")
                             for _ in range(HOST_BLOCKS)]
        self._host_views = [block.numpy() for block in self._host_blocks]  # written through numpy: cheaper per call
        self._host_copied: list[torch.cuda.Event | None] = [None] * HOST_BLOCKS
        self._turn = 0
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.chunk_graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        max_rows = max(1, chunk_width // step)  # several prompts of one pass: rows x width <= chunk_width
        self.row_tokens = torch.zeros((max_rows, max(step, chunk_width)), dtype=torch.long, device=device)
        self.row_lengths = torch.ones(max_rows, dtype=torch.long, device=device)
        self.row_slots = torch.zeros(max_rows, dtype=torch.long, device=device)
        self.rows_graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def width(self, length: int) -> int:
        return min(self.model.max_seq_len, -(-length // self.step) * self.step)

    def _load(self, tokens: torch.Tensor, length: int, slot: int, start: int = 0) -> int:
        """One row's inputs into the graphs' input block (tokens [1, T] on the host; from the device, as the load-time
        checks send them, they come over first); returns its padded width."""
        t = min(tokens.shape[1], self.model.max_seq_len)
        width, end = self.width(t), self.model.max_seq_len
        turn, self._turn = self._turn, (self._turn + 1) % HOST_BLOCKS
        copied = self._host_copied[turn]
        if copied is not None:
            copied.synchronize()  # (long done in practice: a step reads its results back before the next pass)
        host = self._host_views[turn]
        host[:t] = tokens[0, :t].cpu().numpy()
        host[t:width] = 0
        host[end:] = length, slot, start
        self._inputs.copy_(self._host_blocks[turn], non_blocking=True)
        if self._inputs.is_cuda:  # (a CPU copy is done when it returns)
            self._host_copied[turn] = copied = copied or torch.cuda.Event()
            copied.record()
        return width

    def prefill(self, tokens: torch.Tensor, length: int, slot: int) -> torch.Tensor:
        """tokens [1, T] (T >= the prompt length), on the host -> logits [1, V] (a view of the graph's output: consume
        it before the next call). Captures the bucket's graph on first use."""
        width = self._load(tokens, length, slot)
        graph, logits = self.graphs.get(width) or self._capture(width)
        graph.replay()
        return logits

    def prefill_chunk(self, tokens: torch.Tensor, length: int, slot: int, start: int) -> torch.Tensor:
        """As `prefill`, for a chunk holding prompt positions start..start+length-1 of a slot that caches [0, start)
        already (GptModel.prefill's `starts`)."""
        if start == 0:
            return self.prefill(tokens, length, slot)
        width = self._load(tokens, length, slot, start)
        kv_len = self.kv_bucket(start, width)
        graph, logits = self.chunk_graphs.get((width, kv_len)) or self._capture_chunk(width, kv_len)
        graph.replay()
        return logits

    def fits_rows(self, rows: int, length: int) -> bool:
        """Whether `rows` whole prompts padded to `length` tokens replay one graph (`prefill_rows`)."""
        return 2 <= rows and rows * self.width(length) <= self.chunk_width

    def prefill_rows(self, tokens: torch.Tensor, lengths: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """Whole prompts of several rows in one pass: tokens [n, T] right-padded, lengths [n] and slots [n] on the
        device (`fits_rows(n, T)`) -> logits [n, V] (a view of the graph's output: consume it before the next
        call). Captures the (n, width) graph on first use."""
        n, t = tokens.shape
        width = self.width(t)
        self.row_tokens[:n, :t].copy_(tokens)
        self.row_tokens[:n, t:width].zero_()
        self.row_lengths[:n].copy_(lengths)
        self.row_slots[:n].copy_(slots)
        graph, logits = self.rows_graphs.get((n, width)) or self._capture_rows(n, width)
        graph.replay()
        return logits

    def _capture_rows(self, rows: int, width: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        self.rows_graphs[(rows, width)] = self._graph(lambda: self.model.prefill(
            self.row_tokens[:rows, :width], self.row_lengths[:rows], slot_index=self.row_slots[:rows]))
        return self.rows_graphs[(rows, width)]

    def _graph(self, run: Callable[[], torch.Tensor]) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        side = torch.cuda.Stream(device=self.model.device)
        side.wait_stream(torch.cuda.current_stream(self.model.device))
        with torch.cuda.stream(side):  # warm-up outside the graph (lazy library init); it is the real pass
            run()
        torch.cuda.current_stream(self.model.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            logits = run()
        return graph, logits

    def _capture(self, width: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        self.graphs[width] = self._graph(lambda: self.model.prefill(self.tokens[:, :width], self.lengths, 0,
                                                                    self.slot))
        return self.graphs[width]

    def _capture_chunk(self, width: int, kv_len: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        self.chunk_graphs[(width, kv_len)] = self._graph(lambda: self.model.prefill(
            self.tokens[:, :width], self.lengths, 0, self.slot, starts=self.start, kv_len=kv_len))
        return self.chunk_graphs[(width, kv_len)]

    def kv_bucket(self, start: int, width: int) -> int:
        """The cached keys a chunk graph attends over. The Triton prefill attention reads each row's start from the
        device and needs no such bound: one chunk graph per width then serves every start."""
        if self.model.kernels.attention:
            return self.model.max_seq_len
        return min(self.model.max_seq_len, -(-(start + width) // self.kv_step) * self.kv_step)

    def capture_all(self) -> int:
        """Capture every whole-prompt graph, the chunk graphs up to `chunk_width` and the several-prompt graphs now (at
        load: the warm-up passes write junk K/V into slot 0); returns how many graphs there are."""
        widths = sorted({self.width(t) for t in range(self.step, self.model.max_seq_len + self.step, self.step)})
        for width in widths:
            if width not in self.graphs:
                self._capture(width)
        for width in (w for w in widths if w <= self.width(self.chunk_width)) if self.chunk_width > 0 else ():
            for kv_len in sorted({self.kv_bucket(start, width) for start in range(1, self.model.max_seq_len)}):
                if (width, kv_len) not in self.chunk_graphs:
                    self._capture_chunk(width, kv_len)
        for rows in range(2, self.row_tokens.shape[0] + 1):
            for width in range(self.step, min(self.chunk_width // rows, self.model.max_seq_len) + 1, self.step):
                if (rows, width) not in self.rows_graphs:
                    self._capture_rows(rows, width)
        torch.cuda.synchronize(self.model.device)
        return len(self.graphs) + len(self.chunk_graphs) + len(self.rows_graphs)


def batch_buckets(max_rows: int) -> list[int]:
    buckets = [1 << i for i in range(max(1, math.ceil(math.log2(max_rows)) + 1)) if (1 << i) < max_rows]
    return [*buckets, max_rows]


class DecodeGraphs:
    def __init__(self, model: GptModel, kv_bucket: int = 256) -> None:
        if model.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        self.model = model
        self.kv_bucket = kv_bucket
        self.buckets = batch_buckets(model.slots)
        self.tokens = torch.zeros(model.slots, dtype=torch.long, device=model.device)
        self.positions = torch.zeros(model.slots, dtype=torch.long, device=model.device)
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def capture_all(self) -> int:
        """Capture every (rows, kv) bucket now (a server at load), so no request waits for a capture; returns how
        many were captured. The junk steps write K/V at position 0 of the slots: call it before any request."""
        kv_lens = sorted({min(self.model.max_seq_len, kv) for kv in range(self.kv_bucket, self.model.max_seq_len
                                                                             + self.kv_bucket, self.kv_bucket)})
        captured = 0
        for kv_len in kv_lens:
            for rows in self.buckets:
                if (rows, kv_len) not in self.graphs:
                    zeros = torch.zeros(rows, dtype=torch.long, device=self.model.device)
                    self.decode(zeros, zeros, kv_len)
                    captured += 1
        torch.cuda.synchronize(self.model.device)
        return captured

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, kv_len: int) -> torch.Tensor:
        n = tokens.shape[0]
        rows = next(b for b in self.buckets if b >= n)
        kv_len = min(self.model.max_seq_len, -(-kv_len // self.kv_bucket) * self.kv_bucket)
        self.tokens[:n].copy_(tokens)
        self.positions[:n].copy_(positions)
        self.tokens[n:rows].zero_()
        self.positions[n:rows].zero_()
        captured = self.graphs.get((rows, kv_len))
        if captured is not None:
            graph, logits = captured
            graph.replay()
            return logits[:n]
        static_tokens, static_positions = self.tokens[:rows], self.positions[:rows]
        side = torch.cuda.Stream(device=self.model.device)
        side.wait_stream(torch.cuda.current_stream(self.model.device))
        with torch.cuda.stream(side):  # warm-up on a side stream (lazy library init stays out of the graph)
            step_logits = self.model.decode(static_tokens, static_positions, kv_len)
        torch.cuda.current_stream(self.model.device).wait_stream(side)
        step_logits = step_logits.clone()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            logits = self.model.decode(static_tokens, static_positions, kv_len)
        self.graphs[(rows, kv_len)] = (graph, logits)
        return step_logits[:n]
