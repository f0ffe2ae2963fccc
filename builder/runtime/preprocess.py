"""Text requests -> FasterTransformer input tensors (the preprocessing model's logic, without Triton).

One `execute` call hands over several requests (dynamic batching); each may carry B rows (B prompts). Every request is
validated on its own and yields either its FT tensors (B rows each) or a `RequestError` naming the input and the limit,
so one bad request never fails the others. All prompts and stop/bad words of the call are tokenized in one batch.
A streaming text core (text_core.py) takes the same requests to the core's rows directly (`core_requests`): the same
values, without the tensors the core would parse again.

Defaults for absent inputs follow FT: top_k 0 and top_p 0 mean greedy decoding (so sampling needs top_k or top_p;
temperature alone does not switch it on), temperature 1, repetition_penalty 1, presence_penalty 0, min_length 0,
beam_width 1, len_penalty 0, random_seed 0, end_id = the configured end id (GPT-2 eos 50256), pad_id = end_id,
no stop/bad words, no log probs.

Names other clients send (`seed`, `min_length`, `length_penalty`) are aliases; `num_return_sequences` must be 1;
`stream` is checked here where the core cannot take it (contract.py says which values each repository honours).

temperature 0 is accepted and means greedy (what OpenAI-style clients send): it becomes runtime_top_k 1,
runtime_top_p 0, temperature 1, so the engine never divides by zero.
"""

from __future__ import annotations

import array
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from typing import TypeVar

import numpy as np

from . import contract
from .contract import MAX_TOKENS, TEXT_INPUT, WORD_LIST_INPUTS, RequestError, detached
from .core_io import EngineLimits, ParsedRequest, rows_from_values
from .tokenizer import GptTokenizer
from .word_lists import distinct_words, encode_word_lists, word_variants

# FT input names the preprocessing model can produce, with FT's dtypes (the contract's core inputs it fills).
FT_OUTPUT_DTYPES: dict[str, type[np.generic]] = {
    name: contract.CORE[name].tensor.numpy_type
    for name in (*contract.REQUIRED_CORE_INPUTS, *(i.core for i in contract.ENSEMBLE_INPUTS if i.core),
                 *contract.STREAMING_CORE_INPUTS)}  # the last: for a streaming torch core, always sent explicitly
REQUIRED_OUTPUTS = contract.REQUIRED_CORE_INPUTS
# Every ensemble input preprocessing can read, with its Triton type (a mismatch would feed us misread values).
INPUT_TYPES = {i.name: f"TYPE_{i.tensor.data_type}" for i in contract.ENSEMBLE_INPUTS}
KNOWN_INPUTS = frozenset(INPUT_TYPES)


class PreprocessConfigError(ValueError):
    """The preprocessing model's parameters are missing or out of range."""


@dataclass(frozen=True)
class PreprocessConfig:
    max_pos_seq_len: int  # prompt tokens + max_tokens must fit (the model's position table)
    vocab_size: int  # ids in [0, vocab_size) exist; top_k <= vocab_size
    end_id: int = 50256
    pad_id: int | None = None  # default: end_id
    outputs: tuple[str, ...] = tuple(FT_OUTPUT_DTYPES)  # FT tensors to produce, in this order
    max_beam_width: int = contract.MAX_BEAM_WIDTH
    max_words: int = 64  # words per stop/bad list and row, before adding the leading-space variants
    max_word_chars: int = 256
    max_word_list_tokens: int = 1024  # N of the [2, N] list
    streaming: bool = False  # the repository streams (decides which `stream` values can be honoured)
    # Send only the tensors a request sets (and the required ones, and `stream`): the core takes its own defaults for
    # the others (a torch repository: its ensemble may leave optional core inputs out, Triton >= 2.42).
    # Each tensor costs both Python stubs a hand-over; most requests set two or three of ~20.
    omit_defaults: bool = False

    def __post_init__(self) -> None:
        for name in ("max_pos_seq_len", "vocab_size", "max_beam_width", "max_words", "max_word_chars",
                     "max_word_list_tokens"):
            if getattr(self, name) < 1:
                raise PreprocessConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("end_id", "pad_id"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < self.vocab_size:
                raise PreprocessConfigError(f"{name} must be in [0, vocab_size={self.vocab_size}), got {value}")
        if self.max_beam_width > contract.MAX_BEAM_WIDTH:
            raise PreprocessConfigError(f"max_beam_width must be <= {contract.MAX_BEAM_WIDTH}")
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
                        default_end_id: int = 50256) -> PreprocessConfig:
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
        max_pos_seq_len, vocab_size = integer("max_pos_seq_len", True), integer("vocab_size", True)
        assert max_pos_seq_len is not None and vocab_size is not None  # required=True raised otherwise
        def flag(key: str) -> bool:
            value = parameters.get(key, "false").strip().lower()
            if value not in ("true", "false"):
                raise PreprocessConfigError(f"parameter '{key}' must be \"true\" or \"false\", got {value!r}")
            return value == "true"

        return cls(max_pos_seq_len=max_pos_seq_len, vocab_size=vocab_size,
                   end_id=default_end_id if end_id is None else end_id, pad_id=integer("pad_id", False),
                   outputs=tuple(outputs), streaming=flag("streaming"), omit_defaults=flag("omit_defaults"))

    def check_tokenizer(self, tokenizer_vocab_size: int) -> None:
        """Every id the tokenizer produces must exist in the model (preprocessing and a text core, at load)."""
        if self.vocab_size < tokenizer_vocab_size:
            raise PreprocessConfigError(f"vocab_size {self.vocab_size} is smaller than the tokenizer's "
                                        f"{tokenizer_vocab_size} tokens")

    @cached_property
    def kept_scalar_defaults(self) -> tuple[str, ...]:
        """The scalar FT outputs sent with their defaults where a request leaves them out (not `omitted`)."""
        return tuple(name for name in self.outputs if name in _SCALAR_BY_OUTPUT and name not in self.omitted)

    @cached_property
    def omitted(self) -> frozenset[str]:
        """The outputs left out of a request that does not set them (`omit_defaults`): where the core's default for
        a missing input is this model's default too. `stream` is always sent: without it the core answers as to FT's
        own clients; so is what a non-streaming repository's postprocessing reads from here."""
        if not self.omit_defaults:
            return frozenset()
        same = {spec.output for spec in SCALAR_INPUTS if spec.output and spec.output != contract.STREAM
                and contract.CORE[spec.output].default is not None
                and contract.CORE[spec.output].default == spec.default(self)}
        kept = set(REQUIRED_OUTPUTS) | (set() if self.streaming else set(contract.POSTPROCESSING_FROM_PREPROCESSING))
        return frozenset(same | set(WORD_LIST_INPUTS.values())) - kept


# ---------------------------------------------------------------------------------------------------------------------
# Scalar inputs: one value per row, validated by the contract's rule, defaulted, mapped to an FT output.

@dataclass(frozen=True)
class ScalarInput:
    name: str  # ensemble input (aliases resolved)
    output: str  # FT output it becomes ("" for inputs used here only)
    check: contract.Check

    def default(self, config: PreprocessConfig) -> float:
        if self.name in ("end_id", "pad_id"):
            return config.end_id if self.name == "end_id" else config.default_pad_id
        value = contract.ENSEMBLE[self.name].fallback
        return 0 if value is None else value

    def problem(self, value: float, config: PreprocessConfig) -> str | None:
        if self.name == "beam_width" and value > config.max_beam_width:
            return f"must be in [1, {config.max_beam_width}]"
        if self.name == contract.STREAM:  # a streaming torch core honours both; FT's decoupled mode always streams
            if config.streaming and contract.STREAM not in config.outputs:
                return None if value else "must be true: this repository's engine streams every request"
            return contract.stream_rule(config.streaming)(value, config.vocab_size)
        return self.check(value, config.vocab_size)


SCALAR_INPUTS: tuple[ScalarInput, ...] = tuple(
    ScalarInput(i.name, i.core or "", i.rule or contract.stream_rule(True))
    for i in contract.ENSEMBLE_INPUTS
    if i.tensor.dims == (1,) and i.tensor.data_type != "STRING" and i.name != MAX_TOKENS and not i.alias_of)


# FT output -> the scalar input that fills it, and -> the word list input (what `_ft_tensors` looks up per output).
_SCALAR_BY_OUTPUT = {**{spec.output: spec for spec in SCALAR_INPUTS if spec.output in FT_OUTPUT_DTYPES},
                     **{spec.name: spec for spec in SCALAR_INPUTS if spec.name in contract.STREAMING_CORE_INPUTS}}
_WORD_LIST_BY_OUTPUT = {output: name for name, output in WORD_LIST_INPUTS.items()}


@lru_cache(maxsize=64)
def _default_tensors(config: PreprocessConfig, batch: int) -> dict[str, np.ndarray]:
    """The FT tensor of every input a request leaves out, for `batch` rows; built once and shared (read-only).

    Most requests set two or three inputs; building the other ~17 tensors per request cost more than the tokenizer
    on a 2-core host (each NumPy call touches cold code between requests)."""
    tensors = {spec.output: np.full((batch, 1), spec.default(config), dtype=FT_OUTPUT_DTYPES[spec.output])
               for spec in SCALAR_INPUTS if spec.output in FT_OUTPUT_DTYPES}  # [B, 1] each
    for spec in SCALAR_INPUTS:
        if spec.name in contract.STREAMING_CORE_INPUTS:  # a streaming torch core's; same names
            tensors[spec.name] = np.full((batch, 1), spec.default(config), dtype=np.bool_)
    for output in WORD_LIST_INPUTS.values():
        tensors[output] = encode_word_lists([[] for _ in range(batch)])  # [B, 2, 1]: no words
    for tensor in tensors.values():
        tensor.flags.writeable = False
    return tensors


@dataclass
class _ParsedRequest:
    prompts: list[str]
    max_tokens: np.ndarray  # [B] int64
    scalars: dict[str, np.ndarray]  # ensemble input name -> [B] values, for the inputs given (_default_tensors: others)
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
        return bytes(value).decode("utf-8")  # type: ignore[call-overload]  # numpy hands over bytes objects
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
    assert prompt_values is not None  # present: checked above
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

    for alias, name in contract.ALIASES.items():  # the names other clients use (contract.py)
        if inputs.get(alias) is not None:
            if inputs.get(name) is not None:
                raise RequestError(alias, f"is another name for '{name}'; send one of them")
            inputs = {**inputs, name: inputs[alias]}
    scalars: dict[str, np.ndarray] = {}
    for spec in SCALAR_INPUTS:
        if inputs.get(spec.name) is None:  # most requests set two or three of ~20
            continue
        given = _per_row(inputs, spec.name, batch)
        assert given is not None
        for row, value in enumerate(given.tolist()):
            problem = spec.problem(value, config)
            if problem:
                raise RequestError(spec.name, f"{problem}{_row_label(row, batch)}")
        scalars[spec.name] = given
    if "beam_width" in scalars:  # left out: 1 for every row
        problem = contract.same_beam_width(scalars["beam_width"].astype(np.int64).tolist())
        if problem:
            raise RequestError("beam_width", problem)
    for row, (min_tokens, limit) in enumerate(zip(scalars.get(contract.MIN_TOKENS, ()), max_tokens.tolist())):
        if min_tokens > limit:
            raise RequestError(contract.MIN_TOKENS, f"must be <= max_tokens{_row_label(row, batch)}")

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


def _check_encoded(parsed: _ParsedRequest, prompt_ids: list[list[int]], word_ids: dict[str, list[list[list[int]]]],
                   config: PreprocessConfig) -> None:
    """The limits only the token ids can tell: prompt + max_tokens in the position table, word lists' tokens."""
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


def _given_outputs(parsed: _ParsedRequest, config: PreprocessConfig) -> dict[str, np.ndarray]:
    """FT output -> its [B] values in FT's dtype, for the scalar inputs the request sets (of `config.outputs`)."""
    batch = len(parsed.prompts)
    scalars = dict(parsed.scalars)
    sampling = SCALAR_INPUTS[:3]  # top_k, top_p, temperature: the contract's order
    if sampling[2].name in scalars:  # only a given temperature can be 0, which greedy_for_ft rewrites
        defaults = _default_tensors(config, batch)
        top_k, top_p, temperature = (scalars[spec.name] if spec.name in scalars
                                     else defaults[spec.output].reshape(batch) for spec in sampling)
        scalars[sampling[0].name], scalars[sampling[1].name], scalars[sampling[2].name] = contract.greedy_for_ft(
            top_k, top_p, temperature)
    return {name: scalars[spec.name].astype(FT_OUTPUT_DTYPES[name]) for name, spec in _SCALAR_BY_OUTPUT.items()
            if spec.name in scalars and name in config.outputs}


def _ft_tensors(parsed: _ParsedRequest, prompt_ids: list[list[int]], word_ids: dict[str, list[list[list[int]]]],
                config: PreprocessConfig) -> dict[str, np.ndarray]:
    _check_encoded(parsed, prompt_ids, word_ids, config)
    batch = len(parsed.prompts)
    given = _given_outputs(parsed, config)
    defaults = _default_tensors(config, batch)
    pad_ids = (parsed.scalars["pad_id"].astype(np.int64) if "pad_id" in parsed.scalars
               else np.full(batch, config.default_pad_id))
    width = max(len(ids) for ids in prompt_ids)
    input_ids = np.empty((batch, width), dtype=np.uint32)  # [B, longest prompt], right-padded per row
    for row, ids in enumerate(prompt_ids):
        input_ids[row, :len(ids)] = _id_array(ids)
        input_ids[row, len(ids):] = pad_ids[row]

    tensors: dict[str, np.ndarray] = {
        "input_ids": input_ids,
        "input_lengths": np.array([[len(ids)] for ids in prompt_ids], dtype=np.uint32),
        "request_output_len": parsed.max_tokens.reshape(batch, 1).astype(np.uint32),
    }
    for name in config.outputs:  # the rest, in the config's order; a default is left out where config.omitted says
        if name in tensors:
            continue
        if name in given:
            tensors[name] = given[name].reshape(batch, 1)
        elif name in _WORD_LIST_BY_OUTPUT and _WORD_LIST_BY_OUTPUT[name] in word_ids:
            tensors[name] = encode_word_lists(word_ids[_WORD_LIST_BY_OUTPUT[name]])
        elif name not in config.omitted:
            tensors[name] = defaults[name]
    return {name: tensors[name] for name in config.outputs if name in tensors}


def _id_array(ids: list[int]) -> np.ndarray:
    """Token ids as a uint32 array, via array.array: a third of the time numpy takes to convert the list itself (512
    ids: 3 vs 9 us)."""
    return np.frombuffer(array.array("I", ids), dtype=np.uint32)


def _core_request(parsed: _ParsedRequest, prompt_ids: list[list[int]], word_ids: dict[str, list[list[list[int]]]],
                  config: PreprocessConfig, limits: EngineLimits) -> ParsedRequest:
    """What `_ft_tensors` would hand the core, as core_io.parse_request would read it, with no tensors between: the
    same FT values (those the request sets, and the defaults `config.omitted` keeps) go to core_io.rows_from_values,
    which checks them against the engine as it does a token-id request's (here: against this model's limits)."""
    _check_encoded(parsed, prompt_ids, word_ids, config)
    batch = len(parsed.prompts)
    given = _given_outputs(parsed, config)
    defaults = _default_tensors(config, batch)
    values: dict[str, list] = {"request_output_len": parsed.max_tokens.tolist()}
    values.update((name, column.tolist()) for name, column in given.items())
    values.update((name, defaults[name].reshape(batch).tolist()) for name in config.kept_scalar_defaults
                  if name not in given)
    words: dict[str, list[tuple[tuple[int, ...], ...]]] = {}
    for output, name in _WORD_LIST_BY_OUTPUT.items():
        rows = word_ids.get(name) if output in config.outputs else None
        # as parse_word_list reads encode_word_lists' tensor: each row's words in order (none is empty: _parse_request
        # drops empty words before they are tokenized)
        words[output] = [()] * batch if rows is None else [tuple(map(tuple, row)) for row in rows]
    return rows_from_values([_id_array(ids) for ids in prompt_ids], values, words["stop_words_list"],
                            words["bad_words_list"], limits)


def preprocess_requests(requests: Sequence[Mapping[str, np.ndarray]], tokenizer: GptTokenizer,
                        config: PreprocessConfig) -> list[dict[str, np.ndarray] | RequestError]:
    """Each request's inputs (name -> array with the batch dim) -> its FT tensors (`config.outputs`) or its error."""
    return _preprocess(requests, tokenizer, config,
                       lambda request, ids, words: _ft_tensors(request, ids, words, config))


def core_requests(requests: Sequence[Mapping[str, np.ndarray]], tokenizer: GptTokenizer, config: PreprocessConfig,
                  limits: EngineLimits) -> list[ParsedRequest | RequestError]:
    """Each request's inputs -> the rows the core would parse from its FT tensors, or its error: a text core's way
    (text_core.py). Making the tensors and parsing them again took 0.25 ms of a cold stub's time on a 512-token
    request's way to its first token, these rows 0.18 (H200 host, docs/gpu/runs-2026-12-04)."""
    return _preprocess(requests, tokenizer, config,
                       lambda request, ids, words: _core_request(request, ids, words, config, limits))


Result = TypeVar("Result")


def _preprocess(requests: Sequence[Mapping[str, np.ndarray]], tokenizer: GptTokenizer, config: PreprocessConfig,
                build: Callable[[_ParsedRequest, list[list[int]], dict[str, list[list[list[int]]]]], Result]
                ) -> list[Result | RequestError]:
    """Parse each request's text inputs, tokenize all of them at once, then `build` each from its token ids."""
    parsed: list[_ParsedRequest | RequestError] = []
    for inputs in requests:
        try:
            request = _parse_request(inputs, config)
            _check_prompt_bytes(request, tokenizer.max_token_bytes, config)
            parsed.append(request)
        except RequestError as err:
            parsed.append(detached(err))

    # One batched encode for every prompt and word variant of the call; `spans` finds each request's slice.
    texts: list[str] = []
    spans: list[tuple[int, int]] = []
    for parsed_request in parsed:
        start = len(texts)
        if isinstance(parsed_request, _ParsedRequest):
            texts.extend(parsed_request.prompts)
            for rows in parsed_request.words.values():
                for variants in rows:
                    texts.extend(variants)
        spans.append((start, len(texts)))
    encoded = tokenizer.encode_batch(texts)

    results: list[Result | RequestError] = []
    for item, (start, _) in zip(parsed, spans):
        if isinstance(item, RequestError):
            results.append(item)
            continue
        request = item
        cursor = start + len(request.prompts)
        prompt_ids = encoded[start:cursor]
        word_ids: dict[str, list[list[list[int]]]] = {}
        for name, rows in request.words.items():
            word_ids[name] = []
            for variants in rows:
                word_ids[name].append(distinct_words(encoded[cursor:cursor + len(variants)]))
                cursor += len(variants)
        try:
            results.append(build(request, prompt_ids, word_ids))
        except RequestError as err:
            results.append(detached(err))
    return results
