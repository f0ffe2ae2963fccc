"""Typed GPT model configuration, read from (and written to) FasterTransformer's `config.ini`.

The `[gpt]` section of config.ini is the single description of a converted checkpoint: the converter writes it,
the weight reader and the PyTorch engine read it, and `validate` checks `.bin` sizes against it. Keys and defaults
follow FasterTransformer's `ParallelGptTritonModel`, except `layernorm_eps`, which we always write explicitly
(FT defaults to 1e-6, NeMo and GPT-2 train with 1e-5).
"""

from __future__ import annotations

import configparser
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path

SECTION = "gpt"
WEIGHT_DATA_TYPES = ("fp32", "fp16", "bf16")
# FT's activation names; "Gelu" is the tanh approximation (Megatron's fused bias-GeLU, HF's `gelu_new`).
ACTIVATIONS = ("Gelu", "Relu")
# The torch engine's KV-cache dtypes: "auto" is the model's dtype, "fp8" e4m3 (gpt.py maps them to torch dtypes).
KV_CACHE_DTYPES = ("auto", "fp8")
# The torch engine's weight quantizations: "none" keeps the weights in the model's dtype, "int8" the layers' four
# matrices as int8 with a scale per output row (quantize.py).
WEIGHT_QUANTIZATIONS = ("none", "int8")


class ModelConfigError(ValueError):
    """A config.ini that is missing a key or holds an impossible value."""


@dataclass(frozen=True)
class GptModelConfig:
    head_num: int
    size_per_head: int
    inter_size: int
    num_layer: int
    vocab_size: int  # padded vocabulary: rows of wte (e.g. 50304 for GPT-2's 50257 tokens)
    max_pos_seq_len: int
    start_id: int = 50256
    end_id: int = 50256
    tensor_para_size: int = 1
    weight_data_type: str = "fp32"
    layernorm_eps: float = 1e-5
    activation_type: str = "Gelu"
    model_name: str = "gpt"

    def __post_init__(self) -> None:
        for name in ("head_num", "size_per_head", "inter_size", "num_layer", "vocab_size", "max_pos_seq_len",
                     "tensor_para_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ModelConfigError(f"config.ini [{SECTION}] {name} must be a positive integer, got {value!r}")
        for name in ("start_id", "end_id"):
            value = getattr(self, name)
            if not 0 <= value < self.vocab_size:
                raise ModelConfigError(
                    f"config.ini [{SECTION}] {name}={value} is outside the vocabulary [0, {self.vocab_size})")
        if self.weight_data_type not in WEIGHT_DATA_TYPES:
            raise ModelConfigError(f"config.ini [{SECTION}] weight_data_type must be one of {WEIGHT_DATA_TYPES}, "
                                   f"got {self.weight_data_type!r}")
        if self.activation_type not in ACTIVATIONS:
            raise ModelConfigError(f"config.ini [{SECTION}] activation_type must be one of {ACTIVATIONS}, "
                                   f"got {self.activation_type!r}")
        if not 0 < self.layernorm_eps < 1:
            raise ModelConfigError(f"config.ini [{SECTION}] layernorm_eps must be in (0, 1), got {self.layernorm_eps}")
        if self.head_num % self.tensor_para_size or self.inter_size % self.tensor_para_size:
            raise ModelConfigError(f"config.ini [{SECTION}] tensor_para_size={self.tensor_para_size} must divide "
                                   f"head_num={self.head_num} and inter_size={self.inter_size}")

    @property
    def hidden_size(self) -> int:
        return self.head_num * self.size_per_head

    @property
    def num_parameters(self) -> int:
        h, f = self.hidden_size, self.inter_size
        per_layer = 4 * h + (3 * h * h + 3 * h) + (h * h + h) + (h * f + f) + (f * h + h)
        return self.num_layer * per_layer + (self.vocab_size + self.max_pos_seq_len) * h + 2 * h

    def kv_cache_bytes_per_token(self, dtype_bytes: int) -> int:
        """Bytes of K and V cached per token, all layers together."""
        return 2 * self.num_layer * self.hidden_size * dtype_bytes

    def with_tensor_para_size(self, tp: int) -> GptModelConfig:
        values = asdict(self)
        values["tensor_para_size"] = tp
        return GptModelConfig(**values)

    @classmethod
    def from_ini(cls, path: str | Path) -> GptModelConfig:
        path = Path(path)
        if not path.is_file():
            raise ModelConfigError(f"{path}: config.ini not found")
        parser = configparser.ConfigParser()
        parser.read(path)
        if SECTION not in parser:
            raise ModelConfigError(f"{path}: no [{SECTION}] section")
        section = parser[SECTION]
        values: dict[str, object] = {}
        for field in fields(cls):
            if field.name not in section:
                continue
            raw = section[field.name].strip()
            try:
                if field.type == "int":
                    values[field.name] = int(raw)
                elif field.type == "float":
                    values[field.name] = float(raw)
                else:
                    values[field.name] = raw
            except ValueError as err:
                raise ModelConfigError(f"{path}: [{SECTION}] {field.name}={raw!r} is not a valid {field.type}") from err
        missing = [f.name for f in fields(cls) if f.default is MISSING and f.name not in values]
        if missing:
            raise ModelConfigError(f"{path}: [{SECTION}] is missing {', '.join(missing)}")
        try:
            return cls(**values)  # type: ignore[arg-type]  # each value parsed to its field's type above
        except ModelConfigError as err:
            raise ModelConfigError(f"{path}: {err}") from err

    def to_ini(self, path: str | Path) -> None:
        parser = configparser.ConfigParser()
        parser[SECTION] = {name: str(value) for name, value in asdict(self).items()}
        with open(path, "w") as handle:
            parser.write(handle)
