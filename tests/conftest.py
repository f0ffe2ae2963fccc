"""Shared fixtures. Integration tests start the real tritonserver from the pinned nvidia-pytriton package."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from builder.serve import TritonServer
from servers import ECHO_MODEL, server_on_free_ports, write_model

if TYPE_CHECKING:
    from engine_testing import TinyGpt

pytest_plugins = ["fixtures_checkpoints"]


@pytest.fixture(scope="session")
def demo_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo ensemble (torch engine, CPU), rendered once; servers only read it."""
    # Imported here: collecting the engine's CUDA tests on the GPU host's own Python needs no renderer packages.
    from builder.demo import build_demo_repository

    return build_demo_repository(tmp_path_factory.mktemp("demo") / "repository")


@pytest.fixture(scope="session")
def demo_streaming_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo ensemble rendered with --streaming (decoupled torch core), once; servers only read it."""
    from builder.demo import build_demo_repository

    return build_demo_repository(tmp_path_factory.mktemp("demo_streaming") / "repository", streaming=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyGpt:
    """A random tiny HF GPT-2 (the oracle) and its FT weight folder (engine_testing.TinyGpt), one per module."""
    from engine_testing import make_tiny_gpt  # torch + transformers only for the engine tests

    return make_tiny_gpt(tmp_path_factory.mktemp("tiny_gpt"))


@pytest.fixture
def echo_repo(tmp_path: Path) -> Path:
    """A repository with one Python model, `echo` (tests/servers.py)."""
    write_model(tmp_path / "repo", "echo", ECHO_MODEL)
    return tmp_path / "repo"


@pytest.fixture
def start_server() -> Iterator[Callable[..., TritonServer]]:
    """Factory: `start_server(repo, **ServerConfig fields)` starts tritonserver on free ports; stopped at teardown.
    Default timeouts: tests/servers.py (a short exit timeout)."""
    servers: list[TritonServer] = []

    def start(repository: Path | str, **kwargs: object) -> TritonServer:
        server = server_on_free_ports(repository, **kwargs)
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.stop()
