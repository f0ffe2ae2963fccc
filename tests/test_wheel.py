"""The wheel renders: built from the sources, installed non-editable into a fresh venv, run outside the checkout.

The fresh venv takes the wheel's own files (`builder`, `client`, `model_repository_templates`) and borrows only the
third-party dependencies from the project's venv (a .pth line, so this works offline). `python -m builder` then runs
from a temporary folder with the checkout off sys.path: a template or adapter missing from the package data fails
here, as it would for a user of `pip install .`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "builder", "client", "model_repository_templates")


def run(command: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{command} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the project's wheel installed (not editable); returns its python."""
    work = tmp_path_factory.mktemp("wheel")
    # Build from a copy: building in the checkout would reuse a stale build/lib (deleted modules in the wheel).
    source = work / "source"
    source.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(ROOT / name, source / name)
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
         "-w", str(work / "dist"), str(source)], cwd=work)
    (wheel,) = (work / "dist").glob("gpt_triton-*.whl")

    venv = work / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=work)
    python = venv / "bin" / "python"
    run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index",
         str(wheel)], cwd=work)
    # Dependencies: the project venv's site-packages as a plain path line. Plain lines do not run that folder's
    # own .pth files, so the editable install's finder (which maps `builder` to the checkout) stays out.
    fresh_site = Path(run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          cwd=work).strip())
    (fresh_site / "project-deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    return python


@pytest.mark.slow
def test_installed_wheel_renders_and_validates_the_demo_repository(wheel_venv: Path, demo_repository: Path,
                                                                    tmp_path: Path) -> None:
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONHOME")}
    where = run([str(wheel_venv), "-c", "import builder, client, model_repository_templates as t, os, sys; "
                 "print(builder.__file__); print(client.__file__); print(t.__file__); "
                 f"print(any(os.path.realpath(p or '.') == {str(ROOT)!r} for p in sys.path))"],
                cwd=cwd, env=env).split()
    venv = wheel_venv.parent.parent
    for module_file in where[:3]:
        assert Path(module_file).is_relative_to(venv), f"{module_file} is not the installed wheel's"
    assert where[3] == "False", "the checkout is on the fresh venv's sys.path"

    (weights,) = {path.parent for path in demo_repository.glob("*/1/*/config.ini")}
    output = tmp_path / "repository"
    run([str(wheel_venv), "-m", "builder", "render", "--engine", "torch", "--device", "cpu", "--data-type", "fp32",
         "--max-batch-size", "64", "--checkpoint", str(weights), "--output", str(output)], cwd=cwd, env=env)
    run([str(wheel_venv), "-m", "builder", "validate", str(output)], cwd=cwd, env=env)

    # The same repository as the checkout renders: every config and every copied file, byte for byte.
    def files(repository: Path) -> dict[str, bytes]:
        return {str(path.relative_to(repository)): path.read_bytes() for path in sorted(repository.rglob("*"))
                if path.is_file() and "__pycache__" not in path.parts and path.name != ".gpt-triton-repository"}

    rendered, expected = files(output), files(demo_repository)
    assert sorted(rendered) == sorted(expected)
    assert [name for name in rendered if rendered[name] != expected[name]] == []
    assert any(name.endswith("1/model.py") for name in rendered)

    # The other package data: deploy's templates (manifests, Dockerfiles) and the OpenAI API's chat template.
    run([str(wheel_venv), "-m", "builder", "deploy", "k8s", str(output), "--out", str(tmp_path / "deploy")],
        cwd=cwd, env=env)
    assert (tmp_path / "deploy" / "manifests" / "deployment.yaml").is_file()
    template = run([str(wheel_venv), "-c", "from builder.openai_api.chat_template import ChatTemplate; "
                    "print(ChatTemplate.load().origin)"], cwd=cwd, env=env)
    assert "default" in template
