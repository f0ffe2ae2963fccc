"""Shared helpers for the engine tests: a tiny random HF GPT-2 (the oracle) and its FT weight folder."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import torch

if TYPE_CHECKING:  # imported where used: the GPU host's kit venv (numpy 1.26) cannot import the host's transformers
    from transformers import GPT2LMHeadModel

from builder import GPT2_TOKENIZER_DIR
from builder.checkpoints import convert
from builder.runtime.core_io import GenerationRequest
from builder.runtime.gpt import expected_shapes
from builder.runtime.model_config import GptModelConfig

TRITON = importlib.util.find_spec("triton") is not None
# Where the Triton kernels' tests run: on CUDA; on a CPU-only host under Triton's interpreter (TRITON_INTERPRET=1 with
# Triton installed: the programs one after the other); else nowhere (CI installs no Triton).
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() and TRITON else (
    "cpu" if TRITON and os.environ.get("TRITON_INTERPRET") == "1" else None)
needs_kernel_device = pytest.mark.skipif(KERNEL_DEVICE is None,
                                         reason="needs CUDA and Triton, or Triton's interpreter (TRITON_INTERPRET=1)")

TINY = dict(n_embd=64, n_layer=2, n_head=4, n_inner=256, vocab_size=512, n_positions=128)
END_ID = 0  # the tiny model's end_id (config.ini); tests that need end_id to occur pick a likelier token


@dataclass
class TinyGpt:
    hf: GPT2LMHeadModel
    ft_dir: Path


def make_tiny_gpt(tmp_dir: Path, seed: int = 0) -> TinyGpt:
    """A random GPT-2 of TINY shape, saved HF-style and converted to FT weights by `builder convert`."""
    from transformers import GPT2Config, GPT2LMHeadModel  # see the TYPE_CHECKING import

    torch.manual_seed(seed)
    config = GPT2Config(**TINY, activation_function="gelu_new", bos_token_id=END_ID, eos_token_id=END_ID)
    hf = GPT2LMHeadModel(config).eval()
    hf.save_pretrained(tmp_dir / "hf")
    for name in ("vocab.json", "merges.txt"):  # the converter copies the tokenizer next to the weights
        shutil.copyfile(GPT2_TOKENIZER_DIR / name, tmp_dir / "hf" / name)
    ft_dir = convert(tmp_dir / "hf", tmp_dir / "ft", infer_gpu_num=1, weight_data_type="fp32", progress=False)
    return TinyGpt(hf=hf, ft_dir=ft_dir)


def random_prompts(count: int, *, seed: int, min_len: int = 1, max_len: int = 12) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (count,), generator=generator).tolist()
    return [torch.randint(1, TINY["vocab_size"], (n,), generator=generator).tolist() for n in lengths]


def request(prompt: list[int], output_len: int, **kwargs: object) -> GenerationRequest:
    kwargs.setdefault("end_id", END_ID)
    return GenerationRequest(input_ids=tuple(prompt), output_len=output_len, **kwargs)


@torch.inference_mode()
def hf_generate(hf: GPT2LMHeadModel, prompt: list[int], new_tokens: int, **kwargs: object) -> list[int]:
    """HF generate for one unpadded prompt; returns prompt + generated ids (trailing padding stripped by HF)."""
    kwargs.setdefault("eos_token_id", END_ID)
    kwargs.setdefault("do_sample", False)
    out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                      max_new_tokens=new_tokens, pad_token_id=kwargs["eos_token_id"], **kwargs)
    return out[0].tolist()


@torch.inference_mode()
def hf_next_token_logits(hf: GPT2LMHeadModel, sequence: list[int]) -> torch.Tensor:
    """Teacher-forced logits [len(sequence), V]: row j predicts token j + 1."""
    return hf(torch.tensor([sequence])).logits[0].float()


def random_weights(config: GptModelConfig, generator: torch.Generator, *, scale: float = 0.1, norm_scale: float = 0.3,
                   dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Canonical weights for `config`, on the generator's device: matrices and biases N(0, scale), LayerNorm gains
    1 + N(0, norm_scale) and biases N(0, norm_scale), so that folding or misapplying a norm shows in the logits."""
    return {name: (torch.randn(shape, device=generator.device, generator=generator)
                   * (norm_scale if "layernorm" in name else scale)
                   + (1.0 if name.endswith("layernorm.weight") else 0.0)).to(dtype)
            for name, shape in expected_shapes(config).items()}


def rendered_core_args(ft_dir: Path, output: Path, **options: Any) -> tuple[dict[str, str], dict[str, Any]]:
    """Render a CPU fp32 torch-engine repository of the FT folder with `options` (RenderConfig fields) -> (the args
    tritonserver hands the core's model.py, which CoreSettings.from_args reads; its config.pbtxt as a dict, to edit
    and hand over again)."""
    from google.protobuf import json_format

    from builder.render import parse_model_config, render_repository
    from builder.render_config import RenderConfig

    model = GptModelConfig.from_ini(ft_dir / "config.ini")
    repo = render_repository(RenderConfig(engine="torch", device="cpu", data_type="fp32", checkpoint=ft_dir,
                                          model=model, output=output, **options))
    path = repo / "gpt3_1.3b" / "config.pbtxt"
    config = json_format.MessageToDict(parse_model_config(path.read_text(), str(path)),
                                       preserving_proto_field_name=True)
    return {"model_config": json.dumps(config), "model_repository": str(repo / "gpt3_1.3b"),
            "model_version": "1"}, config
