"""The fused greedy selection (builder/runtime/select_kernels.py) against the reference PyTorch ops of the same step
(step_graphs.select_tokens): the same tokens, flags, decode inputs and slot-table updates, ties and bans included.

Runs on CUDA; on a CPU-only host under Triton's interpreter (TRITON_INTERPRET=1 with Triton installed), else skipped.
"""

from __future__ import annotations


import numpy as np
import pytest
import torch

from builder.runtime.core_io import GenerationRequest
from builder.runtime.sampling import SlotParams
from builder.runtime.scheduler import _SlotTable
from builder.runtime.step_graphs import fused_selection_applies, select_tokens
from engine_testing import KERNEL_DEVICE, needs_kernel_device


VOCAB, LIMIT, END, SEQ = 50304, 50257, 50256, 64


def table_and_logits(rows: int, seed: int, min_length: bool) -> tuple[_SlotTable, torch.Tensor, SlotParams]:
    """A slot table in a mid-serving state (some rows finished, some held short of min_length) and fp16 logits with
    planted ties, a row whose only allowed id is the banned end_id, and a row whose best id is past the vocabulary."""
    rng = np.random.default_rng(seed)
    assert KERNEL_DEVICE is not None
    table = _SlotTable(rows + 3, SEQ, VOCAB, torch.device(KERNEL_DEVICE))
    lengths = rng.integers(2, SEQ - 2, rows)
    table.history[:rows] = torch.from_numpy(rng.integers(0, LIMIT, (rows, SEQ)))
    table.lengths[:rows] = torch.from_numpy(lengths)
    table.generated[:rows] = torch.from_numpy(rng.integers(0, 6, rows))
    table.output_len[:rows] = torch.from_numpy(rng.integers(1, 9, rows))
    table.finished[:rows] = torch.from_numpy(rng.random(rows) < 0.25)
    table.stopped[:rows] = table.finished[:rows] & torch.from_numpy(rng.random(rows) < 0.5).to(KERNEL_DEVICE)
    table.park[:rows] = torch.from_numpy(rng.integers(0, 8, rows))
    ends = [END if i % 3 else int(rng.integers(0, LIMIT)) for i in range(rows)]
    requests = [GenerationRequest(input_ids=np.zeros(1, dtype=np.int64), output_len=8, end_id=end,
                                  min_length=int(rng.integers(1, 9)) if min_length else 0) for end in ends]
    params = SlotParams.build(requests, 1, torch.device(KERNEL_DEVICE))
    for name, values in table.params.items():
        values[:rows] = getattr(params, name)
    logits = torch.from_numpy(rng.standard_normal((rows + 3, VOCAB)).astype(np.float16)).to(KERNEL_DEVICE)
    for i in range(rows):
        kind = i % 5
        if kind in (1, 3, 4):  # the planted cases run
            table.finished[i] = False
        if kind == 1:  # a tie: the first index wins
            top = float(logits[i].max()) + 1
            logits[i, 700], logits[i, 40_000] = top, top
        elif kind == 2:  # the best id is past the vocabulary limit: masked
            logits[i, LIMIT + 10] = 60.0
        elif kind == 3:  # a tie across the kernel's blocks, with the end id ahead of both: allowed once the row has
            logits[i, ends[i]] = 30.0  # generated exactly min_length tokens, banned one token before
            logits[i, 5000], logits[i, 45_000] = 29.0, 29.0
            table.generated[i] = max(0, requests[i].min_length - (i // 5) % 2)
        elif kind == 4:  # only end_id allowed: under the min_length ban the row has nothing left and ends
            logits[i, :] = float("-inf")
            logits[i, ends[i]] = 1.0
    return table, logits, params


def state(table: _SlotTable, rows: int) -> dict[str, torch.Tensor]:
    return {name: getattr(table, name)[:rows].clone()
            for name in ("history", "lengths", "generated", "finished", "stopped")}


@needs_kernel_device
@pytest.mark.parametrize("rows", [1, 7, 64])
@pytest.mark.parametrize("min_length", [True, False])
def test_the_fused_greedy_step_equals_the_reference_ops(rows: int, min_length: bool) -> None:
    fused_table, logits, params = table_and_logits(rows, seed=rows, min_length=min_length)
    reference_table, _, _ = table_and_logits(rows, seed=rows, min_length=min_length)
    assert fused_selection_applies(params, stop_words=None, bad_words=None, want_log_probs=False)
    assert params.use_min_length == min_length
    first = None
    for step in range(3):  # consecutive steps: each starts from the state the previous one left
        expected = select_tokens(reference_table, rows, logits, params, LIMIT)
        first = first or expected
        got = select_tokens(fused_table, rows, logits, params, LIMIT, fused=True)
        for name, want, have in zip(("flags", "log-probs", "tokens", "positions"), expected, got):
            if want is None:
                assert have is None
                continue
            assert torch.equal(want.cpu(), have.cpu()), (step, name, want, have)
        for name, want in state(reference_table, rows).items():
            assert torch.equal(want.cpu(), state(fused_table, rows)[name].cpu()), (step, name)
    # The planted cases took the branches they were planted for (the reference decided them the same way).
    tokens = first[0][0].cpu()
    if rows > 4:
        assert tokens[1] == 700 and tokens[3] == int(params.end_id[3])
    if rows > 4:
        assert tokens[4] == int(params.end_id[4])


def test_steps_the_kernels_do_not_cover_keep_the_reference_ops() -> None:
    request = GenerationRequest(input_ids=np.zeros(1, dtype=np.int64), output_len=4, end_id=END)
    plain = SlotParams.build([request], 1, torch.device("cpu"))
    assert fused_selection_applies(plain, stop_words=None, bad_words=None, want_log_probs=False)
    assert not fused_selection_applies(plain, stop_words=None, bad_words=None, want_log_probs=True)
    for changes in ({"top_k": 4, "top_p": 0.0}, {"temperature": 0.5, "top_k": 1}, {"repetition_penalty": 1.3},
                    {"presence_penalty": 0.5}, {"frequency_penalty": 0.5}):
        other = GenerationRequest(input_ids=np.zeros(1, dtype=np.int64), output_len=4, end_id=END, **changes)
        params = SlotParams.build([request, other], 1, torch.device("cpu"))
        assert not fused_selection_applies(params, stop_words=None, bad_words=None, want_log_probs=False), changes
