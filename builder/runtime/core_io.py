"""FasterTransformer's GPT tensor contract, without torch or Triton.

One Triton request carries B rows of FT inputs (numpy arrays with the batch dim first). `parse_request` turns them into
validated per-row `GenerationRequest`s, or raises `RequestError` naming the input and the limit. `ft_outputs` turns the
engine's per-row `RowOutput`s back into FT's output arrays (docs/ft_contract.md §2):
  output_ids [B, beam, max_input_len + max_request_output_len] uint32: the prompt without padding, the generated tokens,
  then end_id fill; sequence_length [B, beam] uint32 (prompt + generated, a final end_id or stop word counted);
  response_input_lengths [B, beam] int32; cum_log_probs [B, beam] and output_log_probs [B, beam, max_request_output_len]
  float32 when asked for.
The lengths are those of this Triton request, not of the dynamic batch it was grouped into, so a response never depends
on what else was batched with it.

Streaming (decoupled torch core; not in FT's contract) adds, per row and beam:
  delta_start [B, beam] int32: where this response's text starts (the previous response's sequence_length, or the
  prompt length for the first; 0 for a final response that was not streamed and must repeat the prompt, i.e.
  exclude_input_in_output false); stop_length [B, beam] int32: the tokens of a stop word that ends a response that
  was not streamed (postprocessing trims them; 0 on streamed responses); counted [B, beam] int32: generated tokens
  that earlier responses already counted (0 unless return_num_output_tokens); finish_code [B, beam] int32: FINISH_CODES
  (0 while running); stream_ack [B, 2] int64: (port, key) that postprocessing acknowledges each response to
  (stream_ack.py), (0, 0) for none.
A streamed update (`StreamState.update`) sends only the tail of each sequence: output_ids [B, beam, T] holds the
LAST T tokens of each row/beam (positions sequence_length - T .. sequence_length - 1; end_id where a position would
be < 0), with T just large enough for every row's new tokens plus up to STREAM_CONTEXT_TOKENS generated tokens before
them (what a stateless detokenizer needs to finish a multi-byte character). So T < max(sequence_length) tells a
tail from FT's cumulative layout (T >= every sequence_length), which the final response of a `stream: false` call
keeps, so token-id clients read it unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from functools import lru_cache

import numpy as np

from . import contract
from .contract import MAX_BEAM_WIDTH, UINT64_MAX, RequestError

# The FT optional inputs the PyTorch engine honours (the contract's; `stream` and `exclude_input_in_output` are
# rendered in decoupled mode only). Render templates expose exactly these; anything else a client sends is refused by
# Triton, never silently ignored.
CAPABILITIES: frozenset[str] = frozenset(i.name for i in contract.core_inputs(contract.TORCH) if i.tensor.optional)
REQUIRED_INPUTS = contract.REQUIRED_CORE_INPUTS
STREAM_CONTEXT_TOKENS = 4  # a UTF-8 character spans <= 4 bytes, and every token holds >= 1 byte
FINISH_CODES = {"": 0, "stop": 1, "length": 2, "cancelled": 3}  # finish_code values; "" = still running
__all__ = ["MAX_BEAM_WIDTH", "UINT64_MAX", "RequestError"]  # re-exported: the engine's modules import them from here


@dataclass(frozen=True)
class EngineLimits:
    """What the engine was built for; every request is checked against it before it reaches the engine."""
    vocab_size: int  # padded vocabulary (rows of wte)
    max_seq_len: int  # prompt + generated tokens per row
    max_batch_size: int  # KV-cache slots: rows x beam_width of one engine call
    default_end_id: int


@dataclass(frozen=True, eq=False)
class GenerationRequest:
    """One row: a prompt and how to continue it. Defaults are FT's (greedy, no penalties, seed 0).

    The prompt is a read-only int64 array (a tuple or list is converted): on its way to the first token it is checked
    and copied in the stub, pickled to the engine process, checked and copied there and copied again by the stub's
    receiver, each one NumPy call for an array where a tuple of 512 ids took ~45 us more in all (warm CPU). Two
    requests are equal when every field is (the prompts element by element); unhashable, as an array is."""
    input_ids: np.ndarray  # [prompt] int64
    output_len: int  # new tokens to generate (FT request_output_len)
    end_id: int
    top_k: int = 0
    top_p: float = 0.0
    temperature: float = 1.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    min_length: int = 0
    random_seed: int = 0
    beam_width: int = 1
    len_penalty: float = 0.0
    return_log_probs: bool = False
    stop_words: tuple[tuple[int, ...], ...] = ()
    bad_words: tuple[tuple[int, ...], ...] = ()

    def __post_init__(self) -> None:
        ids = np.array(self.input_ids, dtype=np.int64)  # a copy: never a view of a request's input tensor
        ids.flags.writeable = False
        object.__setattr__(self, "input_ids", ids)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, GenerationRequest):
            return NotImplemented
        return all(np.array_equal(self.input_ids, other.input_ids) if item.name == "input_ids"
                   else getattr(self, item.name) == getattr(other, item.name) for item in fields(self))

    __hash__ = None  # type: ignore[assignment]  # equal requests would need equal hashes of their arrays

    @property
    def is_greedy(self) -> bool:
        return contract.is_greedy(self.top_k, self.top_p, self.temperature)


@dataclass
class RowOutput:
    """One row's generation, cumulative (streamed) or final. Beams are best first for beam search."""
    prompt_len: int
    beams: list[np.ndarray]  # per beam: prompt + generated token ids (int64)
    cum_log_probs: np.ndarray | None = None  # [beam]
    output_log_probs: list[np.ndarray] | None = None  # per beam: [generated]
    finished: bool = False
    cancelled: bool = False
    finish_reason: str = "length"  # "stop" (end_id or a stop word), "length", or "cancelled"


@dataclass
class ParsedRequest:
    rows: list[GenerationRequest]
    stream: bool = False
    return_log_probs: bool = False
    exclude_input: bool = True  # a final response that was not streamed: its text starts with the prompt when False
    # No `stream` input (FT's own clients, e.g. issue_request.py): a decoupled core streams as FT's does, every
    # response in FT's cumulative layout. The ensemble always sends `stream`, and gets tails (module notes).
    ft_stream: bool = False
    count_per_response: bool = False  # return_num_output_tokens: a streamed response counts only its own tokens


def parse_word_list(array: np.ndarray, input_name: str, batch_size: int, vocab_size: int
                    ) -> list[tuple[tuple[int, ...], ...]]:
    """FT word list [2, N] (shared by all rows) or [B, 2, N] -> per row, its words as token-id tuples.

    Row layout: [0, :] = all words' ids concatenated (pad 0), [1, :] = each word's exclusive end offset (pad -1).
    Negative offsets end the list, as in FT's kernels; zero-length words are skipped.
    """
    array = np.asarray(array)
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3 or array.shape[1] != 2:
        raise RequestError(input_name, f"expected shape [2, N] or [B, 2, N], got {list(array.shape)}")
    if array.shape[0] not in (1, batch_size):
        raise RequestError(input_name, f"has {array.shape[0]} rows but the request has {batch_size}")
    if not np.issubdtype(array.dtype, np.integer):
        raise RequestError(input_name, f"must be an integer tensor, got {array.dtype}")
    rows: list[tuple[tuple[int, ...], ...]] = []
    for row in array:
        ids, offsets = row[0].tolist(), row[1].tolist()
        words: list[tuple[int, ...]] = []
        start = 0
        for end in offsets:
            if end < 0:
                break
            if end < start or end > len(ids):
                raise RequestError(input_name, f"offsets must be non-decreasing and <= {len(ids)}")
            word = tuple(int(token) for token in ids[start:end])
            if any(not 0 <= token < vocab_size for token in word):
                raise RequestError(input_name, f"token ids must be in [0, {vocab_size})")
            if word:
                words.append(word)
            start = end
        rows.append(tuple(words))
    return rows * batch_size if len(rows) == 1 else rows


def _per_row(inputs: Mapping[str, np.ndarray], name: str, batch_size: int) -> np.ndarray | None:
    """A [B, 1] (or [B]) scalar-per-row input as a flat [B] array; a single value is shared by all rows."""
    value = inputs.get(name)
    if value is None:
        return None
    array = np.asarray(value)
    flat = array.reshape(array.shape[0], -1)[:, 0] if array.ndim else array.reshape(1)
    if flat.shape[0] == 1 and batch_size > 1:
        flat = np.repeat(flat, batch_size)
    if flat.shape[0] != batch_size:
        raise RequestError(name, f"has {flat.shape[0]} rows but input_ids has {batch_size}")
    return flat


# The scalar inputs parse_request reads per row, in a fixed order (word lists are parsed on their own).
_SCALAR_INPUTS = (*REQUIRED_INPUTS[1:], *sorted(CAPABILITIES - {"stop_words_list", "bad_words_list"}))
# Each of those that sets a GenerationRequest field -> that field (the contract maps the one to the other).
_FIELDS = {spec.name: spec.field for spec in contract.CORE_INPUTS
           if spec.field is not None and spec.name in _SCALAR_INPUTS}


def _given_or_default(values: Mapping[str, list], name: str, batch_size: int) -> list:
    """An input's per-row values as the request set them, else its FT default on every row."""
    return values.get(name) or [contract.CORE[name].default] * batch_size


@lru_cache(maxsize=8)
def _default_fields(end_id: int) -> dict[str, bool | int | float]:
    """Every field's value where the request leaves its input out (FT's default; None: the engine's end id)."""
    specs = {field: contract.CORE[name] for name, field in _FIELDS.items()}
    return {field: spec.value(end_id if spec.default is None else spec.default) for field, spec in specs.items()}


def parse_request(inputs: Mapping[str, np.ndarray], limits: EngineLimits) -> ParsedRequest:
    """Validate one Triton request's FT inputs (arrays with the batch dim first) and split it into rows.

    Every check is a plain `if` whose message is built only when it fails: this runs once per request on the way to
    its first token, and formatting the messages of checks that pass was a third of its time."""
    for name in REQUIRED_INPUTS:
        if inputs.get(name) is None:
            raise RequestError(name, "is required")
    unknown = sorted(set(inputs) - set(REQUIRED_INPUTS) - CAPABILITIES)
    if unknown:
        raise RequestError(unknown[0], "is not supported by the torch engine")

    input_ids = np.asarray(inputs["input_ids"])
    if input_ids.ndim == 1:
        input_ids = input_ids[None]
    if input_ids.ndim != 2:
        raise RequestError("input_ids", f"expected shape [B, T], got {list(input_ids.shape)}")
    if input_ids.dtype.kind not in "iu":
        raise RequestError("input_ids", f"must be integers, got {input_ids.dtype}")
    batch_size, padded_len = input_ids.shape
    if not (batch_size >= 1 and padded_len >= 1):
        raise RequestError("input_ids", "must hold at least one token per row")

    values: dict[str, list] = {}  # the inputs the request sets; rows_from_values fills in the others' defaults
    for name in _SCALAR_INPUTS:
        given = _per_row(inputs, name, batch_size)
        if given is None:
            continue
        values[name] = given.tolist()

    stop_words = ([()] * batch_size if inputs.get("stop_words_list") is None else
                  parse_word_list(inputs["stop_words_list"], "stop_words_list", batch_size, limits.vocab_size))
    bad_words = ([()] * batch_size if inputs.get("bad_words_list") is None else
                 parse_word_list(inputs["bad_words_list"], "bad_words_list", batch_size, limits.vocab_size))
    return rows_from_values(input_ids, values, stop_words, bad_words, limits)


def rows_from_values(prompts: np.ndarray | Sequence[np.ndarray], values: Mapping[str, list],
                     stop_words: Sequence[tuple[tuple[int, ...], ...]],
                     bad_words: Sequence[tuple[tuple[int, ...], ...]], limits: EngineLimits) -> ParsedRequest:
    """The rows of one request from its FT inputs' per-row values: parse_request's, read from FT tensors, or a text
    core's preprocessing's (preprocess.core_requests), straight from the text with no tensors between.

    prompts: each row's token ids, padded beyond `input_lengths` where that is given (else each row is its prompt);
    values: FT input name -> one value per row, for the inputs the request sets (the others take FT's defaults); words
    as parse_word_list gives them. Checks each value by its rule against the engine (a text core's preprocessing
    knows only its own vocabulary), then what spans inputs: beam widths, lengths, token ids."""
    batch_size = len(prompts)
    for name, row_values in values.items():
        check = contract.CORE[name].check
        if check:
            for i, value in enumerate(row_values):
                problem = check(value, limits.vocab_size)
                if problem is not None:
                    raise RequestError(name, f"row {i}: {problem}")
    beam_widths = [int(v) for v in _given_or_default(values, "beam_width", batch_size)]
    problem = contract.same_beam_width(beam_widths)
    if problem is not None:
        raise RequestError("beam_width", str(problem))
    beam_width = beam_widths[0]
    if batch_size * beam_width > limits.max_batch_size:
        raise RequestError("beam_width", f"rows x beam_width must be <= the engine's max_batch_size "
                                         f"{limits.max_batch_size} (KV-cache slots); the request has {batch_size} rows")

    lengths = values.get("input_lengths")
    defaults = _default_fields(limits.default_end_id)
    given = [(field, contract.CORE[name].value, values[name]) for name, field in _FIELDS.items() if name in values]
    rows: list[GenerationRequest] = []
    for i in range(batch_size):
        padded_len = len(prompts[i])
        length, output_len = (padded_len if lengths is None else int(lengths[i])), int(values["request_output_len"][i])
        if not 1 <= length <= padded_len:
            raise RequestError("input_lengths", f"row {i}: must be in [1, {padded_len}]")
        if output_len < 1:
            raise RequestError("request_output_len", f"row {i}: must be >= 1")
        if length + output_len > limits.max_seq_len:
            raise RequestError("request_output_len", f"row {i}: input_lengths + request_output_len must be <= the "
                                                     f"engine's max_seq_len {limits.max_seq_len}")
        prompt = prompts[i][:length]
        if prompt.min() < 0 or prompt.max() >= limits.vocab_size:
            raise RequestError("input_ids", f"row {i}: token ids must be in [0, {limits.vocab_size})")
        fields: dict[str, bool | int | float] = {**defaults, **{field: value(row_values[i])
                                                                for field, value, row_values in given}}
        rows.append(GenerationRequest(
            input_ids=prompt, output_len=output_len, beam_width=beam_width,
            stop_words=stop_words[i], bad_words=bad_words[i],
            **fields))  # type: ignore[arg-type]  # each value cast to its field's type by the contract
    flags = {name: [bool(v) for v in _given_or_default(values, name, batch_size)]
             for name in contract.STREAMING_CORE_INPUTS}
    return ParsedRequest(rows=rows, stream=all(flags[contract.STREAM]),
                         return_log_probs=any(r.return_log_probs for r in rows),
                         exclude_input=all(flags[contract.EXCLUDE_INPUT]), ft_stream=contract.STREAM not in values,
                         count_per_response=any(flags[contract.RETURN_NUM_OUTPUT_TOKENS]))


def ft_outputs(rows: Sequence[GenerationRequest], outputs: Sequence[RowOutput], *, with_log_probs: bool
               ) -> dict[str, np.ndarray]:
    """Per-row requests + their outputs (one Triton request) -> FT output arrays, keyed by FT output name."""
    if len(rows) != len(outputs) or not rows:
        raise ValueError(f"need one output per row, got {len(outputs)} for {len(rows)} rows")
    batch_size, beam = len(rows), rows[0].beam_width
    max_input_len = max(len(r.input_ids) for r in rows)
    max_output_len = max(r.output_len for r in rows)
    total_len = max_input_len + max_output_len
    output_ids = np.empty((batch_size, beam, total_len), dtype=np.uint32)
    sequence_length: np.ndarray = np.zeros((batch_size, beam), dtype=np.uint32)
    input_lengths = np.zeros((batch_size, beam), dtype=np.int32)
    cum_log_probs = np.zeros((batch_size, beam), dtype=np.float32)
    output_log_probs = np.zeros((batch_size, beam, max_output_len), dtype=np.float32)
    for i, (row, out) in enumerate(zip(rows, outputs)):
        output_ids[i] = row.end_id
        input_lengths[i] = out.prompt_len
        for b, tokens in enumerate(out.beams[:beam]):
            output_ids[i, b, :len(tokens)] = tokens
            sequence_length[i, b] = len(tokens)
            if out.output_log_probs is not None:
                steps = out.output_log_probs[b]
                output_log_probs[i, b, :len(steps)] = steps
            if out.cum_log_probs is not None:
                cum_log_probs[i, b] = out.cum_log_probs[b]
    arrays = {"output_ids": output_ids, "sequence_length": sequence_length, "response_input_lengths": input_lengths}
    if with_log_probs:
        arrays["cum_log_probs"] = cum_log_probs
        arrays["output_log_probs"] = output_log_probs
    return arrays


def finish_codes(rows: Sequence[GenerationRequest], outputs: Sequence[RowOutput]) -> np.ndarray:
    """[B, beam] int32 FINISH_CODES: 0 for rows still running."""
    codes = np.zeros((len(rows), rows[0].beam_width), dtype=np.int32)
    for i, out in enumerate(outputs):
        codes[i] = FINISH_CODES[out.finish_reason] if out.finished or out.cancelled else 0
    return codes


def stop_lengths(rows: Sequence[GenerationRequest], outputs: Sequence[RowOutput]) -> np.ndarray:
    """[B, beam] int32: tokens of the longest stop word each row/beam ends with (0 when none, or when it ended at
    end_id): what postprocessing trims from a text that was not streamed."""
    lengths = np.zeros((len(rows), rows[0].beam_width), dtype=np.int32)
    for i, (row, out) in enumerate(zip(rows, outputs)):
        if out.finish_reason != "stop":
            continue
        for b, tokens in enumerate(out.beams[:rows[0].beam_width]):
            generated = tokens[out.prompt_len:].tolist()
            if generated and generated[-1] == row.end_id:
                continue
            matched = [len(w) for w in row.stop_words if 0 < len(w) <= len(generated) and
                       tuple(generated[-len(w):]) == w]
            lengths[i, b] = max(matched, default=0)
    return lengths


def stream_tail(rows: Sequence[GenerationRequest], outputs: Sequence[RowOutput], starts: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A streamed update's token arrays; work proportional to the new tokens, not to the sequences.

    starts [B, beam]: where each row/beam's new tokens start (delta_start). Returns output_ids [B, beam, T] (the last T
    tokens of each sequence, see the module notes), sequence_length [B, beam] uint32, response_input_lengths [B, beam].
    """
    batch, beam = len(rows), rows[0].beam_width
    lengths = np.zeros((batch, beam), dtype=np.int64)
    prompt_lens = np.zeros((batch, beam), dtype=np.int64)
    for i, out in enumerate(outputs):
        prompt_lens[i] = out.prompt_len
        for b, tokens in enumerate(out.beams[:beam]):
            lengths[i, b] = len(tokens)
    window_starts = np.maximum(prompt_lens, np.minimum(starts, lengths) - STREAM_CONTEXT_TOKENS)
    width = max(1, int((lengths - window_starts).max()))
    output_ids = np.empty((batch, beam, width), dtype=np.uint32)
    for i, (row, out) in enumerate(zip(rows, outputs)):
        output_ids[i] = row.end_id
        for b, tokens in enumerate(out.beams[:beam]):
            first = max(0, len(tokens) - width)  # the prompt fills in where a sibling row needs a wider window
            output_ids[i, b, width - (len(tokens) - first):] = tokens[first:]
    return output_ids, lengths.astype(np.uint32), prompt_lens.astype(np.int32)


class StreamState:
    """The response arrays of one decoupled (streaming-capable) request, in the order they are sent."""

    def __init__(self, rows: Sequence[GenerationRequest], *, stream: bool, log_probs: bool,
                 ack: tuple[int, int] = (0, 0), exclude_input: bool = True, cumulative: bool = False,
                 count_per_response: bool = False) -> None:
        self.rows, self.stream, self.log_probs = list(rows), stream, log_probs
        self.exclude_input = exclude_input  # honoured by a final response that was not streamed (stream false)
        self.cumulative = cumulative  # every update in FT's cumulative layout (ParsedRequest.ft_stream)
        self.count_per_response = count_per_response
        self.sent: np.ndarray | None = None  # [B, beam] sequence_length of the previous response
        self.ack = np.tile(np.array(ack, dtype=np.int64), (len(rows), 1))  # [B, 2]

    def _starts(self, outputs: Sequence[RowOutput]) -> np.ndarray:
        if self.sent is not None:
            return self.sent
        return np.array([[out.prompt_len] * self.rows[0].beam_width for out in outputs], dtype=np.int64)

    def update(self, outputs: Sequence[RowOutput]) -> dict[str, np.ndarray]:
        """A streamed response: the tails of the sequences (only the tokens since the previous response, plus
        context), so its cost does not grow with the sequence."""
        starts = self._starts(outputs)
        if self.cumulative:
            return self._finish_arrays(ft_outputs(self.rows, outputs, with_log_probs=self.log_probs), starts, outputs)
        output_ids, lengths, prompt_lens = stream_tail(self.rows, outputs, starts)
        arrays = {"output_ids": output_ids, "sequence_length": lengths, "response_input_lengths": prompt_lens}
        if self.log_probs:
            full = ft_outputs(self.rows, outputs, with_log_probs=True)
            arrays.update(cum_log_probs=full["cum_log_probs"], output_log_probs=full["output_log_probs"])
        return self._finish_arrays(arrays, starts, outputs)

    def final(self, outputs: Sequence[RowOutput]) -> dict[str, np.ndarray]:
        """The last response: a tail when streaming, FT's cumulative layout otherwise (stream false)."""
        if self.stream or self.cumulative:
            return self.update(outputs)
        arrays = ft_outputs(self.rows, outputs, with_log_probs=self.log_probs)
        # Not streamed, so the text can still start with the prompt (delta_start 0) and drop a stop word.
        starts = np.zeros_like(self._starts(outputs)) if not self.exclude_input else self._starts(outputs)
        arrays = self._finish_arrays(arrays, starts, outputs)
        arrays["stop_length"] = stop_lengths(self.rows, outputs)
        return arrays

    def _finish_arrays(self, arrays: dict[str, np.ndarray], starts: np.ndarray, outputs: Sequence[RowOutput]
                       ) -> dict[str, np.ndarray]:
        arrays["delta_start"] = starts.astype(np.int32)
        arrays["finish_code"] = finish_codes(self.rows, outputs)
        arrays["stop_length"] = np.zeros_like(arrays["finish_code"])  # streamed text cannot take a stop word back
        prompt_lens = np.array([[out.prompt_len] for out in outputs], dtype=np.int64)  # [B, 1]
        counted = (self.sent - prompt_lens) if self.count_per_response and self.sent is not None else 0
        arrays["counted"] = (np.zeros_like(arrays["finish_code"]) + counted).astype(np.int32)  # [B, beam]
        arrays["stream_ack"] = self.ack
        self.sent = arrays["sequence_length"].astype(np.int64)
        return arrays
