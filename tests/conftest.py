"""Shared fixtures. Integration tests start the real tritonserver from the pinned nvidia-pytriton package."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from builder.serve import TritonServer

pytest_plugins = ["fixtures_checkpoints"]


@pytest.fixture
def start_server() -> Iterator[Callable[..., TritonServer]]:
    """Factory: `start_server(repo, **ServerConfig fields)` starts tritonserver on free ports; stopped at teardown."""
    servers: list[TritonServer] = []

    def start(repository: Path | str, **kwargs: object) -> TritonServer:
        kwargs.setdefault("startup_timeout_s", 180.0)
        server = TritonServer.on_free_ports(repository, **kwargs)
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.stop()
