"""How tests start tritonserver: on free ports, with a generous start-up timeout and a short exit timeout."""

from __future__ import annotations

from pathlib import Path

from builder.serve import TritonServer

STARTUP_TIMEOUT_S = 180.0  # a loaded 2-core machine starts the demo ensemble in ~10 s; CI may be slower
# At SIGTERM tritonserver waits up to its exit timeout for the models to unload, polling once a second, and Python
# models' stubs take 1-4 s to: ~30 s of teardown over the suite. A test that does not exercise graceful shutdown
# needs no grace: 0 exits at once (code 1, "Exit timeout expired") and stop() kills the stubs and removes their
# shared memory. Tests of graceful shutdown pass their own exit_timeout_s.
EXIT_TIMEOUT_S = 0


def server_on_free_ports(repository: Path | str, **kwargs: object) -> TritonServer:
    """`TritonServer.on_free_ports` with the tests' timeouts as defaults; not started."""
    kwargs.setdefault("startup_timeout_s", STARTUP_TIMEOUT_S)
    kwargs.setdefault("exit_timeout_s", EXIT_TIMEOUT_S)
    return TritonServer.on_free_ports(repository, **kwargs)
