"""Session fixtures for checkpoints (register with `pytest_plugins = ["fixtures_checkpoints"]`), and an independent
reference forward pass over the canonical FT weight dict.

- `tiny_nemo`: a random `tiny`-preset NeMo 1.x archive (fp16, seed 0).
- `tiny_ft_dir`: it, converted to FT weights (`<tmp>/1-gpu`, fp16 files, TP 1).
- `demo_nemo`: the counting demo archive (trained once per cache, ~1 minute; then instant).
- `demo_ft_dir`: it, converted to FT weights (fp16 files, TP 1).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import pytest
import torch

from builder.checkpoints import convert, demo_checkpoint, write_synthetic_checkpoint
from builder.runtime.model_config import GptModelConfig


@pytest.fixture(scope="session")
def tiny_nemo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_checkpoint("tiny", tmp_path_factory.mktemp("tiny_nemo") / "tiny.nemo", seed=0)


@pytest.fixture(scope="session")
def tiny_ft_dir(tiny_nemo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return convert(tiny_nemo, tmp_path_factory.mktemp("tiny_ft"), weight_data_type="fp16", progress=False)


@pytest.fixture(scope="session")
def hf_greedy_continuation(tiny_ft_dir: Path) -> Callable[[str, int], tuple[str, int]]:
    """(prompt, max_tokens) -> (text, tokens generated): HF transformers' greedy continuation on the tiny checkpoint's
    weights (stored fp16, computed in fp32), the oracle for text served through Triton; stops at (and drops) end_id."""
    from builder.checkpoints.hf import hf_model_from_canonical
    from builder.runtime.ft_weights import load_ft_weights
    from builder.runtime.tokenizer import GptTokenizer

    config, tensors = load_ft_weights(tiny_ft_dir, dtype=torch.float32)
    model = hf_model_from_canonical(config, tensors).eval()
    tokenizer = GptTokenizer.from_directory(tiny_ft_dir)

    def continuation(prompt: str, max_tokens: int) -> tuple[str, int]:
        ids = torch.tensor([tokenizer.encode(prompt)])
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=max_tokens, do_sample=False, pad_token_id=config.end_id,
                                 eos_token_id=config.end_id)
        generated = out[0, ids.shape[1]:].tolist()
        if config.end_id in generated:
            generated = generated[:generated.index(config.end_id)]
        return tokenizer.decode(generated), len(generated)

    return continuation


@pytest.fixture(scope="session")
def demo_nemo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return demo_checkpoint(tmp_path_factory.mktemp("demo_nemo") / "demo.nemo")


@pytest.fixture(scope="session")
def demo_ft_dir(demo_nemo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return convert(demo_nemo, tmp_path_factory.mktemp("demo_ft"), weight_data_type="fp16", progress=False)


def _layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.nn.functional.layer_norm(x, weight.shape, weight, bias, eps)


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def reference_logits(config: GptModelConfig, w: Mapping[str, torch.Tensor], ids: Sequence[int]) -> torch.Tensor:
    """[T, V] logits of one sequence, written from FT's weight semantics alone (no converter code): pre-LN GPT,
    qkv weight [in, (q|k|v), heads * d], linear weights [in, out], lm_head tied to wte unless present."""
    n, d = config.head_num, config.size_per_head
    t = len(ids)
    x = w["model.wte"][torch.tensor(ids)] + w["model.wpe"][:t]  # [T, H]
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    for i in range(config.num_layer):
        p = f"model.layers.{i}."
        h = _layer_norm(x, w[p + "input_layernorm.weight"], w[p + "input_layernorm.bias"], config.layernorm_eps)
        qkv = torch.einsum("th,hcj->tcj", h, w[p + "attention.query_key_value.weight"])
        qkv = qkv + w[p + "attention.query_key_value.bias"]  # [T, 3, H]
        q, k, v = (qkv[:, c].reshape(t, n, d).transpose(0, 1) for c in range(3))  # [n, T, d]
        scores = (q @ k.transpose(1, 2)) / math.sqrt(d)
        attention = scores.masked_fill(~causal, float("-inf")).softmax(dim=-1)
        context = (attention @ v).transpose(0, 1).reshape(t, n * d)
        x = x + context @ w[p + "attention.dense.weight"] + w[p + "attention.dense.bias"]
        h = _layer_norm(x, w[p + "post_attention_layernorm.weight"], w[p + "post_attention_layernorm.bias"],
                        config.layernorm_eps)
        inner = h @ w[p + "mlp.dense_h_to_4h.weight"] + w[p + "mlp.dense_h_to_4h.bias"]
        activated = _gelu_tanh(inner) if config.activation_type == "Gelu" else torch.relu(inner)
        x = x + activated @ w[p + "mlp.dense_4h_to_h.weight"] + w[p + "mlp.dense_4h_to_h.bias"]
    x = _layer_norm(x, w["model.final_layernorm.weight"], w["model.final_layernorm.bias"], config.layernorm_eps)
    return x @ w.get("model.lm_head.weight", w["model.wte"]).T


def reference_greedy(config: GptModelConfig, w: Mapping[str, torch.Tensor], prompt: Sequence[int],
                     new_tokens: int) -> list[int]:
    ids = list(prompt)
    for _ in range(new_tokens):
        ids.append(int(reference_logits(config, w, ids)[-1].argmax()))
    return ids[len(prompt):]
