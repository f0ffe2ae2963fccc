"""The typed description of one render: CLI values validated once, then used as the Jinja2 context.

The tensor lists come from the one contract (runtime/contract.py); here they are only chosen and wired per engine and
streaming mode: a tensor the chosen engine does not honour is never rendered (and so never silently ignored).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from .runtime import contract
from .runtime.contract import EnsembleInput, Tensor
from .runtime.model_config import KV_CACHE_DTYPES, WEIGHT_QUANTIZATIONS, GptModelConfig

Engine = Literal["fastertransformer", "torch"]
ENGINES: tuple[Engine, ...] = ("fastertransformer", "torch")
assert ENGINES == contract.ENGINES  # the contract names the engines each input works with
DATA_TYPES = ("fp16", "bf16", "fp32")
DEVICES = ("gpu", "cpu")
# Model names become folder names and config strings: refuse anything that could escape the output folder or
# break a config file.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

# NeMo GPT-3 1.3B (docs/ft_contract.md §4): the limits used when no checkpoint is given at render time.
NEMO_1P3B = GptModelConfig(head_num=16, size_per_head=128, inter_size=8192, num_layer=24, vocab_size=50304,
                           max_pos_seq_len=2048, weight_data_type="fp16", model_name="gpt3_1.3b")


def _config_safe(text: str) -> bool:
    """Safe inside a double-quoted config.pbtxt string as is: nothing that ends or escapes it."""
    return not any(c in '"\\' or ord(c) < 32 or ord(c) == 127 for c in text)


class RenderError(ValueError):
    """A render option that cannot work; the message names the option and the limit."""


POSTPROCESSING_FROM_PREPROCESSING = contract.POSTPROCESSING_FROM_PREPROCESSING
# The ensemble input that bypasses preprocessing: to postprocessing (non-streaming repositories).
PASSED_ON = (contract.EXCLUDE_INPUT,)
FT_CAPABILITIES = frozenset(i.name for i in contract.core_inputs(contract.FT) if i.tensor.optional)


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
    step_prompt_tokens: int = 0  # torch engine, --streaming: prompt tokens prefilled per step (0: scheduler.py's)
    kv_cache_dtype: str = "auto"  # torch engine: KV-cache dtype (model_config.KV_CACHE_DTYPES; "auto": --data-type)
    weight_quantization: str = "none"  # torch engine: model_config.WEIGHT_QUANTIZATIONS (quantize.py)
    # torch engine, --streaming: the engine in a child process (engine_process.py); None: wherever it applies
    engine_process: bool | None = None
    # torch engine: the core model tokenizes and detokenizes itself, served as --ensemble-name (text_core.py)
    text_in_core: bool = False
    gpus: tuple[int, ...] = ()  # torch engine, --tp > 1 on GPUs: the GPU of each rank (default 0..tp-1)
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
        torch_tp = self.engine == "torch" and self.tp > 1
        check(not torch_tp or self.instances == 1,
              f"--instances {self.instances}: with --tp {self.tp} the torch engine runs one instance (rank 0) that "
              f"starts the other {self.tp - 1} rank(s); use --instances 1")
        check(not self.gpus or (torch_tp and self.device == "gpu"),
              "--gpus places the ranks of the torch engine's --tp > 1 on GPUs (--device gpu)")
        check(not self.gpus or (len(self.gpus) == self.tp and len(set(self.gpus)) == self.tp
                                and all(0 <= g < 1024 for g in self.gpus)),
              f"--gpus must list {self.tp} distinct GPU ids (one per rank of --tp {self.tp}), got "
              f"{','.join(map(str, self.gpus))}")
        check(0 <= self.kv_slots <= 65536, f"--kv-slots must be in 0..65536 (0 = automatic), got {self.kv_slots}")
        check(0 <= self.step_prompt_tokens <= 65536,
              f"--step-prompt-tokens must be in 0..65536 (0 = the engine's default), got {self.step_prompt_tokens}")
        check(self.kv_cache_dtype in KV_CACHE_DTYPES,
              f"--kv-cache-dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {self.kv_cache_dtype!r}")
        check(self.kv_cache_dtype == "auto" or self.engine == "torch",
              f"--kv-cache-dtype {self.kv_cache_dtype} needs --engine torch (the FasterTransformer backend keeps "
              f"its cache in --data-type)")
        check(self.weight_quantization in WEIGHT_QUANTIZATIONS,
              f"--weight-quantization must be one of {', '.join(WEIGHT_QUANTIZATIONS)}, got "
              f"{self.weight_quantization!r}")
        check(self.weight_quantization == "none" or self.engine == "torch",
              f"--weight-quantization {self.weight_quantization} needs --engine torch (the FasterTransformer "
              f"backend's own int8 is --int8-mode)")
        check(self.weight_quantization == "none" or self.tp == 1,
              f"--weight-quantization {self.weight_quantization} needs --tp 1 (each rank would quantize its own shard "
              f"with its own scales: not supported yet)")
        check(self.engine_process is not True or self.engine_process_applies,
              "--engine-process needs --engine torch --streaming --tp 1 (the in-flight scheduler's loop moves to a "
              "process of its own)")
        check(not self.text_in_core or self.engine == "torch",
              "--text-in-core needs --engine torch (the FasterTransformer backend takes token ids only)")
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
    def engine_process_applies(self) -> bool:
        """The engine can run in a process of its own: torch, --streaming (the in-flight loop), one rank."""
        return self.engine == "torch" and self.streaming and self.tp == 1

    @property
    def omit_default_tensors(self) -> bool:
        """Preprocessing leaves out the core inputs a request does not set (preprocess.PreprocessConfig.omit_defaults):
        a torch repository, whose pinned Triton lets an ensemble step's optional inputs go missing (the FT
        backend's containers predate that)."""
        return self.engine == "torch"

    @property
    def engine_in_own_process(self) -> bool:
        return self.engine_process_applies if self.engine_process is None else self.engine_process

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
        """The optional core inputs the engine honours (the torch core's streaming inputs only when it streams)."""
        names = {i.name for i in contract.core_inputs(self.engine) if i.tensor.optional}
        return frozenset(names if self.streaming else names - set(contract.STREAMING_CORE_INPUTS))

    @property
    def weights_folder(self) -> str:
        """FT's default_model_filename: the weight folder inside the core model's version folder."""
        return f"{self.tp}-gpu"

    @property
    def ensemble_optional_inputs(self) -> list[EnsembleInput]:
        return [i for i in contract.ensemble_inputs(self.engine) if i.tensor.optional and i.name not in PASSED_ON]

    @property
    def core_inputs(self) -> list[Tensor]:
        """What the core step of the ensemble feeds (preprocessing's outputs, plus `stream` etc. when streaming)."""
        fed = {i.core for i in contract.ENSEMBLE_INPUTS if i.core} | set(contract.REQUIRED_CORE_INPUTS)
        fed |= set(contract.STREAMING_CORE_INPUTS) if self.core_stream_input else set()
        return [i.tensor for i in contract.core_inputs(self.engine) if i.name in fed and
                (i.name in self.capabilities or not i.tensor.optional)]

    @property
    def core_model_inputs(self) -> list[Tensor]:
        """What the core model's config declares: every input its engine honours (FT: its whole contract)."""
        if self.engine == contract.FT:
            return [i.tensor for i in contract.core_inputs(contract.FT)]
        return [i.tensor for i in contract.core_inputs(self.engine)
                if not i.tensor.optional or i.name in self.capabilities]

    @property
    def core_name(self) -> str:
        """The core model's name and folder: --ensemble-name when it takes text itself (--text-in-core)."""
        return self.ensemble_name if self.text_in_core else self.model_name

    @property
    def core_config_inputs(self) -> list[Tensor]:
        """The core model config's inputs: the ensemble's (text) with --text-in-core, else its FT tensors."""
        return self.ensemble_inputs if self.text_in_core else self.core_model_inputs

    @property
    def core_config_outputs(self) -> list[Tensor]:
        return self.ensemble_outputs if self.text_in_core else self.core_outputs

    @property
    def core_stream_input(self) -> bool:
        """`stream` goes to the core where it is decoupled and can also answer with one response (torch)."""
        return self.streaming and contract.STREAM in self.capabilities

    @property
    def preprocessing_outputs(self) -> list[Tensor]:
        """Every core input preprocessing produces, plus the tensors postprocessing needs even where the core does not
        take them."""
        produced = self.core_inputs  # `stream` too: preprocessing always sends it explicitly (core_io.py)
        extra = [] if self.streaming else [contract.CORE[n].tensor for n in POSTPROCESSING_FROM_PREPROCESSING]
        names = [t.name for t in produced]
        return produced + [t for t in extra if t.name not in names]

    @property
    def core_outputs(self) -> list[Tensor]:
        keep_log_probs = "is_return_log_probs" in self.capabilities
        outputs = [t for t in contract.CORE_OUTPUTS if keep_log_probs or t.name not in contract.LOG_PROB_OUTPUTS]
        return outputs + list(contract.STREAM_OUTPUTS) if self.core_stream_input else outputs

    @property
    def log_prob_outputs(self) -> list[Tensor]:
        return [t for t in self.core_outputs if t.name in contract.LOG_PROB_OUTPUTS]

    @property
    def postprocessing_inputs(self) -> list[Tensor]:
        from_core = [t for t in self.core_outputs if t.name not in contract.LOG_PROB_OUTPUTS]
        if self.streaming:
            return from_core
        return (from_core + [contract.CORE[n].tensor for n in POSTPROCESSING_FROM_PREPROCESSING]
                + [contract.ENSEMBLE[contract.EXCLUDE_INPUT].tensor])

    @property
    def ensemble_inputs(self) -> list[Tensor]:
        """Every repository declares `stream` and `exclude_input_in_output` (clients always send them); where they
        go depends on streaming (`passed_on`)."""
        return [i.tensor for i in contract.ensemble_inputs(self.engine)]

    @property
    def ensemble_outputs(self) -> list[Tensor]:
        return list(contract.ENSEMBLE_OUTPUTS) + self.log_prob_outputs

    @property
    def tp_devices(self) -> str:
        """Torch engine on GPUs with --tp > 1: the GPU ids of ranks 0..tp-1, comma-separated; else empty."""
        if self.engine != "torch" or self.tp == 1 or self.device != "gpu":
            return ""
        return ",".join(map(str, self.gpus or range(self.tp)))

    @property
    def core_instance_gpus(self) -> list[int]:
        """Torch engine, --tp > 1 on GPUs: the instance (rank 0) on the first rank's GPU; it starts the others."""
        return [int(self.tp_devices.split(",")[0])] if self.tp_devices else []

    @property
    def core_instance_kind(self) -> str:
        # The FT backend places its instances on GPUs itself and requires KIND_CPU (docs/ft_contract.md §1).
        if self.engine == "fastertransformer" or self.device == "cpu":
            return "KIND_CPU"
        return "KIND_GPU"

    @property
    def preprocessing_inputs(self) -> list[Tensor]:
        """Every ensemble input but `exclude_input_in_output` of a non-streaming repository (postprocessing's). It
        checks `stream` where it cannot be honoured, and hands both to a streaming torch core."""
        passed = set() if self.streaming else set(PASSED_ON)
        return [t for t in self.ensemble_inputs if t.name not in passed]

    @property
    def postprocessing_outputs(self) -> list[Tensor]:
        return list(contract.ENSEMBLE_OUTPUTS)

    # ---- the FasterTransformer backend's own tensor list (docs/ft_contract.md §1) ----

    @property
    def ft_inputs(self) -> list[Tensor]:
        return [replace(i.tensor, dims=i.ft_dims) if i.ft_dims else i.tensor for i in contract.core_inputs(contract.FT)]

    @property
    def ft_outputs(self) -> list[Tensor]:
        return list(contract.CORE_OUTPUTS + contract.FT_EXTRA_OUTPUTS)

    @property
    def ft_weights_path(self) -> str:
        return self.ft_checkpoint_path or str(self.output.resolve() / self.core_name / "1" / self.weights_folder)

    # ---- ensemble wiring: (model tensor, ensemble tensor) pairs; internal tensors start with "_" ----

    @property
    def preprocessing_input_map(self) -> list[tuple[str, str]]:
        return [(t.name, t.name) for t in self.preprocessing_inputs]

    @property
    def preprocessing_output_map(self) -> list[tuple[str, str]]:
        return [(t.name, f"_{t.name}") for t in self.preprocessing_outputs]

    @property
    def core_input_map(self) -> list[tuple[str, str]]:
        return [(t.name, f"_{t.name}") for t in self.core_inputs]

    @property
    def core_output_map(self) -> list[tuple[str, str]]:
        # Log-probs go straight to the ensemble's outputs; the rest feeds postprocessing.
        return [(t.name, t.name if t.name in contract.LOG_PROB_OUTPUTS else f"_{t.name}") for t in self.core_outputs]

    @property
    def postprocessing_input_map(self) -> list[tuple[str, str]]:
        return [(t.name, t.name if t.name in PASSED_ON else f"_{t.name}") for t in self.postprocessing_inputs]

    @property
    def postprocessing_output_map(self) -> list[tuple[str, str]]:
        return [(t.name, t.name) for t in contract.ENSEMBLE_OUTPUTS]
