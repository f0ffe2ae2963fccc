"""The one-launch decode step (builder/runtime/step_kernel.py) against the eager ops of `GptModel.decode`: logits and
the KV cache it leaves, over steps whose keys span several key blocks, with the counters left zero for the next step.

Runs on CUDA (the programs run at once: the counters' ordering and the tickets are exercised for real); on a CPU-only
host under Triton's interpreter (TRITON_INTERPRET=1 with Triton installed: the programs run one after the other, so
the task order, indexing and arithmetic are checked, not the concurrency), else skipped.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import pytest
import torch

from builder.runtime.gpt import STACKED, GptModel
from builder.runtime.model_config import GptModelConfig
from engine_testing import KERNEL_DEVICE, needs_kernel_device, random_weights

if TYPE_CHECKING:
    from builder.runtime.step_kernel import OneLaunchStep

pytestmark = needs_kernel_device
TOLERANCES = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float16: dict(rtol=1e-2, atol=1e-2)}


def small_model(dtype: torch.dtype, activation: str = "Gelu", weight_quantization: str = "none") -> GptModel:
    """4 heads of 16, 2 layers, random LayerNorms and biases (the eager path folds nothing on CPU)."""
    config = GptModelConfig(head_num=4, size_per_head=16, inter_size=256, num_layer=2, vocab_size=300,
                            max_pos_seq_len=256, start_id=0, end_id=0, weight_data_type="fp32",
                            activation_type=activation)
    model = GptModel(config, random_weights(config, torch.Generator().manual_seed(3)),
                     device=torch.device(KERNEL_DEVICE or "cpu"), dtype=dtype, weight_quantization=weight_quantization)
    model.allocate_cache(2, 200)
    return model


def one_launch(model: GptModel, prefetch_rounds: int = 0) -> OneLaunchStep:
    from builder.runtime.step_kernel import StepLaunch  # here: Triton may be missing

    # 512-element tiles: 8 rows of QKV/FC1 or 32 outputs of a 16-wide K slice a task; 16-key blocks: several per head
    launch = StepLaunch(tile_elements=512, key_block=16, prefetch_rounds=prefetch_rounds)
    return model.build_one_launch(launch, programs=3 if KERNEL_DEVICE == "cpu" else None)


# L2 prefetches (inline PTX) compile on CUDA only; under the interpreter the launch leaves them out. int8: the layers'
# matrices int8 with a scale per row (quantize.py), against the eager ops over the widened weights.
@pytest.mark.parametrize("prefetch_rounds", [0, 1] if KERNEL_DEVICE == "cuda" else [0])
@pytest.mark.parametrize("weight_quantization", ["none", "int8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@torch.inference_mode()
def test_one_launch_step_matches_the_eager_decode(dtype: torch.dtype, weight_quantization: str,
                                                  prefetch_rounds: int) -> None:
    model = small_model(dtype, weight_quantization=weight_quantization)
    step = one_launch(model, prefetch_rounds)
    prompt = torch.randint(1, 300, (1, 45), generator=torch.Generator().manual_seed(4)).to(KERNEL_DEVICE)
    token = model.prefill(prompt, torch.tensor([45], device=KERNEL_DEVICE)).argmax(-1)
    for position in (45, 46, 47, 48):  # keys in 3, then 4 blocks of 16 (the step's own key the last of a block at 47)
        before = [cache.clone() for cache in model.k_cache + model.v_cache]
        positions = torch.tensor([position], device=KERNEL_DEVICE)
        want = model.decode(token, positions, kv_len=position + 1 + position % 2)  # kv_len past the position too
        want_cache = [cache.clone() for cache in model.k_cache + model.v_cache]
        for cache, saved in zip(model.k_cache + model.v_cache, before):
            cache.copy_(saved)
        got = step(token, positions, position + 1 + position % 2)
        torch.testing.assert_close(got.float(), want.float(), **TOLERANCES[dtype])
        for cache, expected in zip(model.k_cache + model.v_cache, want_cache):
            torch.testing.assert_close(cache.float(), expected.float(), **TOLERANCES[dtype])
        assert not step.counters.any(), "the last program out leaves every counter zero"
        assert not step.stalls.any(), "no wait gave up"
        token = want.argmax(-1)


@torch.inference_mode()
def test_one_launch_step_with_relu_and_through_the_model() -> None:
    """A ReLU model, through `GptModel.decode` with `DecodeKernels.one_launch_step`."""
    model = small_model(torch.float32, activation="Relu")
    assert model.one_launch is None  # built with the cache only when DecodeKernels.one_launch_step asks
    model.one_launch = one_launch(model)
    prompt = torch.randint(1, 300, (1, 20), generator=torch.Generator().manual_seed(5)).to(KERNEL_DEVICE)
    token = model.prefill(prompt, torch.tensor([20], device=KERNEL_DEVICE)).argmax(-1)
    positions = torch.tensor([20], device=KERNEL_DEVICE)
    saved = [cache.clone() for cache in model.k_cache + model.v_cache]
    want = model.decode(token, positions, kv_len=32)
    for cache, copy in zip(model.k_cache + model.v_cache, saved):
        cache.copy_(copy)
    model.kernels = replace(model.kernels, one_launch_step=True)
    torch.testing.assert_close(model.decode(token, positions, kv_len=32), want, **TOLERANCES[torch.float32])


@pytest.mark.parametrize("odd_step", ["lost signal", "no waits"])
@torch.inference_mode()
def test_a_step_that_cannot_or_need_not_wait_ends_clean(odd_step: str) -> None:
    """A lost signal (planted: the first attention-output tile's arrival count set past its last value, so no task
    finishes that tile and FC1's tasks wait for a stream that never completes) makes the waiting tasks give up after
    SPIN_LIMIT polls and count themselves in `stalls` instead of never returning. A step with wait=False (the
    bench's streaming bound) waits for nothing and counts no stall. Either way the counters are zero after that step,
    and the next step computes the eager ops' logits again."""
    model = small_model(torch.float32)
    step = one_launch(model)
    prompt = torch.randint(1, 300, (1, 9), generator=torch.Generator().manual_seed(6)).to(KERNEL_DEVICE)
    token = model.prefill(prompt, torch.tensor([9], device=KERNEL_DEVICE)).argmax(-1)
    positions = torch.tensor([9], device=KERNEL_DEVICE)
    saved = [cache.clone() for cache in model.k_cache + model.v_cache]
    if odd_step == "lost signal":
        step.counters[step.counter_offsets["C_OUT_SEEN"]] = 100
    step(token, positions, 16, wait=odd_step != "no waits")
    assert (int(step.stalls) > 0) == (odd_step == "lost signal") and not step.counters.any()
    for cache, copy in zip(model.k_cache + model.v_cache, saved):
        cache.copy_(copy)
    want = model.decode(token, positions, kv_len=16)
    for cache, copy in zip(model.k_cache + model.v_cache, saved):
        cache.copy_(copy)
    stalls = int(step.stalls)
    torch.testing.assert_close(step(token, positions, 16), want, **TOLERANCES[torch.float32])
    assert int(step.stalls) == stalls


def test_the_layers_are_views_of_the_stacks() -> None:
    """The kernel reads `GptModel.stacked`; the layers' tensors (the eager path's) must be the same memory, folded
    norms included."""
    model = small_model(torch.float32)
    model.fold_norms()
    for name in STACKED:
        for i, layer in enumerate(model.layers):
            assert getattr(layer, name).data_ptr() == model.stacked[name][i].data_ptr(), (name, i)
    assert torch.equal(model.stacked["ln1_weight"], torch.ones_like(model.stacked["ln1_weight"]))
    layer_bytes = model.k_cache[0].numel() * model.k_cache[0].element_size()  # the kernel's layer stride
    assert all(cache[1].data_ptr() - cache[0].data_ptr() == layer_bytes for cache in (model.k_cache, model.v_cache))


def test_shapes_the_kernel_cannot_take_are_named() -> None:
    from builder.runtime import step_kernel

    shape = step_kernel.StepShape(hidden=2048, inter=8192, heads=16, head_dim=128, layers=24, vocab=50257,
                                  max_seq=2048, activation="gelu_tanh", eps=1e-5)
    launch = step_kernel.StepLaunch()
    assert step_kernel.unsupported(shape, launch) is None
    assert "head size 96" in str(step_kernel.unsupported(replace(shape, head_dim=96), launch))
    assert "MLP width 8200" in str(step_kernel.unsupported(replace(shape, inter=8200), launch))
    assert "gives 0 rows" in str(step_kernel.unsupported(shape, step_kernel.StepLaunch(tile_elements=1024)))
    assert step_kernel.StepLaunch.parse("32768,8,2,0") == step_kernel.StepLaunch(32768, 8, 2, max_registers=0)
    assert step_kernel.StepLaunch.parse("8192,4,4").max_registers == launch.max_registers
    assert step_kernel.StepLaunch.parse("16384,4,3,168,2").prefetch_rounds == 2
    with pytest.raises(ValueError, match=r"'TILE,WARPS,PROGRAMS\[,REGISTERS\[,PREFETCH_ROUNDS\]\]'.*got '8192,4'"):
        step_kernel.StepLaunch.parse("8192,4")
    # The L2 prefetch asks for a whole 32 KiB tile (256 lines of 128 bytes); never under the interpreter (CPU tensors).
    for device, lines in (("meta", 256), ("cpu", 0)):
        placeholder = torch.empty(0, dtype=torch.float16, device=device)  # shapes only: nothing is allocated
        step = step_kernel.OneLaunchStep(shape, {"qkv_weight": placeholder, "wte": placeholder}, placeholder,
                                         placeholder, replace(launch, prefetch_rounds=1), programs=1)
        assert step.prefetch_lines() == lines
    with pytest.raises(ValueError, match="cannot run this model: head size 96"):
        step_kernel.OneLaunchStep(replace(shape, head_dim=96), {}, torch.zeros(1), torch.zeros(1))


def test_the_tickets_walk_the_step_once_in_order() -> None:
    """The kernel's decode of a ticket (`_locate`, through `OneLaunchStep.locate`) against the shape: the embeddings,
    then per layer QKV, attention, attention output, FC1, FC2 in that order, then the LM head, as many tickets as
    `tasks` says (the kernel's loop bound), and every weight row, K slice, output tile and key block of each stage
    covered exactly once."""
    from builder.runtime.step_kernel import STAGES

    model = small_model(torch.float32)
    step = one_launch(model)
    s, rows, cols = step.shape, step.rows_full, step.cols_split  # 64 wide, 4 heads of 16; 8 rows, 32 outputs a tile
    kv_len, blocks, n_tiles = 37, 3, s.hidden // cols  # 37 keys: 3 blocks of 16
    located = step.locate(kv_len).cpu()
    stage, layer, a, b = located.unbind(1)
    assert step.tasks(kv_len) == len(located)
    assert [STAGES[i] for i in torch.unique_consecutive(stage).tolist()] == (
        ["embeddings"] + ["qkv", "attention", "attention output", "fc1", "fc2"] * s.layers + ["lm head"])
    assert layer.tolist() == sorted(layer.tolist()) and int(layer[-1]) == s.layers

    def tiles(name: str, at_layer: int) -> list[tuple[int, int]]:
        chosen = (stage == STAGES.index(name)) & (layer == at_layer)
        return list(zip(a[chosen].tolist(), b[chosen].tolist()))

    def covered_rows(name: str, at_layer: int, count: int) -> None:
        assert sorted(r + i for r, _ in tiles(name, at_layer) for i in range(rows)) == list(range(count))

    for at in range(s.layers):
        covered_rows("qkv", at, 3 * s.hidden)
        assert all(head == first % s.hidden // s.head_dim for first, head in tiles("qkv", at))  # its head's counter
        assert sorted(tiles("attention", at)) == [(block, head) for block in range(blocks) for head in range(s.heads)]
        assert sorted(tiles("attention output", at)) == [(h, t) for h in range(s.heads) for t in range(n_tiles)]
        covered_rows("fc1", at, s.inter)
        assert all(chunk == first // s.head_dim for first, chunk in tiles("fc1", at))  # its FC2 chunk's counter
        assert sorted(tiles("fc2", at)) == [(c, t) for c in range(s.inter // s.head_dim) for t in range(n_tiles)]
    assert sorted(first for first, _ in tiles("lm head", s.layers)) == list(range(0, s.vocab, rows))
