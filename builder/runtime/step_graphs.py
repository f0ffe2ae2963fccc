"""One in-flight scheduler step's token selection replayed as ONE CUDA graph (CUDA only); its decode replays the
engine's decode graph.

Why a graph: the selection (`sampling.process_logits` and `advance_rows`: ~30 small PyTorch ops on [rows, vocab]
logits) was launched op by op from Python. On an H200 that host work took ~1 ms per step at 64 rows and ~1.3 ms at
batch 1, longer than the GPU's own decode step (1.24 ms at batch 1): the loop was host-bound, and under Triton the
sender and request threads competing for the GIL stretched it further (docs/benchmarks.md). Replayed, a step costs
the host two replays.

Why two graphs, selection then decode: the step's results (tokens, active, finished, stopped) are copied to the host
right after the selection, and the scheduler records its event there, before the decode is launched. So the host
reads a row's token while the decode that consumes it runs: the first token is not held back by a whole decode step,
and the loop's bookkeeping (consume, admission) overlaps the device's decode instead of leaving the device idle
between steps. (One graph of selection + decode, as before, made the host wait for the decode too.)

A selection graph is kept per (rows bucket, selection flags): the rows buckets are the decode graphs'
(`gpt.batch_buckets`); the flags are the host-side switches of `SlotParams` (sampling or greedy, temperature,
penalties, min length), which decide which ops the selection runs. Steps that need per-batch host data (stop words,
bad words) or log-probs run eagerly. Slots between the batch's span and the rows bucket are free or still
prefilling: finished on the device, so the selection leaves them be and their junk decode writes land at their
parking position, exactly as for the free slots inside the span.

The capturing call's warm-up run on a side stream is the real selection (as in `DecodeGraphs`), so no step ever runs
on made-up inputs. Every tensor a graph reads or writes is persistent: the scheduler's slot table, the shared logits
buffer below, the decode's input buffers and the pinned readback buffer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from .gpt import DecodeGraphs, GptModel
from .sampling import BadWords, RowState, SlotParams, WordTable, advance_rows, process_logits


def fused_selection_applies(params: SlotParams, *, stop_words: WordTable | None, bad_words: BadWords | None,
                            want_log_probs: bool) -> bool:
    """Whether a step's selection is plain greedy, select_kernels.greedy_step's case: every row's token is the argmax of
    its raw logits under the min_length ban and the vocabulary mask, as the reference ops would choose it."""
    return not (params.any_sampling or params.use_temperature or params.use_repetition or params.use_presence
                or params.use_frequency or stop_words is not None or bad_words is not None or want_log_probs)


class SlotState(Protocol):
    """The scheduler's per-slot device state (`scheduler._SlotTable`)."""

    history: torch.Tensor
    lengths: torch.Tensor
    generated: torch.Tensor
    output_len: torch.Tensor
    finished: torch.Tensor
    stopped: torch.Tensor
    seen: torch.Tensor
    park: torch.Tensor
    params: dict[str, torch.Tensor]


class Replayable(Protocol):
    def replay(self) -> None: ...


@dataclass(frozen=True)
class SelectionFlags:
    """The host-side switches of `SlotParams`: one graph per combination in use."""

    any_sampling: bool
    any_greedy: bool
    max_top_k: int | None
    use_temperature: bool
    use_repetition: bool
    use_presence: bool
    use_min_length: bool
    use_frequency: bool

    @classmethod
    def of(cls, params: SlotParams) -> SelectionFlags:
        return cls(params.any_sampling, params.any_greedy, params.max_top_k, params.use_temperature,
                   params.use_repetition, params.use_presence, params.use_min_length, params.use_frequency)


Decode = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]  # (tokens [n], positions [n], kv_len) -> [n, V]


class StepGraphs:
    def __init__(self, model: GptModel, table: SlotState, readback: torch.Tensor, vocab_limit: int, *,
                 buckets: list[int], decode: Decode | None = None, tokens: torch.Tensor | None = None,
                 positions: torch.Tensor | None = None) -> None:
        """readback: the buffer [>= 4 * slots] (pinned host memory on CUDA) that receives tokens, active, finished
        and stopped; buckets: the decode graphs' rows buckets; decode: the step's decode (default: the model's own);
        tokens, positions [slots]: the buffers the selection writes the decode's inputs into (the decode graphs' own
        input buffers, so replaying one copies nothing)."""
        self.model, self.table, self.readback, self.vocab_limit = model, table, readback, vocab_limit
        self.buckets = buckets
        self.decode_step: Decode = decode if decode is not None else model.decode
        slots, vocab = model.slots, model.config.vocab_size
        self.tokens = tokens if tokens is not None else torch.zeros(slots, dtype=torch.long, device=model.device)
        self.positions = (positions if positions is not None
                          else torch.zeros(slots, dtype=torch.long, device=model.device))
        # Next-token logits of every slot: the steps' decode writes them, admissions' prefills add theirs.
        self.logits = torch.zeros((slots, vocab), dtype=model.dtype, device=model.device)
        self.pool = torch.cuda.graph_pool_handle() if model.device.type == "cuda" else None
        self.graphs: dict[tuple[int, SelectionFlags], Replayable] = {}
        self.failure: str | None = None  # set when a capture failed: the scheduler then steps op by op

    @classmethod
    def for_decode_graphs(cls, model: GptModel, decode_graphs: DecodeGraphs, table: SlotState,
                          readback: torch.Tensor, vocab_limit: int) -> StepGraphs:
        return cls(model, table, readback, vocab_limit, buckets=decode_graphs.buckets, decode=decode_graphs.decode,
                   tokens=decode_graphs.tokens, positions=decode_graphs.positions)

    def rows_bucket(self, span: int) -> int:
        return next(b for b in self.buckets if b >= span)

    def select(self, span: int, params: SlotParams) -> int:
        """Select a token for slots 0..span-1 from `self.logits`, update the slot table, copy (tokens, active,
        finished, stopped) of the rows bucket into the readback buffer as [4, bucket] and leave the decode's inputs
        in `tokens` and `positions`. Returns the rows bucket: record an event now, then call `decode`. A selection
        whose graph could not be captured has still run (`failure` says why)."""
        rows = self.rows_bucket(span)
        flags = SelectionFlags.of(params)
        graph = self.graphs.get((rows, flags))
        if graph is None:
            captured = self._graph(lambda: self._select(rows, flags))
            if captured is not None:
                self.graphs[(rows, flags)] = captured
        else:
            graph.replay()
        return rows

    def decode(self, rows: int, kv_len: int) -> None:
        """The decode of the tokens `select` chose for slots 0..rows-1; writes the next logits into `self.logits`."""
        self.logits[:rows].copy_(self.decode_step(self.tokens[:rows], self.positions[:rows], kv_len))

    def _graph(self, run: Callable[[], None]) -> Replayable | None:
        """Run the selection for real on a side stream (lazy library init stays out of the graph), then record it. A
        failed capture (e.g. out of memory mid-serving: graphs are captured as new batch shapes appear) returns None
        and sets `failure`; the real run has advanced the step all the same."""
        device = self.model.device
        side = torch.cuda.Stream(device=device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            run()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                run()  # recorded only: the state the real run advanced is not advanced twice
        except RuntimeError as err:  # torch.OutOfMemoryError included
            self.failure = f"capturing a step graph failed ({err})"
            return None
        return graph

    def _select(self, rows: int, flags: SelectionFlags) -> None:
        table = self.table
        params = SlotParams(
            **{name: values[:rows] for name, values in table.params.items()}, any_sampling=flags.any_sampling,
            any_greedy=flags.any_greedy, max_top_k=flags.max_top_k, use_temperature=flags.use_temperature,
            use_repetition=flags.use_repetition, use_presence=flags.use_presence,
            use_min_length=flags.use_min_length, use_frequency=flags.use_frequency)
        step_flags, _, tokens, positions = select_tokens(table, rows, self.logits, params, self.vocab_limit,
                                                         fused=self.model.kernels.fused_select)
        # [4, rows] -> the first 4 * rows entries of the readback buffer (a contiguous destination: see _Readback).
        self.readback[:4 * rows].view(4, rows).copy_(step_flags, non_blocking=True)
        self.tokens[:rows].copy_(tokens)
        self.positions[:rows].copy_(positions)


def select_tokens(table: SlotState, rows: int, logits: torch.Tensor, params: SlotParams, vocab_limit: int, *,
                  stop_words: WordTable | None = None, bad_words: BadWords | None = None,
                  want_log_probs: bool = False, fused: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """The selection of one step of slots 0..rows-1, the same ops whether replayed from a graph or run one by one:
    select each row's token from `logits` [>= rows, V] and advance the slot table. Returns (tokens, active, finished,
    stopped as [4, rows] int64, the chosen log-probs or None, then the decode's inputs: tokens [rows], positions
    [rows]). fused (CUDA with Triton: the model's `kernels.fused_select`): a plain greedy step runs
    select_kernels.greedy_step instead, with the same results."""
    history, lengths, generated = table.history[:rows], table.lengths[:rows], table.generated[:rows]
    finished = table.finished[:rows]
    if fused and fused_selection_applies(params, stop_words=stop_words, bad_words=bad_words,
                                         want_log_probs=want_log_probs):
        from .select_kernels import greedy_step

        step_flags, tokens, positions = greedy_step(
            logits[:rows], params, history=history, lengths=lengths, generated=generated,
            output_len=table.output_len[:rows], finished=finished, stopped=table.stopped[:rows],
            park=table.park[:rows], vocab_limit=vocab_limit)
        return step_flags, None, tokens, positions
    seen = table.seen[:rows] if params.uses_seen_tokens else None
    processed = process_logits(logits[:rows], params, generated=generated, seen=seen, bad_words=bad_words,
                               history=history, lengths=lengths, vocab_limit=vocab_limit)
    state = RowState(history=history, lengths=lengths, generated=generated, finished=finished,
                     stopped=table.stopped[:rows], output_len=table.output_len[:rows], seen=seen)
    # Each row's own step index (tokens generated so far) keys its seeded sampling, exactly as when it runs alone;
    # finished and free slots emit end_id and stay put.
    tokens, active, log_probs = advance_rows(processed, params, generated, state, stop_words, want_log_probs)
    step_flags = torch.stack([tokens, active.long(), finished.long(), state.stopped.long()])
    # A running row's next position is its length - 1; finished and free slots decode at their parking position
    # (junk nothing reads): 0, or a prefilling row's next uncached position.
    positions = torch.where(finished, table.park[:rows], lengths - 1)
    return step_flags, log_probs, tokens, positions
