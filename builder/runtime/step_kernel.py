"""The whole decode step of one row as one persistent Triton kernel (`OneLaunchStep`), for batch 1 on CUDA.

Why: at batch 1 a step streams the weights once (2.6 GB for the 1.3B model in fp16) and computes almost nothing, so
its time is the weights' bytes over the memory bandwidth plus whatever keeps the memory idle. With a kernel per GEMV
(gpt_kernels.py) each of the ~100 GEMVs of a step starts streaming only once the previous one has finished: its ramp,
its tail and the dependent chain between them (add, norm, attention) leave the memory idle, and the four GEMVs of a
layer took 858 us a step where copy bandwidth needs 569 (H200, docs/gpu/runs-2026-12-04e). Here one launch walks the
whole step, and a program loads its next task's weights before it waits for that task's input, so the weights of
the next stage stream while the current one finishes.

How: the step is a list of tasks in a fixed order (below; `_locate` decodes a ticket); every program takes the next
task with an atomic ticket, loads the task's weight tile into registers (32 KiB of fp16 by default), takes its next
ticket (the round trip overlaps the loads), waits on a counter until the task's inputs are complete, computes,
writes, and adds to the counter its consumers wait on (release; the waiter's read is acquire). A task depends only on
tasks earlier in the order, and tickets are handed out in that order to programs that are running; a program holds
at most one ticket it has not started, later than the one it runs. So the smallest unfinished task is always running
(were it only held, the task its holder runs would be smaller and unfinished) and its inputs are done: it proceeds.
No deadlock however many programs the GPU holds at once (a grid larger than the GPU only queues), and Triton's
interpreter (TRITON_INTERPRET=1, programs one after the other) runs it too, which is how the CPU test checks it.

Tasks (L layers, H hidden, d the head size; a tile is `rows_full` whole rows of a matrix, or `cols_split` output
rows of a d-wide slice of its K dimension):
  0              the embeddings: x_0 = wte[token] + wpe[position]
  per layer l    QKV: rows_full rows of LN_1(x_2l) @ W_qkv^T + b, head by head (q, k, v of head 0 first);
                 attention: one block of `key_block` cached keys of one head (the head's q, k, v done), the last
                   block of a head to finish merges the blocks with the step's own key and writes that key and value
                   into the cache;
                 attention output: a d-wide slice (one head, done) of the K dimension for cols_split outputs, as
                   fp32 partials; the last head to finish a tile sums them in head order and adds the bias and the
                   residual: x_2l+1;
                 FC1: rows_full rows of act(LN_2(x_2l+1) @ W_fc1^T + b);
                 FC2: a d-wide K slice (its FC1 rows done) for cols_split outputs, finished as above: x_2l+2;
  then           the LM head: rows_full rows of LN_f(x_2L) @ W_lm^T.
The layers' matrices may be int8 with a scale per output row (quantize.py): a task then scales its sums. Each
LayerNorm is computed by every task that reads it, from the whole row (H values: nothing next to a 32 KiB tile),
in fp32 and rounded to the model's dtype as the eager ops round, so no task has to wait for a norm task.
The last program to exit zeroes the counters for the next step. The workspace holds every intermediate of the step
(~22 MB for the 1.3B model at 2048 positions), none reused within it: no task overwrites what a slower one reads.

The launch shape (tile size, warps, programs a multiprocessor, register cap) and why: `StepLaunch`.
Import this module only where Triton is installed (gpt.py imports it lazily).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .gpt_kernels import ACTIVATIONS, activate, layer_norm_row

# Polls before a wait gives up (`_wait_for`): [Triton's interpreter (a poll is ~0.1 ms of Python; tasks run in ticket
# order there, so a wait that is not met at once never will be), a GPU (~4 s at ~1 us a poll)].
SPIN_LIMITS = (1000, 1 << 22)

# The stages of the step, as `_locate` names a ticket's task (STAGES[stage]: the names traces and benchmarks print).
STAGES = ("embeddings", "qkv", "attention", "attention output", "fc1", "fc2", "lm head")
EMBEDDINGS, QKV, ATTENTION, ATTENTION_OUT, FC1, FC2, LM_HEAD = (tl.constexpr(i) for i in range(len(STAGES)))


@triton.jit
def _wait_for(counter_ptr, target, tickets_ptr, stalls_ptr, trace_slot, TRACE: tl.constexpr,
              SPIN_LIMIT: tl.constexpr):
    """Takes this program's next ticket, then spins until the counter reaches target -> the next ticket. The ticket is
    taken once the task's weight loads are issued, so its round trip to L2 overlaps them rather than coming before
    them; holding it while this task waits is safe (the module docstring). After the spin, this program's loads see
    what its producers wrote before their release (acquire by the thread that polls, then the barrier for the
    others). A wait that outlasts SPIN_LIMIT polls (seconds on a GPU; a wait in a correct step lasts microseconds)
    gives up and counts itself in stalls: a lost signal then makes wrong logits and a count the caller can read, not
    a GPU that never returns. SPIN_LIMIT 0: no wait at all (`OneLaunchStep.__call__`'s wait=False, a bound).
    TRACE: when the wait ended (-1: it gave up)."""
    ticket = tl.atomic_add(tickets_ptr, 1, sem="relaxed", scope="gpu")
    polls = 0
    if SPIN_LIMIT > 0:
        while (tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu") < target) & (polls < SPIN_LIMIT):
            polls += 1
        tl.debug_barrier()
        if polls >= SPIN_LIMIT:
            tl.atomic_add(stalls_ptr, 1, sem="relaxed", scope="gpu")
    if TRACE:
        tl.store(trace_slot + 2, tl.where((SPIN_LIMIT > 0) & (polls >= SPIN_LIMIT), -1, tl.extra.cuda.globaltimer()))
    return ticket


@triton.jit
def _signal(counter_ptr, amount):
    tl.debug_barrier()  # every thread's stores before the release
    tl.atomic_add(counter_ptr, amount, sem="release", scope="gpu")


@triton.jit
def _layer_norm(x_ptr, gain, shift, cols, hidden, eps, DTYPE: tl.constexpr):
    """One row of the residual stream, LayerNorm'd in fp32 and rounded to DTYPE (as F.layer_norm in DTYPE) -> fp32.
    Loaded past L1: another program wrote it during this launch."""
    inside = cols < hidden
    x = tl.load(x_ptr + cols, mask=inside, other=0.0, cache_modifier=".cg").to(tl.float32)
    return layer_norm_row(x, gain, shift, inside, hidden, eps).to(DTYPE).to(tl.float32)


@triton.jit
def _embedding_task(tokens_ptr, wte_ptr, wpe_ptr, xs_ptr, res_ptr, tickets_ptr, position, cols,
                    HIDDEN: tl.constexpr, N_TILES: tl.constexpr):
    inside = cols < HIDDEN
    token = tl.load(tokens_ptr)
    word = tl.load(wte_ptr + token.to(tl.int64) * HIDDEN + cols, mask=inside, other=0.0)
    where = tl.load(wpe_ptr + position.to(tl.int64) * HIDDEN + cols, mask=inside, other=0.0)
    ticket = tl.atomic_add(tickets_ptr, 1, sem="relaxed", scope="gpu")  # the next, as `_wait_for` takes it
    tl.store(xs_ptr + cols, word + where, mask=inside)  # in the model's dtype, as the eager add
    _signal(res_ptr, N_TILES)
    return ticket


@triton.jit
def _normed_rows_task(w_ptr, scale_ptr, bias_ptr, gain_ptr, shift_ptr, x_ptr, out_ptr, ready_ptr, done_ptr, rows,
                      n_rows, cols, eps, HIDDEN: tl.constexpr, N_TILES: tl.constexpr, SCALED: tl.constexpr,
                      HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, tickets_ptr, stalls_ptr, trace_slot,
                      TRACE: tl.constexpr, SPIN_LIMIT: tl.constexpr):
    """out[rows] = act(LayerNorm(x) @ W[rows]^T + bias) (QKV, FC1, the LM head): the weight rows, bias and norm loaded
    first, then the wait for x (all N_TILES tiles of it), then one product of whole rows. SCALED: W is int8 with a
    scale per row (quantize.py)."""
    inside = cols < HIDDEN
    w = tl.load(w_ptr + rows[:, None] * HIDDEN + cols[None, :], mask=(rows[:, None] < n_rows) & inside[None, :],
                other=0.0)  # [R, HIDDEN_POW2]
    if SCALED:
        row_scale = tl.load(scale_ptr + rows, mask=rows < n_rows, other=0.0)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + rows, mask=rows < n_rows, other=0.0).to(tl.float32)
    gain = tl.load(gain_ptr + cols, mask=inside, other=0.0).to(tl.float32)
    shift = tl.load(shift_ptr + cols, mask=inside, other=0.0).to(tl.float32)
    ticket = _wait_for(ready_ptr, N_TILES, tickets_ptr, stalls_ptr, trace_slot, TRACE, SPIN_LIMIT)
    h = _layer_norm(x_ptr, gain, shift, cols, HIDDEN, eps, x_ptr.dtype.element_ty)
    y = tl.sum(w.to(tl.float32) * h[None, :], axis=1)
    if SCALED:
        y = y * row_scale
    if HAS_BIAS:
        y += bias
    tl.store(out_ptr + rows, activate(y, ACTIVATION).to(out_ptr.dtype.element_ty), mask=rows < n_rows)
    if done_ptr is not None:
        _signal(done_ptr, 1)
    return ticket


@triton.jit
def _attention_task(qkv_ptr, k_cache_ptr, v_cache_ptr, part_ptr, attn_ptr, ready_ptr, seen_ptr, done_ptr, position,
                    split, key_splits, scale, HIDDEN: tl.constexpr, HEAD_DIM: tl.constexpr,
                    HEAD_TASKS: tl.constexpr, KEY_BLOCK: tl.constexpr, MAX_SPLITS: tl.constexpr, tickets_ptr,
                    stalls_ptr, trace_slot, TRACE: tl.constexpr, SPIN_LIMIT: tl.constexpr):
    """One block of one head's cached keys (pointers at the head: its q in qkv, its cache, its partials, its output);
    the head's last block to finish merges the blocks and the step's own key, and writes that key and value into
    the cache."""
    dims = tl.arange(0, HEAD_DIM)
    keys = split * KEY_BLOCK + tl.arange(0, KEY_BLOCK)
    cached = keys < position  # the step's own key is merged by the head's last block
    at = keys[:, None] * HEAD_DIM + dims[None, :]
    k = tl.load(k_cache_ptr + at, mask=cached[:, None], other=0.0)  # [KEY_BLOCK, HEAD_DIM]
    v = tl.load(v_cache_ptr + at, mask=cached[:, None], other=0.0)
    ticket = _wait_for(ready_ptr, HEAD_TASKS, tickets_ptr, stalls_ptr, trace_slot, TRACE, SPIN_LIMIT)
    q = tl.load(qkv_ptr + dims, cache_modifier=".cg").to(tl.float32) * scale
    scores = tl.where(cached, tl.sum(k.to(tl.float32) * q[None, :], axis=1), -float("inf"))
    top = tl.max(scores, axis=0)
    safe = tl.where(top == -float("inf"), 0.0, top)  # a block past the position: no keys, no NaN
    p = tl.where(cached, tl.exp(scores - safe), 0.0)
    slot = part_ptr + split * (HEAD_DIM + 2)  # acc [HEAD_DIM], max, sum
    tl.store(slot + dims, tl.sum(p[:, None] * v.to(tl.float32), axis=0))
    tl.store(slot + HEAD_DIM, top)
    tl.store(slot + HEAD_DIM + 1, tl.sum(p, axis=0))
    tl.debug_barrier()
    if tl.atomic_add(seen_ptr, 1, sem="acq_rel", scope="gpu") == key_splits - 1:
        blocks = tl.arange(0, MAX_SPLITS)
        used = blocks < key_splits
        maxes = tl.load(part_ptr + blocks * (HEAD_DIM + 2) + HEAD_DIM, mask=used, other=-float("inf"),
                        cache_modifier=".cg")
        sums = tl.load(part_ptr + blocks * (HEAD_DIM + 2) + HEAD_DIM + 1, mask=used, other=0.0, cache_modifier=".cg")
        accs = tl.load(part_ptr + blocks[:, None] * (HEAD_DIM + 2) + dims[None, :], mask=used[:, None], other=0.0,
                       cache_modifier=".cg")
        # The step's key and value rounded to the cache's dtype, as written (the eager path reads them back).
        k_own = tl.load(qkv_ptr + HIDDEN + dims, cache_modifier=".cg").to(k_cache_ptr.dtype.element_ty)
        v_own = tl.load(qkv_ptr + 2 * HIDDEN + dims, cache_modifier=".cg").to(v_cache_ptr.dtype.element_ty)
        s_own = tl.sum(k_own.to(tl.float32) * q, axis=0)
        top = tl.maximum(tl.max(maxes, axis=0), s_own)
        weights = tl.where(used, tl.exp(maxes - top), 0.0)
        w_own = tl.exp(s_own - top)
        out = (tl.sum(weights[:, None] * accs, axis=0) + w_own * v_own.to(tl.float32)) / (
            tl.sum(weights * sums, axis=0) + w_own)
        tl.store(attn_ptr + dims, out.to(attn_ptr.dtype.element_ty))
        tl.store(k_cache_ptr + position * HEAD_DIM + dims, k_own)
        tl.store(v_cache_ptr + position * HEAD_DIM + dims, v_own)
        _signal(done_ptr, 1)
    return ticket


@triton.jit
def _into_residual_task(w_ptr, scale_ptr, x_ptr, part_ptr, bias_ptr, x_in_ptr, x_out_ptr, ready_ptr, seen_ptr,
                        done_ptr, ready_target, slice_index, tile, k_total, HIDDEN: tl.constexpr,
                        HEAD_DIM: tl.constexpr, COLS_SPLIT: tl.constexpr, PARTS: tl.constexpr,
                        PARTS_POW2: tl.constexpr, SCALED: tl.constexpr, tickets_ptr, stalls_ptr, trace_slot,
                        TRACE: tl.constexpr, SPIN_LIMIT: tl.constexpr):
    """Attention output or FC2: a HEAD_DIM-wide slice of K (x's slice ready) for COLS_SPLIT outputs, as an fp32
    partial [PARTS, HIDDEN]; the tile's last slice to finish sums the partials in slice order (the same bits
    whichever is last) and adds the bias and the residual: x_out[tile] = x_in + (sum + bias), rounded as the eager
    ops round (the product in the model's dtype, then the sum). SCALED: W is int8 with a scale per output row, which
    each partial carries."""
    outs = tile * COLS_SPLIT + tl.arange(0, COLS_SPLIT)
    ks = slice_index * HEAD_DIM + tl.arange(0, HEAD_DIM)
    w = tl.load(w_ptr + outs[:, None] * k_total + ks[None, :])  # [COLS_SPLIT, HEAD_DIM]
    if SCALED:
        out_scale = tl.load(scale_ptr + outs)
    ticket = _wait_for(ready_ptr, ready_target, tickets_ptr, stalls_ptr, trace_slot, TRACE, SPIN_LIMIT)
    x = tl.load(x_ptr + ks, cache_modifier=".cg").to(tl.float32)
    product = tl.sum(w.to(tl.float32) * x[None, :], axis=1)
    if SCALED:
        product = product * out_scale
    tl.store(part_ptr + slice_index * HIDDEN + outs, product)
    tl.debug_barrier()
    if tl.atomic_add(seen_ptr, 1, sem="acq_rel", scope="gpu") == PARTS - 1:
        slots = tl.arange(0, PARTS_POW2)
        partial = tl.load(part_ptr + slots[:, None] * HIDDEN + outs[None, :], mask=slots[:, None] < PARTS, other=0.0,
                          cache_modifier=".cg")  # [PARTS_POW2, COLS_SPLIT]
        dtype = x_out_ptr.dtype.element_ty
        delta = (tl.sum(partial, axis=0) + tl.load(bias_ptr + outs).to(tl.float32)).to(dtype).to(tl.float32)
        residual = tl.load(x_in_ptr + outs, cache_modifier=".cg").to(tl.float32)
        tl.store(x_out_ptr + outs, (residual + delta).to(dtype))
        _signal(done_ptr, 1)
    return ticket


@triton.jit
def _prefetch_lines(base_ptr, rows, row_elements, stride, LINES: tl.constexpr):
    """Asks L2 for `rows` rows of `row_elements` each (`stride` apart) from base_ptr, one request per 128-byte line,
    without waiting or holding registers (`prefetch.global.L2`: a hint that blocks nothing; every line asked for is
    inside the tensor, as PTX does not say what a prefetch of an unmapped address does)."""
    per_line = 128 // (base_ptr.dtype.element_ty.primitive_bitwidth // 8)
    per_row = tl.maximum(row_elements // per_line, 1)
    lines = tl.arange(0, LINES)
    wanted = lines < rows * per_row
    at = tl.where(wanted, (lines // per_row) * stride + (lines % per_row) * per_line, 0)
    tl.inline_asm_elementwise("prefetch.global.L2 [$1];\n mov.u32 $0, 0;", "=r,l", [base_ptr + at], dtype=tl.int32,
                              is_pure=False, pack=1)


@triton.jit
def _stage_starts(key_splits, HIDDEN: tl.constexpr, INTER: tl.constexpr, HEADS: tl.constexpr,
                  HEAD_DIM: tl.constexpr, ROWS_FULL: tl.constexpr, N_TILES: tl.constexpr):
    """Where each stage's tasks start within a layer's, and the layer's task count: (attention, attention output,
    FC1, FC2, per layer)."""
    att_first = 3 * HIDDEN // ROWS_FULL  # after QKV's
    out_first = att_first + HEADS * key_splits
    fc1_first = out_first + HEADS * N_TILES
    fc2_first = fc1_first + INTER // ROWS_FULL
    return att_first, out_first, fc1_first, fc2_first, fc2_first + (INTER // HEAD_DIM) * N_TILES


@triton.jit
def _locate(ticket, key_splits, HIDDEN: tl.constexpr, INTER: tl.constexpr, HEADS: tl.constexpr,
            HEAD_DIM: tl.constexpr, LAYERS: tl.constexpr, ROWS_FULL: tl.constexpr, N_TILES: tl.constexpr):
    """A ticket's task in the kernel's order (the module docstring) -> (stage, layer, a, b). The one home of that
    order: the main loop runs it, the L2 prefetch reads its weights, `OneLaunchStep.task_kinds` lists it.
    QKV, FC1, the LM head: a = the tile's first row, b = the counter it adds to (QKV: its head; FC1: its FC2 chunk);
    attention: a = the key block, b = the head; attention output, FC2: a = the K slice (head; chunk), b = the output
    tile."""
    att_first, out_first, fc1_first, fc2_first, per_layer = _stage_starts(key_splits, HIDDEN, INTER, HEADS,
                                                                          HEAD_DIM, ROWS_FULL, N_TILES)
    slice_rows: tl.constexpr = HEAD_DIM // ROWS_FULL  # QKV or FC1 tasks per head-wide slice
    layer = tl.minimum(tl.maximum(ticket - 1, 0) // per_layer, LAYERS)
    i = ticket - 1 - layer * per_layer  # within the layer
    stage = EMBEDDINGS
    a = 0
    b = 0
    if ticket == 0:
        stage = EMBEDDINGS
    elif layer == LAYERS:
        stage = LM_HEAD
        a = i * ROWS_FULL
    elif i < att_first:  # heads in order, q k v each
        stage = QKV
        b = i // (3 * slice_rows)
        a = (i % (3 * slice_rows)) // slice_rows * HIDDEN + b * HEAD_DIM + (i % slice_rows) * ROWS_FULL
    elif i < out_first:
        stage = ATTENTION
        a = (i - att_first) % key_splits
        b = (i - att_first) // key_splits
    elif i < fc1_first:
        stage = ATTENTION_OUT
        a = (i - out_first) // N_TILES
        b = (i - out_first) % N_TILES
    elif i < fc2_first:
        stage = FC1
        a = (i - fc1_first) * ROWS_FULL
        b = (i - fc1_first) // slice_rows
    else:
        stage = FC2
        a = (i - fc2_first) // N_TILES
        b = (i - fc2_first) % N_TILES
    return stage, layer, a, b


@triton.jit
def _locate_kernel(out_ptr, key_splits, HIDDEN: tl.constexpr, INTER: tl.constexpr, HEADS: tl.constexpr,
                   HEAD_DIM: tl.constexpr, LAYERS: tl.constexpr, ROWS_FULL: tl.constexpr, N_TILES: tl.constexpr):
    """out[ticket] = `_locate`(ticket), a program a ticket (`OneLaunchStep.locate`)."""
    ticket = tl.program_id(0)
    stage, layer, a, b = _locate(ticket, key_splits, HIDDEN, INTER, HEADS, HEAD_DIM, LAYERS, ROWS_FULL, N_TILES)
    tl.store(out_ptr + 4 * ticket + tl.arange(0, 4),
             tl.where(tl.arange(0, 4) == 0, stage, tl.where(tl.arange(0, 4) == 1, layer,
                                                            tl.where(tl.arange(0, 4) == 2, a, b))))


@triton.jit
def _prefetch_task(stage, layer, a, b, key_splits, qkv_w_ptr, out_w_ptr, fc1_w_ptr, fc2_w_ptr, lm_w_ptr,
                   k_cache_ptr, v_cache_ptr, cache_layer_stride, max_seq, HIDDEN: tl.constexpr, INTER: tl.constexpr,
                   HEAD_DIM: tl.constexpr, VOCAB: tl.constexpr, ROWS_FULL: tl.constexpr, COLS_SPLIT: tl.constexpr,
                   KEY_BLOCK: tl.constexpr, LINES: tl.constexpr):
    """L2 prefetch of the weights (or cached keys and values) that a later ticket's task (`_locate`) reads."""
    wide = layer.to(tl.int64)
    if stage == LM_HEAD:
        _prefetch_lines(lm_w_ptr + a.to(tl.int64) * HIDDEN, 1, tl.minimum(ROWS_FULL, VOCAB - a) * HIDDEN, 0, LINES)
    elif stage == QKV:
        _prefetch_lines(qkv_w_ptr + wide * 3 * HIDDEN * HIDDEN + a * HIDDEN, 1, ROWS_FULL * HIDDEN, 0, LINES)
    elif stage == ATTENTION:
        at = wide * cache_layer_stride + b * max_seq * HEAD_DIM + a * KEY_BLOCK * HEAD_DIM
        keys = tl.minimum(KEY_BLOCK, max_seq - a * KEY_BLOCK)  # never past the cache (the last head's last block)
        _prefetch_lines(k_cache_ptr + at, 1, keys * HEAD_DIM, 0, LINES)
        _prefetch_lines(v_cache_ptr + at, 1, keys * HEAD_DIM, 0, LINES)
    elif stage == ATTENTION_OUT:
        _prefetch_lines(out_w_ptr + wide * HIDDEN * HIDDEN + b * COLS_SPLIT * HIDDEN + a * HEAD_DIM, COLS_SPLIT,
                        HEAD_DIM, HIDDEN, LINES)
    elif stage == FC1:
        _prefetch_lines(fc1_w_ptr + wide * INTER * HIDDEN + a * HIDDEN, 1, ROWS_FULL * HIDDEN, 0, LINES)
    elif stage == FC2:
        _prefetch_lines(fc2_w_ptr + wide * HIDDEN * INTER + b * COLS_SPLIT * INTER + a * HEAD_DIM, COLS_SPLIT,
                        HEAD_DIM, INTER, LINES)


@triton.jit
def _one_launch_step_kernel(
        tokens_ptr, positions_ptr, wte_ptr, wpe_ptr,
        ln1_w_ptr, ln1_b_ptr, qkv_w_ptr, qkv_b_ptr, out_w_ptr, out_b_ptr,
        ln2_w_ptr, ln2_b_ptr, fc1_w_ptr, fc1_b_ptr, fc2_w_ptr, fc2_b_ptr, lnf_w_ptr, lnf_b_ptr, lm_w_ptr,
        qkv_s_ptr, out_s_ptr, fc1_s_ptr, fc2_s_ptr, k_cache_ptr, v_cache_ptr, logits_ptr,
        xs_ptr, qkv_ptr, attn_ptr, up_ptr, att_part_ptr, out_part_ptr, fc2_part_ptr, counters_ptr, trace_ptr,
        total, key_splits, cache_layer_stride, max_seq, eps, scale, ahead,
        HIDDEN: tl.constexpr, HIDDEN_POW2: tl.constexpr, INTER: tl.constexpr, HEADS: tl.constexpr,
        HEADS_POW2: tl.constexpr, HEAD_DIM: tl.constexpr, LAYERS: tl.constexpr, VOCAB: tl.constexpr,
        ROWS_FULL: tl.constexpr, COLS_SPLIT: tl.constexpr, KEY_BLOCK: tl.constexpr, MAX_SPLITS: tl.constexpr,
        CHUNKS: tl.constexpr, CHUNKS_POW2: tl.constexpr, ACTIVATION: tl.constexpr, SCALED: tl.constexpr,
        C_RES: tl.constexpr, C_QKV: tl.constexpr, C_ATT_SEEN: tl.constexpr, C_ATT: tl.constexpr,
        C_OUT_SEEN: tl.constexpr, C_FC1: tl.constexpr, C_FC2_SEEN: tl.constexpr, N_COUNTERS: tl.constexpr,
        TRACE: tl.constexpr, SPIN_LIMIT: tl.constexpr, PREFETCH_LINES: tl.constexpr):
    tickets_ptr = counters_ptr  # counter 0: the next ticket; 1: programs out
    stalls_ptr = counters_ptr + N_COUNTERS  # past the counters: not zeroed by the kernel
    n_tiles: tl.constexpr = HIDDEN // COLS_SPLIT  # output tiles of a GEMV into the residual
    slice_rows: tl.constexpr = HEAD_DIM // ROWS_FULL  # QKV or FC1 tasks per head-wide slice
    cols = tl.arange(0, HIDDEN_POW2)
    fulls = tl.arange(0, ROWS_FULL)
    position = tl.load(positions_ptr)

    # Each task takes this program's next ticket as it starts waiting (`_wait_for`), so the first one is taken here.
    ticket = tl.atomic_add(tickets_ptr, 1, sem="relaxed", scope="gpu")
    while ticket < total:
        slot = trace_ptr + ticket * 4  # TRACE: [multiprocessor, started, inputs ready, done] per task, ns
        if PREFETCH_LINES > 0:  # the task `ahead` tickets on, whichever program takes it: a window ahead of them all
            if ticket + ahead < total:
                p_stage, p_layer, p_a, p_b = _locate(ticket + ahead, key_splits, HIDDEN, INTER, HEADS, HEAD_DIM,
                                                     LAYERS, ROWS_FULL, n_tiles)
                _prefetch_task(p_stage, p_layer, p_a, p_b, key_splits, qkv_w_ptr, out_w_ptr, fc1_w_ptr, fc2_w_ptr,
                               lm_w_ptr, k_cache_ptr, v_cache_ptr, cache_layer_stride, max_seq, HIDDEN, INTER,
                               HEAD_DIM, VOCAB, ROWS_FULL, COLS_SPLIT, KEY_BLOCK, PREFETCH_LINES)
        if TRACE:
            tl.store(slot, tl.extra.cuda.smid().to(tl.int64))
            tl.store(slot + 1, tl.extra.cuda.globaltimer())
            tl.store(slot + 2, tl.extra.cuda.globaltimer())  # no wait (the embeddings): ready when started
        stage, layer, a, b = _locate(ticket, key_splits, HIDDEN, INTER, HEADS, HEAD_DIM, LAYERS, ROWS_FULL, n_tiles)
        wide = layer.to(tl.int64)  # matrix and cache offsets past 2**31 elements in big models
        res = counters_ptr + C_RES + 2 * layer  # this layer's input stream is complete at n_tiles
        if stage == EMBEDDINGS:
            ticket = _embedding_task(tokens_ptr, wte_ptr, wpe_ptr, xs_ptr, counters_ptr + C_RES, tickets_ptr, position,
                                     cols, HIDDEN, n_tiles)
        elif stage == LM_HEAD:
            ticket = _normed_rows_task(lm_w_ptr, lm_w_ptr, lm_w_ptr, lnf_w_ptr, lnf_b_ptr, xs_ptr + 2 * LAYERS * HIDDEN,
                                       logits_ptr, res, None, a + fulls, VOCAB, cols, eps, HIDDEN, n_tiles, False,
                                       False, 0, tickets_ptr, stalls_ptr, slot, TRACE, SPIN_LIMIT)
        elif stage == QKV:  # rows of head b's q, k or v
            ticket = _normed_rows_task(qkv_w_ptr + wide * 3 * HIDDEN * HIDDEN, qkv_s_ptr + layer * 3 * HIDDEN,
                                       qkv_b_ptr + layer * 3 * HIDDEN, ln1_w_ptr + layer * HIDDEN,
                                       ln1_b_ptr + layer * HIDDEN, xs_ptr + 2 * layer * HIDDEN,
                                       qkv_ptr + layer * 3 * HIDDEN, res, counters_ptr + C_QKV + layer * HEADS + b,
                                       a + fulls, 3 * HIDDEN, cols, eps, HIDDEN, n_tiles, SCALED, True, 0,
                                       tickets_ptr, stalls_ptr, slot, TRACE, SPIN_LIMIT)
        elif stage == ATTENTION:  # key block a of head b
            at = layer * HEADS + b
            cache = wide * cache_layer_stride + b * max_seq * HEAD_DIM  # slot 0: the batch's only row
            ticket = _attention_task(qkv_ptr + layer * 3 * HIDDEN + b * HEAD_DIM, k_cache_ptr + cache,
                                     v_cache_ptr + cache, att_part_ptr + at * MAX_SPLITS * (HEAD_DIM + 2),
                                     attn_ptr + at * HEAD_DIM, counters_ptr + C_QKV + at,
                                     counters_ptr + C_ATT_SEEN + at, counters_ptr + C_ATT + at, position, a,
                                     key_splits, scale, HIDDEN, HEAD_DIM, 3 * slice_rows, KEY_BLOCK, MAX_SPLITS,
                                     tickets_ptr, stalls_ptr, slot, TRACE, SPIN_LIMIT)
        elif stage == ATTENTION_OUT:  # head a's slice of K for output tile b
            ticket = _into_residual_task(out_w_ptr + wide * HIDDEN * HIDDEN, out_s_ptr + layer * HIDDEN,
                                         attn_ptr + layer * HIDDEN, out_part_ptr + wide * HEADS * HIDDEN,
                                         out_b_ptr + layer * HIDDEN, xs_ptr + 2 * layer * HIDDEN,
                                         xs_ptr + (2 * layer + 1) * HIDDEN, counters_ptr + C_ATT + layer * HEADS + a,
                                         counters_ptr + C_OUT_SEEN + layer * n_tiles + b, res + 1, 1, a, b, HIDDEN,
                                         HIDDEN, HEAD_DIM, COLS_SPLIT, HEADS, HEADS_POW2, SCALED, tickets_ptr,
                                         stalls_ptr, slot, TRACE, SPIN_LIMIT)
        elif stage == FC1:  # rows of FC2's chunk b
            ticket = _normed_rows_task(fc1_w_ptr + wide * INTER * HIDDEN, fc1_s_ptr + layer * INTER,
                                       fc1_b_ptr + layer * INTER, ln2_w_ptr + layer * HIDDEN,
                                       ln2_b_ptr + layer * HIDDEN, xs_ptr + (2 * layer + 1) * HIDDEN,
                                       up_ptr + layer * INTER, res + 1, counters_ptr + C_FC1 + layer * CHUNKS + b,
                                       a + fulls, INTER, cols, eps, HIDDEN, n_tiles, SCALED, True, ACTIVATION,
                                       tickets_ptr, stalls_ptr, slot, TRACE, SPIN_LIMIT)
        else:  # FC2: chunk a of K (its FC1 rows done) for output tile b
            ticket = _into_residual_task(fc2_w_ptr + wide * HIDDEN * INTER, fc2_s_ptr + layer * HIDDEN,
                                         up_ptr + layer * INTER, fc2_part_ptr + wide * CHUNKS * HIDDEN,
                                         fc2_b_ptr + layer * HIDDEN, xs_ptr + (2 * layer + 1) * HIDDEN,
                                         xs_ptr + (2 * layer + 2) * HIDDEN, counters_ptr + C_FC1 + layer * CHUNKS + a,
                                         counters_ptr + C_FC2_SEEN + layer * n_tiles + b, res + 2, slice_rows, a, b,
                                         INTER, HIDDEN, HEAD_DIM, COLS_SPLIT, CHUNKS, CHUNKS_POW2, SCALED,
                                         tickets_ptr, stalls_ptr, slot, TRACE, SPIN_LIMIT)
        if TRACE:
            tl.store(slot + 3, tl.extra.cuda.globaltimer())

    # The last program out zeroes the counters (every other program has taken its last ticket) for the next step.
    if tl.atomic_add(counters_ptr + 1, 1, sem="acq_rel", scope="gpu") == tl.num_programs(0) - 1:
        for start in range(0, N_COUNTERS, 1024):
            at = start + tl.arange(0, 1024)
            tl.store(counters_ptr + at, tl.zeros([1024], dtype=tl.int32), mask=at < N_COUNTERS)


@dataclass(frozen=True)
class StepShape:
    """The model's shape as the step kernel needs it."""

    hidden: int
    inter: int
    heads: int
    head_dim: int
    layers: int
    vocab: int
    max_seq: int
    activation: str  # a gpt_kernels.ACTIVATIONS key
    eps: float  # the LayerNorms'


@dataclass(frozen=True)
class StepLaunch:
    """How the step is cut into tasks and launched: not tuned on a GPU yet (GPT_TRITON_STEP_LAUNCH, the first four
    fields as "tile,warps,programs,registers" with registers 0 for no cap, sets it for A/B runs).

    tile_elements: weight elements one task loads into registers before it waits; programs_per_sm: programs launched
    per multiprocessor; max_registers: a cap per thread (Triton's maxnreg). The bytes in flight are what streams the
    weights. Each kind of task alone needs <= 128 registers a thread at 16384 elements and 4 warps, but the one loop
    over them all takes 255 uncapped: 2 programs a multiprocessor. Capped at 168 it spills nothing, so 3 fit the 64K
    registers: 96 KiB of fp16 weights in flight on each multiprocessor, 12.7 MB on an H200, what 4.24 TB/s needs over
    ~3 us of latency; capped at 128, 4 fit but 208 bytes spill (bench/step_kernel_registers.py: Triton 3.6, sm_90,
    the 1.3B shape). Launching more programs than fit only queues them (tickets go to running programs)."""

    tile_elements: int = 16384
    num_warps: int = 4
    programs_per_sm: int = 3
    max_registers: int = 168  # 0: no cap
    # > 0: each program, as it takes ticket t, asks L2 for the tiles of ticket t + prefetch_rounds x programs (a
    # prefetch holds no registers, so the bytes in flight are no longer bounded by the register file). Off until
    # measured: a whole next matrix prefetched into L2 made the per-op kernels slower (docs/benchmarks.md), but this
    # window is ~13 MB a round, in an L2 of 50 MB.
    prefetch_rounds: int = 0
    key_block: int = 64

    @classmethod
    def parse(cls, text: str) -> StepLaunch:
        """The launch "TILE,WARPS,PROGRAMS[,REGISTERS[,PREFETCH_ROUNDS]]" names (REGISTERS 0: no cap; left out: the
        defaults)."""
        values = text.split(",")
        if len(values) not in (3, 4, 5) or not all(v.isdigit() for v in values) or not all(int(v) for v in values[:3]):
            raise ValueError(f"a one-launch step launch is 'TILE,WARPS,PROGRAMS[,REGISTERS[,PREFETCH_ROUNDS]]' (whole "
                             f"numbers, the first three positive; REGISTERS 0 for no cap), got {text!r}")
        tile, warps, programs, *rest = (int(v) for v in values)
        return cls(tile_elements=tile, num_warps=warps, programs_per_sm=programs,
                   max_registers=rest[0] if rest else cls.max_registers,
                   prefetch_rounds=rest[1] if len(rest) > 1 else cls.prefetch_rounds)

    @classmethod
    def from_environment(cls) -> StepLaunch:
        text = os.environ.get("GPT_TRITON_STEP_LAUNCH", "")
        return cls.parse(text) if text else cls()


def _power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def unsupported(shape: StepShape, launch: StepLaunch) -> str | None:
    """Why the step kernel cannot run this shape (None: it can). Its tiles are powers of two that divide the head
    size, and a task's rows of QKV or FC1 must not straddle a head or an FC2 chunk."""
    rows_full = launch.tile_elements // triton.next_power_of_2(shape.hidden)
    cols_split = launch.tile_elements // shape.head_dim if shape.head_dim else 0
    reasons = [
        (not _power_of_two(shape.head_dim), f"head size {shape.head_dim} is not a power of two"),
        (not _power_of_two(launch.tile_elements), f"tile of {launch.tile_elements} elements is not a power of two"),
        (not 1 <= rows_full <= shape.head_dim, f"a tile of {launch.tile_elements} elements gives {rows_full} rows "
                                               f"of {shape.hidden}: needs 1 to the head size {shape.head_dim}"),
        (cols_split == 0 or shape.hidden % cols_split, f"hidden {shape.hidden} is not a multiple of the tile's "
                                                       f"{cols_split} output columns"),
        (shape.inter % shape.head_dim, f"MLP width {shape.inter} is not a multiple of the head size"),
        (shape.activation not in ACTIVATIONS, f"activation {shape.activation!r} is not one of {sorted(ACTIVATIONS)}"),
    ]
    return next((why for bad, why in reasons if bad), None)


class OneLaunchStep:
    """A batch-1 decode step as one kernel launch (see the module docstring). Holds the step's workspace; capturable
    in a CUDA graph (no host sync, fixed addresses). The weights are [layers, ...] stacks (`gpt.GptModel.stacked`),
    the caches [layers, slots, heads, max_seq, d] with the row in slot 0."""

    def __init__(self, shape: StepShape, weights: dict[str, torch.Tensor], k_cache: torch.Tensor,
                 v_cache: torch.Tensor, launch: StepLaunch | None = None, programs: int | None = None) -> None:
        self.launch = launch or StepLaunch.from_environment()
        why = unsupported(shape, self.launch)
        if why is not None:
            raise ValueError(f"the one-launch decode step cannot run this model: {why}")
        self.shape, self.weights, self.k_cache, self.v_cache = shape, weights, k_cache, v_cache
        device, dtype = k_cache.device, weights["wte"].dtype  # the model's (the matrices may be int8)
        # int8 matrices (quantize.py): their scale stacks are in weights too (gpt.SCALES).
        self.scaled = weights["qkv_weight"].dtype == torch.int8
        s, lay = shape, shape.layers
        self.rows_full = self.launch.tile_elements // triton.next_power_of_2(s.hidden)
        self.cols_split = self.launch.tile_elements // s.head_dim
        self.chunks = s.inter // s.head_dim
        self.max_splits = triton.next_power_of_2(triton.cdiv(s.max_seq, self.launch.key_block))
        n_tiles = s.hidden // self.cols_split
        sizes = {"C_RES": 2 * lay + 1, "C_QKV": lay * s.heads, "C_ATT_SEEN": lay * s.heads, "C_ATT": lay * s.heads,
                 "C_OUT_SEEN": lay * n_tiles, "C_FC1": lay * self.chunks, "C_FC2_SEEN": lay * n_tiles}
        self.counter_offsets, at = {}, 2  # 0: the ticket, 1: programs out
        for name, size in sizes.items():
            self.counter_offsets[name] = at
            at += size
        # The counters (zeroed again by each step), then the stalls: waits that gave up, counted over every step.
        self._counter_buffer = torch.zeros(at + 1, dtype=torch.int32, device=device)
        self.counters, self.stalls = self._counter_buffer[:at], self._counter_buffer[at:]

        def buffer(*size: int, like: torch.dtype = torch.float32) -> torch.Tensor:
            return torch.zeros(size, dtype=like, device=device)

        self.xs = buffer(2 * lay + 1, s.hidden, like=dtype)  # the residual stream after each half layer
        self.qkv = buffer(lay, 3 * s.hidden, like=dtype)
        self.attn = buffer(lay, s.hidden, like=dtype)
        self.up = buffer(lay, s.inter, like=dtype)
        self.att_part = buffer(lay, s.heads, self.max_splits, s.head_dim + 2)  # per key block: acc, max, sum
        self.out_part = buffer(lay, s.heads, s.hidden)
        self.fc2_part = buffer(lay, self.chunks, s.hidden)
        if programs is None:
            sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
            programs = sms * self.launch.programs_per_sm
        self.programs = programs

    def tasks(self, kv_len: int) -> int:
        """How many tasks (tickets) a step at kv_len runs: the kernel's `_stage_starts` counted on the host (the
        kernel runs this many; test_step_kernel checks `_locate` agrees)."""
        s = self.shape
        n_tiles = s.hidden // self.cols_split
        per_layer = ((3 * s.hidden + s.inter) // self.rows_full + s.heads * triton.cdiv(kv_len, self.launch.key_block)
                     + (s.heads + self.chunks) * n_tiles)
        return 1 + s.layers * per_layer + triton.cdiv(s.vocab, self.rows_full)

    def locate(self, kv_len: int) -> torch.Tensor:
        """int32 [`tasks`(kv_len), 4]: each ticket's (stage, layer, a, b) as the kernel's own `_locate` decodes it
        (one launch, a program a ticket)."""
        located = torch.zeros((self.tasks(kv_len), 4), dtype=torch.int32, device=self.counters.device)
        s = self.shape
        _locate_kernel[(located.shape[0],)](located, triton.cdiv(kv_len, self.launch.key_block), HIDDEN=s.hidden,
                                            INTER=s.inter, HEADS=s.heads, HEAD_DIM=s.head_dim, LAYERS=s.layers,
                                            ROWS_FULL=self.rows_full, N_TILES=s.hidden // self.cols_split)
        return located

    def task_kinds(self, kv_len: int) -> list[tuple[str, int]]:
        """(stage name, layer) of each task in ticket order: what a trace's rows are."""
        return [(STAGES[stage], layer) for stage, layer in self.locate(kv_len)[:, :2].tolist()]

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, kv_len: int,
                 trace: torch.Tensor | None = None, wait: bool = True) -> torch.Tensor:
        """tokens [1], positions [1] < kv_len <= max_seq -> logits [1, vocab]; writes the step's K/V into the cache.

        trace: int64 [`tasks`(kv_len), 4]: per task, the multiprocessor that ran it and the global timer (ns) when it
        started, when its inputs were ready (after its weights' loads were issued and the wait) and when it was
        done. Costs a few stores a task; for profiles, not for serving.

        wait=False: no task waits for its inputs, so the logits and the cache are wrong (on a GPU); what is left is
        the step's streaming alone, tickets and arithmetic included: the bound of this launch shape, for benchmarks
        (bench/one_launch_step.py), never for serving."""
        if not 1 <= kv_len <= self.shape.max_seq:
            raise ValueError(f"kv_len must be in [1, max_seq={self.shape.max_seq}], got {kv_len}")
        s, w = self.shape, self.weights
        logits = torch.empty((1, s.vocab), dtype=self.xs.dtype, device=self.xs.device)
        _one_launch_step_kernel[(self.programs,)](
            tokens, positions, w["wte"], w["wpe"], w["ln1_weight"], w["ln1_bias"], w["qkv_weight"], w["qkv_bias"],
            w["attn_out_weight"], w["attn_out_bias"], w["ln2_weight"], w["ln2_bias"], w["fc1_weight"], w["fc1_bias"],
            w["fc2_weight"], w["fc2_bias"], w["final_ln_weight"], w["final_ln_bias"], w["lm_head"],
            *((w["qkv_scale"], w["attn_out_scale"], w["fc1_scale"], w["fc2_scale"]) if self.scaled
              else (self.xs,) * 4),  # unread unless SCALED
            self.k_cache, self.v_cache, logits, self.xs, self.qkv, self.attn, self.up, self.att_part, self.out_part,
            self.fc2_part, self._counter_buffer, self.counters if trace is None else trace, self.tasks(kv_len),
            triton.cdiv(kv_len, self.launch.key_block), self.k_cache[0].numel(), s.max_seq, s.eps,
            1.0 / s.head_dim ** 0.5, self.launch.prefetch_rounds * self.programs,
            **{**self.constexprs(), **({} if wait else {"SPIN_LIMIT": 0})}, TRACE=trace is not None, **self.options())
        return logits

    def constexprs(self) -> dict[str, int]:
        """The kernel's compile-time arguments but TRACE (bench/step_kernel_registers.py compiles it with them)."""
        s = self.shape
        return dict(HIDDEN=s.hidden, HIDDEN_POW2=triton.next_power_of_2(s.hidden), INTER=s.inter, HEADS=s.heads,
                    HEADS_POW2=triton.next_power_of_2(s.heads), HEAD_DIM=s.head_dim, LAYERS=s.layers, VOCAB=s.vocab,
                    ROWS_FULL=self.rows_full, COLS_SPLIT=self.cols_split, KEY_BLOCK=self.launch.key_block,
                    MAX_SPLITS=self.max_splits, CHUNKS=self.chunks, CHUNKS_POW2=triton.next_power_of_2(self.chunks),
                    ACTIVATION=ACTIVATIONS[s.activation], SCALED=self.scaled, **self.counter_offsets,
                    N_COUNTERS=self.counters.numel(), SPIN_LIMIT=SPIN_LIMITS[self.counters.device.type != "cpu"],
                    PREFETCH_LINES=self.prefetch_lines())

    def prefetch_lines(self) -> int:
        """128-byte lines of the largest tile a task reads (weights, or a key block's keys), where the launch prefetches
        (never under Triton's interpreter, which has no inline assembly); else 0."""
        if not self.launch.prefetch_rounds or self.counters.device.type == "cpu":
            return 0
        widest = max(self.weights["qkv_weight"].element_size(), self.xs.element_size())  # the LM head's: the model's
        largest = max(self.launch.tile_elements * widest,
                      self.launch.key_block * self.shape.head_dim * self.k_cache.element_size())
        return triton.next_power_of_2(largest // 128)

    def options(self) -> dict[str, int]:
        """The launch's compile options: warps, and the register cap where there is one."""
        cap = {"maxnreg": self.launch.max_registers} if self.launch.max_registers else {}
        return {"num_warps": self.launch.num_warps, **cap}
