"""One greedy step's token selection in two Triton kernels (CUDA only; `sampling.py`'s PyTorch ops stay the reference).

Why: at batch 1 the selection of an in-flight step (`step_graphs.select_tokens`: logits to float32, the min_length ban
of end_id, the vocabulary mask, the check for rows left without any allowed token, argmax, then the slot table's
bookkeeping) is ~30 small kernels inside the step's graph, ~80 us of device time on an H200 between the decode's last
kernel and the token's copy to the host: two of them reduce a whole 50k-wide row in one thread block (the exhausted
check's max, 7 us, and the argmax, 13 us). Every streamed token waits for it, the first one included. Here:
  1. `_partial_argmax_kernel`, grid (rows, vocab / BLOCK): each program takes one BLOCK of a row's logits with the bans
     applied and leaves its best value and the first index holding it;
  2. `_greedy_step_kernel`, grid (rows,): the row's best over those partials (the first index on ties, as
     torch.argmax), end_id for a row with nothing allowed (as `process_logits`), then `advance_rows`' bookkeeping for a
     greedy row: finished rows emit end_id and stay put, the token is appended at the row's length, end_id stops the
     row, the output length finishes it; writes the step's [4, rows] flags and the decode's inputs.
It covers the steps that need nothing else: every row greedy, no temperature or penalties, no stop or bad words, no
log-probs (`step_graphs.fused_selection_applies`); the rest keep the reference ops. Shape-static and without host
syncs: runs inside a step graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .sampling import SlotParams

BLOCK = 2048  # logits per program of the first kernel: 25 programs a row for GPT-2's 50,257 ids


# The sizes are not specialized on (Triton compiles a variant per value class otherwise: 1, multiples of 16, ...): one
# compiled kernel serves every rows bucket, so a bucket's first step captures without compiling.
@triton.jit(do_not_specialize=["logits_stride", "vocab", "splits"])
def _partial_argmax_kernel(logits_ptr, logits_stride, end_id_ptr, generated_ptr, min_length_ptr, best_ptr, index_ptr,
                           vocab, splits, USE_MIN_LENGTH: tl.constexpr, BLOCK: tl.constexpr):
    row, split = tl.program_id(0), tl.program_id(1)
    ids = split * BLOCK + tl.arange(0, BLOCK)
    values = tl.load(logits_ptr + row * logits_stride + ids, mask=ids < vocab, other=float("-inf")).to(tl.float32)
    if USE_MIN_LENGTH:  # end_id is banned until the row has generated min_length tokens
        too_short = tl.load(generated_ptr + row) < tl.load(min_length_ptr + row)
        values = tl.where((ids == tl.load(end_id_ptr + row)) & too_short, float("-inf"), values)
    best, index = tl.max(values, axis=0, return_indices=True, return_indices_tie_break_left=True)
    tl.store(best_ptr + row * splits + split, best)
    tl.store(index_ptr + row * splits + split, (split * BLOCK + index).to(tl.int64))


@triton.jit(do_not_specialize=["splits", "history_stride", "rows"])
def _greedy_step_kernel(best_ptr, index_ptr, splits, end_id_ptr, history_ptr, history_stride, lengths_ptr,
                        generated_ptr, output_len_ptr, finished_ptr, stopped_ptr, park_ptr, flags_ptr, tokens_ptr,
                        positions_ptr, rows, USE_MIN_LENGTH: tl.constexpr, SPLITS: tl.constexpr):
    row = tl.program_id(0)
    parts = tl.arange(0, SPLITS)
    best = tl.load(best_ptr + row * splits + parts, mask=parts < splits, other=float("-inf"))
    top, first = tl.max(best, axis=0, return_indices=True, return_indices_tie_break_left=True)
    token = tl.load(index_ptr + row * splits + first)  # the earliest split holding the maximum: the first index
    end_id = tl.load(end_id_ptr + row)
    if USE_MIN_LENGTH:  # the bans left nothing allowed: the row ends (process_logits)
        token = tl.where(top == float("-inf"), end_id, token)
    finished = tl.load(finished_ptr + row) != 0
    active = finished == 0
    token = tl.where(active, token, end_id)  # finished rows emit end_id and stay put
    length = tl.load(lengths_ptr + row)
    tl.store(history_ptr + row * history_stride + length, token)
    length += active.to(tl.int64)
    generated = tl.load(generated_ptr + row) + active.to(tl.int64)
    hit_stop = token == end_id
    stopped = (tl.load(stopped_ptr + row) != 0) | (active & hit_stop)
    finished = finished | (active & (hit_stop | (generated >= tl.load(output_len_ptr + row))))
    tl.store(lengths_ptr + row, length)
    tl.store(generated_ptr + row, generated)
    tl.store(finished_ptr + row, finished)
    tl.store(stopped_ptr + row, stopped)
    tl.store(flags_ptr + row, token)
    tl.store(flags_ptr + rows + row, active.to(tl.int64))
    tl.store(flags_ptr + 2 * rows + row, finished.to(tl.int64))
    tl.store(flags_ptr + 3 * rows + row, stopped.to(tl.int64))
    tl.store(tokens_ptr + row, token)
    # A running row's next position is its length - 1; finished and free slots decode at their parking position.
    tl.store(positions_ptr + row, tl.where(finished, tl.load(park_ptr + row), length - 1))


def greedy_step(logits: torch.Tensor, params: SlotParams, *, history: torch.Tensor, lengths: torch.Tensor,
                generated: torch.Tensor, output_len: torch.Tensor, finished: torch.Tensor, stopped: torch.Tensor,
                park: torch.Tensor, vocab_limit: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`step_graphs.select_tokens` for a plain greedy step (`step_graphs.fused_selection_applies`): logits [rows, V];
    the slot table's [rows] columns (contiguous) and history [rows, S] advance in place -> (flags [4, rows] int64:
    tokens, active, finished, stopped; the decode's tokens [rows]; its positions [rows])."""
    rows, vocab = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    splits = triton.cdiv(min(vocab, vocab_limit), BLOCK)
    best = torch.empty((rows, splits), dtype=torch.float32, device=logits.device)
    index = torch.empty((rows, splits), dtype=torch.int64, device=logits.device)
    _partial_argmax_kernel[(rows, splits)](
        logits, logits.stride(0), params.end_id, generated, params.min_length, best, index, min(vocab, vocab_limit),
        splits, USE_MIN_LENGTH=params.use_min_length, BLOCK=BLOCK, num_warps=8)
    flags = torch.empty((4, rows), dtype=torch.int64, device=logits.device)
    tokens = torch.empty(rows, dtype=torch.int64, device=logits.device)
    positions = torch.empty(rows, dtype=torch.int64, device=logits.device)
    _greedy_step_kernel[(rows,)](
        best, index, splits, params.end_id, history, history.stride(0), lengths, generated, output_len, finished,
        stopped, park, flags, tokens, positions, rows, USE_MIN_LENGTH=params.use_min_length,
        SPLITS=triton.next_power_of_2(splits), num_warps=1)
    return flags, tokens, positions
