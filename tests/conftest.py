"""Shared fixtures. Integration tests start the real tritonserver from the pinned nvidia-pytriton package."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from builder.serve import TritonServer
from servers import server_on_free_ports

pytest_plugins = ["fixtures_checkpoints"]


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
