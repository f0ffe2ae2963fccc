"""FasterTransformer output tensors -> text (the postprocessing model's logic, without Triton).

Non-streaming, per row and beam: the generated tokens are `output_ids[input_len:sequence_length]`. Generation ends
at the first `end_id` (dropped, finish_reason "stop"), or with a stop word: FT leaves the stop word's tokens in
`output_ids`, so the longest matching word is trimmed from the end (finish_reason "stop"); otherwise finish_reason is
"length". `num_output_tokens` counts the generated tokens without the end_id but WITH a trimmed stop word's tokens
(the model did generate them). With `exclude_input_in_output` false the text is the prompt followed by the generation.
Every row and beam of every request in the call is decoded in one batched call.

Streaming (stateless): the text delta of a response is what its new tokens add (`GptTokenizer.stream_delta`: an
unfinished UTF-8 character is held back until it completes; the prompt is never included). Our decoupled torch core
says where the new tokens start (`delta_start`), sends only the tail of each sequence (core_io.py: output_ids holds
the last T tokens when T < max(sequence_length), else FT's cumulative layout), why a row ended (`finish_code`, so
finish_reason is "stop" or "length" on the last response and "" before), how many generated tokens earlier
responses counted (`counted`: num_output_tokens is then per response, as return_num_output_tokens asks), and a
`stream_ack` (port, key) that the
postprocessing model acknowledges (stream_ack.py). Without `delta_start` (FT) each response adds one token, so a beam
"grew" when its generated length equals the longest in the request and a beam that finished earlier gets "".
What a stateless step cannot know, by design:
- a streamed stop word is not trimmed (its text has been streamed before the engine stops); a response that was not
  streamed (`stream` false) is trimmed by the core's `stop_length`, and starts with the prompt where the core's
  `delta_start` says so (exclude_input_in_output false); without `finish_code` (FT)
  finish_reason is "" except when the last token is the end id (the `end_id` parameter, default the tokenizer's eos):
  then "stop"; the end id itself adds no text (a request's own `end_id` input cannot reach a streaming postprocessing);
- without `delta_start` the core model must send exactly one response per step: a response repeating the previous
  one (no beam grew) would repeat the last delta, unless its last token is the end id;
- without `finish_code`, an unfinished character at the very end of a generation stopped by length is never emitted (a
  full decode would show U+FFFD); before the end id, or with `finish_code`, it is flushed as U+FFFD like a full decode;
- with beam_width > 1 the beams are re-ranked every step, so per-beam deltas need not add up to the final beams.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from . import contract
from .contract import RequestError, detached
from .tokenizer import GptTokenizer
from .word_lists import decode_word_list

FINISH_STOP = "stop"
FINISH_LENGTH = "length"
FINISH_REASONS = {0: "", 1: FINISH_STOP, 2: FINISH_LENGTH, 3: "cancelled"}  # core_io.FINISH_CODES, inverted


class PostprocessConfigError(ValueError):
    """The postprocessing model's parameters are missing or invalid."""


@dataclass(frozen=True)
class PostprocessConfig:
    streaming: bool
    end_id: int  # default end id (a request's `end_id` input wins); in streaming the token that means "stop"

    @classmethod
    def from_parameters(cls, parameters: Mapping[str, str], default_end_id: int) -> PostprocessConfig:
        """From a model config's string parameters: streaming ("true"/"false", required), end_id (optional)."""
        raw = parameters.get("streaming", "").strip().lower()
        if raw not in ("true", "false"):
            raise PostprocessConfigError(f"parameter 'streaming' must be \"true\" or \"false\", got {raw!r}")
        raw_end_id = parameters.get("end_id", "").strip()
        try:
            end_id = int(raw_end_id) if raw_end_id else default_end_id
        except ValueError:
            raise PostprocessConfigError(f"parameter 'end_id' must be an integer, got {raw_end_id!r}") from None
        if end_id < 0:
            raise PostprocessConfigError(f"parameter 'end_id' must be >= 0, got {end_id}")
        return cls(streaming=raw == "true", end_id=end_id)


def _types(tensors: Sequence[contract.Tensor]) -> dict[str, str]:
    return {t.name: f"TYPE_{t.data_type}" for t in tensors}


# The core outputs postprocessing reads, from the contract (log-probs go to the ensemble's outputs directly).
CORE_INPUTS = _types([t for t in contract.CORE_OUTPUTS if t.name not in contract.LOG_PROB_OUTPUTS])
# From preprocessing or the ensemble: a step after a decoupled model may not read them, so non-streaming only.
# request_output_len is accepted for wiring symmetry but not needed: sequence_length and end_id tell how it ended.
REQUEST_INPUTS = _types([*(contract.CORE[n].tensor for n in contract.POSTPROCESSING_FROM_PREPROCESSING),
                         contract.ENSEMBLE[contract.EXCLUDE_INPUT].tensor])
# Streaming only, from a decoupled torch core (core_io.py).
STREAM_INPUTS = _types(contract.STREAM_OUTPUTS)
OUTPUTS = _types(contract.ENSEMBLE_OUTPUTS)


def check_model_tensors(config: PostprocessConfig, inputs: Mapping[str, str], outputs: Mapping[str, str]) -> None:
    """The postprocessing model config's tensors (name -> TYPE_x) against what this code reads and writes."""
    allowed = {**CORE_INPUTS, **(STREAM_INPUTS if config.streaming else REQUEST_INPUTS)}
    unknown = sorted(set(inputs) - set(allowed))
    if unknown:
        mode = "streaming" if config.streaming else "non-streaming"
        raise PostprocessConfigError(f"postprocessing ({mode}): config declares inputs it cannot use: {unknown}; "
                                     f"allowed: {sorted(allowed)}")
    missing = sorted(set(CORE_INPUTS) - set(inputs))
    if missing:
        raise PostprocessConfigError(f"postprocessing: config must declare the inputs {missing}")
    for name, data_type in {**inputs, **outputs}.items():
        expected = {**allowed, **OUTPUTS}.get(name)
        if expected is None:
            raise PostprocessConfigError(f"postprocessing: unknown output '{name}'; known: {sorted(OUTPUTS)}")
        if data_type != expected:
            raise PostprocessConfigError(f"postprocessing: '{name}' must be {expected}, config says {data_type}")
    if "text_output" not in outputs:
        raise PostprocessConfigError("postprocessing: config must declare the output 'text_output'")


def stream_acks(requests: Sequence[Mapping[str, np.ndarray]]) -> list[tuple[int, int]]:
    """(port, key) of every request that carries a stream_ack (stream_ack.py), to acknowledge."""
    acks = []
    for inputs in requests:
        value = inputs.get("stream_ack")
        if value is not None and np.asarray(value).size >= 2:
            port, key = (int(v) for v in np.asarray(value).reshape(-1)[:2])
            acks.append((port, key))
    return acks


@dataclass(frozen=True)
class _Beams:
    """One request's core-model outputs, validated. B rows x W beams."""
    output_ids: np.ndarray  # [B, W, T]
    sequence_length: np.ndarray  # [B, W]
    input_lengths: np.ndarray  # [B, W]
    is_tail: bool = False  # a streamed update of our torch core: output_ids holds the last T tokens of each sequence

    def generated(self, row: int, beam: int) -> list[int]:
        """The generated tokens held (all of them, or for a tail the ones it holds) and their first position."""
        start, end = int(self.input_lengths[row, beam]), int(self.sequence_length[row, beam])
        if self.is_tail:
            width = self.output_ids.shape[2]
            first = max(start, end - width)
            return self.output_ids[row, beam, width - (end - first):].tolist()
        return self.output_ids[row, beam, start:end].tolist()


def _read_beams(inputs: Mapping[str, np.ndarray], allow_tail: bool = False) -> _Beams:
    for name in ("output_ids", "sequence_length", "response_input_lengths"):
        if inputs.get(name) is None:
            raise RequestError(name, "is required")
    output_ids = np.asarray(inputs["output_ids"])
    if output_ids.ndim != 3:
        raise RequestError("output_ids", f"expected shape [batch, beam, tokens], got {list(output_ids.shape)}")
    batch, beams, tokens = output_ids.shape
    sequence_length = np.asarray(inputs["sequence_length"]).astype(np.int64)
    if sequence_length.shape != (batch, beams):
        raise RequestError("sequence_length", f"expected shape [{batch}, {beams}], got {list(sequence_length.shape)}")
    input_lengths = np.asarray(inputs["response_input_lengths"]).astype(np.int64)
    if input_lengths.ndim != 2 or input_lengths.shape[0] != batch or input_lengths.shape[1] not in (1, beams):
        raise RequestError("response_input_lengths", f"expected shape [{batch}, {beams}], got "
                                                     f"{list(input_lengths.shape)}")
    if input_lengths.shape[1] != beams:
        input_lengths = np.broadcast_to(input_lengths, (batch, beams))
    longest = int(sequence_length.max(initial=0))
    tail = allow_tail and tokens < longest  # a streamed tail (core_io.py)
    if int(input_lengths.min(initial=0)) < 0 or (input_lengths > sequence_length).any() or (
            not tail and longest > tokens):
        # The values are not echoed: they can come from a shared-memory region (contract.RequestError).
        raise RequestError("sequence_length", f"need 0 <= response_input_lengths <= sequence_length <= {tokens} "
                                              f"(output_ids length) for every row and beam")
    if output_ids.dtype.kind not in "iu":
        raise RequestError("output_ids", f"must be integers, got {output_ids.dtype}")
    return _Beams(output_ids, sequence_length, input_lengths, tail)


def _per_row(inputs: Mapping[str, np.ndarray], name: str, batch: int, default: int) -> list[int]:
    value = inputs.get(name)
    if value is None:
        return [default] * batch
    value = np.asarray(value)
    if value.size != batch:
        raise RequestError(name, f"expected one value per row ({batch}), got shape {list(value.shape)}")
    return [int(v) for v in value.reshape(batch)]


def _stop_words(inputs: Mapping[str, np.ndarray], batch: int) -> list[list[list[int]]]:
    value = inputs.get("stop_words_list")
    if value is None:
        return [[] for _ in range(batch)]
    value = np.asarray(value)
    if value.ndim != 3 or value.shape[:2] != (batch, 2):
        raise RequestError("stop_words_list", f"expected shape [{batch}, 2, N], got {list(value.shape)}")
    try:
        return [decode_word_list(value[row]) for row in range(batch)]
    except ValueError as err:
        raise RequestError("stop_words_list", str(err)) from None


def _trimmed_stop(generated: list[int], stop_words: list[list[int]]) -> int:
    """Length of the longest stop word that `generated` ends with (0 if none)."""
    matched = [len(word) for word in stop_words if 0 < len(word) <= len(generated) and generated[-len(word):] == word]
    return max(matched, default=0)


def _final_texts(requests: Sequence[Mapping[str, np.ndarray]], tokenizer: GptTokenizer, default_end_id: int
                 ) -> list[dict[str, np.ndarray] | RequestError]:
    # Pass 1: per beam, which ids to decode and the metadata; pass 2: one batched decode; pass 3: assemble.
    plans: list[tuple[_Beams, list[list[str]], list[list[int]]] | RequestError] = []
    to_decode: list[list[int]] = []
    for inputs in requests:
        try:
            beams = _read_beams(inputs)
            batch, width = beams.sequence_length.shape
            end_ids = _per_row(inputs, "end_id", batch, default_end_id)
            exclude_input = _per_row(inputs, "exclude_input_in_output", batch, 1)
            stop_words = _stop_words(inputs, batch)
        except RequestError as err:
            plans.append(detached(err))  # a kept traceback would pin the request's arrays
            continue
        reasons: list[list[str]] = []
        counts: list[list[int]] = []
        for row in range(batch):
            reasons.append([])
            counts.append([])
            for beam in range(width):
                generated = beams.generated(row, beam)
                if end_ids[row] in generated:
                    kept = generated[:generated.index(end_ids[row])]
                    reason, count = FINISH_STOP, len(kept)
                else:
                    stop_length = _trimmed_stop(generated, stop_words[row])
                    kept = generated[:len(generated) - stop_length]
                    reason, count = (FINISH_STOP if stop_length else FINISH_LENGTH), len(generated)
                if not exclude_input[row]:
                    kept = beams.output_ids[row, beam, :beams.input_lengths[row, beam]].tolist() + kept
                to_decode.append(kept)
                reasons[row].append(reason)
                counts[row].append(count)
        plans.append((beams, reasons, counts))

    texts = iter(tokenizer.decode_batch(to_decode))
    results: list[dict[str, np.ndarray] | RequestError] = []
    for plan in plans:
        if isinstance(plan, RequestError):
            results.append(plan)
            continue
        beams, reasons, counts = plan
        texts_of_plan = [next(texts).encode("utf-8") for _ in range(beams.sequence_length.size)]  # row-major
        results.append(text_arrays(texts_of_plan, reasons, beams.input_lengths[:, 0].tolist(), counts))
    return results


def text_arrays(texts: list[bytes], reasons: list[list[str]], prompt_lengths: list[int], counts: list[list[int]]
                ) -> dict[str, np.ndarray]:
    """The text outputs of B rows x W beams: `texts` [B * W] UTF-8 bytes (row-major), per row its beams' finish
    reasons and generated-token counts, and its prompt's length."""
    return {
        # [B * W] UTF-8 bytes, row-major: TRT-LLM's layout, which its clients read as text_output[0] (contract.py)
        "text_output": np.array(texts, dtype=np.object_),
        "finish_reason": np.array([[reason.encode() for reason in row] for row in reasons], dtype=np.object_),
        "num_input_tokens": np.array(prompt_lengths, dtype=np.int32).reshape(-1, 1),  # [B, 1]
        "num_output_tokens": np.array(counts, dtype=np.int32),  # [B, W]
    }


def stream_piece(tokenizer: GptTokenizer, generated: list[int], num_new: int, reason: str, end_id: int,
                 end_means_stop: bool = False) -> tuple[str, str, int]:
    """One streamed response's text for one sequence: `generated` holds its generated tokens (or the last ones: enough
    context before the `num_new` new ones, core_io.stream_tail), `reason` why it ended ("" while it runs).
    Returns (text delta, finish reason, end tokens dropped). A last token equal to `end_id` that ended the sequence
    (`reason` "stop", or any reason with `end_means_stop`: FT says none) adds no text and is not counted; the last
    response flushes a held-back partial character as U+FFFD, as a full decode would."""
    if _ended_by_end_id(generated, end_id, reason, end_means_stop):
        return (tokenizer.stream_delta(generated[:-1], num_new - 1, final=True) if num_new else ""), FINISH_STOP, 1
    return (tokenizer.stream_delta(generated, num_new, final=bool(reason)) if num_new else ""), reason, 0


def _ended_by_end_id(generated: list[int], end_id: int, reason: str, end_means_stop: bool) -> bool:
    return bool(generated) and generated[-1] == end_id and (end_means_stop or reason == FINISH_STOP)


def _stream_deltas(inputs: Mapping[str, np.ndarray], tokenizer: GptTokenizer, end_id: int) -> dict[str, np.ndarray]:
    beams = _read_beams(inputs, allow_tail="delta_start" in inputs)
    batch, width = beams.sequence_length.shape
    # Plain lists from here: a response holds a row or a few, where each NumPy call costs more than the loop.
    lengths, prompt_lengths = beams.sequence_length.tolist(), beams.input_lengths.tolist()

    def grid(name: str) -> list[list[int]] | None:  # an optional [B, W] input
        value = inputs.get(name)
        return None if value is None else np.asarray(value, dtype=np.int64).reshape(batch, -1).tolist()

    codes, starts, trims, counted = grid("finish_code"), grid("delta_start"), grid("stop_length"), grid("counted")
    # Without delta_start (FT's decoupled mode) each response adds one token, to the longest beams only.
    newest = max((length - prompt for row in zip(lengths, prompt_lengths) for length, prompt in zip(*row)),
                 default=0)
    # delta_start before the prompt's end: a final response repeats the prompt (exclude_input_in_output false)
    echo = starts is not None and not beams.is_tail and any(
        0 <= start < prompt for row in zip(starts, prompt_lengths) for start, prompt in zip(*row))
    texts: list[bytes] = []  # row-major
    reasons: list[list[str]] = []
    counts: list[list[int]] = []
    for row in range(batch):
        reasons.append([])
        counts.append([])
        for beam in range(width):
            generated = beams.generated(row, beam)
            total = lengths[row][beam] - prompt_lengths[row][beam]  # generated so far (a tail holds the last ones)
            if starts is not None:  # the core says where this response's new tokens start
                num_new = min(max(lengths[row][beam] - starts[row][beam], 0), len(generated))
            else:
                num_new = 1 if total == newest and total > 0 else 0
            reason = FINISH_REASONS.get(codes[row][beam], "") if codes is not None else ""
            trim = trims[row][beam] if trims is not None else 0
            if (echo or trim) and not _ended_by_end_id(generated, end_id, reason, codes is None):
                # a final response that was not streamed
                tokens = beams.output_ids[row, beam, :lengths[row][beam]].tolist() if echo else generated
                num_new = len(tokens) - starts[row][beam] if echo and starts is not None else len(generated)
                keep = len(tokens) - min(max(trim, 0), len(generated))
                delta = tokenizer.stream_delta(tokens[:keep], num_new - (len(tokens) - keep), final=True)
            else:
                delta, reason, dropped = stream_piece(tokenizer, generated, num_new, reason, end_id,
                                                      end_means_stop=codes is None)
                total -= dropped
            texts.append(delta.encode("utf-8"))
            reasons[row].append(reason)
            counts[row].append(total - (counted[row][beam] if counted is not None else 0))
    return text_arrays(texts, reasons, [row[0] for row in prompt_lengths], counts)


def postprocess_requests(requests: Sequence[Mapping[str, np.ndarray]], tokenizer: GptTokenizer,
                         config: PostprocessConfig) -> list[dict[str, np.ndarray] | RequestError]:
    """Each request's inputs (name -> array with the batch dim) -> text_output, finish_reason, num_input_tokens,
    num_output_tokens (all [B, ...]), or its error."""
    if not config.streaming:
        return _final_texts(requests, tokenizer, config.end_id)
    results: list[dict[str, np.ndarray] | RequestError] = []
    for inputs in requests:
        try:
            results.append(_stream_deltas(inputs, tokenizer, config.end_id))
        except RequestError as err:
            results.append(detached(err))
    return results
