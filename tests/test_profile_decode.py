"""bench/profile_decode.py's per-kernel timeline, from a made-up CUDA trace (the GPU host runs the real one)."""

from __future__ import annotations

import pytest

from bench.profile_decode import summarize_timeline


def _trace(steps: int, combine_at: int | None = None) -> list[dict]:
    """A loop of `steps` decode steps of 2 layers (QKV, attention, out, add+norm, FC1, FC2, add+norm; then the LM
    head), each kernel starting 1 us after the previous one ends, the loop's argmax after each step; step
    `combine_at` runs one more attention kernel (a split-key combine)."""
    events: list[dict] = []
    clock = 0.0

    def kernel(name: str, duration: float) -> None:
        nonlocal clock
        events.append({"name": name, "ts": clock, "dur": duration})
        clock += duration + 1.0

    kernel("prefill_kernel", 100.0)
    kernel("void at::native::reduce_kernel<512, 1>(argmax)", 2.0)
    for step in range(steps):
        kernel("_add_layer_norm_kernel", 3.0)
        for _ in range(2):
            kernel("_skinny_linear_kernel", 8.0)
            kernel("_decode_attention_kernel", 5.0)
            if step == combine_at:
                kernel("_combine_splits_kernel", 2.0)
            kernel("_skinny_linear_kernel", 3.0)
            kernel("_add_layer_norm_kernel", 3.0)
            kernel("_skinny_linear_kernel", 10.0)
            kernel("_skinny_linear_kernel", 10.0)
            kernel("_add_layer_norm_kernel", 3.0)
        kernel("_skinny_linear_kernel", 40.0)
        kernel("void at::native::reduce_kernel<512, 1>(argmax)", 2.0)
    return events


def _rows(table: str) -> dict[str, list[float]]:
    return {line.split()[0]: [float(v) for v in line.split()[1:]] for line in table.splitlines()[2:]}


def test_the_timeline_names_each_gemv_and_adds_up_each_kernel_kind() -> None:
    table = summarize_timeline(_trace(6), {"qkv": 8_000, "out": 3_000, "fc1": 10_000, "fc2": 10_000,
                                           "lm_head": 40_000})
    assert table.startswith("5 steps of 16 kernels")  # past the prefill's segment and the first step
    rows = _rows(table)
    # per step, mean duration, adds per step (duration + the 1 us gap before it), GB/s of the adds
    assert rows["qkv"] == pytest.approx([2, 8.0, 18.0, 8_000 * 2 / 18e-6 / 1e9], abs=1)
    assert rows["lm_head"][:3] == [1, 40.0, 41.0]
    assert rows["_add_layer_norm_kernel"][:3] == [5, 3.0, 19.0]  # 3 + 4 x 4: the step's first adds no gap before it
    assert rows["_decode_attention_kernel"][:3] == [2, 5.0, 12.0]


def test_a_step_with_another_kernel_count_is_left_out_not_misnamed() -> None:
    table = summarize_timeline(_trace(6, combine_at=3), {"qkv": 1, "out": 1, "fc1": 1, "fc2": 1, "lm_head": 1})
    assert table.startswith("4 steps of 16 kernels (all steps: {16: 4, 18: 1})")
    assert "_combine_splits_kernel" not in table
