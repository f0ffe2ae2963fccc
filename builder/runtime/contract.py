"""The tensor contract, declared once: every text-ensemble input and every core (FasterTransformer GPT) input.

Everything else derives from these tables: the rendered configs (builder/render_config.py), `validate`, the
preprocessing model's request parsing (preprocess.py), the torch core's request parsing (core_io.py) and the client
(client/request.py). Each validation rule lives on its input here, so preprocessing and the core apply the same one.

Compatibility with the clients users run (docs/client_compat.md): the ensemble also takes the names TRT-LLM's
ensemble, genai-perf and Triton's OpenAI frontend send. `seed`, `min_length` and `length_penalty` are aliases;
`num_return_sequences` is accepted as 1; `stream` and `exclude_input_in_output` exist in every repository, and a value
a repository cannot honour is refused by name (`Ensemble.stream` etc. below say which).

This module imports numpy only, so the client and the Triton-free runtime modules can use it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

FT, TORCH = "fastertransformer", "torch"
ENGINES = (FT, TORCH)
MAX_BEAM_WIDTH = 8  # FT's beam-search kernels stop at 8 beams; so does the torch engine
UINT64_MAX = (1 << 64) - 1
NUMPY_TYPES: dict[str, type[np.generic]] = {
    "STRING": np.object_, "BOOL": np.bool_, "INT32": np.int32, "INT64": np.int64, "UINT32": np.uint32,
    "UINT64": np.uint64, "FP16": np.float16, "FP32": np.float32,
}


def model_parameters(model_config: Mapping[str, Any]) -> dict[str, str]:
    """A model config's `parameters` (the JSON form a Python model's `initialize` gets), name -> string value: the
    rendered settings each runtime module reads (preprocess.py, postprocess.py, text_core.py)."""
    return {key: value.get("string_value", "") for key, value in model_config.get("parameters", {}).items()}


class RequestError(ValueError):
    """A request is invalid; `input_name` is the offending input, the message states the limit. The one request
    error of the serving path (preprocessing, the torch core, postprocessing).

    Messages never echo a numeric input's value: any input can be read from a shared-memory region, and a client
    that registered someone else's memory as one could otherwise read it back through our errors, four bytes per
    refused `top_k`. The client knows what it sent; the field and the limit are what it needs. Text-derived numbers
    (a prompt's bytes or tokens) stay: a request that passes returns its text anyway (exclude_input_in_output).
    """

    def __init__(self, input_name: str, message: str):
        super().__init__(f"invalid input '{input_name}': {message}")
        self.input_name = input_name
        self.message = message


ErrorT = TypeVar("ErrorT", bound=BaseException)


def detached(err: ErrorT) -> ErrorT:
    """`err` without its traceback or chained exceptions, fit to be kept as a result.

    A kept traceback pins the frames that hold the request's arrays in a reference cycle (the result list holds the
    error, the error holds the frame that holds the list); until a full garbage collection every refused 16 MB prompt
    then stays in the stub's heap and shared memory (+48 MB each).
    """
    err.__traceback__ = err.__cause__ = err.__context__ = None
    return err


# ---- rules, each written once ------------------------------------------------------------------------------------

Check = Callable[[float, int], "str | None"]  # (value, vocab_size) -> the broken rule, or None when the value is fine


def _any(value: float, vocab_size: int) -> str | None:
    return None


def _finite(value: float, vocab_size: int) -> str | None:
    return None if math.isfinite(value) else "must be finite"


def _closed(low: float, high: float) -> Check:
    return lambda v, _: None if low <= v <= high else f"must be in [{low:g}, {high:g}]"


def _zero_or(name: str) -> Check:
    return lambda v, _: None if v == 0 else f"must be 0: {name} is not supported"


def _top_k(value: float, vocab_size: int) -> str | None:
    return None if 0 <= value <= vocab_size else f"must be in [0, {vocab_size}]"


def _token_id(value: float, vocab_size: int) -> str | None:
    return None if 0 <= value < vocab_size else f"must be a token id in [0, {vocab_size})"


def _temperature(value: float, vocab_size: int) -> str | None:
    return None if math.isfinite(value) and value >= 0 else "must be >= 0 (0 = greedy) and finite"


def _positive(value: float, vocab_size: int) -> str | None:
    return None if math.isfinite(value) and value > 0 else "must be > 0 and finite (1 = off)"


def _non_negative(value: float, vocab_size: int) -> str | None:
    return None if value >= 0 else "must be >= 0"


def _uint64(value: float, vocab_size: int) -> str | None:
    return None if 0 <= value <= UINT64_MAX else "must be a uint64"


def is_greedy(top_k: int, top_p: float, temperature: float) -> bool:
    """FT: top_k 1, or top_k 0 with top_p 0, selects the argmax; so does temperature 0 (what OpenAI-style clients
    send; FT would divide by T + 1e-6)."""
    return top_k == 1 or (top_k == 0 and top_p == 0.0) or temperature == 0.0


def greedy_for_ft(top_k: np.ndarray, top_p: np.ndarray, temperature: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-row ensemble values with temperature 0 said FT's way: top_k 1, top_p 0, temperature 1 (k=1 picks the
    argmax whatever top_p says; FT would divide by T + 1e-6)."""
    greedy = temperature.astype(np.float64) == 0.0
    return np.where(greedy, 1, top_k), np.where(greedy, 0.0, top_p), np.where(greedy, 1.0, temperature)


def same_beam_width(widths: list[int]) -> str | None:
    """One beam width per request: output_ids is [B, beam, T]."""
    return None if len(set(widths)) <= 1 else "must be the same for all rows of a request"


# ---- the tables --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Tensor:
    name: str
    data_type: str  # Triton TYPE_* suffix: STRING, INT32, UINT32, UINT64, FP32, BOOL
    dims: tuple[int, ...] = (1,)
    optional: bool = False
    ragged: bool = False  # allow_ragged_batch: requests of different lengths still batch together

    @property
    def dims_text(self) -> str:
        return "[ " + ", ".join(str(d) for d in self.dims) + " ]"

    @property
    def numpy_type(self) -> type[np.generic]:
        return NUMPY_TYPES[self.data_type]


PYTHON_TYPES: dict[str, type] = {"BOOL": bool, "FP32": float, "FP16": float}  # CoreInput.value's; other types: int


@dataclass(frozen=True)
class CoreInput:
    """An FT GPT core input: its tensor, the engines that honour it, its rule and default (None: no rule here)."""
    tensor: Tensor
    engines: tuple[str, ...] = ENGINES
    check: Check | None = None
    default: float | None = None  # None: the engine's end id (end_id, start_id) or no default needed
    ft_dims: tuple[int, ...] | None = None  # where FT's own config declares other dims
    field: str | None = None  # the torch engine's GenerationRequest field it sets (core_io.py)

    def value(self, raw: Any) -> bool | int | float:
        """A request's value (a numpy or Python number) as the engine's Python type."""
        return PYTHON_TYPES.get(self.tensor.data_type, int)(raw)

    @property
    def name(self) -> str:
        return self.tensor.name


def _core(name: str, data_type: str, engines: tuple[str, ...] = ENGINES, check: Check | None = None,
          default: float | None = None, field: str | None = None) -> CoreInput:
    return CoreInput(Tensor(name, data_type, optional=True), engines, check, default, field=field)


# Every FT GPT input (fastertransformer_backend's all_models/gpt config; docs/ft_contract.md §1), plus the torch
# engine's own: presence/frequency penalty and min_length (FT's GPT model has presence_penalty and min_length in later
# versions; the torch engine implements them), and in streaming repositories `stream` / `exclude_input_in_output`.
CORE_INPUTS: tuple[CoreInput, ...] = (
    CoreInput(Tensor("input_ids", "UINT32", (-1,), ragged=True)),
    CoreInput(Tensor("input_lengths", "UINT32")),
    CoreInput(Tensor("request_output_len", "UINT32"), ft_dims=(-1,)),
    _core("runtime_top_k", "UINT32", check=_top_k, default=0, field="top_k"),
    _core("runtime_top_p", "FP32", check=_closed(0, 1), default=0.0, field="top_p"),
    # The torch engine has no diverse beam search: it takes FT's neutral value, 0, and refuses the others by name.
    _core("beam_search_diversity_rate", "FP32", check=_zero_or("diverse beam search"), default=0.0),
    _core("temperature", "FP32", check=_temperature, default=1.0, field="temperature"),
    _core("len_penalty", "FP32", check=_finite, default=0.0, field="len_penalty"),
    _core("repetition_penalty", "FP32", check=_positive, default=1.0, field="repetition_penalty"),
    _core("presence_penalty", "FP32", (TORCH,), _finite, 0.0, "presence_penalty"),
    _core("frequency_penalty", "FP32", (TORCH,), _finite, 0.0, "frequency_penalty"),
    _core("min_length", "UINT32", (TORCH,), _non_negative, 0, "min_length"),
    _core("random_seed", "UINT64", check=_uint64, default=0, field="random_seed"),
    _core("is_return_log_probs", "BOOL", check=_any, default=0, field="return_log_probs"),
    _core("is_return_context_embeddings", "BOOL", (FT,)),
    _core("beam_width", "UINT32", check=_closed(1, MAX_BEAM_WIDTH), default=1),
    # GPT starts from the prompt, so start_id changes nothing; the torch core accepts it (FT's samples send it).
    _core("start_id", "UINT32", check=_token_id),
    _core("end_id", "UINT32", check=_token_id, field="end_id"),
    CoreInput(Tensor("stop_words_list", "INT32", (2, -1), optional=True)),
    CoreInput(Tensor("bad_words_list", "INT32", (2, -1), optional=True)),
    _core("prompt_learning_task_name_ids", "UINT32", (FT,)),
    CoreInput(Tensor("request_prompt_embedding", "FP16", (-1, -1), optional=True), (FT,)),
    _core("request_prompt_lengths", "UINT32", (FT,)),
    _core("request_prompt_type", "UINT32", (FT,)),
    _core("top_p_decay", "FP32", (FT,)),
    _core("top_p_min", "FP32", (FT,)),
    _core("top_p_reset_ids", "UINT32", (FT,)),
    # Torch core in a streaming repository only (render_config adds them there): one final response when false.
    _core("stream", "BOOL", (TORCH,), _any, 0),
    _core("exclude_input_in_output", "BOOL", (TORCH,), _any, 1),
    _core("return_num_output_tokens", "BOOL", (TORCH,), _any, 0),
)
CORE: dict[str, CoreInput] = {i.name: i for i in CORE_INPUTS}
REQUIRED_CORE_INPUTS = tuple(i.name for i in CORE_INPUTS if not i.tensor.optional)
STREAMING_CORE_INPUTS = ("stream", "exclude_input_in_output", "return_num_output_tokens")  # decoupled torch core


def core_inputs(engine: str) -> list[CoreInput]:
    return [i for i in CORE_INPUTS if engine in i.engines]


@dataclass(frozen=True)
class EnsembleInput:
    """A text-ensemble input. `core`: the core input it becomes (None: preprocessing/postprocessing use it);
    `alias_of`: another ensemble input this name stands for (clients' names); `engines`: where it is declared."""
    tensor: Tensor
    core: str | None = None
    check: Check | None = None  # None: the core input's rule (or a rule of preprocessing, for the text inputs)
    default: float | None = None
    alias_of: str | None = None
    client_option: bool = True  # our client offers it (the token-count requests are answered anyway)

    @property
    def name(self) -> str:
        return self.tensor.name

    @property
    def engines(self) -> tuple[str, ...]:
        return CORE[self.core].engines if self.core else ENGINES

    @property
    def rule(self) -> Check | None:
        return self.check or (CORE[self.core].check if self.core else None)

    @property
    def fallback(self) -> float | None:
        return self.default if self.default is not None or not self.core else CORE[self.core].default


def _in(name: str, data_type: str, core: str | None = None, check: Check | None = None,
        default: float | None = None, alias_of: str | None = None) -> EnsembleInput:
    return EnsembleInput(Tensor(name, data_type, optional=True), core, check, default, alias_of)


TEXT_INPUT, MAX_TOKENS, STREAM, EXCLUDE_INPUT = "text_input", "max_tokens", "stream", "exclude_input_in_output"
MIN_TOKENS = "min_tokens"  # checked against max_tokens per row, once both are known (preprocess.py)
WORD_LIST_INPUTS = {"stop_words": "stop_words_list", "bad_words": "bad_words_list"}  # ensemble input -> core input

# The text ensemble's public contract (README.md, "The text ensemble's contract"), in the order of the configs.
ENSEMBLE_INPUTS: tuple[EnsembleInput, ...] = (
    EnsembleInput(Tensor(TEXT_INPUT, "STRING")),
    EnsembleInput(Tensor(MAX_TOKENS, "INT32"), "request_output_len"),
    EnsembleInput(Tensor("stop_words", "STRING", (-1,), optional=True), "stop_words_list"),
    EnsembleInput(Tensor("bad_words", "STRING", (-1,), optional=True), "bad_words_list"),
    _in("top_k", "INT32", "runtime_top_k"),
    _in("top_p", "FP32", "runtime_top_p"),
    _in("temperature", "FP32", "temperature"),
    _in("repetition_penalty", "FP32", "repetition_penalty"),
    _in("presence_penalty", "FP32", "presence_penalty"),
    _in("frequency_penalty", "FP32", "frequency_penalty"),
    # min_tokens <= max_tokens is checked per row once both are known (preprocess.py).
    _in(MIN_TOKENS, "INT32", "min_length"),
    _in("min_length", "INT32", "min_length", alias_of=MIN_TOKENS),  # TRT-LLM's name (genai-perf sends it)
    _in("len_penalty", "FP32", "len_penalty"),
    _in("length_penalty", "FP32", "len_penalty", alias_of="len_penalty"),  # TRT-LLM's name
    _in("beam_width", "INT32", "beam_width"),
    _in("random_seed", "UINT64", "random_seed"),
    _in("seed", "UINT64", "random_seed", alias_of="random_seed"),  # Triton's OpenAI frontend (v2.59+)
    _in("end_id", "INT32", "end_id"),
    _in("pad_id", "INT32", check=_token_id),  # pads input_ids; default end_id
    _in("return_log_probs", "BOOL", "is_return_log_probs"),
    # One sequence per prompt (TRT-LLM's clients send 1); more would need the beams as separate sequences.
    _in("num_return_sequences", "INT32", check=lambda v, _: None if v == 1 else "must be 1: one sequence per prompt "
                                                                                  "(use beam_width for more beams)",
        default=1),
    # Triton's OpenAI frontend (v2.64+) asks for the token counts; they are always returned.
    EnsembleInput(Tensor("return_num_input_tokens", "BOOL", optional=True), check=_any, default=1,
                  client_option=False),
    # Asked for (OpenAI frontend v2.64+, TRT-LLM's later ensemble), a streamed response counts only its own tokens,
    # which is what that frontend sums; otherwise the counts are cumulative (our client, the benchmarks).
    EnsembleInput(Tensor("return_num_output_tokens", "BOOL", optional=True), check=_any, default=0,
                  client_option=False),
    # Where each is honoured: stream_rule below; exclude_input_in_output: postprocessing or the streaming core.
    _in(EXCLUDE_INPUT, "BOOL", default=1),
    _in(STREAM, "BOOL", default=0),
)
ENSEMBLE: dict[str, EnsembleInput] = {i.name: i for i in ENSEMBLE_INPUTS}
ALIASES = {i.name: i.alias_of for i in ENSEMBLE_INPUTS if i.alias_of}  # client name -> our name


def ensemble_inputs(engine: str) -> list[EnsembleInput]:
    """The inputs a repository of this engine declares: a tensor the engine does not honour is never rendered (and so
    never silently ignored: Triton refuses it by name)."""
    return [i for i in ENSEMBLE_INPUTS if engine in i.engines]


def stream_rule(streaming: bool) -> Check:
    """`stream`: a streaming repository honours both values; the others answer once, so they refuse true."""
    if streaming:
        return _any
    return lambda v, _: None if not v else "must be false: this repository does not stream (render it with --streaming)"


# ---- core outputs (FT's, plus the torch core's streaming extras; core_io.py describes their layout) ----------------

CORE_OUTPUTS: tuple[Tensor, ...] = (
    Tensor("output_ids", "UINT32", (-1, -1)),
    Tensor("sequence_length", "UINT32", (-1,)),
    Tensor("response_input_lengths", "INT32", (-1,)),
    Tensor("cum_log_probs", "FP32", (-1,)),
    Tensor("output_log_probs", "FP32", (-1, -1)),
)
LOG_PROB_OUTPUTS = ("cum_log_probs", "output_log_probs")
FT_EXTRA_OUTPUTS = (Tensor("context_embeddings", "FP32", (-1, -1)),)
# Not in FT's contract: a decoupled torch core says where in output_ids each response's text starts, so the
# stateless postprocessing also handles a single final response (`stream` false) and rows that advance unevenly;
# why a row ended (finish_code); how many tokens at the end are a stop word to trim (stop_length: set only on a
# response that is not streamed, whose text can still drop it); how many generated tokens earlier responses counted
# (counted: 0 unless return_num_output_tokens asks for per-response counts); and (port, key) that postprocessing
# acknowledges
# (stream_ack.py: Triton gives a step inside an ensemble no cancellation signal).
STREAM_OUTPUTS: tuple[Tensor, ...] = (
    Tensor("delta_start", "INT32", (-1,), optional=True),
    Tensor("finish_code", "INT32", (-1,), optional=True),
    Tensor("stop_length", "INT32", (-1,), optional=True),
    Tensor("counted", "INT32", (-1,), optional=True),
    Tensor("stream_ack", "INT64", (2,), optional=True),
)

# Tensors postprocessing reads from preprocessing (non-streaming only: Triton refuses a step that mixes tensors of a
# decoupled model with tensors of another origin).
POSTPROCESSING_FROM_PREPROCESSING = ("request_output_len", "end_id", "stop_words_list")
RETURN_NUM_OUTPUT_TOKENS = "return_num_output_tokens"

# ---- the text outputs -----------------------------------------------------------------------------------------

# text_output is [B x beams] flat, row-major: TRT-LLM's ensemble layout, which its clients and Triton's OpenAI
# frontend read as `as_numpy("text_output")[0].decode()` (docs/client_compat.md). The others are [B, beams] / [B, 1].
ENSEMBLE_OUTPUTS: tuple[Tensor, ...] = (
    Tensor("text_output", "STRING", (-1,)),
    Tensor("finish_reason", "STRING", (-1,)),
    Tensor("num_input_tokens", "INT32", (1,)),
    Tensor("num_output_tokens", "INT32", (-1,)),
)
