"""GptModel invariants the CUDA-graph decode path relies on (checked on CPU), and weight checks."""

from __future__ import annotations

import pytest
import torch

from builder.runtime.generation import GptEngine
from builder.runtime.gpt import DecodeKernels, WeightError, batch_buckets, check_weights
from engine_testing import TinyGpt


@torch.inference_mode()
def test_padding_rows_and_a_longer_kv_window_leave_real_rows_unchanged(tiny: TinyGpt) -> None:
    """DecodeGraphs pads the batch to a bucket (token 0 at position 0 in spare slots) and rounds kv_len up."""
    model = GptEngine.from_ft_dir(tiny.ft_dir, max_batch_size=8).model
    tokens = torch.tensor([[5, 6, 7, 8, 9], [10, 11, 0, 0, 0]])
    lengths = torch.tensor([5, 2])
    model.prefill(tokens, lengths)
    saved = [c.clone() for c in model.k_cache + model.v_cache]
    step_tokens, positions = torch.tensor([3, 4]), lengths  # next token of each row at its own position
    exact = model.decode(step_tokens, positions, kv_len=6)
    for cache, copy in zip(model.k_cache + model.v_cache, saved):
        cache.copy_(copy)
    padded = model.decode(torch.tensor([3, 4, 0, 0]), torch.tensor([5, 2, 0, 0]), kv_len=model.max_seq_len)
    torch.testing.assert_close(padded[:2], exact, rtol=1e-5, atol=1e-5)
    # and the ragged decode equals a fresh prefill of the longer sequences
    full = model.prefill(torch.tensor([[5, 6, 7, 8, 9, 3], [10, 11, 4, 0, 0, 0]]), torch.tensor([6, 3]))
    torch.testing.assert_close(exact, full, rtol=1e-4, atol=1e-4)


def test_batch_buckets() -> None:
    assert batch_buckets(64) == [1, 2, 4, 8, 16, 32, 64]
    assert batch_buckets(48) == [1, 2, 4, 8, 16, 32, 48]
    assert batch_buckets(1) == [1]


def test_weight_check_names_every_problem(tiny: TinyGpt) -> None:
    engine = GptEngine.from_ft_dir(tiny.ft_dir, max_batch_size=1)
    config = engine.config
    weights = {"model.wte": torch.zeros(config.vocab_size, config.hidden_size),
               "model.wpe": torch.zeros(7, config.hidden_size)}
    with pytest.raises(WeightError) as info:
        check_weights(config, weights)
    message = str(info.value)
    assert "model.wpe: shape [7, 64], expected [128, 64]" in message
    assert "model.layers.1.mlp.dense_4h_to_h.bias: missing" in message
    assert "model.wte" not in message
    itemsize = torch.empty((), dtype=engine.model.dtype).element_size()
    assert engine.model.slot_bytes(10) == 10 * 2 * config.num_layer * 64 * itemsize


def test_cpu_decode_uses_the_eager_ops_only(tiny: TinyGpt) -> None:
    """The fused kernels are CUDA-only; on CPU every op must stay the eager one (fp32 results equal HF's)."""
    model = GptEngine.from_ft_dir(tiny.ft_dir, max_batch_size=1).model
    assert model.kernels == DecodeKernels()
    assert DecodeKernels.for_model(model.config, torch.device("cpu"), torch.float16) == DecodeKernels()
