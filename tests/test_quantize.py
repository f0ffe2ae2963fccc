"""Weight-only int8 (builder/runtime/quantize.py, render --weight-quantization int8).

The oracle: an int8 model must compute what the same model with its weights set to the dequantized values computes
(the int8 GEMMs only widen and scale): exactly in fp32 on CPU (the eager path widens the weight), within fp16 rounding
on a GPU (the skinny Triton GEMM widens in its loop, at every number of rows, norms folded). The Triton GEMM itself
runs on CUDA, or on a CPU-only host under Triton's interpreter (TRITON_INTERPRET=1 with Triton installed), else
those tests are skipped; the rest runs everywhere.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from builder.runtime.gpt import MATRICES, SCALES, GptModel, _row_sums
from builder.runtime.model_config import GptModelConfig
from builder.runtime.quantize import INT8_MAX, Int8Weight, quantize_int8
from engine_testing import KERNEL_DEVICE, TRITON, TinyGpt, needs_kernel_device, random_weights, rendered_core_args

CONFIG = GptModelConfig(head_num=4, size_per_head=16, inter_size=256, num_layer=2, vocab_size=300, max_pos_seq_len=64,
                        start_id=0, end_id=0, weight_data_type="fp32")


def test_each_weight_moves_by_at_most_half_its_rows_step() -> None:
    row_scales = torch.tensor([1e-3, 1, 5, 0, 1, 1])[:, None]  # row 3 all zeros
    weight = torch.randn(6, 40, generator=torch.Generator().manual_seed(0)) * row_scales
    weight[4, 7] = -30.0  # one large value sets its row's step
    quantized = quantize_int8(weight)
    assert quantized.values.dtype == torch.int8 and quantized.scale.dtype == torch.float32
    assert quantized.values.abs().max() <= INT8_MAX and quantized.shape == weight.shape
    torch.testing.assert_close(quantized.scale[4], torch.tensor(30.0 / INT8_MAX))
    assert quantized.scale[3] == 1 and not quantized.values[3].any()  # a row of zeros
    error = (quantized.dequantize(torch.float32) - weight).abs()
    assert (error <= quantized.scale[:, None] / 2 + 1e-6).all()
    assert quantized.dequantize(torch.float16).dtype == torch.float16
    torch.testing.assert_close(_row_sums(quantized), quantized.dequantize(torch.float32).sum(1))


def dequantized_twin(quantized: GptModel, weights: dict[str, torch.Tensor], device: str,
                     dtype: torch.dtype) -> GptModel:
    """The same model unquantized (norms folded alike), its four matrices set to `quantized`'s dequantized ones."""
    twin = GptModel(CONFIG, weights, device=torch.device(device), dtype=dtype)
    for mine, theirs in zip(twin.layers, quantized.layers):
        for name in MATRICES:
            int8 = getattr(theirs, name)
            assert isinstance(int8, Int8Weight)
            getattr(mine, name).copy_(int8.dequantize(dtype))
        mine.qkv_column_sums, mine.fc1_column_sums = theirs.qkv_column_sums, theirs.fc1_column_sums
    return twin


def run_alike(models: list[GptModel], device: str, steps: int = 3) -> list[list[torch.Tensor]]:
    """Each model's logits: a ragged prefill of two rows, then `steps` greedy decode steps (the first model's tokens
    fed to all)."""
    prompt = torch.randint(1, CONFIG.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1)).to(device)
    lengths = torch.tensor([9, 5], device=device)
    for model in models:
        model.allocate_cache(2, 32)
    outputs = [[model.prefill(prompt, lengths)] for model in models]
    for step in range(steps):
        token = outputs[0][-1].argmax(-1)
        for model, logits in zip(models, outputs):
            logits.append(model.decode(token, lengths + step, int(lengths.max()) + step + 1))
    return outputs


@torch.inference_mode()
def test_an_int8_model_computes_what_its_dequantized_weights_do() -> None:
    weights = random_weights(CONFIG, torch.Generator().manual_seed(2))
    model = GptModel(CONFIG, weights, device=torch.device("cpu"), dtype=torch.float32, weight_quantization="int8")
    for name in MATRICES:  # int8 stacks and scale stacks, the layers holding views of them (the one-launch step's)
        assert model.stacked[name].dtype == torch.int8 and model.stacked[SCALES[name]].dtype == torch.float32
        for i, layer in enumerate(model.layers):
            weight = getattr(layer, name)
            assert isinstance(weight, Int8Weight)
            assert weight.values.data_ptr() == model.stacked[name][i].data_ptr()
            assert weight.scale.data_ptr() == model.stacked[SCALES[name]][i].data_ptr()
    plain = GptModel(CONFIG, weights, device=torch.device("cpu"), dtype=torch.float32)
    int8, twin, unquantized = run_alike([model, dequantized_twin(model, weights, "cpu", torch.float32), plain], "cpu")
    for got, want in zip(int8, twin):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (int8[0] - unquantized[0]).abs().max() > 1e-4, "quantizing changed nothing: the test would prove nothing"
    with pytest.raises(ValueError, match="before they are quantized"):
        model.fold_norms()
    with pytest.raises(ValueError, match="weight_quantization must be one of none, int8, got 'int4'"):
        GptModel(CONFIG, weights, device=torch.device("cpu"), dtype=torch.float32, weight_quantization="int4")


def test_int8_goes_from_render_to_the_loaded_engine(tiny: TinyGpt, tmp_path: Path) -> None:
    """render --weight-quantization int8 -> the core's config.pbtxt -> CoreSettings -> an engine of Int8Weights that
    says so in its load line; a bad value is refused by name at each step."""
    from builder.render_config import RenderConfig, RenderError
    from builder.runtime.core_adapter import CoreSettings

    model = GptModelConfig.from_ini(tiny.ft_dir / "config.ini")
    with pytest.raises(RenderError, match="--weight-quantization must be one of none, int8, got 'int4'"):
        RenderConfig(engine="torch", device="cpu", model=model, weight_quantization="int4")
    with pytest.raises(RenderError, match="--weight-quantization int8 needs --engine torch"):
        RenderConfig(model=model, weight_quantization="int8")
    with pytest.raises(RenderError, match="--weight-quantization int8 needs --tp 1"):
        RenderConfig(engine="torch", device="cpu", model=model, weight_quantization="int8", tp=2)
    args, config = rendered_core_args(tiny.ft_dir, tmp_path / "r", weight_quantization="int8")
    settings = CoreSettings.from_args(args)
    assert settings.weight_quantization == "int8"
    engine = settings.load("cpu")
    assert isinstance(engine.model.layers[0].fc2_weight, Int8Weight)
    assert ", weights int8" in settings.describe(engine, "cpu")
    config["parameters"]["weight_quantization"] = {"string_value": "fp8"}
    with pytest.raises(ValueError, match="parameter weight_quantization must be one of none, int8, got 'fp8'"):
        CoreSettings.from_args({**args, "model_config": json.dumps(config)})


@needs_kernel_device
@pytest.mark.parametrize("rows", [1, 5, 40, 70])
@torch.inference_mode()
def test_the_skinny_gemm_widens_int8_weights(rows: int) -> None:
    """skinny_linear and skinny_linear_residual over an Int8Weight against the eager ops over its dequantized weight:
    finished (bias + GELU), split-K partials, into the residual, and applying a LayerNorm from the residual's sums."""
    from builder.runtime import gpt_kernels

    device, dtype = KERNEL_DEVICE or "cpu", torch.float16 if KERNEL_DEVICE == "cuda" else torch.float32
    generator = torch.Generator(device=device).manual_seed(rows)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, device=device, dtype=dtype, generator=generator) * scale

    x, w, b = randn(rows, 256), quantize_int8(randn(96, 256, scale=0.05)), randn(96)
    wide = w.dequantize(dtype)
    tolerance = dict(rtol=1e-2, atol=1e-2) if dtype == torch.float16 else dict(rtol=1e-4, atol=1e-4)
    finished = gpt_kernels.skinny_linear(x, w, b, activation="gelu_tanh", block_n=32, block_k=64)
    torch.testing.assert_close(finished, F.gelu(F.linear(x, wide, b), approximate="tanh"), **tolerance)
    partials = gpt_kernels.skinny_linear(x, w, split_k=2, block_n=32, block_k=64)
    torch.testing.assert_close(partials.sum(0).to(dtype), F.linear(x, wide), **tolerance)
    residual = randn(rows, 96, scale=3.0) + 0.5
    counters = torch.zeros(64, dtype=torch.int32, device=device)
    summed, stats = gpt_kernels.skinny_linear_residual(x, w, b, residual, counters, split_k=2, block_n=32, block_k=64)
    torch.testing.assert_close(summed, residual + F.linear(x, wide, b), **tolerance)
    w_next = quantize_int8(randn(64, 96, scale=0.05))
    normed = gpt_kernels.skinny_linear(summed, w_next, block_n=32, block_k=32,
                                       norm=gpt_kernels.LayerNormIn(stats, _row_sums(w_next), 1e-5))
    want = F.linear(F.layer_norm(summed, (96,), eps=1e-5), w_next.dequantize(dtype))
    torch.testing.assert_close(normed, want, **tolerance)


@pytest.mark.skipif(not (torch.cuda.is_available() and TRITON), reason="needs CUDA and Triton")
@torch.inference_mode()
def test_an_int8_model_on_a_gpu_computes_what_its_dequantized_weights_do() -> None:
    """fp16 on CUDA, norms folded into QKV and FC1 before quantizing: prefill (the int8 GEMM at 2 x 9 rows), the
    skinny decode with the norms applied in its GEMMs, against the twin running the same kernels on fp16 weights."""
    weights = random_weights(CONFIG, torch.Generator().manual_seed(3))
    model = GptModel(CONFIG, weights, device=torch.device("cuda"), dtype=torch.float16, weight_quantization="int8")
    assert model.norms_folded and model.kernels.norm_in_gemv
    twin = dequantized_twin(model, weights, "cuda", torch.float16)
    for got, want in zip(*run_alike([model, twin], "cuda")):
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
