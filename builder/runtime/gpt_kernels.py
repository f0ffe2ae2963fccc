"""Triton kernels for the decode step of `gpt.GptModel` on CUDA (the eager PyTorch ops stay the reference).

A decode step is memory-bound: per layer it streams ~100 MB of fp16 weights (1.3B shape), while the small ops
between the weight GEMMs (layer norms, residual adds, KV-cache writes, attention) each cost a kernel launch of a few
microseconds. These kernels fuse those small ops and stream the weights for few rows (batch <= 16) at a higher share
of the memory bandwidth than cuBLAS's GEMV choices:
- `add_layer_norm`: residual + delta (+ bias, + split-K partial sums) and the next LayerNorm in one pass;
- `skinny_linear`: x @ W^T for few rows, either finished (bias + activation epilogue) or as split-K fp32 partials
  that `add_layer_norm` sums (so the split costs no extra kernel); it may apply a LayerNorm of x to its product
  (`LayerNormIn`: the norm's gain and bias folded into the weights), from the block sums `skinny_linear_residual` left;
- `skinny_linear_residual`: residual + x @ W^T + bias, with those block sums, in one kernel even when split over K
  (the last program of a tile to finish sums the tile's partials): with the norm above, no add + LayerNorm kernel;
- `decode_attention`: one query per row over its own cached keys (positions <= its position only, so a row never
  reads the rest of the kv bucket), writing the step's K/V into the cache in the same kernel; buckets over 256 keys
  are split over the keys (a small combine kernel merges the splits), or at many rows run as `prefill_attention`'s
  chunk of one query;
- `prefill_attention`: the prefill's causal attention straight from the QKV GEMM's output, over a chunk's cached keys
  too, writing the chunk's K/V into its cache slot (flash-attention style, on tensor cores).
Everything is shape-static for a given (rows, kv_len) and never syncs with the host, so it runs inside CUDA graphs.
The attention kernels take the cache in the model's dtype or in fp8 (e4m3; gpt.py): a key or value is rounded to the
cache's dtype when written, and the queries of the pass that wrote it see the rounded value too.
On Hopper every kernel here is launched as a programmatic dependent of the previous one (`_wait_previous`).
Import this module only where Triton is installed (gpt.py imports it lazily, on CUDA only).
"""

from __future__ import annotations

import functools
import math
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .quantize import Int8Weight, Weight

ACTIVATIONS = {"none": 0, "gelu_tanh": 1, "relu": 2}
SKINNY_TILE_ROWS = 64  # rows per program of the skinny GEMM (tl.dot needs >= 16; rows past the batch are masked off)


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132


@functools.cache
def _shared_memory_bytes(device: torch.device) -> int:
    """Shared memory one program may use (opt-in maximum): 227 KiB on an H100/H200, ~100 KiB on Ada."""
    if device.type != "cuda":
        return 227 * 1024
    properties = torch.cuda.get_device_properties(device)
    optin = getattr(properties, "shared_memory_per_block_optin", None)  # a torch without the field: by architecture
    return optin or {(9, 0): 227, (8, 0): 163, (8, 7): 163}.get((properties.major, properties.minor), 99) * 1024


def pdl_supported(device: torch.device) -> bool:
    """Programmatic dependent launch: Hopper or newer, and a Triton that has the grid-dependency instructions."""
    return (device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9
            and hasattr(tl.extra.cuda, "gdc_wait"))


def _launch_options(pdl: bool) -> dict[str, bool]:
    return {"launch_pdl": True} if pdl else {}  # older Tritons reject the keyword: pass it only when used


# Programmatic dependent launch (PDL), for the chain of small kernels of one decode step: a kernel launched with it
# may start while the previous kernel in the stream is still running; `_wait_previous` blocks until that kernel has
# finished and its writes are visible. Every kernel here writes only after it, and reads before it only what was
# written before the step's first kernel (a plain launch: every PDL chain starts after it has finished), so a PDL kernel
# computes exactly what a plainly launched one does, minus the launch gap. Signalling dependents only after the wait
# keeps at most one kernel launched ahead. Such reads (LayerNorm weights, biases, the step's positions) come before
# the wait on purpose: after it, each was one more memory round trip on the step's critical path (with 2-warp GEMV
# programs, -7 % of the batch-1 step on an H200, docs/gpu/runs-2026-12-04b). Not the GEMVs' weight tiles, though:
# requesting their first K-blocks before the wait made the step 0.3-3 % slower (the pipelined loop still starts after
# the wait), and an L2 prefetch of a whole matrix was slower at every batch (the next matrix does not fit in L2 beside
# the one being streamed; docs/benchmarks.md).
@triton.jit
def _wait_previous(USE_PDL: tl.constexpr):
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


# ---------------------------------------------------------------------------------------------------------------------
# Residual add + LayerNorm


@triton.jit
def _add_layer_norm_kernel(x_ptr, delta_ptr, bias_ptr, ln_weight_ptr, ln_bias_ptr, out_x_ptr, out_h_ptr,
                           rows, hidden, eps,
                           NUM_PARTS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr,
                           USE_PDL: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    inside = cols < hidden
    # Before the wait: nothing in the step writes them (the PDL note above).
    w = tl.load(ln_weight_ptr + cols, mask=inside, other=0.0).to(tl.float32)
    b = tl.load(ln_bias_ptr + cols, mask=inside, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols, mask=inside, other=0.0).to(tl.float32)
    _wait_previous(USE_PDL)
    x = tl.load(x_ptr + row * hidden + cols, mask=inside, other=0.0).to(tl.float32)
    delta = tl.zeros([BLOCK], dtype=tl.float32)
    for part in tl.static_range(NUM_PARTS):  # split-K partials [parts, rows, hidden] (or one finished delta)
        delta += tl.load(delta_ptr + (part * rows + row) * hidden + cols, mask=inside, other=0.0).to(tl.float32)
    if HAS_BIAS:
        delta += bias
    # Round the delta and the sum to the storage dtype as the eager ops do (x + linear(...) in fp16).
    delta = delta.to(out_x_ptr.dtype.element_ty).to(tl.float32)
    summed = (x + delta).to(out_x_ptr.dtype.element_ty)
    tl.store(out_x_ptr + row * hidden + cols, summed, mask=inside)
    h = layer_norm_row(summed.to(tl.float32), w, b, inside, hidden, eps)
    tl.store(out_h_ptr + row * hidden + cols, h.to(out_h_ptr.dtype.element_ty), mask=inside)


@triton.jit
def layer_norm_row(s, gain, shift, inside, hidden, eps):
    """LayerNorm of one row s [BLOCK] (fp32; lanes outside the row masked by `inside`) -> fp32, as F.layer_norm."""
    mean = tl.sum(s, axis=0) / hidden
    centered = tl.where(inside, s - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=0) / hidden + eps)
    return centered * rstd * gain + shift


def add_layer_norm(x: torch.Tensor, delta: torch.Tensor, bias: torch.Tensor | None, ln_weight: torch.Tensor,
                   ln_bias: torch.Tensor, eps: float, *, pdl: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x [n, H] + delta (+ bias) -> (sum [n, H], layer_norm(sum) [n, H]).

    delta is [n, H], or [parts, n, H] fp32 split-K partials of one product (summed here)."""
    rows, hidden = x.shape
    parts = 1 if delta.dim() == 2 else delta.shape[0]
    out_x, out_h = torch.empty_like(x), torch.empty_like(x)
    _add_layer_norm_kernel[(rows,)](x, delta, bias if bias is not None else x, ln_weight, ln_bias, out_x, out_h,
                                    rows, hidden, eps, NUM_PARTS=parts, HAS_BIAS=bias is not None,
                                    BLOCK=triton.next_power_of_2(hidden), USE_PDL=pdl,
                                    num_warps=4 if hidden <= 4096 else 8, **_launch_options(pdl))
    return out_x, out_h


# ---------------------------------------------------------------------------------------------------------------------
# Skinny GEMM (few rows): y = x @ W^T


@triton.jit
def _gelu_tanh(x):
    # 0.5 x (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3); tanh(u) = 1 - 2 / (exp(2u) + 1) saturates cleanly.
    u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
    return 0.5 * x * (2.0 - 2.0 / (tl.exp(2.0 * u) + 1.0))


@triton.jit
def activate(x, ACTIVATION: tl.constexpr):
    """The MLP activation of an ACTIVATIONS code on fp32 values (0: none)."""
    if ACTIVATION == 1:
        x = _gelu_tanh(x)
    elif ACTIVATION == 2:
        x = tl.maximum(x, 0.0)
    return x


@triton.jit
def _skinny_linear_kernel(x_ptr, w_ptr, scale_ptr, bias_ptr, out_ptr, rows, n, k, k_per_split,
                          norm_stats_ptr, column_sums_ptr, eps,
                          residual_ptr, partial_ptr, counter_ptr, stats_ptr, SCALED: tl.constexpr,
                          SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr,
                          IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          NORM_BLOCKS: tl.constexpr, NORM_BLOCKS_POW2: tl.constexpr, RESIDUAL: tl.constexpr,
                          USE_PDL: tl.constexpr):
    block_n, split, block_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = block_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    k_start = split * k_per_split
    if HAS_BIAS and (SPLIT_K == 1 or RESIDUAL):  # before the wait (the PDL note above), not after the loop
        bias = tl.load(bias_ptr + offs_n, mask=offs_n < n, other=0.0).to(tl.float32)
    if NORM_BLOCKS > 0:
        column_sums = tl.load(column_sums_ptr + offs_n, mask=offs_n < n, other=0.0)
    if SCALED:  # int8 weights (quantize.py): each output row's scale
        scale = tl.load(scale_ptr + offs_n, mask=offs_n < n, other=0.0)
    _wait_previous(USE_PDL)
    if NORM_BLOCKS > 0:  # x is the residual stream: its mean and rstd from the block sums its producer left
        slots = tl.arange(0, NORM_BLOCKS_POW2)
        at = (offs_m[:, None] * NORM_BLOCKS + slots[None, :]) * 2  # stats [rows, NORM_BLOCKS, (sum, sum of squares)]
        used = (offs_m[:, None] < rows) & (slots[None, :] < NORM_BLOCKS)
        # Loaded before the loop, summed after it: in flight while the weights stream (summed before it, the loop's
        # first loads waited for them: +4 % of the batch-1 step on an H200, docs/gpu/runs-2026-12-04e).
        sums = tl.load(norm_stats_ptr + at, mask=used, other=0.0)
        squares = tl.load(norm_stats_ptr + at + 1, mask=used, other=0.0)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_start, k_start + k_per_split, BLOCK_K):
        ks = k0 + offs_k
        x = tl.load(x_ptr + offs_m[:, None] * k + ks[None, :], mask=offs_m[:, None] < rows, other=0.0)
        w = tl.load(w_ptr + offs_n[:, None] * k + ks[None, :], mask=offs_n[:, None] < n, other=0.0)
        if SCALED:  # int8 values widened for the dot; the row scales multiply the sums after the loop
            w = w.to(x_ptr.dtype.element_ty)
        if IEEE:
            acc += tl.dot(x, tl.trans(w), input_precision="ieee")
        else:
            acc += tl.dot(x, tl.trans(w))
    if SCALED:
        acc = acc * scale[None, :]
    if NORM_BLOCKS > 0:  # (x - mean) rstd @ W^T = (x @ W^T - mean * W's row sums) rstd
        mean = tl.sum(sums, axis=1) / k
        rstd = 1.0 / tl.sqrt(tl.maximum(tl.sum(squares, axis=1) / k - mean * mean, 0.0) + eps)  # [BLOCK_M]
        acc = (acc - mean[:, None] * column_sums[None, :]) * rstd[:, None]
    inside = (offs_m[:, None] < rows) & (offs_n[None, :] < n)
    at = offs_m[:, None] * n + offs_n[None, :]
    if RESIDUAL:
        if SPLIT_K == 1:
            if HAS_BIAS:
                acc += bias[None, :]
            _into_residual(acc, residual_ptr, out_ptr, stats_ptr, offs_m, offs_n, rows, n, block_n)
        else:
            # The tile's last split to arrive sums all the partials (in split order: the same bits whichever is
            # last) and finishes the tile: no second kernel. The barrier puts every thread's partial before the
            # release; the partials are read past L1 (another program's writes).
            tl.store(partial_ptr + split * rows * n + at, acc, mask=inside)
            tl.debug_barrier()
            tile = counter_ptr + block_m * tl.num_programs(0) + block_n
            if tl.atomic_add(tile, 1, sem="acq_rel", scope="gpu") == SPLIT_K - 1:
                total = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
                for part in tl.static_range(SPLIT_K):
                    total += tl.load(partial_ptr + part * rows * n + at, mask=inside, other=0.0, cache_modifier=".cg")
                tl.store(tile, 0)  # zero again for the next GEMV into the residual (it starts after this kernel ends)
                if HAS_BIAS:
                    total += bias[None, :]
                _into_residual(total, residual_ptr, out_ptr, stats_ptr, offs_m, offs_n, rows, n, block_n)
    elif SPLIT_K == 1:
        if HAS_BIAS:
            acc += bias[None, :]
        tl.store(out_ptr + at, activate(acc, ACTIVATION).to(out_ptr.dtype.element_ty), mask=inside)
    else:  # fp32 partial sums [SPLIT_K, rows, n]; the consumer adds them (and the bias)
        tl.store(out_ptr + split * rows * n + at, acc, mask=inside)


@triton.jit
def _into_residual(delta, residual_ptr, out_ptr, stats_ptr, offs_m, offs_n, rows, n, block_n):
    """out = residual + delta for one tile, rounded as the eager ops round (x + linear(...) in the storage dtype), and
    the tile's per-row sum and sum of squares of out: the slots the next LayerNorm reads (stats [rows, blocks, 2])."""
    inside = (offs_m[:, None] < rows) & (offs_n[None, :] < n)
    at = offs_m[:, None] * n + offs_n[None, :]
    dtype = out_ptr.dtype.element_ty
    residual = tl.load(residual_ptr + at, mask=inside, other=0.0).to(tl.float32)
    summed = (residual + delta.to(dtype).to(tl.float32)).to(dtype)
    tl.store(out_ptr + at, summed, mask=inside)
    s = tl.where(inside, summed.to(tl.float32), 0.0)
    slot = stats_ptr + (offs_m * tl.num_programs(0) + block_n) * 2
    tl.store(slot, tl.sum(s, axis=1), mask=offs_m < rows)
    tl.store(slot + 1, tl.sum(s * s, axis=1), mask=offs_m < rows)


class LayerNormIn(NamedTuple):
    """A LayerNorm without its affine part, applied by `skinny_linear` to its input: x is then the residual stream
    itself, `stats` the per-row block sums [rows, blocks, 2] (fp32) that `skinny_linear_residual` left with it, and
    `column_sums` weight.float().sum(1) [N]. The product is computed from x as loaded (x @ W^T, then minus the mean
    times the column sums, times rstd): no elementwise work between the load of x and the dot, which would cost the
    loop its pipelining (normalizing each tile of x as loaded made the GEMVs 2.5x slower on an H200,
    docs/gpu/runs-2026-12-04e). The LayerNorm's gain and bias are in the weight and bias (`gpt.fold_layer_norm`)."""

    stats: torch.Tensor
    column_sums: torch.Tensor
    eps: float


def skinny_linear(x: torch.Tensor, weight: Weight, bias: torch.Tensor | None = None, *,
                  activation: str = "none", split_k: int = 1, block_n: int = 32, block_k: int = 128,
                  num_warps: int = 4, num_stages: int = 5, pdl: bool = False,
                  norm: LayerNormIn | None = None) -> torch.Tensor:
    """x [rows, K] @ weight[N, K]^T (+ bias, activation) -> [rows, N] in x's dtype; or, with split_k > 1,
    the unreduced fp32 partials [split_k, rows, N] (no bias, no activation: `add_layer_norm` finishes them).
    Each program takes up to SKINNY_TILE_ROWS rows: past them the weights are read once per tile of rows.

    norm: the product is of layer_norm(x) without its affine part (`LayerNormIn`): no LayerNorm kernel before it.
    pdl: launch it as a programmatic dependent of the previous kernel (Hopper). weight may be an Int8Weight."""
    if split_k > 1 and (bias is not None or activation != "none" or norm is not None):
        raise ValueError("split-K partials take no bias, activation or norm")
    rows, n = x.shape[0], weight.shape[0]
    shape = (rows, n) if split_k == 1 else (split_k, rows, n)
    out = torch.empty(shape, device=x.device, dtype=x.dtype if split_k == 1 else torch.float32)
    _launch_skinny(x, weight, bias, out, activation=activation, split_k=split_k, block_n=block_n, block_k=block_k,
                   num_warps=num_warps, num_stages=num_stages, pdl=pdl, norm=norm)
    return out


def skinny_linear_residual(x: torch.Tensor, weight: Weight, bias: torch.Tensor | None, residual: torch.Tensor,
                           counters: torch.Tensor, *, split_k: int = 1, block_n: int = 32, block_k: int = 128,
                           num_warps: int = 4, num_stages: int = 5,
                           pdl: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """residual [rows, N] + x @ weight^T (+ bias) -> (that sum [rows, N], its per-row block sums [rows, blocks, 2]
    for the next LayerNorm: `LayerNormIn.stats`), rounded as the eager ops round, in one kernel also with split_k > 1.

    counters: int32 zeros, one per output tile (blocks of N x tiles of rows), left zero again; kernels that run one
    after the other in a stream may share them."""
    rows, n = residual.shape
    blocks = triton.cdiv(n, block_n)
    if counters.dtype != torch.int32 or counters.numel() < blocks * triton.cdiv(rows, SKINNY_TILE_ROWS):
        raise ValueError(f"counters must be int32 with one per output tile ({blocks} x row tiles), "
                         f"got {counters.numel()} {counters.dtype}")
    out = torch.empty_like(residual)
    stats = torch.empty((rows, blocks, 2), device=x.device, dtype=torch.float32)
    partial = torch.empty((split_k, rows, n), device=x.device, dtype=torch.float32) if split_k > 1 else stats
    _launch_skinny(x, weight, bias, out, split_k=split_k, block_n=block_n, block_k=block_k, num_warps=num_warps,
                   num_stages=num_stages, pdl=pdl, norm=None, residual=(residual, partial, counters, stats))
    return out, stats


def _launch_skinny(x: torch.Tensor, weight: Weight, bias: torch.Tensor | None, out: torch.Tensor, *,
                   split_k: int, block_n: int, block_k: int, num_warps: int, num_stages: int, pdl: bool,
                   norm: LayerNormIn | None, activation: str = "none",
                   residual: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> None:
    rows, k = x.shape
    values, scale = weight if isinstance(weight, Int8Weight) else (weight, None)
    n = values.shape[0]
    if k % (split_k * block_k):
        raise ValueError(f"K={k} must be a multiple of split_k * block_k = {split_k} * {block_k}")
    block_m = min(SKINNY_TILE_ROWS, max(16, triton.next_power_of_2(rows)))
    # Each pipeline stage holds an x tile and a weight tile: as many stages as the GPU's shared memory takes (a 64-row
    # tile with 64-column blocks: 32 KiB a stage, 5 stages on an H200, 2 on a GPU of ~100 KiB), 8 KiB kept spare.
    stage_bytes = (block_m + block_n) * block_k * x.element_size()
    num_stages = max(1, min(num_stages, (_shared_memory_bytes(x.device) - 8192) // stage_bytes))
    grid = (triton.cdiv(n, block_n), split_k, triton.cdiv(rows, block_m))
    norm_blocks = 0 if norm is None else norm.stats.shape[1]
    stats_in, column_sums, eps = norm or (out, out, 0.0)  # unused without a norm
    residual_in, partial, counters, stats = residual or (out, out, out, out)  # unused outside the residual mode
    _skinny_linear_kernel[grid](x, values, scale if scale is not None else x, bias if bias is not None else x, out,
                                rows, n, k, k // split_k, stats_in, column_sums, eps, residual_in, partial, counters,
                                stats, SCALED=scale is not None, SPLIT_K=split_k, HAS_BIAS=bias is not None,
                                ACTIVATION=ACTIVATIONS[activation], IEEE=x.dtype == torch.float32, BLOCK_M=block_m,
                                BLOCK_N=block_n, BLOCK_K=block_k,
                                NORM_BLOCKS=norm_blocks, NORM_BLOCKS_POW2=triton.next_power_of_2(max(norm_blocks, 1)),
                                RESIDUAL=residual is not None, USE_PDL=pdl, num_warps=num_warps,
                                num_stages=num_stages, **_launch_options(pdl))


# ---------------------------------------------------------------------------------------------------------------------
# Decode attention (one query per row) with the KV-cache write


@triton.jit
def _decode_attention_kernel(qkv_ptr, k_cache_ptr, v_cache_ptr, positions_ptr, out_ptr, partial_ptr, stats_ptr,
                             heads, max_seq, hidden, scale,
                             SPLIT_KEYS: tl.constexpr, NUM_SPLITS: tl.constexpr, BLOCK_N: tl.constexpr,
                             HEAD_DIM: tl.constexpr, HALF_PRODUCTS: tl.constexpr, USE_PDL: tl.constexpr):
    # SPLIT_KEYS and NUM_SPLITS are compile-time (a new kv bucket compiles a variant once; Triton caches it on disk):
    # a runtime-valued variant measured slower at 64 rows on an H100 (3.40 vs 3.12 ms/step, separate runs).
    row_head, split = tl.program_id(0), tl.program_id(1)
    row = row_head // heads
    head = row_head % heads
    # Before the wait (the PDL note above): the cache addresses are ready when qkv is.
    pos = tl.load(positions_ptr + row)
    _wait_previous(USE_PDL)
    dims = tl.arange(0, HEAD_DIM)
    qkv_row = qkv_ptr + row * 3 * hidden + head * HEAD_DIM  # qkv [n, 3, heads, d]
    q = tl.load(qkv_row + dims).to(tl.float32) * scale
    cache_offset = row_head.to(tl.int64) * max_seq * HEAD_DIM  # cache [slots, heads, max_seq, d], slot = row
    k_base = k_cache_ptr + cache_offset
    v_base = v_cache_ptr + cache_offset
    start = split * SPLIT_KEYS
    end = tl.minimum(start + SPLIT_KEYS, pos + 1)
    if (pos >= start) & (pos < start + SPLIT_KEYS):  # exactly one program writes the step's K/V, rounded to the cache
        tl.store(k_base + pos * HEAD_DIM + dims, tl.load(qkv_row + hidden + dims).to(k_cache_ptr.dtype.element_ty))
        tl.store(v_base + pos * HEAD_DIM + dims, tl.load(qkv_row + 2 * hidden + dims).to(v_cache_ptr.dtype.element_ty))
    # The program's threads read that key back below: the barrier orders the write before every read. Selecting it
    # from qkv inside each tile instead cost ~400 instructions per 64-key block, a third of the kernel's; reading it
    # back: -6 to -20 % of the kernel with an fp8 cache, -2 to -9 % with fp16 (H200, bench/decode_attention_bench.py).
    tl.debug_barrier()
    running_max = -float("inf")
    running_sum = 0.0
    acc = tl.zeros([HEAD_DIM], dtype=tl.float32)
    for key0 in range(start, end, BLOCK_N):  # usually one block per program: no dependent loads in a chain
        keys = key0 + tl.arange(0, BLOCK_N)
        valid = keys < end
        offsets = keys[:, None] * HEAD_DIM + dims[None, :]
        k = tl.load(k_base + offsets, mask=valid[:, None], other=0.0)
        v = tl.load(v_base + offsets, mask=valid[:, None], other=0.0)  # issued before k is used
        if HALF_PRODUCTS:  # products and sums of one block in fp16 (two elements an instruction), see the launcher
            scores = tl.sum(k.to(tl.float16) * q.to(tl.float16)[None, :], axis=1).to(tl.float32)
        else:
            scores = tl.sum(k.to(tl.float32) * q[None, :], axis=1)
        scores = tl.where(valid, scores, -float("inf"))
        new_max = tl.maximum(running_max, tl.max(scores, axis=0))
        p = tl.exp(scores - new_max)
        rescale = tl.exp(running_max - new_max)
        if HALF_PRODUCTS:
            acc = acc * rescale + tl.sum(p.to(tl.float16)[:, None] * v.to(tl.float16), axis=0).to(tl.float32)
        else:
            acc = acc * rescale + tl.sum(p[:, None] * v.to(tl.float32), axis=0)
        running_sum = running_sum * rescale + tl.sum(p, axis=0)
        running_max = new_max
    if NUM_SPLITS == 1:
        tl.store(out_ptr + row * hidden + head * HEAD_DIM + dims, (acc / running_sum).to(out_ptr.dtype.element_ty))
    else:  # unnormalised partials; a split past the row's position leaves (max=-inf, sum=0, acc=0)
        slot = row_head * NUM_SPLITS + split
        tl.store(partial_ptr + slot * HEAD_DIM + dims, acc)
        tl.store(stats_ptr + slot * 2, running_max)
        tl.store(stats_ptr + slot * 2 + 1, running_sum)


@triton.jit
def _combine_splits_kernel(partial_ptr, stats_ptr, out_ptr, heads, hidden,
                           NUM_SPLITS: tl.constexpr, SPLITS_POW2: tl.constexpr, HEAD_DIM: tl.constexpr,
                           USE_PDL: tl.constexpr):
    _wait_previous(USE_PDL)
    row_head = tl.program_id(0)
    row = row_head // heads
    head = row_head % heads
    splits = tl.arange(0, SPLITS_POW2)
    used = splits < NUM_SPLITS
    base = row_head * NUM_SPLITS + splits
    maxes = tl.load(stats_ptr + base * 2, mask=used, other=-float("inf"))
    sums = tl.load(stats_ptr + base * 2 + 1, mask=used, other=0.0)
    top = tl.max(maxes, axis=0)  # finite: split 0 always holds key 0 <= position
    weights = tl.where(used, tl.exp(maxes - top), 0.0)
    dims = tl.arange(0, HEAD_DIM)
    partial = tl.load(partial_ptr + base[:, None] * HEAD_DIM + dims[None, :], mask=used[:, None], other=0.0)
    out = tl.sum(weights[:, None] * partial, axis=0) / tl.sum(weights * sums, axis=0)
    tl.store(out_ptr + row * hidden + head * HEAD_DIM + dims, out.to(out_ptr.dtype.element_ty))


# From this many rows over a kv bucket past 256 keys, a decode step's attention runs as the prefill kernel's chunk
# of one query (tensor cores; its loads pipelined through shared memory), launched as TENSOR_CORE_LAUNCH. On an H200
# (bench/decode_attention_bench.py, and the decode step in bench/profile_decode.py) at 64 rows over 640-703 keys: the
# kernel alone -12 % (fp16 cache) and -10 % (fp8), the step 3.80 -> 3.45 ms and 3.02 -> 2.87 ms. Over 128-191 keys
# (bucket 256) it was slower at 64 and 256 rows: the kernel +14 % (fp16) and +36-41 % (fp8), the step +5 to +20 %.
# Buckets between 256 and 768 keys were not measured apart.
TENSOR_CORE_MIN_ROWS = 17
TENSOR_CORE_MIN_KEYS = 257
TENSOR_CORE_LAUNCH = (16, 64, 4, 3)  # (queries per program: tl.dot's minimum, keys per block, warps, stages)


# With an fp8 cache, from this many rows the one-query kernel runs one warp per (row, head) at every kv bucket: 64-key
# blocks up to 64 rows, 32-key blocks past that (in place of two warps, and of the tensor-core path at long keys). One
# warp sums the values without the two warps' exchange through shared memory (2 barriers per program instead of 12)
# and spends ~20 % fewer instructions per key (sm_90 SASS). On an H200 (bench/decode_attention_bench.py, us a layer):
# 256 rows over 128-255 keys 67.5 -> 58.1 (64-key blocks: 60.2), 64 rows 22.9 -> 20.4 (32-key blocks: 21.8), 64 rows
# over 16-1535 keys 85.7 on tensor cores -> 69.1; at 1 and 8 rows one warp lost by 48-118 %. 256 streams through the
# server, fp8 cache, same host: 47.8k -> 49.6k tok/s. 32 rows gained 9 % too (measured after the final serving run,
# which used this bound). With an fp16 cache one warp gained at most 5 % (64 rows, short keys) and lost at long keys
# (14-21 %) and at few rows: unchanged there.
ONE_WARP_MIN_ROWS = 33


def one_warp_attention(rows: int, cache_dtype: torch.dtype) -> bool:
    """Whether `decode_attention` runs the one-query kernel with one warp per (row, head), see above."""
    return cache_dtype == torch.float8_e4m3fn and rows >= ONE_WARP_MIN_ROWS


def tensor_core_attention(rows: int, kv_len: int, dtype: torch.dtype, cache_dtype: torch.dtype) -> bool:
    """Whether `decode_attention` runs the tensor-core kernel (not for fp32 models: tl.dot would round to tf32)."""
    return (rows >= TENSOR_CORE_MIN_ROWS and kv_len >= TENSOR_CORE_MIN_KEYS and dtype != torch.float32
            and not one_warp_attention(rows, cache_dtype))


ATTENTION_LAUNCH_VARIABLE = "GPT_TRITON_ATTENTION_LAUNCH"


def _launch_from_environment() -> tuple[int, int, int] | None:
    """GPT_TRITON_ATTENTION_LAUNCH's "keys per block,blocks per program,warps", which `attention_launch` returns in
    place of its own choice: A/B runs of a whole server (its stubs and engine process inherit the variable)."""
    text = os.environ.get(ATTENTION_LAUNCH_VARIABLE, "")
    if not text:
        return None
    values = text.split(",")
    launch = tuple(int(value) for value in values if value.isdigit() and int(value) > 0)
    if len(values) != 3 or len(launch) != 3 or any(n & (n - 1) for n in (launch[0], launch[2])):
        raise ValueError(f"{ATTENTION_LAUNCH_VARIABLE} must be 'KEYS,BLOCKS,WARPS' (positive whole numbers; KEYS and "
                         f"WARPS powers of two), got {text!r}")
    return launch[0], launch[1], launch[2]


ATTENTION_LAUNCH_OVERRIDE = _launch_from_environment()


def attention_launch(rows: int, heads: int, kv_len: int, sms: int,
                     cache_dtype: torch.dtype = torch.float16) -> tuple[int, int, int]:
    """(keys per block, blocks per program, warps) for `decode_attention` (many rows over an fp8 cache:
    `one_warp_attention`; GPT_TRITON_ATTENTION_LAUNCH, when set, wins over every rule here).

    From bench/profile_decode.py --tune on an H200 (16 heads x 128, ragged positions): 64-key blocks with 2 warps
    won at every shape from 1 x 256 to 256 x 1024 keys (1.3-1.7x faster than the 8-warp default it replaced, and
    faster than cuDNN's SDPA where that had won). A bucket of <= 256 keys runs as one split (no combine kernel);
    longer ones take 1-4 blocks per program, as many as still leave ~4096 programs (rows 16 x 1024 keys: 1 block;
    64 x 1024: 4).
    Timed inside the decode step's CUDA graph (--attention-sweep, where a kernel's Python launch does not count),
    a bucket of <= 256 keys at <= 8 rows runs faster as one 256-key block with 8 warps per (row, head): all its keys'
    loads in flight at once, for the few programs there are (-5 to -6 % of the step at 1-8 rows and 128-192 keys;
    +2.6 % at 16 rows; longer keys split over 64-key programs and kept the default)."""
    del sms  # the shapes above were all best at the same block and warp count, whatever the grid's size
    if ATTENTION_LAUNCH_OVERRIDE is not None:
        return ATTENTION_LAUNCH_OVERRIDE
    if one_warp_attention(rows, cache_dtype):
        return (64, 4, 1) if rows <= 64 else (32, 8, 1)
    blocks = -(-kv_len // 64)
    if blocks <= 4:
        return (256, 1, 8) if rows <= 8 else (64, 4, 2)
    return 64, max(1, min(4, rows * heads * blocks // 4096)), 2


def half_products(qkv_dtype: torch.dtype, cache_dtype: torch.dtype) -> bool:
    """Whether the one-query decode attention multiplies and sums each block's keys and values in fp16: with an fp8
    cache of an fp16 model (the K/V carry 3 mantissa bits; fp16's 10 round far below that), not with an fp16 cache
    (kept as exact as the eager ops) or a bf16/fp32 model (fp16's range could overflow). Widening every fp8 element
    to fp32 costs ~250 more sm_90 instructions per 64-key block (1,408 against 1,160). On an H200
    (bench/decode_attention_bench.py, 128-191 keys, us a layer): 256 rows 71.6 -> 61.3, 64 rows 20.8 -> 18.8, 8 rows
    7.1 -> 6.0; teacher-forced next tokens against the eager ops unchanged (0.995). With an fp16 cache, fp16 products
    ran 6-30 % slower."""
    return qkv_dtype == torch.float16 and cache_dtype == torch.float8_e4m3fn


def decode_attention(qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, positions: torch.Tensor,
                     kv_len: int, *, launch: tuple[int, int, int] | None = None, pdl: bool = False,
                     products: str = "auto") -> torch.Tensor:
    """qkv [n, 3 * H] (q | k | v, heads x d each), caches [slots, heads, max_seq, d], positions [n] < kv_len
    -> attention output [n, H]; also writes this step's k, v at (slot i, positions[i]) for each row i.

    Row i attends to its keys 0..positions[i] (causal over its own sequence), as the eager masked SDPA does; splits
    past a row's position exit at once, so a row reads only its own keys, not the whole kv bucket. The step's key and
    value are rounded to the cache's dtype as they are written, and read back from there like every other key.
    Many rows over a bucket past 256 keys (`tensor_core_attention`) run `prefill_attention` as a chunk of one query.
    launch: (keys per block, blocks per program, warps) of the one-query kernel, default `attention_launch`'s choice
    (benchmarks vary it; given, it is always that kernel). products: "auto" (`half_products`), or "f16" / "f32" to
    force the one-query kernel's arithmetic (benchmarks)."""
    if products not in ("auto", "f16", "f32"):
        raise ValueError(f"products must be auto, f16 or f32, got {products!r}")
    rows = qkv.shape[0]
    if launch is None and tensor_core_attention(rows, kv_len, qkv.dtype, k_cache.dtype):  # one query at its position
        return prefill_attention(qkv.view(rows, 1, -1), k_cache, v_cache, None, positions, pdl=pdl,
                                 launch=TENSOR_CORE_LAUNCH).view(rows, -1)  # [n, 1, 3H] -> [n, H]
    _, heads, max_seq, head_dim = k_cache.shape
    hidden = heads * head_dim
    block_n, blocks_per_split, num_warps = launch or attention_launch(rows, heads, kv_len,
                                                                      _multiprocessors(qkv.device), k_cache.dtype)
    split_keys = block_n * max(blocks_per_split, triton.cdiv(kv_len, 64 * block_n))  # at most 64 splits
    splits = triton.cdiv(kv_len, split_keys)
    out = torch.empty((rows, hidden), device=qkv.device, dtype=qkv.dtype)
    if splits > 1:
        partial = torch.empty((rows * heads * splits, head_dim), device=qkv.device, dtype=torch.float32)
        stats = torch.empty((rows * heads * splits, 2), device=qkv.device, dtype=torch.float32)
    else:
        partial = stats = out  # unused
    _decode_attention_kernel[(rows * heads, splits)](
        qkv, k_cache, v_cache, positions, out, partial, stats, heads, max_seq, hidden, 1.0 / math.sqrt(head_dim),
        SPLIT_KEYS=split_keys, NUM_SPLITS=splits, BLOCK_N=block_n, HEAD_DIM=head_dim, USE_PDL=pdl,
        HALF_PRODUCTS=products == "f16" or (products == "auto" and half_products(qkv.dtype, k_cache.dtype)),
        num_warps=num_warps, **_launch_options(pdl))
    if splits > 1:
        _combine_splits_kernel[(rows * heads,)](partial, stats, out, heads, hidden, NUM_SPLITS=splits,
                                                SPLITS_POW2=triton.next_power_of_2(splits), HEAD_DIM=head_dim,
                                                USE_PDL=pdl, num_warps=4, **_launch_options(pdl))
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Prefill attention (a chunk of T queries per row) with the chunk's KV-cache write


@triton.jit
def _prefill_attention_kernel(qkv_ptr, k_cache_ptr, v_cache_ptr, slots_ptr, starts_ptr, out_ptr,
                              width, heads, max_seq, hidden, scale_log2,
                              HAS_STARTS: tl.constexpr, HAS_SLOTS: tl.constexpr, BLOCK_M: tl.constexpr,
                              BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, USE_PDL: tl.constexpr):
    _wait_previous(USE_PDL)
    block_m, row_head = tl.program_id(0), tl.program_id(1)
    row = row_head // heads
    head = row_head % heads
    if HAS_SLOTS:
        slot = tl.load(slots_ptr + row).to(tl.int64)
    else:  # row i is slot i (a decode step)
        slot = row.to(tl.int64)
    if HAS_STARTS:
        start = tl.load(starts_ptr + row)
    else:
        start = 0
    t = block_m * BLOCK_M + tl.arange(0, BLOCK_M)  # this program's queries: chunk positions
    in_chunk = t < width
    dims = tl.arange(0, HEAD_DIM)
    row_qkv = qkv_ptr + row.to(tl.int64) * width * 3 * hidden + head * HEAD_DIM  # qkv [n, T, 3, heads, d]
    own = row_qkv + t[:, None] * (3 * hidden) + dims[None, :]
    q = tl.load(own, mask=in_chunk[:, None], other=0.0)
    cache = (slot * heads + head) * max_seq * HEAD_DIM  # cache [slots, heads, max_seq, d]
    write = (in_chunk & (start + t < max_seq))[:, None]  # padding past the cache is not kept (decode never reads it)
    cache_type = k_cache_ptr.dtype.element_ty
    tl.store(k_cache_ptr + cache + (start + t)[:, None] * HEAD_DIM + dims[None, :],
             tl.load(own + hidden, mask=in_chunk[:, None], other=0.0).to(cache_type), mask=write)
    tl.store(v_cache_ptr + cache + (start + t)[:, None] * HEAD_DIM + dims[None, :],
             tl.load(own + 2 * hidden, mask=in_chunk[:, None], other=0.0).to(cache_type), mask=write)
    running_max = tl.full([BLOCK_M], -float("inf"), dtype=tl.float32)
    running_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    # Keys cached before the chunk (positions < start): every query of the chunk sees all of them.
    for key0 in range(0, start, BLOCK_N):
        keys = key0 + tl.arange(0, BLOCK_N)
        valid = keys < start
        offsets = cache + keys[:, None] * HEAD_DIM + dims[None, :]
        k = tl.load(k_cache_ptr + offsets, mask=valid[:, None], other=0.0).to(q.dtype)
        v = tl.load(v_cache_ptr + offsets, mask=valid[:, None], other=0.0).to(q.dtype)
        acc, running_max, running_sum = _attend_block(q, k, v, valid[None, :], acc, running_max, running_sum,
                                                      scale_log2)
    # The chunk's own keys, causally; read from qkv, not the cache (other programs' writes need not be visible yet).
    for key0 in range(0, tl.minimum((block_m + 1) * BLOCK_M, width), BLOCK_N):
        keys = key0 + tl.arange(0, BLOCK_N)
        theirs = row_qkv + keys[:, None] * (3 * hidden) + dims[None, :]
        k = tl.load(theirs + hidden, mask=(keys < width)[:, None], other=0.0).to(cache_type).to(q.dtype)
        v = tl.load(theirs + 2 * hidden, mask=(keys < width)[:, None], other=0.0).to(cache_type).to(q.dtype)
        seen = (keys[None, :] <= t[:, None]) & (keys < width)[None, :]  # key 0 always: no row is all -inf
        acc, running_max, running_sum = _attend_block(q, k, v, seen, acc, running_max, running_sum, scale_log2)
    out = out_ptr + row.to(tl.int64) * width * hidden + t[:, None] * hidden + head * HEAD_DIM + dims[None, :]
    tl.store(out, (acc / running_sum[:, None]).to(out_ptr.dtype.element_ty), mask=in_chunk[:, None])


@triton.jit
def _attend_block(q, k, v, seen, acc, running_max, running_sum, scale_log2):
    """One block of keys into the online softmax (base 2: scale_log2 = log2(e) / sqrt(d))."""
    if q.dtype == tl.float32:  # fp32 models: exact products (tl.dot would round its inputs to tf32)
        scores = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        scores = tl.dot(q, tl.trans(k))
    scores = tl.where(seen, scores * scale_log2, -float("inf"))
    new_max = tl.maximum(running_max, tl.max(scores, axis=1))
    p = tl.exp2(scores - new_max[:, None])
    rescale = tl.exp2(running_max - new_max)
    if q.dtype == tl.float32:
        acc = acc * rescale[:, None] + tl.dot(p, v, input_precision="ieee")
    else:
        acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, new_max, running_sum * rescale + tl.sum(p, axis=1)


def prefill_attention(qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor | None,
                      starts: torch.Tensor | None = None, *,
                      launch: tuple[int, int, int, int] | None = None, pdl: bool = False) -> torch.Tensor:
    """qkv [n, T, 3 * H] (q | k | v, heads x d each) of n right-padded rows, caches [slots, heads, max_seq, d],
    slots [n] (None: row i is slot i) -> attention output [n, T, H]; also writes each row's chunk K/V at cache
    (slots[i], starts[i] + t). pdl: launched as a programmatic dependent (inside the decode step's graphs).

    Query t of row i attends causally to the chunk's keys 0..t and, with `starts` [n], to the keys the slot caches
    already (positions < starts[i]): the eager path's masked SDPA over the cache, without gathering the cache or
    copying K/V out of qkv. Positions past the cache (padding only) are not written. All on the device: capturable.
    launch: (queries per program, keys per block, warps, stages); benchmarks vary it."""
    n, width, _ = qkv.shape
    _, heads, max_seq, head_dim = k_cache.shape
    hidden = heads * head_dim
    block = 64 if qkv.dtype != torch.float32 or head_dim <= 64 else 32  # fp32 x 128: fewer registers
    # Three pipeline stages, not two: on an H200 (bench/profile_prefill.py --attention-launches, in CUDA graphs)
    # 3-14 % off a chunk's pass over cached keys (1 x 128 at 1536: 2.41 -> 2.08 ms), 0-2 % off whole prompts.
    block_m, block_n, num_warps, num_stages = launch or (block, block, 4, 3)
    out = torch.empty((n, width, hidden), device=qkv.device, dtype=qkv.dtype)
    _prefill_attention_kernel[(triton.cdiv(width, block_m), n * heads)](
        qkv, k_cache, v_cache, out if slots is None else slots, out if starts is None else starts, out, width, heads,
        max_seq, hidden, math.log2(math.e) / math.sqrt(head_dim), HAS_STARTS=starts is not None,
        HAS_SLOTS=slots is not None, BLOCK_M=block_m, BLOCK_N=block_n, HEAD_DIM=head_dim, USE_PDL=pdl,
        num_warps=num_warps, num_stages=num_stages, **_launch_options(pdl))
    return out
