"""Hugging Face GPT-2 directories (`config.json` + safetensors or `pytorch_model.bin`), read tensor by tensor.

HF GPT-2 uses Conv1D, whose weights are already [in, out], and its fused `c_attn` is plain [Q | K | V], so the
canonical layout is a reshape away. The same mapping, inverted, rebuilds an HF model from canonical tensors (used by
the demo checkpoint to check its own export).
"""

from __future__ import annotations

import functools
import json
import re
import warnings
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch

from builder.runtime.model_config import GptModelConfig, ModelConfigError

from .nemo import load_state_dict
from .source import END_OF_TEXT, PACKAGED_TOKENIZER, CheckpointError, TokenizerFiles

# HF's tanh-approximated GeLUs are what FT's "Gelu" computes; HF "gelu" is the exact erf GeLU, which FT lacks.
HF_ACTIVATIONS = {"gelu_new": "Gelu", "gelu_pytorch_tanh": "Gelu", "gelu_fast": "Gelu", "relu": "Relu"}
# HF config fields whose non-default values change the math in ways FT's GPT cannot follow.
UNSUPPORTED_FLAGS = {"scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
                     "add_cross_attention": False}

_LAYER_RENAMES = {
    "input_layernorm": "ln_1",
    "attention.query_key_value": "attn.c_attn",
    "attention.dense": "attn.c_proj",
    "post_attention_layernorm": "ln_2",
    "mlp.dense_h_to_4h": "mlp.c_fc",
    "mlp.dense_4h_to_h": "mlp.c_proj",
}


def _same(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def hf_key(stem: str) -> str:
    """Canonical FT stem -> HF GPT-2 parameter name (without the `transformer.` prefix)."""
    fixed = {"model.wte": "wte.weight", "model.wpe": "wpe.weight", "model.lm_head.weight": "lm_head.weight",
             "model.final_layernorm.weight": "ln_f.weight", "model.final_layernorm.bias": "ln_f.bias"}
    if stem in fixed:
        return fixed[stem]
    match = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", stem)
    if match is None or match.group(2) not in _LAYER_RENAMES:
        raise KeyError(f"no HF GPT-2 name for tensor {stem!r}")
    index, module, kind = match.groups()
    return f"h.{index}.{_LAYER_RENAMES[module]}.{kind}"


def hf_to_canonical(stem: str, tensor: torch.Tensor, hidden: int) -> torch.Tensor:
    if stem.endswith("query_key_value.weight"):
        return tensor.reshape(hidden, 3, hidden)  # [H, 3H] = [in, q|k|v] -> [H, 3, H]
    if stem.endswith("query_key_value.bias"):
        return tensor.reshape(3, hidden)
    return tensor


def canonical_to_hf(stem: str, tensor: torch.Tensor) -> torch.Tensor:
    if stem.endswith("query_key_value.weight"):
        return tensor.reshape(tensor.shape[0], -1)  # [H, 3, H] -> [H, 3H]
    if stem.endswith("query_key_value.bias"):
        return tensor.reshape(-1)
    return tensor


def hf_config_from_canonical(config: GptModelConfig) -> Any:
    """A `transformers.GPT2Config` with the shape and numerics of an FT config (tied embeddings)."""
    from transformers import GPT2Config

    return GPT2Config(vocab_size=config.vocab_size, n_positions=config.max_pos_seq_len, n_embd=config.hidden_size,
                      n_layer=config.num_layer, n_head=config.head_num, n_inner=config.inter_size,
                      activation_function="gelu_new" if config.activation_type == "Gelu" else "relu",
                      layer_norm_epsilon=config.layernorm_eps, bos_token_id=config.start_id,
                      eos_token_id=config.end_id, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                      tie_word_embeddings=True)


def hf_model_from_canonical(config: GptModelConfig, tensors: Mapping[str, torch.Tensor]) -> Any:
    """Rebuild a `GPT2LMHeadModel` (fp32, eval mode) from canonical tensors."""
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel(hf_config_from_canonical(config)).eval()
    state = {f"transformer.{hf_key(stem)}": canonical_to_hf(stem, t).float()
             for stem, t in tensors.items() if stem != "model.lm_head.weight"}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "lm_head.weight" and not k.endswith(".attn.bias")]
    if missing or unexpected:
        raise ValueError(f"canonical tensors do not fit GPT2LMHeadModel: missing {missing}, unexpected {unexpected}")
    return model


def _index_shards(index_path: Path, directory: Path) -> list[Path]:
    """The shard files an HF index (`weight_map`: tensor name -> file name) names, each required to be a file inside
    `directory`: the index is untrusted data, so `..`, absolute paths and links leading outside are refused."""
    try:
        weight_map = json.loads(index_path.read_text(encoding="utf-8")).get("weight_map")
    except (OSError, ValueError, AttributeError) as err:
        raise CheckpointError(f"{index_path}: unreadable index (expected JSON with a weight_map): {err}") from err
    if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index_path}: weight_map must be a non-empty mapping of tensor name -> shard file")
    root = directory.resolve()
    shards = []
    for name in sorted(set(weight_map.values())):
        shard = (directory / name).resolve()  # follows links: where the file really is
        if not shard.is_relative_to(root):
            raise CheckpointError(f"{index_path}: weight_map names {name!r}, which resolves to {shard}, outside "
                                  f"the checkpoint folder {root}; shard files must lie inside it (copy them in)")
        if not shard.is_file():
            raise CheckpointError(f"{index_path}: weight_map names {name!r}, which is not a file in {root}")
        shards.append(shard)
    return shards


def _weight_readers(directory: Path, stack: ExitStack) -> dict[str, Callable[[], torch.Tensor]]:
    """HF parameter name (prefix stripped) -> a function reading it, over safetensors or .bin, sharded or not."""
    from safetensors import safe_open

    def strip(key: str) -> str:
        return key[len("transformer."):] if key.startswith("transformer.") else key

    readers: dict[str, Callable[[], torch.Tensor]] = {}

    def add_safetensors(path: Path) -> None:
        handle = stack.enter_context(safe_open(str(path), framework="pt"))
        for key in handle.keys():
            readers[strip(key)] = functools.partial(handle.get_tensor, key)

    def add_bin(path: Path) -> None:
        state = load_state_dict(path)
        for key, tensor in state.items():
            readers[strip(key)] = functools.partial(_same, tensor)

    for index_name, add in (("model.safetensors.index.json", add_safetensors),
                            ("pytorch_model.bin.index.json", add_bin)):
        index_path = directory / index_name
        if index_path.is_file():
            for shard in _index_shards(index_path, directory):
                add(shard)
            return readers
    if (directory / "model.safetensors").is_file():
        add_safetensors(directory / "model.safetensors")
    elif (directory / "pytorch_model.bin").is_file():
        add_bin(directory / "pytorch_model.bin")
    else:
        raise CheckpointError(f"{directory}: no model.safetensors or pytorch_model.bin (sharded or not)")
    return readers


class HfGpt2Checkpoint:
    """An HF GPT-2 model directory (implements `CheckpointSource`); close it with `close()` or `with`."""

    def __init__(self, directory: Path) -> None:
        self._stack = ExitStack()
        try:
            self._open(directory)
        except BaseException:
            self._stack.close()
            raise

    def _open(self, directory: Path) -> None:
        config_path = directory / "config.json"
        try:
            cfg = json.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise CheckpointError(f"{config_path}: unreadable: {err}") from err
        if cfg.get("model_type") != "gpt2":
            raise CheckpointError(f"{config_path}: model_type={cfg.get('model_type')!r}; only 'gpt2' is supported")
        activation = cfg.get("activation_function", "gelu_new")
        if activation not in HF_ACTIVATIONS:
            raise CheckpointError(f"{config_path}: activation_function={activation!r} is not supported; "
                                  f"FasterTransformer GPT computes {sorted(HF_ACTIVATIONS)} only "
                                  f"(its Gelu is the tanh approximation)")
        for flag, required in UNSUPPORTED_FLAGS.items():
            if cfg.get(flag, required) != required:
                raise CheckpointError(f"{config_path}: {flag}={cfg[flag]!r} is not supported (needs {required!r})")
        self.tokenizer = self._tokenizer(directory)
        self._readers = _weight_readers(directory, self._stack)
        if "wte.weight" not in self._readers:
            raise CheckpointError(f"{directory}: no wte.weight among the weights; not a GPT-2 checkpoint")
        hidden, heads = int(cfg["n_embd"]), int(cfg["n_head"])
        if hidden % heads:
            raise CheckpointError(f"{config_path}: n_embd={hidden} is not a multiple of n_head={heads}")
        self.hidden = hidden
        self.has_lm_head = not cfg.get("tie_word_embeddings", True) and "lm_head.weight" in self._readers
        end_of_text = self.tokenizer.token_id(END_OF_TEXT)
        try:
            self.config = GptModelConfig(
                head_num=heads, size_per_head=hidden // heads, inter_size=int(cfg.get("n_inner") or 4 * hidden),
                num_layer=int(cfg["n_layer"]), vocab_size=int(self._readers["wte.weight"]().shape[0]),
                max_pos_seq_len=int(cfg["n_positions"]),
                start_id=int(cfg.get("bos_token_id", end_of_text)), end_id=int(cfg.get("eos_token_id", end_of_text)),
                layernorm_eps=float(cfg.get("layer_norm_epsilon", 1e-5)),
                activation_type=HF_ACTIVATIONS[activation], model_name=directory.resolve().name or "gpt2")
        except (KeyError, ModelConfigError) as err:
            raise CheckpointError(f"{config_path}: {err}") from err

    @staticmethod
    def _tokenizer(directory: Path) -> TokenizerFiles:
        vocab, merges = directory / "vocab.json", directory / "merges.txt"
        if vocab.is_file() and merges.is_file():
            return TokenizerFiles(vocab, merges)
        warnings.warn(f"{directory}: no vocab.json + merges.txt; writing the packaged GPT-2 tokenizer tables "
                      f"next to the weights", stacklevel=3)
        return PACKAGED_TOKENIZER

    def read(self, stem: str) -> torch.Tensor:
        key = hf_key(stem)
        if key not in self._readers:
            raise CheckpointError(f"HF checkpoint lacks tensor {key!r}")
        return hf_to_canonical(stem, self._readers[key](), self.hidden)

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> HfGpt2Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

