"""The PyTorch GPT engine behind FasterTransformer's GPT tensor contract.

`GptEngine.generate(requests)` takes validated per-row `GenerationRequest`s (core_io.py) and returns one `RowOutput`
per row. Rows are grouped by beam width (sampling/greedy rows together, beam rows per width) and split into chunks
that fit the KV cache; each chunk is one batch: one prefill pass over the ragged prompts, then one decode step per
generated token for the whole chunk.

Sampling path (beam_width 1): everything per step stays on the device (sampling, stop/bad words, penalties,
finished flags); the host polls "all rows finished" through a pinned copy it reads only once ready, so nothing
blocks the GPU, and the decode step runs from CUDA graphs on CUDA. Streaming (`on_step`) and cancellation polls are
the only per-step host reads.

Beam search follows Hugging Face's `generate(num_beams=W, do_sample=False, early_stopping=False, length_penalty=lp)`
(transformers' vectorised beam search): keep the top 2W continuations of all beams by cumulative log-prob; of the top
W, those that end (end_id, a stop word, or the length limit) join the row's finished set with score
cum_log_prob / generated_len ** lp; the best W unfinished ones continue. A row stops when no running beam can beat
its worst finished one (best running score / current_len ** lp), or at its length limit. FT's default len_penalty
is 0 (no length normalisation); pass len_penalty=1 to match HF's default. The finished beams are returned best first;
cum_log_probs are their raw (unnormalised) cumulative log-probs.

`generate` runs one static batch to completion. For serving, scheduler.py's `InflightScheduler` drives the same
engine (its `prefill_chunks` and `decode`) with in-flight batching: rows join and leave the running batch at every
step, their prompts prefilled in chunks within a per-step token budget.

Log-probs are those of the chosen token under the processed distribution (after temperature, penalties and bans,
before top-k/top-p truncation); for plain greedy they equal HF's `output_scores` log-softmax.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .core_io import CAPABILITIES, EngineLimits, GenerationRequest, RequestError, RowOutput
from .gpt import DecodeGraphs, GptModel, PrefillGraphs
from .model_config import GptModelConfig
from .sampling import BadWords, RowState, SlotParams, WordTable, advance_rows, last_tokens, process_logits

log = logging.getLogger(__name__)

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SCORE_FLOOR = -1.0e9  # HF's "impossible" beam score
ACTIVATION_RESERVE = 0.15  # share of free device memory left for activations when sizing the KV cache
PREFILL_TOKEN_BUDGET = 16384  # prompt tokens (rows x padded length) per prefill pass: bounds activation memory
# The in-flight scheduler's default prompt tokens per step (scheduler.py, chunked prefill). The mixed workload (prompts
# 16-1024, outputs 16-512) needs ~130 prompt tokens per step on average; what the budget decides is how fast a burst
# of arrivals is prefilled, and how long a step with a full chunk stalls the running rows (a 2048-token pass is ~10 ms
# of an H200, against ~5 ms for the step of 64 rows beside it). On an H200, the scheduler alone on the mixed workload
# (bench/inflight_engine.py --mixed, 64 streaming clients): 2048 ran 11.0k tok/s with a first token in 10 ms at the
# median and 31 ms at p99, against 10.4k, 17 ms and 44 ms at 512; through Triton 11.4k against 10.5k. Short prompts
# alone keep passes of PREFILL_GRAPH_TOKENS (scheduler.InflightScheduler._step_budget): at 64 streams of 128-token
# prompts, eager passes of ~1,000 tokens cost 20.4k tok/s against 22.7k with graph passes (docs/benchmarks.md).
STEP_PROMPT_TOKENS = 2048
# Prefill passes of at most this many padded tokens replay CUDA graphs captured at load (the same on every
# tensor-parallel rank); wider ones run eagerly, where the device time outweighs the ~300 launches of a pass. Up to
# 1024: passes of several short prompts (scheduler.GATHER_PROMPT_TOKENS says which, and why 1024).
PREFILL_GRAPH_TOKENS = int(os.environ.get("GPT_TRITON_PREFILL_GRAPH_TOKENS", "1024"))  # the variable: A/B runs
if PREFILL_GRAPH_TOKENS < 64 or PREFILL_GRAPH_TOKENS % 64:
    raise ValueError(f"GPT_TRITON_PREFILL_GRAPH_TOKENS must be a positive multiple of 64, got {PREFILL_GRAPH_TOKENS}")
# Chunk passes of up to this many rows replay one prefill graph per row instead of one eager pass: an eager pass is
# launch-bound (~5.7 ms of host time on an H200 for ~300 launches) where a replay of a short chunk costs ~1 ms of
# device time (the weights read once per row). Not measured on a GPU yet: GPT_TRITON_GRAPH_PREFILL_ROWS for A/B runs.
GRAPH_PREFILL_ROWS = int(os.environ.get("GPT_TRITON_GRAPH_PREFILL_ROWS", "4"))
# (request index, its cumulative output) for every row that was running during the step
StepCallback = Callable[[list[tuple[int, RowOutput]]], None]
CancelCheck = Callable[[], Collection[int]]  # -> indices of the requests cancelled so far


def check_request(request: GenerationRequest, limits: EngineLimits) -> None:
    """The engine-level limits (core_io.parse_request checks these and more at the Triton boundary)."""
    if len(request.input_ids) == 0:
        raise RequestError("input_ids", "must hold at least one token")
    if not 0 <= request.input_ids.min() <= request.input_ids.max() < limits.vocab_size:
        raise RequestError("input_ids", f"token ids must be in [0, {limits.vocab_size})")
    if request.output_len < 1:
        raise RequestError("request_output_len", f"must be >= 1, got {request.output_len}")
    if len(request.input_ids) + request.output_len > limits.max_seq_len:
        raise RequestError("request_output_len", f"input length + request_output_len = "
                           f"{len(request.input_ids)} + {request.output_len} exceeds max_seq_len "
                           f"{limits.max_seq_len}")
    if not 1 <= request.beam_width <= limits.max_batch_size:
        raise RequestError("beam_width", f"must be in [1, max_batch_size={limits.max_batch_size}], "
                           f"got {request.beam_width}")
    if not 0 <= request.end_id < limits.vocab_size:
        raise RequestError("end_id", f"must be in [0, {limits.vocab_size}), got {request.end_id}")


class ResourceError(RuntimeError):
    """The engine (or a request) does not fit the memory budget."""


class _DoneFlag:
    """Whether every row finished, read without stalling the device.

    On CUDA the flag is copied to pinned memory asynchronously and read once that copy has completed (a step or two
    later, so a batch may decode one extra step: its rows are already finished and emit nothing). On CPU it is read
    directly (no pipeline to stall).
    """

    def __init__(self, device: torch.device) -> None:
        self.is_cuda = device.type == "cuda"
        self.host = torch.zeros((), dtype=torch.bool, pin_memory=self.is_cuda)
        self.event: torch.cuda.Event | None = None

    def all_finished(self, finished: torch.Tensor) -> bool:
        if not self.is_cuda:
            return bool(finished.all())
        if self.event is not None and self.event.query():
            self.event = None
            if bool(self.host):
                return True
        if self.event is None:
            self.host.copy_(finished.all(), non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        return False


class _CancelPoll:
    """Rate-limited polling of the caller's cancellation hook, mapped to this chunk's rows."""

    def __init__(self, is_cancelled: CancelCheck | None, indices: Sequence[int], interval_s: float) -> None:
        self.is_cancelled = is_cancelled
        self.row_of = {request: row for row, request in enumerate(indices)}
        self.interval_s = interval_s
        self.last = time.monotonic()

    def newly_cancelled(self, cancelled: list[bool]) -> list[int]:
        """Rows cancelled since the last poll (also marked in `cancelled`)."""
        now = time.monotonic()
        if self.is_cancelled is None or now - self.last < self.interval_s:
            return []
        self.last = now
        rows = sorted({self.row_of[i] for i in self.is_cancelled() if i in self.row_of})
        newly = [row for row in rows if not cancelled[row]]
        for row in newly:
            cancelled[row] = True
        return newly


def row_output(prompt_len: int, beams: list[np.ndarray], log_probs: list[np.ndarray] | None, *,
               finished: bool, reason: str, cum: np.ndarray | None = None) -> RowOutput:
    """A RowOutput; cum_log_probs default to the sums of the per-step log-probs."""
    if log_probs is not None and cum is None:
        cum = np.array([float(steps.sum()) for steps in log_probs], dtype=np.float32)
    return RowOutput(prompt_len=prompt_len, beams=beams, cum_log_probs=cum, output_log_probs=log_probs,
                     finished=finished, cancelled=reason == "cancelled", finish_reason=reason)


class GptEngine:
    CAPABILITIES = CAPABILITIES

    def __init__(self, config: GptModelConfig, weights: dict[str, torch.Tensor], *, device: str = "cpu",
                 dtype: torch.dtype = torch.float32, max_batch_size: int = 8, max_seq_len: int | None = None,
                 shrink_to_fit: bool = False, vocab_limit: int | None = None, use_cuda_graphs: bool = True,
                 cancel_poll_s: float = 0.05, kv_cache_dtype: str = "auto", weight_quantization: str = "none") -> None:
        """max_batch_size: KV-cache slots (rows x beam_width decoded together; larger calls run in chunks);
        max_seq_len: prompt + output tokens per row (default config.max_pos_seq_len); shrink_to_fit: on CUDA, use
        fewer slots when max_batch_size does not fit the free memory (else that is a ResourceError);
        vocab_limit: ids >= it are never generated (default: the whole padded vocabulary, as FT);
        cancel_poll_s: least time between two calls of generate()'s is_cancelled (each may cost an IPC round trip);
        kv_cache_dtype: "auto" (the model's dtype) or "fp8" (model_config.KV_CACHE_DTYPES: half the bytes per slot);
        weight_quantization: "none" or "int8" (model_config.WEIGHT_QUANTIZATIONS: quantize.py)."""
        self.config = config
        self.device = torch.device(device)
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {dtype}")
        max_seq_len = config.max_pos_seq_len if max_seq_len is None else max_seq_len
        if not 1 <= max_seq_len <= config.max_pos_seq_len:
            raise ValueError(f"max_seq_len must be in [1, {config.max_pos_seq_len}] (max_pos_seq_len), "
                             f"got {max_seq_len}")
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.vocab_limit = config.vocab_size if vocab_limit is None else vocab_limit
        if not 1 <= self.vocab_limit <= config.vocab_size:
            raise ValueError(f"vocab_limit must be in [1, {config.vocab_size}], got {vocab_limit}")
        self.cancel_poll_s = cancel_poll_s
        try:
            self.model = GptModel(config, weights, device=self.device, dtype=dtype, kv_cache_dtype=kv_cache_dtype,
                                  weight_quantization=weight_quantization)
            slots = self._slots_that_fit(max_batch_size, max_seq_len, shrink_to_fit)
            self.model.allocate_cache(slots, max_seq_len)
            self.kv_cache_bytes = self.model.cache_bytes  # a tensor-parallel rank's: its heads only
        except torch.cuda.OutOfMemoryError as err:
            raise ResourceError(f"out of memory loading the weights and a KV cache of max_batch_size="
                                f"{max_batch_size} x max_seq_len={max_seq_len} on {self.device}: lower them") from err
        log.info("KV cache: %d slots x %d tokens x %d layers (%s) = %.3f GiB on %s", slots, max_seq_len,
                 config.num_layer, self.model.cache_dtype, self.kv_cache_bytes / 2**30, self.device)
        self.graphs = DecodeGraphs(self.model) if self.device.type == "cuda" and use_cuda_graphs else None
        self.prefill_graphs = (PrefillGraphs(self.model, chunk_width=PREFILL_GRAPH_TOKENS) if self.graphs is not None
                               else None)
        self.limits = EngineLimits(vocab_size=config.vocab_size, max_seq_len=max_seq_len, max_batch_size=slots,
                                   default_end_id=config.end_id)
        self._lock = threading.Lock()  # one generate() at a time: the KV cache is shared
        self.last_prefill_path = ""  # prefill_chunks's last path: "one graph", "a graph per row" or "eager"

    def _slots_that_fit(self, wanted: int, max_seq_len: int, shrink: bool) -> int:
        """KV-cache slots to allocate: `wanted`, checked against the device's free memory (CUDA only)."""
        if self.device.type != "cuda":
            return wanted
        per_slot = self.model.slot_bytes(max_seq_len)
        free, _ = torch.cuda.mem_get_info(self.device)
        usable = int(free * (1 - ACTIVATION_RESERVE))  # prefill activations, logits, CUDA graph pools
        fitting = usable // per_slot
        if fitting >= wanted:
            return wanted
        message = (f"a KV cache of max_batch_size={wanted} x max_seq_len={max_seq_len} needs "
                   f"{wanted * per_slot / 2**30:.2f} GiB but {self.device} has {usable / 2**30:.2f} GiB usable "
                   f"({free / 2**30:.2f} GiB free)")
        if not shrink or fitting < 1:
            raise ResourceError(message + ": lower max_batch_size or max_seq_len")
        log.warning("%s: using %d slots", message, fitting)
        return int(fitting)

    @classmethod
    def from_ft_dir(cls, model_dir: str | Path, **kwargs: Any) -> GptEngine:
        """Load an FT weight directory (config.ini + model.*.bin); kwargs as for the constructor."""
        from .ft_weights import load_ft_weights  # written alongside; keeps import order simple

        config, weights = load_ft_weights(model_dir, dtype=kwargs.get("dtype", torch.float32),
                                          device=kwargs.get("device", "cpu"))
        return cls(config, weights, **kwargs)

    # ----------------------------------------------------------------------------------------------------------------
    def _plan(self, requests: Sequence[GenerationRequest]) -> list[list[int]]:
        """Request indices grouped by beam width, each group cut into chunks that fit the cache slots."""
        chunks: list[list[int]] = []
        for width in sorted({r.beam_width for r in requests}):
            per_chunk = self.limits.max_batch_size // width
            group = [i for i, r in enumerate(requests) if r.beam_width == width]
            chunks += [group[start:start + per_chunk] for start in range(0, len(group), per_chunk)]
        return chunks

    def generate(self, requests: Sequence[GenerationRequest], *, on_step: StepCallback | None = None,
                 is_cancelled: CancelCheck | None = None) -> list[RowOutput]:
        """Generate for every request; returns one RowOutput per request, in order.

        on_step: called after every decode step with the cumulative outputs of the rows that were running
            (`finished` is set on a row's last update; beam search reports its running beams).
        is_cancelled: returns the indices of cancelled requests; polled at most every `cancel_poll_s` seconds
            (between decode steps); a cancelled row stops and keeps what it generated.
        """
        for request in requests:
            check_request(request, self.limits)
        outputs: list[RowOutput | None] = [None] * len(requests)
        with self._lock, torch.inference_mode():
            for chunk in self._plan(requests):
                chunk_requests = [requests[i] for i in chunk]
                run = self._run_beam_search if chunk_requests[0].beam_width > 1 else self._run_sampling
                try:
                    chunk_outputs = run(chunk_requests, chunk, on_step, is_cancelled)
                except torch.cuda.OutOfMemoryError as err:
                    raise ResourceError(f"out of memory generating for {len(chunk)} rows on {self.device}: "
                                        f"send fewer rows or shorter prompts") from err
                for index, output in zip(chunk, chunk_outputs):
                    outputs[index] = output
        return outputs  # type: ignore[return-value]  # every index was filled by its chunk

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, kv_len: int) -> torch.Tensor:
        """One decode step over cache slots 0..n-1 (tokens [n], positions [n]) -> logits [n, V], from CUDA graphs
        when enabled. On CUDA the result may be a view of a graph's output buffer: consume it before the next call."""
        if self.graphs is not None:
            return self.graphs.decode(tokens, positions, kv_len)
        return self.model.decode(tokens, positions, kv_len)

    def prefill_slots(self, prompts: torch.Tensor, lengths: torch.Tensor, first_slot: int = 0) -> torch.Tensor:
        """Right-padded prompts [n, T] (any valid id as padding) -> logits [n, V] at each row's last prompt token;
        fills cache slots first_slot..first_slot+n-1, in passes of at most PREFILL_TOKEN_BUDGET padded tokens."""
        if prompts.shape[0] == 1 and self.prefill_graphs is not None:
            try:
                return self.prefill_graphs.prefill(prompts, int(lengths[0]), first_slot).clone()
            except RuntimeError:  # a capture that fails (memory, a backend that cannot be captured): run eagerly
                log.exception("prefill CUDA graph failed: prefill runs eagerly from now on")
                self.prefill_graphs = None
        rows_per_pass = max(1, PREFILL_TOKEN_BUDGET // prompts.shape[1])
        return torch.cat([self.model.prefill(prompts[start:start + rows_per_pass],
                                             lengths[start:start + rows_per_pass], first_slot=first_slot + start)
                          for start in range(0, prompts.shape[0], rows_per_pass)])

    def prefill_chunks(self, tokens: torch.Tensor, starts: Sequence[int], lengths: Sequence[int],
                       slots: Sequence[int]) -> torch.Tensor:
        """Chunked prefill (scheduler.py): row i of tokens [n, T] (host, right-padded with any valid id) holds prompt
        positions starts[i]..starts[i]+lengths[i]-1 of cache slot slots[i], whose positions [0, starts[i]) are cached
        already -> logits [n, V] at each chunk's last token (for a chunk that ends its prompt: the first token's).

        Several whole prompts (every start 0) of at most PREFILL_GRAPH_TOKENS padded tokens in all replay one prefill
        CUDA graph (PrefillGraphs.prefill_rows); otherwise up to GRAPH_PREFILL_ROWS rows replay the prefill CUDA
        graphs, one per row (GptModel.prefill's chunk path at an offset); more rows run as eager passes of at most
        PREFILL_TOKEN_BUDGET padded tokens."""
        n, t = tokens.shape
        several = not any(starts) and self.prefill_graphs is not None and self.prefill_graphs.fits_rows(n, t)
        if not several and n <= GRAPH_PREFILL_ROWS and self.prefill_graphs is not None:
            graphs = self.prefill_graphs
            # Each row from the host (one copy each) at its own padded width; each replay's output is the graph's
            # buffer: copied before the next.
            widths = [min(t, -(-lengths[i] // graphs.step) * graphs.step) for i in range(n)]
            try:
                out = torch.cat([graphs.prefill_chunk(tokens[i:i + 1, :widths[i]], lengths[i], slots[i],
                                                      starts[i]).clone() for i in range(n)])
                self.last_prefill_path = "a graph per row"
                return out
            except RuntimeError:  # a capture that fails (memory, a backend that cannot be captured): run eagerly
                log.exception("prefill CUDA graph failed: prefill runs eagerly from now on")
                self.prefill_graphs = None
        ints = torch.tensor([list(starts), list(lengths), list(slots)], dtype=torch.long)  # [3, n]
        if self.device.type == "cuda":  # pinned: the copies do not wait for the device to drain
            tokens, ints = (x.pin_memory().to(self.device, non_blocking=True) for x in (tokens, ints))
        else:
            tokens, ints = tokens.to(self.device), ints.to(self.device)
        start_dev, length_dev, slot_dev = ints
        if several and self.prefill_graphs is not None:
            try:
                out = self.prefill_graphs.prefill_rows(tokens, length_dev, slot_dev).clone()
                self.last_prefill_path = "one graph"  # for the scheduler's timeline
                return out
            except RuntimeError:  # a capture that fails (memory, a backend that cannot be captured): run eagerly
                log.exception("prefill CUDA graph failed: prefill runs eagerly from now on")
                self.prefill_graphs = None
        chunked = any(starts)  # whole prompts keep the plain causal pass (no mask, no cache read)
        self.last_prefill_path = "eager"
        rows_per_pass = max(1, PREFILL_TOKEN_BUDGET // t)
        logits = []
        for first in range(0, n, rows_per_pass):
            part = slice(first, first + rows_per_pass)
            if chunked:  # keys rounded up to a multiple of 64: few distinct shapes, aligned mask rows
                kv_len = min(self.model.max_seq_len, -(-(max(starts[part]) + t) // 64) * 64)
                logits.append(self.model.prefill(tokens[part], length_dev[part], slot_index=slot_dev[part],
                                                 starts=start_dev[part], kv_len=kv_len))
            else:
                logits.append(self.model.prefill(tokens[part], length_dev[part], slot_index=slot_dev[part]))
        return torch.cat(logits)

    def capture_graphs(self, check: bool = True) -> str:
        """Capture every decode, single-prompt, chunk and several-prompt prefill graph now (at load, before any
        request); with `check`, first compare a graph prefill with the eager one, a graph chunk (the prompt's last 40
        tokens at offset 60) with the whole prompt, and two prompts in one graph with their eager pass, and drop the
        prefill graphs if they disagree."""
        if self.graphs is None:
            return "no CUDA graphs on this device"
        notes: list[str] = []

        def agrees(eager: torch.Tensor, graph: torch.Tensor, what: str, note: str) -> None:
            """Keep the prefill graphs only if `graph` matches `eager` (relative to the first check's logits)."""
            error = float((eager.float() - graph.float()).abs().max())
            if not error <= 1e-2 * max(1.0, scale):
                log.warning("%s CUDA graph disagrees with eager (max |d| %.4g): prefill runs eagerly", what, error)
                self.prefill_graphs = None
            notes.append(f"{note} max |d logit| {error:.3g}")

        if self.prefill_graphs is not None and check:
            prompt = torch.randint(0, self.config.vocab_size, (1, 100), device=self.device)
            length = torch.full((1,), 100, dtype=torch.long, device=self.device)
            eager = self.model.prefill(prompt, length, first_slot=0)
            scale = float(eager.float().abs().max())
            agrees(eager, self.prefill_graphs.prefill(prompt, 100, 0).clone(), "prefill", "prefill graph vs eager")
            if self.prefill_graphs is not None:  # slot 0 caches the prompt: its last 40 tokens again, as a chunk
                agrees(eager, self.prefill_graphs.prefill_chunk(prompt[:, 60:], 40, 0, 60).clone(),
                       "chunk prefill", "chunk graph vs whole prompt")
            # Two prompts in one graph; they need two cache slots (an engine of one slot has no several-prompt passes).
            if self.prefill_graphs is not None and self.model.slots >= 2 and self.prefill_graphs.fits_rows(2, 64):
                pair, lengths = prompt[:, :64].repeat(2, 1), torch.tensor([64, 40], device=self.device)
                slots = torch.tensor([0, 1], device=self.device)
                agrees(self.model.prefill(pair, lengths, slot_index=slots),
                       self.prefill_graphs.prefill_rows(pair, lengths, slots).clone(), "several-prompt prefill",
                       "two-prompt graph vs eager")
        decode = self.graphs.capture_all()
        prefill = self.prefill_graphs.capture_all() if self.prefill_graphs is not None else 0
        return f"captured {decode} decode and {prefill} prefill CUDA graphs; " + "; ".join(notes)

    def _prompt_batch(self, requests: Sequence[GenerationRequest]) -> tuple[torch.Tensor, torch.Tensor, int]:
        """history [n, max(prompt + output) + 1] (prompts, then the pad id V), prompt lengths [n], max prompt len.

        The extra column lets finished rows keep writing end_id one past their end."""
        vocab = self.config.vocab_size
        width = max(len(r.input_ids) + r.output_len for r in requests) + 1
        history = torch.full((len(requests), width), vocab, dtype=torch.long)
        for i, r in enumerate(requests):
            history[i, :len(r.input_ids)] = torch.tensor(r.input_ids, dtype=torch.long)
        lengths = torch.tensor([len(r.input_ids) for r in requests], dtype=torch.long)
        return history.to(self.device), lengths.to(self.device), int(lengths.max())

    def _prefill(self, history: torch.Tensor, lengths: torch.Tensor, max_prompt: int) -> torch.Tensor:
        """Prefill rows into slots 0..n-1, in passes of at most PREFILL_TOKEN_BUDGET padded tokens."""
        prompt = history[:, :max_prompt]
        prompt = prompt.masked_fill(prompt == self.config.vocab_size, 0)  # any valid id: padding is masked
        return self.prefill_slots(prompt, lengths)

    def _seen_tokens(self, params: SlotParams, history: torch.Tensor, max_prompt: int) -> torch.Tensor | None:
        if not params.uses_seen_tokens:
            return None
        # One extra column absorbs the pad id, so prompt padding never counts as a seen token.
        seen = torch.zeros((history.shape[0], self.config.vocab_size + 1), dtype=torch.bool, device=self.device)
        return seen.scatter_(1, history[:, :max_prompt], True)

    # ----------------------------------------------------------------------------------------------------------------
    def _run_sampling(self, requests: Sequence[GenerationRequest], indices: Sequence[int],
                      on_step: StepCallback | None, is_cancelled: CancelCheck | None) -> list[RowOutput]:
        n, device = len(requests), self.device
        steps = max(r.output_len for r in requests)
        prompt_lens = [len(r.input_ids) for r in requests]
        row_limits = [len(r.input_ids) + r.output_len for r in requests]
        history, lengths, max_prompt = self._prompt_batch(requests)
        params = SlotParams.build(requests, 1, device)
        stop_words = WordTable.build([r.stop_words for r in requests], device)
        bad_words = BadWords.build([r.bad_words for r in requests], device)
        seen = self._seen_tokens(params, history, max_prompt)
        want_log_probs = any(r.return_log_probs for r in requests)
        output_len = torch.tensor([r.output_len for r in requests], dtype=torch.long, device=device)
        generated = torch.zeros(n, dtype=torch.long, device=device)
        finished = torch.zeros(n, dtype=torch.bool, device=device)
        stopped = torch.zeros(n, dtype=torch.bool, device=device)
        log_probs = torch.zeros((n, steps), dtype=torch.float32, device=device)
        cancelled = [False] * n
        cancel_poll = _CancelPoll(is_cancelled, indices, self.cancel_poll_s)
        streamed: list[list[int]] = [r.input_ids.tolist() for r in requests] if on_step else []
        streamed_log_probs: list[list[float]] = [[] for _ in requests]
        done_flag = _DoneFlag(device)

        state = RowState(history=history, lengths=lengths, generated=generated, finished=finished, stopped=stopped,
                         output_len=output_len, seen=seen)
        logits = self._prefill(history, lengths, max_prompt)
        for step in range(steps):
            processed = process_logits(logits, params, generated=generated, seen=seen, bad_words=bad_words,
                                       history=history, lengths=lengths, vocab_limit=self.vocab_limit)
            tokens, active, step_log_probs = advance_rows(processed, params, step, state, stop_words, want_log_probs)
            if step_log_probs is not None:
                log_probs[:, step] = step_log_probs

            if on_step is not None:
                was_active, now_finished = active.tolist(), finished.tolist()
                new_tokens, now_stopped = tokens.tolist(), stopped.tolist()
                new_log_probs = log_probs[:, step].tolist() if want_log_probs else []
                updates = []
                for i in range(n):
                    if was_active[i] and not cancelled[i]:
                        streamed[i].append(new_tokens[i])
                        if want_log_probs:
                            streamed_log_probs[i].append(new_log_probs[i])
                        steps_lp = [np.array(streamed_log_probs[i], np.float32)] if want_log_probs else None
                        updates.append((indices[i], row_output(
                            prompt_lens[i], [np.array(streamed[i])], steps_lp, finished=now_finished[i],
                            reason="stop" if now_stopped[i] else "length")))
                on_step(updates)
            newly = cancel_poll.newly_cancelled(cancelled)
            if newly:
                finished[torch.tensor(newly, device=device)] = True
            if step + 1 == steps or done_flag.all_finished(finished):
                break
            # Each row's next position is its length - 1; rows never pass their own limit (finished rows stay put).
            kv_len = max(min(p + step + 1, limit) for p, limit in zip(prompt_lens, row_limits))
            logits = self.decode(tokens, lengths - 1, kv_len)

        history_host, lengths_host = history.cpu(), lengths.tolist()
        stopped_host = stopped.tolist()
        log_probs_host = log_probs.cpu().numpy() if want_log_probs else None
        outputs = []
        for i in range(len(requests)):
            tokens_i = history_host[i, :lengths_host[i]].numpy()
            steps_lp = ([log_probs_host[i, :lengths_host[i] - prompt_lens[i]].copy()]
                        if log_probs_host is not None else None)
            reason = "cancelled" if cancelled[i] else "stop" if stopped_host[i] else "length"
            outputs.append(row_output(prompt_lens[i], [tokens_i], steps_lp, finished=True, reason=reason))
        return outputs

    # ----------------------------------------------------------------------------------------------------------------
    def _run_beam_search(self, requests: Sequence[GenerationRequest], indices: Sequence[int],
                         on_step: StepCallback | None, is_cancelled: CancelCheck | None) -> list[RowOutput]:
        n, width, device = len(requests), requests[0].beam_width, self.device
        m, vocab = n * width, self.config.vocab_size
        candidates = 2 * width
        steps = max(r.output_len for r in requests)
        prompt_lens = [len(r.input_ids) for r in requests]
        row_history, row_lengths, max_prompt = self._prompt_batch(requests)
        history, lengths = row_history.repeat_interleave(width, 0), row_lengths.repeat_interleave(width, 0)
        seq_width = history.shape[1]
        params = SlotParams.build(requests, width, device)
        stop_words = WordTable.build([r.stop_words for r in requests], device)  # rows = requests (candidates)
        bad_words = BadWords.build([r.bad_words for r in requests for _ in range(width)], device)  # rows = slots
        seen = self._seen_tokens(params, history, max_prompt)
        output_len = torch.tensor([r.output_len for r in requests], dtype=torch.long, device=device)
        end_id = torch.tensor([r.end_id for r in requests], dtype=torch.long, device=device)
        len_penalty = torch.tensor([r.len_penalty for r in requests], dtype=torch.float32, device=device)

        running_score = torch.full((n, width), SCORE_FLOOR, device=device)
        running_score[:, 0] = 0.0  # only beam 0 is real at first: no duplicate continuations
        step_log_probs = torch.zeros((m, steps), device=device)
        # The finished set per row ("pool"): W best ended hypotheses.
        pool_score = torch.full((n, width), SCORE_FLOOR, device=device)
        pool_filled = torch.zeros((n, width), dtype=torch.bool, device=device)
        pool_tokens = torch.full((n, width, seq_width), vocab, dtype=torch.long, device=device)
        pool_len = torch.zeros((n, width), dtype=torch.long, device=device)
        pool_cum = torch.zeros((n, width), device=device)
        pool_log_probs = torch.zeros((n, width, steps), device=device)
        pool_stopped = torch.zeros((n, width), dtype=torch.bool, device=device)
        improvable = torch.ones(n, dtype=torch.bool, device=device)
        done = torch.zeros(n, dtype=torch.bool, device=device)
        row_base = torch.arange(n, device=device)[:, None] * width
        top_rank = torch.arange(candidates, device=device)[None, :] < width
        cancelled = [False] * n
        cancel_poll = _CancelPoll(is_cancelled, indices, self.cancel_poll_s)
        done_flag = _DoneFlag(device)

        logits = self._prefill(row_history, row_lengths, max_prompt)
        self.model.copy_slots(torch.arange(n, device=device).repeat_interleave(width), max_prompt)
        logits = logits.repeat_interleave(width, 0)
        for step in range(steps):
            was_done = done.tolist() if on_step is not None else []
            generated = torch.full((m,), step, dtype=torch.long, device=device)
            processed = process_logits(logits, params, generated=generated, seen=seen, bad_words=bad_words,
                                       history=history, lengths=lengths, vocab_limit=self.vocab_limit)
            log_probs = processed.log_softmax(dim=-1)  # [m, V]
            total = (log_probs + running_score.view(m, 1)).view(n, width * vocab)
            cand_score, cand_index = total.topk(candidates, dim=-1)  # [n, 2W], best first
            cand_token = cand_index % vocab
            cand_slot = row_base + cand_index // vocab  # the beam (slot) each candidate extends
            cand_log_prob = log_probs[cand_slot, cand_token]
            ended = cand_token == end_id[:, None]
            if stop_words is not None:
                before = last_tokens(history, lengths, stop_words.width - 1)[cand_slot]  # [n, 2W, width-1]
                ended |= stop_words.rows_hit(torch.cat([before, cand_token[..., None]], dim=-1))
            at_limit = (step + 1 >= output_len)[:, None].expand(n, candidates)
            hits = ended | at_limit

            # Finished set: the top-W candidates that end join it (while the row can still improve).
            joins = hits & top_rank & (improvable & ~done)[:, None]
            generated_len = float(step + 1)
            norm_score = torch.where(joins, cand_score / generated_len ** len_penalty[:, None], SCORE_FLOOR)
            cand_tokens = history[cand_slot]  # [n, 2W, seq_width]
            cand_tokens.scatter_(2, lengths[cand_slot][..., None], cand_token[..., None])
            cand_step_log_probs = step_log_probs[cand_slot]  # [n, 2W, steps]
            cand_step_log_probs[..., step] = cand_log_prob
            keep = torch.cat([pool_score, norm_score], dim=1).topk(width, dim=1).indices  # [n, W]

            def pick(old: torch.Tensor, new: torch.Tensor, keep: torch.Tensor = keep) -> torch.Tensor:
                merged = torch.cat([old, new], dim=1)
                index = keep.view(n, width, *([1] * (merged.dim() - 2))).expand(n, width, *merged.shape[2:])
                return merged.gather(1, index)

            pool_score = pick(pool_score, norm_score)
            pool_filled = pick(pool_filled, joins)
            pool_tokens = pick(pool_tokens, cand_tokens)
            pool_len = pick(pool_len, lengths[cand_slot] + 1)
            pool_cum = pick(pool_cum, cand_score)
            pool_log_probs = pick(pool_log_probs, cand_step_log_probs)
            pool_stopped = pick(pool_stopped, ended)

            # Running beams: the best W candidates that did not end.
            next_score, next_rank = (cand_score + hits.to(torch.float32) * SCORE_FLOOR).topk(width, dim=1)
            parents = cand_slot.gather(1, next_rank).view(m)
            next_tokens = cand_token.gather(1, next_rank).view(m)
            frozen = done.repeat_interleave(width)  # finished rows keep their slots' positions
            history, lengths = history[parents], lengths[parents]
            step_log_probs = step_log_probs[parents]
            step_log_probs[:, step] = cand_log_prob.gather(1, next_rank).view(m)
            if seen is not None:
                seen = seen[parents]
                seen.scatter_(1, next_tokens[:, None], True)
            self.model.copy_slots(parents, min(seq_width - 1, max_prompt + step))
            history.scatter_(1, lengths[:, None], next_tokens[:, None])
            lengths = torch.where(frozen, lengths, lengths + 1)
            running_score = next_score

            # HF's early-stop heuristic (early_stopping=False): stop once no running beam can beat the worst
            # finished one at the current length.
            best_possible = running_score[:, 0] / generated_len ** len_penalty
            improvable &= ~pool_filled.all(dim=1) | (best_possible > pool_score.min(dim=1).values)
            done |= ~improvable | hits.all(dim=1)

            if on_step is not None:  # the running beams of rows that were still searching
                history_host, lengths_host, done_host = history.cpu(), lengths.tolist(), done.tolist()
                updates = []
                for i in range(n):
                    if not was_done[i]:
                        beams = [history_host[i * width + b, :lengths_host[i * width + b]].numpy()
                                 for b in range(width)]
                        updates.append((indices[i], row_output(prompt_lens[i], beams, None, finished=done_host[i],
                                                               reason="length")))
                on_step(updates)
            newly = cancel_poll.newly_cancelled(cancelled)
            if newly:
                done[torch.tensor(newly, device=device)] = True
            if step + 1 == steps or done_flag.all_finished(done):
                break
            logits = self.decode(next_tokens, lengths - 1, min(self.model.max_seq_len, max_prompt + step + 1))

        return self._beam_outputs(requests, prompt_lens, cancelled, pool_filled, pool_tokens, pool_len, pool_cum,
                                  pool_log_probs, pool_stopped, history, lengths, running_score, step_log_probs)

    def _beam_outputs(self, requests: Sequence[GenerationRequest], prompt_lens: list[int], cancelled: list[bool],
                      pool_filled: torch.Tensor, pool_tokens: torch.Tensor, pool_len: torch.Tensor,
                      pool_cum: torch.Tensor, pool_log_probs: torch.Tensor, pool_stopped: torch.Tensor,
                      history: torch.Tensor, lengths: torch.Tensor, running_score: torch.Tensor,
                      step_log_probs: torch.Tensor) -> list[RowOutput]:
        """Finished hypotheses best first; a row stopped early (cancelled) is topped up with its running beams."""
        width = requests[0].beam_width
        filled, tokens, lens = pool_filled.cpu(), pool_tokens.cpu(), pool_len.cpu()
        cum, step_lp, stopped = pool_cum.cpu(), pool_log_probs.cpu(), pool_stopped.cpu()
        history, lengths, running, running_lp = history.cpu(), lengths.cpu(), running_score.cpu(), step_log_probs.cpu()
        outputs = []
        for i, r in enumerate(requests):
            beams, beam_log_probs, beam_cum, reasons = [], [], [], []
            for b in range(width):
                if filled[i, b]:
                    beams.append(tokens[i, b, :lens[i, b]].numpy())
                    beam_log_probs.append(step_lp[i, b, :lens[i, b] - prompt_lens[i]].numpy())
                    beam_cum.append(float(cum[i, b]))
                    reasons.append("stop" if stopped[i, b] else "length")
            for b in range(width - len(beams)):
                slot = i * width + b
                beams.append(history[slot, :lengths[slot]].numpy())
                beam_log_probs.append(running_lp[slot, :lengths[slot] - prompt_lens[i]].numpy())
                beam_cum.append(float(running[i, b]))
                reasons.append("length")
            reason = "cancelled" if cancelled[i] else reasons[0]
            outputs.append(row_output(prompt_lens[i], beams, beam_log_probs if r.return_log_probs else None,
                                      finished=True, reason=reason,
                                      cum=np.array(beam_cum, np.float32) if r.return_log_probs else None))
        return outputs
