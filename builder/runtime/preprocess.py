"""Text requests -> FasterTransformer input tensors (the preprocessing model's logic, without Triton).

One `execute` call hands over several requests (dynamic batching); each may carry B rows (B prompts). Every request is
validated on its own and yields either its FT tensors (B rows each) or a `RequestError` naming the input and the limit,
so one bad request never fails the others. All prompts and stop/bad words of the call are tokenized in one batch.

Defaults for absent inputs follow FT: top_k 0 and top_p 0 mean greedy decoding (so sampling needs top_k or top_p;
temperature alone does not switch it on), temperature 1, repetition_penalty 1, presence_penalty 0, min_length 0,
beam_width 1, len_penalty 0, random_seed 0, end_id = the configured end id (GPT-2 eos 50256), pad_id = end_id,
no stop/bad words, no log probs.

temperature 0 is accepted and means greedy (what OpenAI-style clients send): it becomes runtime_top_k 1,
runtime_top_p 0, temperature 1, so the engine never divides by zero.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .tokenizer import GptTokenizer
from .word_lists import distinct_words, encode_word_lists, word_variants

# FT input names the preprocessing model can produce, with FT's dtypes.
FT_OUTPUT_DTYPES: dict[str, type[np.generic]] = {
    "input_ids": np.uint32,
    "input_lengths": np.uint32,
    "request_output_len": np.uint32,
    "runtime_top_k": np.uint32,
    "runtime_top_p": np.float32,
    "temperature": np.float32,
    "repetition_penalty": np.float32,
    "presence_penalty": np.float32,
    "min_length": np.uint32,
    "len_penalty": np.float32,
    "beam_width": np.uint32,
    "random_seed": np.uint64,
    "end_id": np.uint32,
    "is_return_log_probs": np.bool_,
    "stop_words_list": np.int32,
    "bad_words_list": np.int32,
}
REQUIRED_OUTPUTS = ("input_ids", "input_lengths", "request_output_len")

TEXT_INPUT = "text_input"
MAX_TOKENS = "max_tokens"
WORD_LIST_INPUTS = {"stop_words": "stop_words_list", "bad_words": "bad_words_list"}  # ensemble input -> FT output


class PreprocessConfigError(ValueError):
    """The preprocessing model's parameters are missing or out of range."""


class RequestError(Exception):
    """A request is invalid; `input_name` is the offending input, the message states the limit.

    Messages never echo a numeric input's value: any input can be read from a shared-memory region, and a client
    that registered someone else's memory as one could otherwise read it back through our errors, four bytes per
    refused `top_k`. The client knows what it sent; the field and the limit are what it needs. Text-derived numbers
    (a prompt's bytes or tokens) stay: a request that passes returns its text anyway (exclude_input_in_output).
    """

    def __init__(self, input_name: str, message: str):
        super().__init__(f"invalid input '{input_name}': {message}")
        self.input_name = input_name
        self.message = message


def _detached(err: RequestError) -> RequestError:
    """`err` without its traceback or chained exceptions, fit to be kept as a result.

    A kept traceback pins the frames that hold the request's arrays in a reference cycle (the result list holds the
    error, the error holds the frame that holds the list); until a full garbage collection every refused 16 MB prompt
    then stays in the stub's heap and shared memory (+48 MB each).
    """
    err.__traceback__ = err.__cause__ = err.__context__ = None
    return err


@dataclass(frozen=True)
class PreprocessConfig:
    max_pos_seq_len: int  # prompt tokens + max_tokens must fit (the model's position table)
    vocab_size: int  # ids in [0, vocab_size) exist; top_k <= vocab_size
    end_id: int = 50256
    pad_id: int | None = None  # default: end_id
    outputs: tuple[str, ...] = tuple(FT_OUTPUT_DTYPES)  # FT tensors to produce, in this order
    max_beam_width: int = 8
    max_words: int = 64  # words per stop/bad list and row, before adding the leading-space variants
    max_word_chars: int = 256
    max_word_list_tokens: int = 1024  # N of the [2, N] list

    def __post_init__(self) -> None:
        for name in ("max_pos_seq_len", "vocab_size", "max_beam_width", "max_words", "max_word_chars",
                     "max_word_list_tokens"):
            if getattr(self, name) < 1:
                raise PreprocessConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("end_id", "pad_id"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < self.vocab_size:
                raise PreprocessConfigError(f"{name} must be in [0, vocab_size={self.vocab_size}), got {value}")
        unknown = [name for name in self.outputs if name not in FT_OUTPUT_DTYPES]
        if unknown:
            raise PreprocessConfigError(f"unknown FT outputs {unknown}; known: {sorted(FT_OUTPUT_DTYPES)}")
        missing = [name for name in REQUIRED_OUTPUTS if name not in self.outputs]
        if missing:
            raise PreprocessConfigError(f"outputs must include {list(REQUIRED_OUTPUTS)}; missing {missing}")

    @property
    def default_pad_id(self) -> int:
        return self.end_id if self.pad_id is None else self.pad_id

    @classmethod
    def from_parameters(cls, parameters: Mapping[str, str], outputs: Iterable[str],
                        default_end_id: int = 50256) -> "PreprocessConfig":
        """From a model config's string parameters: max_pos_seq_len, vocab_size (required), end_id, pad_id."""
        def integer(key: str, required: bool) -> int | None:
            raw = parameters.get(key, "").strip()
            if not raw:
                if required:
                    raise PreprocessConfigError(f"parameter '{key}' is required")
                return None
            try:
                return int(raw)
            except ValueError:
                raise PreprocessConfigError(f"parameter '{key}' must be an integer, got {raw!r}") from None

        end_id = integer("end_id", required=False)
        return cls(max_pos_seq_len=integer("max_pos_seq_len", True), vocab_size=integer("vocab_size", True),
                   end_id=default_end_id if end_id is None else end_id, pad_id=integer("pad_id", False),
                   outputs=tuple(outputs))


# ---------------------------------------------------------------------------------------------------------------------
# Scalar inputs: one value per row, validated, defaulted, mapped to an FT output.

Check = Callable[[float, PreprocessConfig], "str | None"]  # returns the broken rule, or None when the value is fine


@dataclass(frozen=True)
class ScalarInput:
    name: str  # ensemble input
    output: str  # FT output it becomes
    default: Callable[[PreprocessConfig], float]
    check: Check


def _finite(value: float, _: PreprocessConfig) -> str | None:
    return None if math.isfinite(value) else "must be finite"


def _in_closed(low: float, high_of: Callable[[PreprocessConfig], float]) -> Check:
    def check(value: float, config: PreprocessConfig) -> str | None:
        high = high_of(config)
        return None if low <= value <= high else f"must be in [{low:g}, {high:g}]"
    return check


def _token_id(value: float, config: PreprocessConfig) -> str | None:
    return None if 0 <= value < config.vocab_size else f"must be a token id in [0, {config.vocab_size})"


SCALAR_INPUTS: tuple[ScalarInput, ...] = (
    ScalarInput("top_k", "runtime_top_k", lambda c: 0, _in_closed(0, lambda c: c.vocab_size)),
    ScalarInput("top_p", "runtime_top_p", lambda c: 0.0, _in_closed(0.0, lambda c: 1.0)),
    ScalarInput("temperature", "temperature", lambda c: 1.0,
                lambda v, c: None if math.isfinite(v) and v >= 0 else "must be >= 0 (0 = greedy) and finite"),
    ScalarInput("repetition_penalty", "repetition_penalty", lambda c: 1.0,
                lambda v, c: None if math.isfinite(v) and v > 0 else "must be > 0 and finite"),
    ScalarInput("presence_penalty", "presence_penalty", lambda c: 0.0, _finite),
    ScalarInput("len_penalty", "len_penalty", lambda c: 0.0, _finite),
    ScalarInput("beam_width", "beam_width", lambda c: 1, _in_closed(1, lambda c: c.max_beam_width)),
    ScalarInput("random_seed", "random_seed", lambda c: 0, lambda v, c: None),
    ScalarInput("end_id", "end_id", lambda c: c.end_id, _token_id),
    ScalarInput("pad_id", "", lambda c: c.default_pad_id, _token_id),  # used here, not an FT input
    ScalarInput("return_log_probs", "is_return_log_probs", lambda c: 0, lambda v, c: None),
    # min_tokens <= max_tokens is checked per row once both are known.
    ScalarInput("min_tokens", "min_length", lambda c: 0, lambda v, c: None if v >= 0 else "must be >= 0"),
)
KNOWN_INPUTS = frozenset({TEXT_INPUT, MAX_TOKENS, *WORD_LIST_INPUTS, *(s.name for s in SCALAR_INPUTS)})


@dataclass
class _ParsedRequest:
    prompts: list[str]
    max_tokens: np.ndarray  # [B] int64
    scalars: dict[str, np.ndarray]  # ensemble input name -> [B] values (defaults filled)
    words: dict[str, list[list[str]]] = field(default_factory=dict)  # stop_words/bad_words -> per row variants


def _row_label(row: int, batch: int) -> str:
    return f" (row {row})" if batch > 1 else ""


def _per_row(inputs: Mapping[str, np.ndarray], name: str, batch: int) -> np.ndarray | None:
    """The input as one value per row ([B, 1] or [B] -> [B]); None when absent."""
    array = inputs.get(name)
    if array is None:
        return None
    array = np.asarray(array)
    if array.ndim == 0 or array.shape[0] != batch or array.size != batch:
        raise RequestError(name, f"expected one value per row, shape [{batch}, 1], got {list(array.shape)}")
    return array.reshape(batch)


def _text(value: object, name: str, row: int, batch: int) -> str:
    if isinstance(value, str):
        return value
    try:
        return bytes(value).decode("utf-8")  # type: ignore[arg-type]
    except (UnicodeDecodeError, TypeError) as err:
        raise RequestError(name, f"element{_row_label(row, batch)} is not valid UTF-8 text ({err})") from None


def _parse_request(inputs: Mapping[str, np.ndarray], config: PreprocessConfig) -> _ParsedRequest:
    if inputs.get(TEXT_INPUT) is None:
        raise RequestError(TEXT_INPUT, "is required")
    text_input = np.asarray(inputs[TEXT_INPUT])
    batch = int(text_input.shape[0]) if text_input.ndim else 0
    if batch < 1:
        raise RequestError(TEXT_INPUT, "must hold at least one prompt")
    prompt_values = _per_row(inputs, TEXT_INPUT, batch)
    prompts = [_text(value, TEXT_INPUT, row, batch) for row, value in enumerate(prompt_values)]
    for row, prompt in enumerate(prompts):
        if not prompt:
            raise RequestError(TEXT_INPUT, f"prompt{_row_label(row, batch)} is empty")

    max_tokens = _per_row(inputs, MAX_TOKENS, batch)
    if max_tokens is None:
        raise RequestError(MAX_TOKENS, "is required")
    max_tokens = max_tokens.astype(np.int64)
    for row, value in enumerate(max_tokens):
        if not 1 <= value <= config.max_pos_seq_len - 1:  # the prompt takes at least one position
            raise RequestError(MAX_TOKENS, f"must be in [1, {config.max_pos_seq_len - 1}]{_row_label(row, batch)} "
                                           f"(max_pos_seq_len {config.max_pos_seq_len} less one prompt token)")

    scalars: dict[str, np.ndarray] = {}
    for spec in SCALAR_INPUTS:
        given = _per_row(inputs, spec.name, batch)
        if given is None:
            scalars[spec.name] = np.full(batch, spec.default(config))
            continue
        for row, value in enumerate(given.tolist()):
            problem = spec.check(float(value), config)
            if problem:
                raise RequestError(spec.name, f"{problem}{_row_label(row, batch)}")
        scalars[spec.name] = given
    for row, (min_tokens, limit) in enumerate(zip(scalars["min_tokens"].tolist(), max_tokens.tolist())):
        if min_tokens > limit:
            raise RequestError("min_tokens", f"must be <= max_tokens{_row_label(row, batch)}")

    words: dict[str, list[list[str]]] = {}
    for name in WORD_LIST_INPUTS:
        array = inputs.get(name)
        if array is None:
            continue
        array = np.asarray(array)
        if array.ndim == 0 or array.shape[0] != batch:
            raise RequestError(name, f"expected shape [{batch}, words], got {list(array.shape)}")
        rows = array.reshape(batch, -1)
        words[name] = []
        for row in range(batch):
            row_words = [word for word in (_text(v, name, row, batch) for v in rows[row]) if word]
            if len(row_words) > config.max_words:
                raise RequestError(name, f"{len(row_words)} words{_row_label(row, batch)}; the limit is "
                                         f"{config.max_words}")
            for word in row_words:
                if len(word) > config.max_word_chars:
                    raise RequestError(name, f"word {word[:20]!r}... has {len(word)} characters; the limit is "
                                             f"{config.max_word_chars}")
            words[name].append(word_variants(row_words))
    return _ParsedRequest(prompts, max_tokens, scalars, words)


def _check_prompt_bytes(parsed: _ParsedRequest, max_token_bytes: int, config: PreprocessConfig) -> None:
    """Refuse a prompt that cannot fit before tokenizing it (a multi-MB prompt costs seconds of CPU to tokenize)."""
    batch = len(parsed.prompts)
    for row, prompt in enumerate(parsed.prompts):
        limit = int(parsed.max_tokens[row])
        room = config.max_pos_seq_len - limit  # tokens left for the prompt
        size = len(prompt.encode("utf-8"))
        if size > room * max_token_bytes:
            raise RequestError(TEXT_INPUT, f"prompt{_row_label(row, batch)} has {size} bytes, more than fit in "
                                           f"max_pos_seq_len {config.max_pos_seq_len} tokens less max_tokens (a token "
                                           f"covers at most {max_token_bytes} bytes)")


def _ft_tensors(parsed: _ParsedRequest, prompt_ids: list[list[int]], word_ids: dict[str, list[list[list[int]]]],
                config: PreprocessConfig) -> dict[str, np.ndarray]:
    batch = len(parsed.prompts)
    for row, ids in enumerate(prompt_ids):
        limit = int(parsed.max_tokens[row])
        if len(ids) + limit > config.max_pos_seq_len:
            raise RequestError(TEXT_INPUT, f"prompt{_row_label(row, batch)} has {len(ids)} tokens; prompt tokens + "
                                           f"max_tokens must be <= max_pos_seq_len {config.max_pos_seq_len}")
    for name, rows in word_ids.items():
        for row, words in enumerate(rows):
            tokens = sum(len(word) for word in words)
            if tokens > config.max_word_list_tokens:
                raise RequestError(name, f"words{_row_label(row, batch)} take {tokens} tokens (with their "
                                         f"leading-space variants); the limit is {config.max_word_list_tokens}")

    scalars = dict(parsed.scalars)
    greedy = scalars["temperature"].astype(np.float64) == 0.0
    if greedy.any():  # temperature 0 = greedy: k=1 picks the argmax whatever top_p says
        scalars["top_k"] = np.where(greedy, 1, scalars["top_k"])
        scalars["top_p"] = np.where(greedy, 0.0, scalars["top_p"])
        scalars["temperature"] = np.where(greedy, 1.0, scalars["temperature"])

    pad_ids = scalars["pad_id"].astype(np.int64)
    width = max(len(ids) for ids in prompt_ids)
    input_ids = np.empty((batch, width), dtype=np.uint32)  # [B, longest prompt], right-padded per row
    for row, ids in enumerate(prompt_ids):
        input_ids[row, :len(ids)] = ids
        input_ids[row, len(ids):] = pad_ids[row]

    tensors: dict[str, np.ndarray] = {
        "input_ids": input_ids,
        "input_lengths": np.array([[len(ids)] for ids in prompt_ids], dtype=np.uint32),
        "request_output_len": parsed.max_tokens.reshape(batch, 1).astype(np.uint32),
    }
    for spec in SCALAR_INPUTS:
        if spec.output:
            tensors[spec.output] = scalars[spec.name].reshape(batch, 1).astype(FT_OUTPUT_DTYPES[spec.output])
    for name, output in WORD_LIST_INPUTS.items():
        tensors[output] = encode_word_lists(word_ids.get(name, [[] for _ in range(batch)]))
    return {name: tensors[name] for name in config.outputs}


def preprocess_requests(requests: Sequence[Mapping[str, np.ndarray]], tokenizer: GptTokenizer,
                        config: PreprocessConfig) -> list[dict[str, np.ndarray] | RequestError]:
    """Each request's inputs (name -> array with the batch dim) -> its FT tensors (`config.outputs`) or its error."""
    parsed: list[_ParsedRequest | RequestError] = []
    for inputs in requests:
        try:
            request = _parse_request(inputs, config)
            _check_prompt_bytes(request, tokenizer.max_token_bytes, config)
            parsed.append(request)
        except RequestError as err:
            parsed.append(_detached(err))

    # One batched encode for every prompt and word variant of the call; `spans` finds each request's slice.
    texts: list[str] = []
    spans: list[tuple[int, int]] = []
    for request in parsed:
        start = len(texts)
        if isinstance(request, _ParsedRequest):
            texts.extend(request.prompts)
            for rows in request.words.values():
                for variants in rows:
                    texts.extend(variants)
        spans.append((start, len(texts)))
    encoded = tokenizer.encode_batch(texts)

    results: list[dict[str, np.ndarray] | RequestError] = []
    for request, (start, _) in zip(parsed, spans):
        if isinstance(request, RequestError):
            results.append(request)
            continue
        cursor = start + len(request.prompts)
        prompt_ids = encoded[start:cursor]
        word_ids: dict[str, list[list[list[int]]]] = {}
        for name, rows in request.words.items():
            word_ids[name] = []
            for variants in rows:
                word_ids[name].append(distinct_words(encoded[cursor:cursor + len(variants)]))
                cursor += len(variants)
        try:
            results.append(_ft_tensors(request, prompt_ids, word_ids, config))
        except RequestError as err:
            results.append(_detached(err))
    return results
