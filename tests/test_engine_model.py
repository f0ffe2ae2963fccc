"""GptModel invariants the CUDA-graph decode path relies on (checked on CPU), weight checks, and the fp8 KV cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from builder.runtime.generation import GptEngine
from builder.runtime.gpt import DecodeKernels, GptModel, WeightError, batch_buckets, check_weights
from builder.runtime.model_config import GptModelConfig
from engine_testing import TinyGpt, random_weights, rendered_core_args


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


@torch.inference_mode()
def test_layer_norms_folded_into_the_weights_compute_the_same_function() -> None:
    """`GptModel.fold_norms` (on CUDA for DecodeKernels.norm_in_gemv) moves each layer's LayerNorm gains and biases
    into QKV and FC1: the prefill's and the decode steps' logits equal the unfolded model's (fp32, eager ops), the
    norms are left as gain 1 and bias 0, the column sums are the folded weights' row sums, and the weights the model
    was given are untouched."""
    config = GptModelConfig(head_num=4, size_per_head=16, inter_size=256, num_layer=2, vocab_size=300,
                            max_pos_seq_len=32, start_id=0, end_id=0, weight_data_type="fp32")
    generator = torch.Generator().manual_seed(3)
    weights = random_weights(config, generator)
    given = {name: tensor.clone() for name, tensor in weights.items()}
    plain = GptModel(config, weights, device=torch.device("cpu"), dtype=torch.float32)
    folded = GptModel(config, weights, device=torch.device("cpu"), dtype=torch.float32)
    folded.fold_norms()
    assert folded.norms_folded and not plain.norms_folded
    for layer in folded.layers:
        assert torch.equal(layer.ln1_weight, torch.ones(64)) and torch.equal(layer.ln2_bias, torch.zeros(64))
        assert layer.fc1_column_sums is not None
        torch.testing.assert_close(layer.fc1_column_sums, layer.fc1_weight.sum(1))
    assert all(torch.equal(weights[name], given[name]) for name in given)
    tokens = torch.randint(1, 300, (3, 6), generator=generator)
    lengths = torch.tensor([6, 2, 4])
    runs = []
    for model in (plain, folded):
        model.allocate_cache(3, 32)
        logits = [model.prefill(tokens, lengths)]
        positions = lengths.clone()
        for step in range(3):  # the plain model's greedy tokens for both
            logits.append(model.decode((runs[0] if runs else logits)[step].argmax(-1), positions, kv_len=32))
            positions += 1
        runs.append(logits)
    for got, want in zip(runs[1], runs[0]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@torch.inference_mode()
def test_fp8_kv_cache_rounds_every_key_once(tiny: TinyGpt) -> None:
    """kv_cache_dtype fp8 (the eager ops, as on CPU): a quarter of the fp32 cache's bytes; a row's logits do not
    depend on whether its keys came from the cache or from the pass that wrote them (decode, whole prompt, chunks:
    each rounds the keys the same way); and they differ from the fp32 cache's by the rounding only."""
    exact = GptEngine.from_ft_dir(tiny.ft_dir, max_batch_size=4).model
    model = GptEngine.from_ft_dir(tiny.ft_dir, max_batch_size=4, kv_cache_dtype="fp8").model
    assert {c.dtype for c in model.k_cache + model.v_cache} == {torch.float8_e4m3fn}
    assert model.cache_bytes * 4 == exact.cache_bytes and model.slot_bytes(10) * 4 == exact.slot_bytes(10)
    tokens = torch.tensor([[5, 6, 7, 8, 9], [10, 11, 0, 0, 0]])
    lengths = torch.tensor([5, 2])
    first = model.prefill(tokens, lengths)
    step = model.decode(torch.tensor([3, 4]), lengths, kv_len=6)
    longer = torch.tensor([[5, 6, 7, 8, 9, 3], [10, 11, 4, 0, 0, 0]])
    torch.testing.assert_close(step, model.prefill(longer, lengths + 1), rtol=1e-5, atol=1e-5)
    model.prefill(tokens[:, :2], torch.tensor([2, 2]))  # the same prompts as a chunk of 2, then the rest
    chunked = model.prefill(longer[:, 2:], lengths - 1, starts=torch.tensor([2, 2]), kv_len=6)
    torch.testing.assert_close(chunked, step, rtol=1e-5, atol=1e-5)
    drift = (first - exact.prefill(tokens, lengths)).abs().max().item()
    assert 0 < drift < 0.05 * first.std().item()
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of auto, fp8"):
        GptEngine.from_ft_dir(tiny.ft_dir, max_batch_size=1, kv_cache_dtype="int4")


@torch.inference_mode()
def test_slot_copies_move_fp8_cache_bytes_exactly(tiny: TinyGpt) -> None:
    model = GptEngine.from_ft_dir(tiny.ft_dir, max_batch_size=3, kv_cache_dtype="fp8").model
    model.prefill(torch.tensor([[5, 6, 7], [8, 9, 10], [11, 12, 13]]), torch.tensor([3, 3, 3]))
    before = [c.view(torch.uint8).clone() for c in model.k_cache + model.v_cache]
    model.copy_slots(torch.tensor([2, 0]), length=3)
    for cache, old in zip(model.k_cache + model.v_cache, before):
        assert torch.equal(cache.view(torch.uint8)[0], old[2]) and torch.equal(cache.view(torch.uint8)[1], old[0])


def test_the_kv_cache_dtype_goes_from_render_to_the_loaded_engine(tiny: TinyGpt, tmp_path: Path) -> None:
    """render --kv-cache-dtype fp8 -> the core's config.pbtxt -> CoreSettings (as tritonserver hands the config to
    model.py) -> an engine with an fp8 cache; a bad value is refused by name at each step. The model's load line
    says what it got (and, where GPT_TRITON_ONE_LAUNCH=1 took effect, that batch-1 steps run in one launch)."""
    from builder.render_config import RenderConfig, RenderError
    from builder.runtime.core_adapter import CoreSettings
    from builder.runtime.model_config import GptModelConfig

    model = GptModelConfig.from_ini(tiny.ft_dir / "config.ini")
    with pytest.raises(RenderError, match="--kv-cache-dtype must be one of auto, fp8, got 'fp4'"):
        RenderConfig(engine="torch", device="cpu", model=model, kv_cache_dtype="fp4")
    with pytest.raises(RenderError, match="--kv-cache-dtype fp8 needs --engine torch"):
        RenderConfig(model=model, kv_cache_dtype="fp8")
    args, config = rendered_core_args(tiny.ft_dir, tmp_path / "r", kv_cache_dtype="fp8")
    settings = CoreSettings.from_args(args)
    assert settings.kv_cache_dtype == "fp8"
    engine = settings.load("cpu")
    assert engine.model.k_cache[0].dtype == torch.float8_e4m3fn
    assert "(fp8)" in settings.describe(engine, "cpu") and "one launch" not in settings.describe(engine, "cpu")
    engine.model.one_launch = object()  # as a CUDA model with GPT_TRITON_ONE_LAUNCH=1 holds its OneLaunchStep
    assert settings.describe(engine, "cpu").endswith(", batch-1 steps in one launch")
    config["parameters"]["kv_cache_dtype"] = {"string_value": "int8"}
    with pytest.raises(ValueError, match="parameter kv_cache_dtype must be one of auto, fp8, got 'int8'"):
        CoreSettings.from_args({**args, "model_config": json.dumps(config)})
