"""The FT weight reader: file list, size checks, loud failures, shard merging."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from builder.runtime.ft_weights import WeightFileError, check_weight_dir, expected_files, load_ft_weights
from builder.runtime.model_config import GptModelConfig


@pytest.fixture
def weight_dir(tiny_ft_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_ft_dir, tmp_path / "1-gpu"))


def test_expected_files_cover_every_rank() -> None:
    config = GptModelConfig(head_num=4, size_per_head=8, inter_size=64, num_layer=2, vocab_size=50304,
                            max_pos_seq_len=32, tensor_para_size=2)
    files = expected_files(config)
    assert files["model.wte.bin"] == (50304, 32)
    assert files["model.layers.1.attention.query_key_value.weight.1.bin"] == (32, 3, 16)
    assert files["model.layers.1.attention.query_key_value.bias.0.bin"] == (3, 16)
    assert files["model.layers.0.attention.dense.weight.1.bin"] == (16, 32)
    assert files["model.layers.0.mlp.dense_h_to_4h.weight.0.bin"] == (32, 32)
    assert files["model.layers.0.mlp.dense_h_to_4h.bias.1.bin"] == (32,)
    assert files["model.layers.0.mlp.dense_4h_to_h.weight.1.bin"] == (32, 32)
    assert "model.layers.0.attention.dense.bias.bin" in files and "model.lm_head.weight.bin" not in files
    # 4 global + per layer: 4 layernorm + 2 whole biases + 6 split tensors x 2 ranks
    assert len(files) == 4 + 2 * (6 + 6 * 2)


def test_converted_dir_is_clean_and_loads(weight_dir: Path) -> None:
    assert check_weight_dir(weight_dir) == []
    config, weights = load_ft_weights(weight_dir, dtype=torch.float16)
    assert weights["model.layers.0.attention.query_key_value.weight"].shape == (64, 3, 64)
    assert all(t.dtype == torch.float16 for t in weights.values())
    raw = np.fromfile(weight_dir / "model.wpe.bin", dtype=np.float16).reshape(config.max_pos_seq_len, 64)
    assert torch.equal(weights["model.wpe"], torch.from_numpy(raw))


def test_every_problem_is_reported(weight_dir: Path) -> None:
    (weight_dir / "model.layers.1.mlp.dense_4h_to_h.weight.0.bin").unlink()
    truncated = weight_dir / "model.wte.bin"
    truncated.write_bytes(truncated.read_bytes()[:1000])
    (weight_dir / "model.layers.0.attention.dense.weight.1.bin").write_bytes(b"\0" * 16)
    problems = check_weight_dir(weight_dir)
    assert len(problems) == 3, problems
    assert any("missing model.layers.1.mlp.dense_4h_to_h.weight.0.bin" in p for p in problems)
    assert any(p.startswith("model.wte.bin: 1000 bytes, expected 6438912") for p in problems)
    assert any("unexpected model.layers.0.attention.dense.weight.1.bin" in p for p in problems)
    with pytest.raises(WeightFileError) as caught:
        load_ft_weights(weight_dir)
    assert caught.value.problems == problems
    assert "model.wte.bin" in str(caught.value) and "dense_4h_to_h.weight.0.bin" in str(caught.value)


def test_missing_config_and_wrong_lm_head_are_reported(weight_dir: Path) -> None:
    (weight_dir / "model.lm_head.weight.bin").write_bytes(b"\0" * 10)
    assert check_weight_dir(weight_dir) == [
        "model.lm_head.weight.bin: 10 bytes, expected 6438912 (shape [50304, 64] x fp16)"]
    (weight_dir / "config.ini").unlink()
    assert check_weight_dir(weight_dir) == [f"{weight_dir / 'config.ini'}: config.ini not found"]


def test_untied_lm_head_is_loaded(weight_dir: Path) -> None:
    head = torch.randn(50304, 64).half()
    head.numpy().tofile(weight_dir / "model.lm_head.weight.bin")
    _, weights = load_ft_weights(weight_dir)
    assert torch.equal(weights["model.lm_head.weight"], head.float())
