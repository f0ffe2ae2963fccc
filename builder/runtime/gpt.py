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
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .model_config import GptModelConfig


class WeightError(ValueError):
    """A canonical weight dict that does not match the model config."""


@dataclass
class _Layer:
    ln1_weight: torch.Tensor
    ln1_bias: torch.Tensor
    qkv_weight: torch.Tensor  # [3H, H] (nn.Linear layout: out, in); out = q heads | k heads | v heads
    qkv_bias: torch.Tensor  # [3H]
    attn_out_weight: torch.Tensor  # [H, H]
    attn_out_bias: torch.Tensor
    ln2_weight: torch.Tensor
    ln2_bias: torch.Tensor
    fc1_weight: torch.Tensor  # [F, H]
    fc1_bias: torch.Tensor
    fc2_weight: torch.Tensor  # [H, F]
    fc2_bias: torch.Tensor


def expected_shapes(config: GptModelConfig) -> dict[str, tuple[int, ...]]:
    """The canonical weight names and shapes a config implies (lm_head excluded: optional)."""
    h, f, v = config.hidden_size, config.inter_size, config.vocab_size
    shapes = {"model.wte": (v, h), "model.wpe": (config.max_pos_seq_len, h),
              "model.final_layernorm.weight": (h,), "model.final_layernorm.bias": (h,)}
    for i in range(config.num_layer):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (h,), p + "input_layernorm.bias": (h,),
            p + "attention.query_key_value.weight": (h, 3, h), p + "attention.query_key_value.bias": (3, h),
            p + "attention.dense.weight": (h, h), p + "attention.dense.bias": (h,),
            p + "post_attention_layernorm.weight": (h,), p + "post_attention_layernorm.bias": (h,),
            p + "mlp.dense_h_to_4h.weight": (h, f), p + "mlp.dense_h_to_4h.bias": (f,),
            p + "mlp.dense_4h_to_h.weight": (f, h), p + "mlp.dense_4h_to_h.bias": (h,),
        })
    return shapes


def check_weights(config: GptModelConfig, weights: dict[str, torch.Tensor]) -> None:
    """Raise WeightError listing every missing or mis-shaped tensor."""
    problems = []
    expected = expected_shapes(config)
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


class GptModel:
    def __init__(self, config: GptModelConfig, weights: dict[str, torch.Tensor], *, device: torch.device,
                 dtype: torch.dtype) -> None:
        """Loads the weights; call `allocate_cache` before running anything."""
        check_weights(config, weights)
        self.config = config
        self.device, self.dtype = device, dtype
        self.slots, self.max_seq_len = 0, 0
        self.heads, self.head_dim, self.hidden = config.head_num, config.size_per_head, config.hidden_size

        def load(name: str) -> torch.Tensor:
            return weights[name].to(device=device, dtype=dtype)

        def linear(name: str) -> torch.Tensor:  # canonical [in, out] -> nn.Linear [out, in], contiguous for GEMMs
            return load(name).reshape(weights[name].shape[0], -1).t().contiguous()

        h = self.hidden
        self.wte = load("model.wte")
        self.wpe = load("model.wpe")
        self.lm_head = load("model.lm_head.weight") if "model.lm_head.weight" in weights else self.wte
        self.final_ln = (load("model.final_layernorm.weight"), load("model.final_layernorm.bias"))
        self.layers: list[_Layer] = []
        for i in range(config.num_layer):
            p = f"model.layers.{i}."
            self.layers.append(_Layer(
                ln1_weight=load(p + "input_layernorm.weight"), ln1_bias=load(p + "input_layernorm.bias"),
                qkv_weight=linear(p + "attention.query_key_value.weight"),  # [H, 3, H] -> [H, 3H] -> [3H, H]
                qkv_bias=load(p + "attention.query_key_value.bias").reshape(3 * h),
                attn_out_weight=linear(p + "attention.dense.weight"), attn_out_bias=load(p + "attention.dense.bias"),
                ln2_weight=load(p + "post_attention_layernorm.weight"),
                ln2_bias=load(p + "post_attention_layernorm.bias"),
                fc1_weight=linear(p + "mlp.dense_h_to_4h.weight"), fc1_bias=load(p + "mlp.dense_h_to_4h.bias"),
                fc2_weight=linear(p + "mlp.dense_4h_to_h.weight"), fc2_bias=load(p + "mlp.dense_4h_to_h.bias"),
            ))
        self.k_cache: list[torch.Tensor] = []
        self.v_cache: list[torch.Tensor] = []
        self._activation = ((lambda x: F.gelu(x, approximate="tanh")) if config.activation_type == "Gelu"
                            else F.relu)

    def allocate_cache(self, slots: int, max_seq_len: int) -> None:
        if not 1 <= max_seq_len <= self.config.max_pos_seq_len:
            raise ValueError(f"max_seq_len must be in [1, max_pos_seq_len={self.config.max_pos_seq_len}], "
                             f"got {max_seq_len}")
        self.k_cache, self.v_cache = [], []  # free the old cache first
        shape = (slots, self.heads, max_seq_len, self.head_dim)
        self.k_cache = [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in self.layers]
        self.v_cache = [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in self.layers]
        self.slots, self.max_seq_len = slots, max_seq_len

    @staticmethod
    def kv_cache_bytes(config: GptModelConfig, slots: int, max_seq_len: int, dtype: torch.dtype) -> int:
        itemsize = torch.empty((), dtype=dtype).element_size()
        return slots * max_seq_len * config.kv_cache_bytes_per_token(itemsize)

    def _layer_norm(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (self.hidden,), weight, bias, self.config.layernorm_eps)

    def _mlp(self, layer: _Layer, x: torch.Tensor) -> torch.Tensor:
        h = self._layer_norm(x, layer.ln2_weight, layer.ln2_bias)
        return F.linear(self._activation(F.linear(h, layer.fc1_weight, layer.fc1_bias)), layer.fc2_weight,
                        layer.fc2_bias)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self._layer_norm(x, *self.final_ln), self.lm_head)

    def prefill(self, tokens: torch.Tensor, lengths: torch.Tensor, first_slot: int = 0) -> torch.Tensor:
        """tokens [n, T] right-padded, lengths [n] -> logits [n, V] at each row's last prompt token.

        Writes K/V of positions 0..T-1 into cache slots first_slot..first_slot+n-1 (padding positions too; decode
        overwrites them).
        """
        n, t = tokens.shape
        positions = torch.arange(t, device=self.device)
        x = F.embedding(tokens, self.wte) + F.embedding(positions, self.wpe)  # [n, T, H]
        for i, layer in enumerate(self.layers):
            h = self._layer_norm(x, layer.ln1_weight, layer.ln1_bias)
            qkv = F.linear(h, layer.qkv_weight, layer.qkv_bias).view(n, t, 3, self.heads, self.head_dim)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [n, heads, T, d]
            self.k_cache[i][first_slot:first_slot + n, :, :t] = k
            self.v_cache[i][first_slot:first_slot + n, :, :t] = v
            # Plain causal attention is exact for right padding: a real token never sees a later (padding)
            # position, and decode overwrites padding K/V before any query can reach it.
            attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [n, heads, T, d]
            x = x + F.linear(attn.transpose(1, 2).reshape(n, t, self.hidden), layer.attn_out_weight,
                             layer.attn_out_bias)
            x = x + self._mlp(layer, x)
        last = x[torch.arange(n, device=self.device), lengths - 1]  # [n, H]
        return self._logits(last)

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, kv_len: int) -> torch.Tensor:
        """tokens [n], positions [n] (each row's own position) -> logits [n, V]; attends to cache[:, :, :kv_len].

        Needs every position < kv_len <= max_seq_len. No host sync: capturable in a CUDA graph.
        """
        n = tokens.shape[0]
        x = F.embedding(tokens, self.wte) + F.embedding(positions, self.wpe)  # [n, H]
        key_pos = torch.arange(kv_len, device=self.device)
        mask = (key_pos[None, :] <= positions[:, None]).view(n, 1, 1, kv_len)
        # Flat row index of (slot b, head h, position pos_b) in a cache viewed as [slots * heads * max_seq, d].
        head_rows = torch.arange(n, device=self.device)[:, None] * self.heads + torch.arange(
            self.heads, device=self.device)[None, :]  # [n, heads]
        write_rows = (head_rows * self.max_seq_len + positions[:, None]).reshape(-1)  # [n * heads]
        for i, layer in enumerate(self.layers):
            h = self._layer_norm(x, layer.ln1_weight, layer.ln1_bias)
            qkv = F.linear(h, layer.qkv_weight, layer.qkv_bias).view(n, 3, self.heads, self.head_dim)
            q, k, v = qkv.unbind(1)  # each [n, heads, d]
            k_cache, v_cache = self.k_cache[i], self.v_cache[i]
            k_cache.view(-1, self.head_dim).index_copy_(0, write_rows, k.reshape(-1, self.head_dim))
            v_cache.view(-1, self.head_dim).index_copy_(0, write_rows, v.reshape(-1, self.head_dim))
            attn = F.scaled_dot_product_attention(q[:, :, None], k_cache[:n, :, :kv_len], v_cache[:n, :, :kv_len],
                                                  attn_mask=mask)  # [n, heads, 1, d]
            x = x + F.linear(attn.reshape(n, self.hidden), layer.attn_out_weight, layer.attn_out_bias)
            x = x + self._mlp(layer, x)
        return self._logits(x)

    def copy_slots(self, sources: torch.Tensor, length: int) -> None:
        """Cache slot i <- slot sources[i] (positions < length), for i < len(sources): beam expansion/reordering."""
        m = sources.shape[0]
        for cache in (*self.k_cache, *self.v_cache):
            cache[:m, :, :length] = cache[:, :, :length].index_select(0, sources)  # a copy: safe to overlap


# ---------------------------------------------------------------------------------------------------------------------
# CUDA graphs of the decode step (CUDA only). One graph per (batch bucket, kv-length bucket), captured the first time
# that shape is needed: the capturing call's warm-up run IS the real step (same inputs, same cache writes), so no
# decode is ever run on made-up inputs. Padding rows of a bucket decode token 0 at position 0 into their own (unused)
# cache slots. All graphs share one memory pool; they never run concurrently and each result is consumed (by stream
# order) before the next replay.


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
