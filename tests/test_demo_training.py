"""The demo model's training says what it is doing: a progress bar on stderr (the first `demo` trains ~1 minute)."""

from __future__ import annotations

import re

import pytest

from builder.checkpoints.demo import RECIPE, DemoRecipe, train


def test_training_shows_a_progress_bar_on_stderr(capfd: pytest.CaptureFixture[str]) -> None:
    recipe = DemoRecipe(steps=3, warmup_steps=1)  # the real recipe, shortened
    config, tensors = train(recipe)
    out, err = capfd.readouterr()
    assert out == ""  # stdout stays clean for the answer
    assert "training the counting demo model" in err
    assert re.search(r"3/3 \[", err), err  # tqdm's "n/total [elapsed<remaining" for the last step
    assert "loss=" in err
    assert config.vocab_size == tensors["model.wte"].shape[0] and recipe.digest != RECIPE.digest
