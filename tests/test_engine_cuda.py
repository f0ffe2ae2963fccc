"""The engine's CUDA path (CUDA graphs, no per-step host sync). Skipped on machines without a GPU."""

from __future__ import annotations

import warnings
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from builder.runtime.generation import GptEngine
from builder.runtime.gpt import DecodeGraphs, DecodeKernels, GptModel, expected_shapes, fold_layer_norm
from builder.runtime.model_config import GptModelConfig
from engine_testing import TinyGpt, hf_generate, random_prompts, random_weights, request

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def engine(tiny: TinyGpt) -> GptEngine:
    return GptEngine.from_ft_dir(tiny.ft_dir, device="cuda:0", dtype=torch.float32, max_batch_size=16)


def test_cuda_graph_greedy_equals_hf(tiny: TinyGpt, engine: GptEngine) -> None:
    assert engine.graphs is not None
    prompts = random_prompts(9, seed=1)
    outputs = engine.generate([request(p, NEW_TOKENS) for p in prompts])
    assert [o.beams[0].tolist() for o in outputs] == [hf_generate(tiny.hf, p, NEW_TOKENS) for p in prompts]
    beam = engine.generate([request(prompts[0], 6, beam_width=4, len_penalty=1.0)])[0]
    assert beam.beams[0].tolist() == hf_generate(tiny.hf, prompts[0], 6, num_beams=4, length_penalty=1.0)


def test_graphs_and_eager_sample_alike(tiny: TinyGpt, engine: GptEngine) -> None:
    eager = GptEngine.from_ft_dir(tiny.ft_dir, device="cuda:0", max_batch_size=16, use_cuda_graphs=False)
    rows = [request(p, NEW_TOKENS, top_k=20, top_p=0.9, random_seed=i) for i, p in enumerate(random_prompts(5, seed=3))]
    assert [o.beams[0].tolist() for o in engine.generate(rows)] == [o.beams[0].tolist() for o in eager.generate(rows)]


def _sync_warnings(engine: GptEngine, output_len: int) -> int:
    rows = [request(p, output_len, top_k=20, random_seed=i, stop_words=((7, 8),), bad_words=((9,),),
                    repetition_penalty=1.1) for i, p in enumerate(random_prompts(4, seed=4))]
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            engine.generate(rows)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def test_no_host_sync_per_decode_step(engine: GptEngine) -> None:
    _sync_warnings(engine, 40)  # capture the graphs first
    assert _sync_warnings(engine, 40) == _sync_warnings(engine, 4)


# (model dtype, KV-cache dtype); an fp8 cache needs compute capability 8.9+. Tolerances: the GEMM variants' fp16
# rounding may move a cached value across an fp8 rounding boundary (one step: 1/8 of its size, relative).
CACHE_CASES = [(torch.float32, "auto"), (torch.float16, "auto"),
               pytest.param(torch.float16, "fp8", marks=pytest.mark.skipif(
                   not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                   reason="an fp8 KV cache needs compute capability 8.9+"))]
TOLERANCES = {"fp32": (dict(rtol=1e-4, atol=1e-4),) * 2, "fp16": (dict(rtol=2e-2, atol=2e-2),) * 2,
              "fp8": (dict(rtol=5e-2, atol=5e-2), dict(rtol=0.13, atol=4e-3))}  # (logits, cache)


def _tolerances(dtype: torch.dtype, kv_cache_dtype: str) -> tuple[dict[str, float], dict[str, float]]:
    return TOLERANCES["fp8" if kv_cache_dtype == "fp8" else "fp32" if dtype == torch.float32 else "fp16"]


@pytest.mark.parametrize("dtype,kv_cache_dtype", CACHE_CASES)
@torch.inference_mode()
def test_fused_decode_kernels_match_eager_ops(tiny: TinyGpt, dtype: torch.dtype, kv_cache_dtype: str) -> None:
    """Each fused CUDA kernel (and all together) against the eager ops: logits and the KV cache it leaves."""
    model = GptEngine.from_ft_dir(tiny.ft_dir, device="cuda:0", dtype=dtype, max_batch_size=16,
                                  kv_cache_dtype=kv_cache_dtype).model
    best = replace(model.kernels, skinny_rows=16)  # the skinny GEMM too (the fp32 default leaves it to cuBLAS)
    assert best.fused_norm and best.attention and best.gemm_epilogue
    assert best.norm_in_gemv == model.norms_folded == (dtype != torch.float32)  # the norms inside the GEMVs: fp16
    prompts = torch.randint(1, 500, (5, 9), generator=torch.Generator().manual_seed(5)).cuda()
    lengths = torch.tensor([9, 1, 4, 7, 2], device="cuda")  # ragged: rows decode at their own positions

    def run(kernels: DecodeKernels, feed: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Prefill, then 6 greedy steps on `feed`'s argmax tokens (the eager run's), so every run sees one input."""
        model.kernels = kernels
        logits = [model.prefill(prompts, lengths)]
        positions = lengths.clone()
        for step in range(6):
            token = (feed or logits)[step].argmax(-1)
            logits.append(model.decode(token, positions, kv_len=model.max_seq_len))
            positions += 1
        return logits, [cache[:5, :, :16].clone() for cache in model.k_cache + model.v_cache]

    eager_logits, eager_cache = run(DecodeKernels(), [])
    tolerance, cache_tolerance = _tolerances(dtype, kv_cache_dtype)
    for kernels in (replace(DecodeKernels(), fused_norm=True), replace(DecodeKernels(), attention=True),
                    replace(DecodeKernels(), gemm_epilogue=True), replace(DecodeKernels(), skinny_rows=16),
                    replace(best, norm_in_gemv=False), best):
        logits, cache = run(kernels, eager_logits)
        for got, want in zip(logits, eager_logits):
            torch.testing.assert_close(got.float(), want.float(), **tolerance, msg=lambda m, k=kernels: f"{k}: {m}")
        for got, want in zip(cache, eager_cache):
            torch.testing.assert_close(got.float(), want.float(), **cache_tolerance,
                                       msg=lambda m, k=kernels: f"{k}: {m}")


@torch.inference_mode()
def test_dependent_launches_in_cuda_graphs_change_no_bit(tiny: TinyGpt) -> None:
    """Programmatic dependent launch only moves kernel starts earlier: inside the
    decode CUDA graphs the logits and the KV cache equal plainly launched kernels' bit for bit, over several steps
    (a kernel reading its predecessor's output before it is complete would show here)."""
    model = GptEngine.from_ft_dir(tiny.ft_dir, device="cuda:0", dtype=torch.float16, max_batch_size=16).model
    assert model.kernels.pdl == (torch.cuda.get_device_capability()[0] >= 9)  # on by default where supported
    if not model.kernels.pdl:
        pytest.skip("programmatic dependent launch needs a Hopper GPU")
    prompts = torch.randint(1, 500, (3, 9), generator=torch.Generator().manual_seed(6)).cuda()
    lengths = torch.tensor([9, 3, 6], device="cuda")

    def run(kernels: DecodeKernels) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        model.kernels = kernels
        graphs = DecodeGraphs(model, kv_bucket=16)
        token = model.prefill(prompts, lengths).argmax(-1)
        positions, logits = lengths.clone(), []
        for _ in range(8):
            step = graphs.decode(token, positions, int(positions.max()) + 1).clone()
            logits.append(step)
            token, positions = step.argmax(-1), positions + 1
        return logits, [cache[:3, :, :24].clone() for cache in model.k_cache + model.v_cache]

    pdl = replace(model.kernels, skinny_rows=16, pdl=True)
    plain_logits, plain_cache = run(replace(pdl, pdl=False))
    pdl_logits, pdl_cache = run(pdl)
    for got, want in zip(pdl_logits + pdl_cache, plain_logits + plain_cache):
        assert torch.equal(got, want)


@torch.inference_mode()
def test_split_residual_gemms_past_the_skinny_rows_match_eager_ops() -> None:
    """Past the skinny rows (16), the attention-output and FC2 GEMMs run as skinny split-K partials that the add +
    LayerNorm sums (QKV and FC1 stay on cuBLAS). The tiny test model is too narrow to split, so this one has hidden
    1024 (random weights): logits of 4 decode steps at 24, 64 and 96 rows (two tiles of rows) against the eager ops;
    and at 5 rows, where every GEMM is skinny and the split ones add the residual themselves (norm_in_gemv)."""
    config = GptModelConfig(head_num=8, size_per_head=128, inter_size=4096, num_layer=2, vocab_size=512,
                            max_pos_seq_len=64, start_id=0, end_id=0, weight_data_type="fp16")
    generator = torch.Generator(device="cuda").manual_seed(11)
    scale = {"bias": 0.1, "layernorm.weight": 0.1}
    weights = {name: (torch.randn(shape, device="cuda", generator=generator)
                      * next((v for k, v in scale.items() if name.endswith(k)), 0.03)
                      + (1.0 if name.endswith("layernorm.weight") else 0.0)).half()
               for name, shape in expected_shapes(config).items()}
    model = GptModel(config, weights, device=torch.device("cuda:0"), dtype=torch.float16)
    model.allocate_cache(96, 64)
    plans = [model.skinny_plans[name] for name in ("out", "fc2", "out_wide", "fc2_wide")]  # 24 rows; 64 and 96
    assert all(plan is not None and plan.split_k > 1 for plan in plans)
    default = model.kernels
    assert default.skinny_residual_rows == 64 and default.skinny_rows == 16

    def run(kernels: DecodeKernels, prompts: torch.Tensor, lengths: torch.Tensor,
            feed: list[torch.Tensor]) -> list[torch.Tensor]:
        model.kernels = kernels
        logits = [model.prefill(prompts, lengths)]
        positions = lengths.clone()
        for step in range(4):
            logits.append(model.decode((feed or logits)[step].argmax(-1), positions, kv_len=64))
            positions += 1
        return logits

    assert default.norm_in_gemv
    for rows in (5, 24, 64, 96):
        prompts = torch.randint(1, 500, (rows, 7), device="cuda", generator=generator)
        lengths = torch.randint(1, 8, (rows,), device="cuda", generator=generator)
        eager = run(DecodeKernels(), prompts, lengths, [])
        # The fused norm sums the partials, then torch does.
        for kernels in (replace(default, skinny_residual_rows=96), replace(DecodeKernels(), skinny_residual_rows=96)):
            for got, want in zip(run(kernels, prompts, lengths, eager), eager):
                torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2,
                                           msg=lambda m, k=kernels, r=rows: f"{r} rows, {k}: {m}")
    model.kernels = default


@torch.inference_mode()
def test_one_launch_step_in_cuda_graphs_matches_the_eager_ops() -> None:
    """The batch-1 step as one kernel (step_kernel.py at its default launch shape: here 16 rows of QKV or FC1, or 256
    outputs of a 64-wide K slice, a task; 64-key blocks; then with L2 prefetches too), replayed from DecodeGraphs'
    CUDA graphs over 12 steps whose keys cross a block: logits and the KV cache against the eager ops fed the same
    tokens, and the greedy tokens against the per-op fused kernels'. Every program runs at once here, so a task that
    read its input before the producer's release, or a counter left non-zero, shows up as wrong logits later."""
    config = GptModelConfig(head_num=16, size_per_head=64, inter_size=4096, num_layer=3, vocab_size=1000,
                            max_pos_seq_len=128, start_id=0, end_id=0, weight_data_type="fp16")
    generator = torch.Generator(device="cuda").manual_seed(12)
    weights = random_weights(config, generator, scale=0.03, norm_scale=0.1, dtype=torch.float16)
    model = GptModel(config, weights, device=torch.device("cuda:0"), dtype=torch.float16)
    model.allocate_cache(4, 128)
    assert model.one_launch is None and not model.kernels.one_launch_step  # off by default: not built
    prompt = torch.randint(1, 1000, (1, 58), device="cuda", generator=generator)
    lengths = torch.tensor([58], device="cuda")

    def run(kernels: DecodeKernels, feed: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        model.kernels = DecodeKernels()
        logits = [model.prefill(prompt, lengths)]  # the same prompt cache for every run
        model.kernels = kernels
        graphs = DecodeGraphs(model, kv_bucket=64)
        positions = lengths.clone()
        for step in range(12):  # positions 58..69: 59 to 70 keys, the second 64-key block from step 6
            token = (feed or logits)[step].argmax(-1)
            logits.append(graphs.decode(token, positions, int(positions.max()) + 1).clone())
            positions += 1
        return logits, [cache[:1, :, :72].clone() for cache in model.k_cache + model.v_cache]

    eager_logits, eager_cache = run(DecodeKernels(), [])
    fused = DecodeKernels.for_model(config, model.device, model.dtype)
    fused_logits, _ = run(fused, eager_logits)
    from builder.runtime.step_kernel import StepLaunch  # here: the module imports Triton

    default_launch = StepLaunch.from_environment()
    for launch in (default_launch, replace(default_launch, prefetch_rounds=1)):  # with L2 prefetches of later tiles
        model.one_launch = model.build_one_launch(launch)
        one_logits, one_cache = run(replace(fused, one_launch_step=True), eager_logits)
        for got, want in zip(one_logits + one_cache, eager_logits + eager_cache):
            torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2,
                                       msg=lambda m, k=launch: f"{k}: {m}")
        assert not model.one_launch.counters.any() and not model.one_launch.stalls.any()
        one_tokens = torch.stack([x.argmax(-1) for x in one_logits])
        assert (one_tokens == torch.stack([x.argmax(-1) for x in fused_logits])).float().mean() >= 0.9


@pytest.mark.parametrize("rows", [1, 5, 16, 17, 40, 64, 65, 130])
@torch.inference_mode()
def test_skinny_linear_matches_the_eager_product(rows: int) -> None:
    """The skinny GEMM at every row tile (16, 32, 64) and over several tiles of 64 rows: finished (bias + GELU
    epilogue) and as split-K partials."""
    from builder.runtime import gpt_kernels

    generator = torch.Generator(device="cuda").manual_seed(rows)
    x = torch.randn(rows, 512, device="cuda", dtype=torch.float16, generator=generator)
    w = torch.randn(384, 512, device="cuda", dtype=torch.float16, generator=generator) * 0.05
    b = torch.randn(384, device="cuda", dtype=torch.float16, generator=generator)
    exact = F.linear(x.float(), w.float(), b.float())
    pdl = gpt_kernels.pdl_supported(x.device)
    for warps in (2, 4):  # the decode's plans: 2 up to 32 rows, 4 past them
        finished = gpt_kernels.skinny_linear(x, w, b, activation="gelu_tanh", block_n=32, block_k=128,
                                             num_warps=warps, pdl=pdl)
        torch.testing.assert_close(finished.float(), F.gelu(exact, approximate="tanh"), rtol=1e-2, atol=1e-2)
        partials = gpt_kernels.skinny_linear(x, w, split_k=2, block_n=16, block_k=128, num_warps=warps, pdl=pdl)
        assert partials.shape == (2, rows, 384) and partials.dtype == torch.float32
        torch.testing.assert_close(partials.sum(0), exact - b.float(), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("rows", [1, 5, 16, 40])
@torch.inference_mode()
def test_skinny_gemms_into_the_residual_and_from_its_norm_match_the_eager_ops(rows: int) -> None:
    """The residual add inside the skinny GEMM (whole and split over K: the last split of a tile sums the partials)
    with the block sums it leaves, then the next GEMM applying the LayerNorm (folded into its weights) to its product:
    against the eager ops (x + linear(...) in fp16, layer_norm, linear), several times, so the tile counters must be
    left zero for the next call."""
    from builder.runtime import gpt_kernels

    generator = torch.Generator(device="cuda").manual_seed(100 + rows)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, device="cuda", dtype=torch.float16, generator=generator) * scale

    hidden, wide = 256, 1024
    x, up = randn(rows, hidden, scale=3.0) + 0.5, randn(rows, wide)  # a mean the LayerNorm must remove
    w_in, b_in = randn(hidden, wide, scale=0.05), randn(hidden)
    w_out, b_out = randn(384, hidden, scale=0.05), randn(384)
    gain, shift = 1.0 + randn(hidden, scale=0.1), randn(hidden, scale=0.1)
    folded, folded_bias, column_sums = fold_layer_norm(w_out, b_out, gain, shift)
    counters = torch.zeros(64, dtype=torch.int32, device="cuda")
    pdl = gpt_kernels.pdl_supported(x.device)
    summed = x + F.linear(up, w_in, b_in)  # the eager ops, in fp16
    for split_k in (1, 2, 4, 1, 4):
        for warps in (2, 4):
            out, stats = gpt_kernels.skinny_linear_residual(up, w_in, b_in, x, counters, split_k=split_k, block_n=32,
                                                             block_k=128, num_warps=warps, pdl=pdl)
            assert not counters.any(), "the last split of each tile zeroes its counter"
            torch.testing.assert_close(out, summed, rtol=2e-3, atol=2e-2)
            assert stats.shape == (rows, hidden // 32, 2)
            blocks = out.float().view(rows, -1, 32)
            torch.testing.assert_close(stats, torch.stack([blocks.sum(-1), blocks.square().sum(-1)], -1),
                                       rtol=1e-5, atol=1e-3)
            normed = gpt_kernels.skinny_linear(out, folded, folded_bias, activation="gelu_tanh", num_warps=warps,
                                               pdl=pdl, norm=gpt_kernels.LayerNormIn(stats, column_sums, 1e-5))
            want = F.gelu(F.linear(F.layer_norm(out, (hidden,), gain, shift, 1e-5), w_out, b_out).float(),
                          approximate="tanh")
            torch.testing.assert_close(normed.float(), want, rtol=1e-2, atol=1e-2)
    with pytest.raises(ValueError, match="counters must be int32"):
        gpt_kernels.skinny_linear_residual(up, w_in, b_in, x, counters[:2], split_k=2)


def _reference_prefill_attention(qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                                 starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 attention of each row's chunk over its slot's cached keys [0, start) and, causally, its own; returns
    (out [n, T, H], the caches with the chunks written)."""
    n, width, _ = qkv.shape
    _, heads, max_seq, d = k_cache.shape
    k_cache, v_cache = k_cache.clone(), v_cache.clone()
    q, k, v = qkv.view(n, width, 3, heads, d).permute(2, 0, 3, 1, 4).float()  # each [n, heads, T, d]
    outs = []
    for i in range(n):
        slot, start = int(slots[i]), int(starts[i])
        kept = min(width, max_seq - start)  # positions past the cache are not written
        k_cache[slot, :, start:start + kept] = k[i, :, :kept].to(k_cache.dtype)
        v_cache[slot, :, start:start + kept] = v[i, :, :kept].to(v_cache.dtype)
        keys = torch.cat([k_cache[slot, :, :start].float(), k[i]], dim=1)  # [heads, start + T, d]
        values = torch.cat([v_cache[slot, :, :start].float(), v[i]], dim=1)
        key_positions, query_positions = torch.arange(start + width), start + torch.arange(width)
        seen = (key_positions[None, :] <= query_positions[:, None]).to(qkv.device)  # [T, start + T]
        attn = F.scaled_dot_product_attention(q[i], keys, values, attn_mask=seen)  # [heads, T, d]
        outs.append(attn.transpose(0, 1).reshape(width, -1))
    return torch.stack(outs), k_cache, v_cache


@pytest.mark.parametrize("head_dim,dtype", [(128, torch.float16), (64, torch.bfloat16), (128, torch.float32),
                                            (16, torch.float32)])
@torch.inference_mode()
def test_prefill_attention_kernel_matches_the_reference(head_dim: int, dtype: torch.dtype) -> None:
    """`prefill_attention` (whole prompts and chunks at their own starts, several query blocks, a chunk running
    past the cache) against fp32 attention over the same keys; the cache it leaves, and no other slot touched."""
    from builder.runtime import gpt_kernels

    generator = torch.Generator(device="cuda").manual_seed(head_dim)
    heads, max_seq, width = 4, 256, 150  # 150 queries: three blocks, the last one partial
    qkv = torch.randn(3, width, 3 * heads * head_dim, device="cuda", generator=generator).to(dtype)
    k_cache = torch.randn(8, heads, max_seq, head_dim, device="cuda", generator=generator).to(dtype)
    v_cache = torch.randn(8, heads, max_seq, head_dim, device="cuda", generator=generator).to(dtype)
    slots = torch.tensor([5, 0, 2], device="cuda")
    tolerance = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for starts in (None, torch.tensor([7, 64, 200], device="cuda")):  # whole prompts; chunks (the last past the cache)
        want, want_k, want_v = _reference_prefill_attention(qkv, k_cache, v_cache, slots,
                                                            torch.zeros_like(slots) if starts is None else starts)
        got_k, got_v = k_cache.clone(), v_cache.clone()
        got = gpt_kernels.prefill_attention(qkv, got_k, got_v, slots, starts)
        torch.testing.assert_close(got.float(), want, **tolerance)
        assert torch.equal(got_k, want_k) and torch.equal(got_v, want_v)


@pytest.mark.parametrize("rows", [1, 5, 40])
@pytest.mark.parametrize("dtype,kv_cache_dtype", CACHE_CASES)
@torch.inference_mode()
def test_decode_attention_kernel_matches_the_reference(rows: int, dtype: torch.dtype, kv_cache_dtype: str) -> None:
    """`decode_attention` (few rows: one program per row and head, split over long keys; many rows: the tensor-core
    kernel, or with an fp8 cache one warp per row and head) against fp32 attention over each row's keys 0..position,
    the step's own key read back as the cache rounds it; the cache keeps every other key, and the step's K/V land at
    (row, position) rounded to the cache's dtype."""
    from builder.runtime import gpt_kernels
    from builder.runtime.gpt import CACHE_TORCH_DTYPES

    generator = torch.Generator(device="cuda").manual_seed(rows)
    heads, head_dim = 4, 128
    cache_dtype = CACHE_TORCH_DTYPES[kv_cache_dtype] or dtype
    tolerance = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for kv_len in (256, 1024):  # one split; several splits and the combine kernel (few rows)
        qkv = torch.randn(rows, 3 * heads * head_dim, device="cuda", generator=generator).to(dtype)
        k_cache = torch.randn(rows, heads, kv_len, head_dim, device="cuda", generator=generator).to(cache_dtype)
        v_cache = torch.randn(rows, heads, kv_len, head_dim, device="cuda", generator=generator).to(cache_dtype)
        positions = torch.randint(0, kv_len, (rows,), device="cuda", generator=generator)
        positions[0] = kv_len - 1  # the last key of the bucket
        want_k, want_v = k_cache.clone(), v_cache.clone()
        q, k, v = qkv.view(rows, 3, heads, head_dim).unbind(1)
        at = torch.arange(rows, device="cuda")
        want_k[at, :, positions], want_v[at, :, positions] = k.to(cache_dtype), v.to(cache_dtype)
        hidden = torch.arange(kv_len, device="cuda")[None, None, None, :] > positions[:, None, None, None]
        want = F.scaled_dot_product_attention(q[:, :, None].float(), want_k.float(), want_v.float(),
                                              attn_mask=~hidden).reshape(rows, heads * head_dim)
        # An fp8 cache multiplies in fp16 by default (gpt_kernels.half_products); fp32 products stay reachable.
        for products in ("auto", "f32") if kv_cache_dtype == "fp8" else ("auto",):
            got = gpt_kernels.decode_attention(qkv, k_cache, v_cache, positions, kv_len, products=products)
            torch.testing.assert_close(got.float(), want, **tolerance)
            assert torch.equal(k_cache.view(torch.uint8), want_k.view(torch.uint8))
            assert torch.equal(v_cache.view(torch.uint8), want_v.view(torch.uint8))


@pytest.mark.parametrize("dtype,kv_cache_dtype", CACHE_CASES)
@torch.inference_mode()
def test_prefill_with_the_attention_kernel_matches_eager_whole_and_in_chunks(tiny: TinyGpt, dtype: torch.dtype,
                                                                            kv_cache_dtype: str) -> None:
    """The model's prefill with the Triton attention against PyTorch's SDPA: ragged whole prompts into named slots,
    then a second chunk of each at its own start: logits and the KV cache."""
    model = GptEngine.from_ft_dir(tiny.ft_dir, device="cuda:0", dtype=dtype, max_batch_size=16,
                                  kv_cache_dtype=kv_cache_dtype).model
    assert model.kernels.attention
    generator = torch.Generator().manual_seed(7)
    first, second = torch.randint(1, 500, (3, 70), generator=generator), torch.randint(1, 500, (3, 20),
                                                                                       generator=generator)
    first_lengths, second_lengths = torch.tensor([70, 33, 5], device="cuda"), torch.tensor([20, 7, 1], device="cuda")
    slots = torch.tensor([6, 2, 9], device="cuda")

    def run(kernels: DecodeKernels) -> list[torch.Tensor]:
        model.kernels = kernels
        for cache in model.k_cache + model.v_cache:
            cache.zero_()
        logits = [model.prefill(first.cuda(), first_lengths, slot_index=slots),
                  model.prefill(second.cuda(), second_lengths, slot_index=slots, starts=first_lengths,
                                kv_len=model.max_seq_len)]
        return logits + [cache.clone() for cache in model.k_cache + model.v_cache]

    tolerance, cache_tolerance = _tolerances(dtype, kv_cache_dtype)
    for got, want in zip(run(replace(DecodeKernels(), attention=True)), run(DecodeKernels())):
        torch.testing.assert_close(got.float(), want.float(),
                                   **(cache_tolerance if got.dtype == torch.float8_e4m3fn else tolerance))
