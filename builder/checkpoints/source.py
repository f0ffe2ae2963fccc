"""What every checkpoint reader hands the converter: a model config, canonical tensors one by one, tokenizer files."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import click

from builder import GPT2_TOKENIZER_DIR
from builder.runtime.model_config import GptModelConfig

if TYPE_CHECKING:
    import torch

END_OF_TEXT = "<|endoftext|>"


class CheckpointError(click.ClickException):
    """A checkpoint or a conversion request we cannot honour; the message names the file or option at fault."""


@dataclass(frozen=True)
class TokenizerFiles:
    """GPT-2 byte-level BPE tables (FT and our preprocessing expect them as vocab.json + merges.txt)."""

    vocab: Path
    merges: Path

    def token_id(self, token: str) -> int:
        try:
            vocab = json.loads(self.vocab.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise CheckpointError(f"{self.vocab}: unreadable GPT-2 vocabulary ({err})") from err
        if token not in vocab:
            raise CheckpointError(f"{self.vocab}: no {token!r} token; only GPT-2 BPE vocabularies are supported")
        return int(vocab[token])


PACKAGED_TOKENIZER = TokenizerFiles(GPT2_TOKENIZER_DIR / "vocab.json", GPT2_TOKENIZER_DIR / "merges.txt")


class CheckpointSource(Protocol):
    """An opened checkpoint. `config` has tensor_para_size 1; `read` returns one canonical (TP-1) tensor."""

    config: GptModelConfig
    has_lm_head: bool  # an untied output layer (model.lm_head.weight) exists
    tokenizer: TokenizerFiles

    def read(self, stem: str) -> torch.Tensor: ...

