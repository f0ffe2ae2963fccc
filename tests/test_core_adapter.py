"""core_adapter's choices that need no server: the CPU core model's torch threads."""

from __future__ import annotations

import pytest

from builder.runtime import core_adapter


@pytest.mark.parametrize(("environment", "cores", "expected"), [
    ({}, 2, 1),  # one core left to tritonserver and the pre/postprocessing stubs
    ({}, 16, 15),
    ({}, 1, 1),
    ({"OMP_NUM_THREADS": "3"}, 16, None),  # torch has taken it
    ({"GPT_TRITON_CPU_THREADS": "2", "OMP_NUM_THREADS": "3"}, 2, 2),
])
def test_cpu_threads(monkeypatch: pytest.MonkeyPatch, environment: dict[str, str], cores: int,
                     expected: int | None) -> None:
    for name in ("OMP_NUM_THREADS", "GPT_TRITON_CPU_THREADS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(core_adapter.os, "cpu_count", lambda: cores)
    assert core_adapter.cpu_threads() == expected


@pytest.mark.parametrize("value", ["0", "two", "-1", "1.5"])
def test_a_bad_cpu_threads_value_is_named(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("GPT_TRITON_CPU_THREADS", value)
    with pytest.raises(ValueError, match=f"GPT_TRITON_CPU_THREADS must be a whole number >= 1, got '{value}'"):
        core_adapter.cpu_threads()
