"""The typed description of one render: CLI values validated once, then used as the Jinja2 context.

Tensor tables live here too, so the ensemble wiring, the step configs and `validate` are derived from one place:
a tensor the chosen engine does not honour is never rendered (and so never silently ignored).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .runtime.model_config import GptModelConfig

Engine = Literal["fastertransformer", "torch"]
ENGINES: tuple[Engine, ...] = ("fastertransformer", "torch")
DATA_TYPES = ("fp16", "bf16", "fp32")
DEVICES = ("gpu", "cpu")
# Model names become folder names and config strings: refuse anything that could escape the output folder or
# break a config file.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

# The FT backend's optional GPT inputs that the text ensemble can drive (docs/ft_contract.md §1).
FT_CAPABILITIES = frozenset({
    "runtime_top_k", "runtime_top_p", "temperature", "repetition_penalty", "len_penalty", "beam_width",
    "random_seed", "end_id", "is_return_log_probs", "stop_words_list", "bad_words_list",
})

# NeMo GPT-3 1.3B (docs/ft_contract.md §4): the limits used when no checkpoint is given at render time.
NEMO_1P3B = GptModelConfig(head_num=16, size_per_head=128, inter_size=8192, num_layer=24, vocab_size=50304,
                           max_pos_seq_len=2048, weight_data_type="fp16", model_name="gpt3_1.3b")


def _config_safe(text: str) -> bool:
    """Safe inside a double-quoted config.pbtxt string as is: nothing that ends or escapes it."""
    return not any(c in '"\\' or ord(c) < 32 or ord(c) == 127 for c in text)


class RenderError(ValueError):
    """A render option that cannot work; the message names the option and the limit."""


@dataclass(frozen=True)
class Tensor:
    name: str
    data_type: str  # Triton TYPE_* suffix: STRING, INT32, UINT32, UINT64, FP32, BOOL
    dims: tuple[int, ...]
    optional: bool = False
    ragged: bool = False  # allow_ragged_batch: requests of different lengths still batch together

    @property
    def dims_text(self) -> str:
        return "[ " + ", ".join(str(d) for d in self.dims) + " ]"


@dataclass(frozen=True)
class EnsembleInput:
    """An optional text-ensemble input and the FT core input it drives (None: used by pre/postprocessing only)."""
    tensor: Tensor
    core_input: str | None


def _scalar(name: str, data_type: str, optional: bool = True) -> Tensor:
    return Tensor(name, data_type, (1,), optional)


# Public contract of the text ensemble (README.md, "The text ensemble's contract"), in the order of the configs.
ENSEMBLE_OPTIONAL_INPUTS: tuple[EnsembleInput, ...] = (
    EnsembleInput(Tensor("stop_words", "STRING", (-1,), True), "stop_words_list"),
    EnsembleInput(Tensor("bad_words", "STRING", (-1,), True), "bad_words_list"),
    EnsembleInput(_scalar("top_k", "INT32"), "runtime_top_k"),
    EnsembleInput(_scalar("top_p", "FP32"), "runtime_top_p"),
    EnsembleInput(_scalar("temperature", "FP32"), "temperature"),
    EnsembleInput(_scalar("repetition_penalty", "FP32"), "repetition_penalty"),
    EnsembleInput(_scalar("presence_penalty", "FP32"), "presence_penalty"),
    EnsembleInput(_scalar("min_tokens", "INT32"), "min_length"),
    EnsembleInput(_scalar("len_penalty", "FP32"), "len_penalty"),
    EnsembleInput(_scalar("beam_width", "INT32"), "beam_width"),
    EnsembleInput(_scalar("random_seed", "UINT64"), "random_seed"),
    EnsembleInput(_scalar("end_id", "INT32"), "end_id"),
    EnsembleInput(_scalar("pad_id", "INT32"), None),
    EnsembleInput(_scalar("return_log_probs", "BOOL"), "is_return_log_probs"),
)

# FT core-model inputs produced by preprocessing (FT names and dtypes).
CORE_INPUTS: dict[str, Tensor] = {t.name: t for t in (
    Tensor("input_ids", "UINT32", (-1,), ragged=True),
    _scalar("input_lengths", "UINT32", optional=False),
    _scalar("request_output_len", "UINT32", optional=False),
    _scalar("runtime_top_k", "UINT32"),
    _scalar("runtime_top_p", "FP32"),
    _scalar("temperature", "FP32"),
    _scalar("repetition_penalty", "FP32"),
    _scalar("presence_penalty", "FP32"),
    _scalar("min_length", "UINT32"),
    _scalar("len_penalty", "FP32"),
    _scalar("beam_width", "UINT32"),
    _scalar("random_seed", "UINT64"),
    _scalar("end_id", "UINT32"),
    _scalar("is_return_log_probs", "BOOL"),
    Tensor("stop_words_list", "INT32", (2, -1), True, ragged=True),
    Tensor("bad_words_list", "INT32", (2, -1), True, ragged=True),
)}
STREAM_INPUT = _scalar("stream", "BOOL")

CORE_OUTPUTS: tuple[Tensor, ...] = (
    Tensor("output_ids", "UINT32", (-1, -1)),
    Tensor("sequence_length", "UINT32", (-1,)),
    Tensor("response_input_lengths", "INT32", (-1,)),
    Tensor("cum_log_probs", "FP32", (-1,)),
    Tensor("output_log_probs", "FP32", (-1, -1)),
)
LOG_PROB_OUTPUTS = ("cum_log_probs", "output_log_probs")
# Not in FT's contract: a decoupled torch core says where in output_ids each response's new tokens start, so the
# stateless postprocessing also handles a single final response (`stream` false) and rows that advance unevenly.
# Without it (FT engine) postprocessing assumes one new token per response, as FT's decoupled mode sends.
DELTA_START = Tensor("delta_start", "INT32", (-1,), optional=True)
# Also torch-only (runtime/core_io.py): why a row ended (FINISH_CODES; 0 while running), so streaming postprocessing
# can send finish_reason; and (port, key) that postprocessing acknowledges, so the core notices an abandoned stream
# (runtime/stream_ack.py: Triton gives a step inside an ensemble no cancellation signal).
FINISH_CODE = Tensor("finish_code", "INT32", (-1,), optional=True)
STREAM_ACK = Tensor("stream_ack", "INT64", (2,), optional=True)

POSTPROCESSING_OUTPUTS: tuple[Tensor, ...] = (
    Tensor("text_output", "STRING", (-1,)),
    Tensor("finish_reason", "STRING", (-1,)),
    Tensor("num_input_tokens", "INT32", (1,)),
    Tensor("num_output_tokens", "INT32", (-1,)),
)
EXCLUDE_INPUT = _scalar("exclude_input_in_output", "BOOL")
# Tensors postprocessing reads from preprocessing (non-streaming only: Triton refuses a step that mixes tensors of a
# decoupled model with tensors of another origin).
POSTPROCESSING_FROM_PREPROCESSING = ("request_output_len", "end_id", "stop_words_list")


@dataclass(frozen=True)
class RenderConfig:
    tp: int = 1
    pp: int = 1
    engine: Engine = "fastertransformer"
    checkpoint: Path | None = None  # an FT weight folder (`<saved-dir>/<N>-gpu`)
    tokenizer: Path | None = None  # a folder with vocab.json + merges.txt, or a .nemo
    model_name: str = "gpt3_1.3b"
    ensemble_name: str = "ensemble"
    max_batch_size: int = 256
    data_type: str = "fp16"
    device: str = "gpu"
    streaming: bool = False
    instances: int = 1
    output: Path = Path("model_repository")
    force: bool = False
    max_queue_delay_us: int = 1000
    kv_slots: int = 0  # torch engine: KV-cache slots (0: as many as fit, up to 256, on a GPU; see core_adapter.py)
    preprocessing_instances: int = 2
    postprocessing_instances: int = 2
    int8_mode: int = 0
    enable_custom_all_reduce: bool = False
    ft_checkpoint_path: str | None = None  # where FT finds the weights inside its container (default: in the repo)
    model: GptModelConfig = field(default=NEMO_1P3B)  # limits: from the checkpoint's config.ini when given

    def __post_init__(self) -> None:
        def check(ok: bool, message: str) -> None:
            if not ok:
                raise RenderError(message)

        check(self.engine in ENGINES, f"--engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        check(self.tp >= 1, f"--tp must be >= 1, got {self.tp}")
        check(self.pp >= 1, f"--pp must be >= 1, got {self.pp}")
        check(self.model.head_num % self.tp == 0,
              f"--tp {self.tp} must divide the model's head_num {self.model.head_num} ({self.model_source})")
        check(self.pp == 1 or self.engine == "fastertransformer",
              f"--pp {self.pp}: the torch engine runs one pipeline stage (use --pp 1)")
        check(self.model.num_layer % self.pp == 0,
              f"--pp {self.pp} must divide the model's num_layer {self.model.num_layer} ({self.model_source})")
        check(1 <= self.max_batch_size <= 4096, f"--max-batch-size must be in 1..4096, got {self.max_batch_size}")
        check(self.data_type in DATA_TYPES, f"--data-type must be one of {', '.join(DATA_TYPES)}, "
                                            f"got {self.data_type!r}")
        check(self.device in DEVICES, f"--device must be gpu or cpu, got {self.device!r}")
        check(self.device == "gpu" or self.engine == "torch",
              "--device cpu needs --engine torch (the FasterTransformer backend runs on GPUs only)")
        check(1 <= self.instances <= 64, f"--instances must be in 1..64, got {self.instances}")
        check(0 <= self.kv_slots <= 65536, f"--kv-slots must be in 0..65536 (0 = automatic), got {self.kv_slots}")
        check(self.max_queue_delay_us >= 0, f"max queue delay must be >= 0 us, got {self.max_queue_delay_us}")
        check(self.int8_mode in (0, 1), f"--int8-mode must be 0 or 1, got {self.int8_mode}")
        for option, name in (("--model-name", self.model_name), ("--ensemble-name", self.ensemble_name)):
            check(bool(NAME_PATTERN.match(name)) and name not in (".", ".."),
                  f"{option} {name!r} must be 1-64 letters, digits, '_', '-' or '.', starting with a letter or digit")
        reserved = {"preprocessing", "postprocessing"}
        check(len({self.model_name, self.ensemble_name} | reserved) == 4,
              f"--model-name and --ensemble-name must differ from each other and from {sorted(reserved)}")
        if self.ft_checkpoint_path is not None:
            check(self.ft_checkpoint_path.startswith("/") and _config_safe(self.ft_checkpoint_path),
                  "--ft-checkpoint-path must be an absolute path without quotes, backslashes or control characters")
        # The FT engine writes the weights' absolute path into its config: it must not be able to break the file.
        check(_config_safe(str(self.output.resolve())),
              f"--output {str(self.output)!r} must not contain quotes, backslashes or control characters")

    @property
    def model_source(self) -> str:
        """Where the model limits come from, for error messages."""
        if self.checkpoint is not None:
            return f"from {self.checkpoint / 'config.ini'}"
        if self.model == NEMO_1P3B:
            return "NeMo GPT-3 1.3B's, assumed without --checkpoint"
        return f"model {self.model.model_name!r}"

    # ---- derived values, used by the templates -------------------------------------------------------------------

    @property
    def capabilities(self) -> frozenset[str]:
        if self.engine == "fastertransformer":
            return FT_CAPABILITIES
        from .runtime.core_io import CAPABILITIES  # noqa: PLC0415  (declared by the engine itself)
        return CAPABILITIES

    @property
    def weights_folder(self) -> str:
        """FT's default_model_filename: the weight folder inside the core model's version folder."""
        return f"{self.tp}-gpu"

    @property
    def ensemble_optional_inputs(self) -> list[EnsembleInput]:
        return [i for i in ENSEMBLE_OPTIONAL_INPUTS if i.core_input is None or i.core_input in self.capabilities]

    @property
    def core_inputs(self) -> list[Tensor]:
        return [t for t in CORE_INPUTS.values() if not t.optional or t.name in self.capabilities]

    @property
    def core_stream_input(self) -> bool:
        """The `stream` input exists where the core model is decoupled and can also answer with one response."""
        return self.streaming and "stream" in self.capabilities

    @property
    def preprocessing_outputs(self) -> list[Tensor]:
        """Every core input, plus the tensors postprocessing needs even where the core does not take them."""
        extra = [] if self.streaming else [CORE_INPUTS[n] for n in POSTPROCESSING_FROM_PREPROCESSING]
        names = [t.name for t in self.core_inputs]
        return self.core_inputs + [t for t in extra if t.name not in names]

    @property
    def core_outputs(self) -> list[Tensor]:
        keep_log_probs = "is_return_log_probs" in self.capabilities
        outputs = [t for t in CORE_OUTPUTS if keep_log_probs or t.name not in LOG_PROB_OUTPUTS]
        return outputs + [DELTA_START, FINISH_CODE, STREAM_ACK] if self.core_stream_input else outputs

    @property
    def log_prob_outputs(self) -> list[Tensor]:
        return [t for t in self.core_outputs if t.name in LOG_PROB_OUTPUTS]

    @property
    def postprocessing_inputs(self) -> list[Tensor]:
        from_core = [t for t in self.core_outputs if t.name not in LOG_PROB_OUTPUTS]
        if self.streaming:
            return from_core
        return from_core + [CORE_INPUTS[n] for n in POSTPROCESSING_FROM_PREPROCESSING] + [EXCLUDE_INPUT]

    @property
    def ensemble_inputs(self) -> list[Tensor]:
        inputs = [Tensor("text_input", "STRING", (1,)), Tensor("max_tokens", "INT32", (1,))]
        inputs += [i.tensor for i in self.ensemble_optional_inputs]
        if not self.streaming:
            inputs.append(EXCLUDE_INPUT)
        if self.core_stream_input:
            inputs.append(STREAM_INPUT)
        return inputs

    @property
    def ensemble_outputs(self) -> list[Tensor]:
        return list(POSTPROCESSING_OUTPUTS) + self.log_prob_outputs

    @property
    def core_instance_kind(self) -> str:
        # The FT backend places its instances on GPUs itself and requires KIND_CPU (docs/ft_contract.md §1).
        if self.engine == "fastertransformer" or self.device == "cpu":
            return "KIND_CPU"
        return "KIND_GPU"

    @property
    def stream_tensor(self) -> Tensor:
        return STREAM_INPUT

    @property
    def preprocessing_inputs(self) -> list[Tensor]:
        return [t for t in self.ensemble_inputs if t.name not in (EXCLUDE_INPUT.name, STREAM_INPUT.name)]

    @property
    def postprocessing_outputs(self) -> list[Tensor]:
        return list(POSTPROCESSING_OUTPUTS)

    # ---- the FasterTransformer backend's own tensor list (docs/ft_contract.md §1) ----

    @property
    def ft_inputs(self) -> list[Tensor]:
        return list(FT_INPUTS)

    @property
    def ft_outputs(self) -> list[Tensor]:
        return list(FT_OUTPUTS)

    @property
    def ft_weights_path(self) -> str:
        return self.ft_checkpoint_path or str(self.output.resolve() / self.model_name / "1" / self.weights_folder)

    # ---- ensemble wiring: (model tensor, ensemble tensor) pairs; internal tensors start with "_" ----

    @property
    def preprocessing_input_map(self) -> list[tuple[str, str]]:
        return [(t.name, t.name) for t in self.preprocessing_inputs]

    @property
    def preprocessing_output_map(self) -> list[tuple[str, str]]:
        return [(t.name, f"_{t.name}") for t in self.preprocessing_outputs]

    @property
    def core_input_map(self) -> list[tuple[str, str]]:
        pairs = [(t.name, f"_{t.name}") for t in self.core_inputs]
        if self.core_stream_input:
            pairs.append((STREAM_INPUT.name, STREAM_INPUT.name))
        return pairs

    @property
    def core_output_map(self) -> list[tuple[str, str]]:
        # Log-probs go straight to the ensemble's outputs; the rest feeds postprocessing.
        return [(t.name, t.name if t.name in LOG_PROB_OUTPUTS else f"_{t.name}") for t in self.core_outputs]

    @property
    def postprocessing_input_map(self) -> list[tuple[str, str]]:
        return [(t.name, t.name if t is EXCLUDE_INPUT else f"_{t.name}") for t in self.postprocessing_inputs]

    @property
    def postprocessing_output_map(self) -> list[tuple[str, str]]:
        return [(t.name, t.name) for t in POSTPROCESSING_OUTPUTS]


def _ft_scalar(name: str, data_type: str) -> Tensor:
    return Tensor(name, data_type, (1,), optional=True)


FT_INPUTS: tuple[Tensor, ...] = (
    Tensor("input_ids", "UINT32", (-1,), ragged=True),
    Tensor("input_lengths", "UINT32", (1,)),
    Tensor("request_output_len", "UINT32", (-1,)),
    _ft_scalar("runtime_top_k", "UINT32"),
    _ft_scalar("runtime_top_p", "FP32"),
    _ft_scalar("beam_search_diversity_rate", "FP32"),
    _ft_scalar("temperature", "FP32"),
    _ft_scalar("len_penalty", "FP32"),
    _ft_scalar("repetition_penalty", "FP32"),
    _ft_scalar("random_seed", "UINT64"),
    _ft_scalar("is_return_log_probs", "BOOL"),
    _ft_scalar("is_return_context_embeddings", "BOOL"),
    _ft_scalar("beam_width", "UINT32"),
    _ft_scalar("start_id", "UINT32"),
    _ft_scalar("end_id", "UINT32"),
    Tensor("stop_words_list", "INT32", (2, -1), optional=True),
    Tensor("bad_words_list", "INT32", (2, -1), optional=True),
    _ft_scalar("prompt_learning_task_name_ids", "UINT32"),
    Tensor("request_prompt_embedding", "FP16", (-1, -1), optional=True),
    _ft_scalar("request_prompt_lengths", "UINT32"),
    _ft_scalar("request_prompt_type", "UINT32"),
    _ft_scalar("top_p_decay", "FP32"),
    _ft_scalar("top_p_min", "FP32"),
    _ft_scalar("top_p_reset_ids", "UINT32"),
)
FT_OUTPUTS: tuple[Tensor, ...] = CORE_OUTPUTS + (Tensor("context_embeddings", "FP32", (-1, -1)),)
