"""Checkpoints: `.nemo` / HF GPT-2 -> FasterTransformer weights, and synthetic or demo `.nemo` files to feed it.

Heavy modules (torch, transformers) load on first use of each function, so importing the package stays cheap.
"""

from __future__ import annotations

from pathlib import Path

from .source import CheckpointError

__all__ = ["CheckpointError", "convert", "demo_checkpoint", "write_synthetic_checkpoint"]


def convert(in_path: str | Path, saved_dir: str | Path, infer_gpu_num: int = 1, weight_data_type: str = "fp32",
            force: bool = False, progress: bool = True) -> Path:
    """Convert a `.nemo` (file or extracted folder) or an HF GPT-2 folder; returns `<saved_dir>/<N>-gpu`."""
    from .converter import convert as _convert

    return _convert(in_path, saved_dir, infer_gpu_num, weight_data_type, force, progress)


def write_synthetic_checkpoint(preset: str, out: str | Path, *, seed: int = 0, tp: int = 1,
                               force: bool = False) -> Path:
    """Random-weight `.nemo` of a named shape (`tiny`, `gpt3-1.3b`)."""
    from .synthetic import write_synthetic_checkpoint as _write

    return _write(preset, out, seed=seed, tp=tp, force=force)


def demo_checkpoint(out: str | Path | None = None) -> Path:
    """The counting demo `.nemo` (trained once, cached); copied to `out` when given."""
    from .demo import demo_checkpoint as _demo

    return _demo(out)
