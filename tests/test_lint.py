"""ruff and mypy, as configured in pyproject.toml, pass; every suppression says why.

They run here so that the README's test command (and so CI) runs them. mypy checks builder/ and client/ (its cache,
.mypy_cache, makes a re-run take seconds); ruff checks every Python file but the third-party clients in tests/data.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINTED = ("builder", "client", "model_repository_templates", "tests", "bench", "scripts")
# Each suppression names its rule and says why (a bare one cannot be judged by a reader): a noqa comment as
# `CODE  (reason)`, a type-ignore comment as `[code]  # reason`.
NOQA = re.compile(r"#\s*noqa\b(?P<rest>.*)$")
NOQA_WITH_REASON = re.compile(r":\s*[A-Z]+[0-9]+(\s*,\s*[A-Z]+[0-9]+)*\s+(\(.+\)|#\s*\S.*)$")
TYPE_IGNORE = re.compile(r"#\s*type:\s*ignore\b(?P<rest>.*)$")
TYPE_IGNORE_WITH_REASON = re.compile(r"\[[a-z-]+(\s*,\s*[a-z-]+)*\]\s+#\s*\S.*$")


def run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *command], cwd=ROOT, capture_output=True, text=True, timeout=300)


def python_files() -> list[Path]:
    return [path for folder in LINTED for path in sorted((ROOT / folder).rglob("*.py"))
            if "data" not in path.relative_to(ROOT).parts and "__pycache__" not in path.parts]


def test_ruff_check_passes() -> None:
    done = run("ruff", "check", "--no-cache", *LINTED)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.slow
def test_mypy_passes() -> None:
    done = run("mypy")  # files and settings: [tool.mypy] in pyproject.toml
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_noqa_and_type_ignore_gives_its_reason() -> None:
    bare = []
    for path in python_files():
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            noqa, ignore = NOQA.search(line), TYPE_IGNORE.search(line)
            if noqa and not NOQA_WITH_REASON.match(noqa["rest"]):
                bare.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
            if ignore and not TYPE_IGNORE_WITH_REASON.match(ignore["rest"]):
                bare.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert bare == [], "suppressions without a reason:\n" + "\n".join(bare)
