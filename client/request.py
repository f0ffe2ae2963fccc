"""What travels over the wire: request tensors (or the generate-endpoint JSON body) and parsed results.

Shared by the sync and asyncio clients and by both protocols. The tensor names and dtypes are the text ensemble's
public contract (README.md, "The text ensemble's contract"): every input has the batch dimension first.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

import numpy as np

from builder.runtime import contract

from .errors import RequestError

# Optional scalar inputs: keyword name == tensor name -> Triton datatype, from the one contract. `stream` is the
# transport's business (TextRequest.stream); aliases are keyword aliases here.
SCALAR_INPUTS: dict[str, str] = {
    i.name: i.tensor.data_type for i in contract.ENSEMBLE_INPUTS
    if i.tensor.optional and i.tensor.dims == (1,) and not i.alias_of and i.name != contract.STREAM and i.client_option}
WORD_LIST_INPUTS = tuple(contract.WORD_LIST_INPUTS)
KEYWORD_ALIASES = {**contract.ALIASES, "stop": "stop_words"}
_NUMPY_DTYPES = {"INT32": np.int32, "UINT64": np.uint64, "FP32": np.float32, "BOOL": np.bool_}
_INT_LIMITS = {"INT32": (-(2**31), 2**31 - 1), "UINT64": (0, 2**64 - 1)}


def _check_value(name: str, datatype: str, value: object) -> None:
    """The value fits the tensor's datatype; ranges that are model policy (top_p <= 1, ...) are the server's call."""
    if datatype == "BOOL":
        if not isinstance(value, (bool, np.bool_)):
            raise TypeError(f"{name} must be a bool, got {value!r}")
        return
    if datatype in _INT_LIMITS:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"{name} must be an integer, got {value!r}")
        low, high = _INT_LIMITS[datatype]
        if not low <= int(value) <= high:
            raise ValueError(f"{name} must be in [{low}, {high}] ({datatype}), got {value}")
        return
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if not np.isfinite(float(value)):
        raise ValueError(f"{name} must be finite, got {value}")


@dataclass(frozen=True)
class SamplingParams:
    """Optional generation inputs. None / empty = not sent, so the model's default applies."""

    top_k: int | None = None
    top_p: float | None = None
    temperature: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    min_tokens: int | None = None
    len_penalty: float | None = None
    beam_width: int | None = None
    random_seed: int | None = None
    end_id: int | None = None
    pad_id: int | None = None
    return_log_probs: bool | None = None
    num_return_sequences: int | None = None
    exclude_input_in_output: bool | None = None
    stop_words: tuple[str, ...] = ()
    bad_words: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name, datatype in SCALAR_INPUTS.items():
            value = getattr(self, name)
            if value is not None:
                _check_value(name, datatype, value)
        for name in WORD_LIST_INPUTS:
            words = getattr(self, name)
            if isinstance(words, str) or not all(isinstance(word, str) for word in words):
                raise TypeError(f"{name} must be a sequence of strings, got {words!r}")
            object.__setattr__(self, name, tuple(words))

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> SamplingParams:
        """Keyword arguments of `generate()`; `stop` and the contract's aliases (`seed`, `min_length`,
        `length_penalty`) are accepted too."""
        known = {f.name for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, value in kwargs.items():
            name = KEYWORD_ALIASES.get(key, key)
            if name not in known:
                raise TypeError(f"unknown generation option {key!r}; known: {', '.join(sorted(known))}")
            if name in values:
                raise TypeError(f"generation option {name!r} given twice (once as an alias)")
            if name in WORD_LIST_INPUTS and isinstance(value, str):
                value = (value,)
            values[name] = value
        return cls(**values)

    def sent_scalars(self) -> dict[str, object]:
        return {name: getattr(self, name) for name in SCALAR_INPUTS if getattr(self, name) is not None}


@dataclass(frozen=True)
class ModelInfo:
    """What the client needs to know about the served model, read once from its config."""

    name: str
    inputs: frozenset[str]
    decoupled: bool
    max_batch_size: int

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ModelInfo:
        # gRPC's JSON wraps the config in {"config": ...}; HTTP returns it bare.
        config = config.get("config", config)
        policy = config.get("model_transaction_policy") or {}
        inputs = frozenset(str(item["name"]) for item in config.get("input", []))
        # Triton makes the ensemble of a streaming repository decoupled even where its own config does not say so;
        # the render marks it with the parameter `streaming` (every repository declares `stream` since issue 13;
        # before, only streaming ones did, and had no exclude_input_in_output). The streaming transports also serve
        # non-decoupled models, so erring this way is safe.
        parameters = config.get("parameters") or {}
        marked = str((parameters.get("streaming") or {}).get("string_value", "")).lower() == "true"
        legacy = "stream" in inputs and "exclude_input_in_output" not in inputs
        decoupled = bool(policy.get("decoupled", False)) or marked or legacy
        return cls(name=str(config.get("name", "")), inputs=inputs, decoupled=decoupled,
                   max_batch_size=int(config.get("max_batch_size", 0)))


@dataclass(frozen=True)
class InputTensor:
    name: str
    datatype: str
    data: np.ndarray  # [B, ...]


@dataclass(frozen=True)
class TextRequest:
    """One request of B prompts (B rows of the batch dimension)."""

    prompts: tuple[str, ...]
    max_tokens: int
    params: SamplingParams = field(default_factory=SamplingParams)
    stream: bool = False

    def __post_init__(self) -> None:
        if not self.prompts:
            raise ValueError("at least one prompt is needed")
        for index, prompt in enumerate(self.prompts):
            if not isinstance(prompt, str):
                raise TypeError(f"prompt {index} must be a str, got {type(prompt).__name__}")
        _check_value("max_tokens", "INT32", self.max_tokens)

    @property
    def batch_size(self) -> int:
        return len(self.prompts)

    def _named_values(self, model: ModelInfo) -> dict[str, object]:
        """Every input to send, checked against the model's declared inputs."""
        values: dict[str, object] = {"max_tokens": self.max_tokens, **self.params.sent_scalars()}
        for name in WORD_LIST_INPUTS:
            if getattr(self.params, name):
                values[name] = getattr(self.params, name)
        missing = sorted(name for name in values if name not in model.inputs)
        if missing:
            raise RequestError(f"model '{model.name}' has no input {', '.join(map(repr, missing))} (its engine does "
                               f"not support it); it accepts: {', '.join(sorted(model.inputs))}")
        # `stream` matters only in a streaming repository; elsewhere one response is all there is.
        if "stream" in model.inputs and model.decoupled:
            values["stream"] = self.stream
        return values

    def tensors(self, model: ModelInfo) -> list[InputTensor]:
        rows = self.batch_size
        prompts = np.array([[prompt.encode("utf-8")] for prompt in self.prompts], dtype=np.object_)  # [B, 1]
        tensors = [InputTensor("text_input", "BYTES", prompts)]
        for name, value in self._named_values(model).items():
            if name in WORD_LIST_INPUTS:
                words = [word.encode("utf-8") for word in value]  # type: ignore[attr-defined]  # word lists: str tuples
                tensors.append(InputTensor(name, "BYTES", np.array([words] * rows, dtype=np.object_)))  # [B, W]
            else:
                datatype = "INT32" if name == "max_tokens" else "BOOL" if name == "stream" else SCALAR_INPUTS[name]
                tensors.append(InputTensor(name, datatype, np.full((rows, 1), value, _NUMPY_DTYPES[datatype])))
        return tensors

    def generate_body(self, model: ModelInfo) -> dict[str, object]:
        """JSON body for /generate_stream. Triton maps a list given to a [1]-dims input onto the batch dimension."""
        values = self._named_values(model)
        if self.batch_size == 1:
            return {"text_input": self.prompts[0], **{k: list(v) if isinstance(v, tuple) else v
                                                      for k, v in values.items()}}
        if any(name in values for name in WORD_LIST_INPUTS):
            raise RequestError("stop_words/bad_words cannot be sent with several prompts in one HTTP generate "
                               "request (Triton cannot shape them); use gRPC or one prompt per request")
        return {"text_input": list(self.prompts), **{k: [v] * self.batch_size for k, v in values.items()}}


@dataclass(frozen=True)
class GenerationResult:
    """One prompt's answer. `text` is beam 0; with exclude_input_in_output=False it starts with the prompt."""

    prompt: str
    text: str
    finish_reason: str | None = None
    num_input_tokens: int | None = None
    num_output_tokens: int | None = None
    beams: tuple[str, ...] = ()
    cum_log_prob: float | None = None
    output_log_probs: tuple[float, ...] | None = None

    def merged(self, delta: GenerationResult) -> GenerationResult:
        """This (accumulated) result followed by a streamed delta: texts concatenate, counts and reasons update."""
        width = max(len(self.beams), len(delta.beams))
        beams = tuple((self.beams[i] if i < len(self.beams) else "") + (delta.beams[i] if i < len(delta.beams) else "")
                      for i in range(width))
        # Streamed responses carry cumulative token counts (the core model sends cumulative output_ids).
        return replace(self, text=self.text + delta.text, beams=beams,
                       finish_reason=delta.finish_reason or self.finish_reason,
                       num_input_tokens=_first_set(delta.num_input_tokens, self.num_input_tokens),
                       num_output_tokens=_first_set(delta.num_output_tokens, self.num_output_tokens),
                       cum_log_prob=_first_set(delta.cum_log_prob, self.cum_log_prob),
                       output_log_probs=_first_set(delta.output_log_probs, self.output_log_probs))


def _first_set(*values: Any) -> Any:
    return next((value for value in values if value is not None), None)


def _rows(value: object, batch: int) -> np.ndarray | None:
    """A tensor (or the generate endpoint's flattened JSON value) as [B, k]."""
    if value is None:
        return None
    array = np.asarray(value)
    if array.size == 0:
        return array.reshape(batch, 0)
    return array.reshape(batch, -1)


def _text(item: object) -> str:
    return item.decode("utf-8", errors="replace") if isinstance(item, bytes) else str(item)


def parse_results(prompts: Sequence[str], get: Callable[[str], object]) -> list[GenerationResult]:
    """Per-row results from a response; `get(name)` returns an output (array or JSON value) or None."""
    batch = len(prompts)
    texts = _rows(get("text_output"), batch)
    if texts is None:
        raise RequestError("the response has no text_output (is this the text ensemble?)")
    reasons = _rows(get("finish_reason"), batch)
    n_in = _rows(get("num_input_tokens"), batch)
    n_out = _rows(get("num_output_tokens"), batch)
    cum = _rows(get("cum_log_probs"), batch)
    per_token = _rows(get("output_log_probs"), batch)
    beams = max(texts.shape[1], 1)
    results = []
    for row, prompt in enumerate(prompts):
        row_texts = tuple(_text(item) for item in texts[row])
        reason = _text(reasons[row][0]) if reasons is not None and reasons.shape[1] else ""
        token_log_probs = None
        if per_token is not None:
            first_beam = per_token[row].reshape(beams, -1)[0]  # [beams * T] -> [beams, T]
            token_log_probs = tuple(float(x) for x in first_beam)
        results.append(GenerationResult(
            prompt=prompt,
            text=row_texts[0] if row_texts else "",
            finish_reason=reason or None,
            num_input_tokens=int(n_in[row][0]) if n_in is not None and n_in.shape[1] else None,
            num_output_tokens=int(n_out[row][0]) if n_out is not None and n_out.shape[1] else None,
            beams=row_texts,
            cum_log_prob=float(cum[row][0]) if cum is not None and cum.shape[1] else None,
            output_log_probs=token_log_probs,
        ))
    return results


def empty_results(prompts: Sequence[str]) -> list[GenerationResult]:
    """Starting point for accumulating a stream."""
    return [GenerationResult(prompt=prompt, text="") for prompt in prompts]
