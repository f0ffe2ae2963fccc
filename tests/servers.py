"""How tests start tritonserver: on free ports, with a generous start-up timeout and a short exit timeout."""

from __future__ import annotations

import json
import sys
import urllib.request
from pathlib import Path

from builder.serve import TritonServer, free_ports

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


def generate_json(server: TritonServer, body: dict, stream: bool = False) -> list[dict]:
    """Triton's /generate (one answer) or /generate_stream (its events) of the model `ensemble`, as JSON."""
    endpoint = "generate_stream" if stream else "generate"
    request = urllib.request.Request(f"http://{server.http_url}/v2/models/ensemble/{endpoint}",
                                     data=json.dumps(body).encode(), method="POST")
    with urllib.request.urlopen(request, timeout=60) as response:
        text = response.read().decode()
    if not stream:
        return [json.loads(text)]
    return [json.loads(line[len("data: "):]) for line in text.splitlines() if line.startswith("data: ")]


def serve_command(repository: Path | str, *options: str) -> tuple[list[str], int]:
    """`python -m builder serve REPOSITORY` on three free ports, plus `options`: (the command, its HTTP port)."""
    http_port, grpc_port, metrics_port = free_ports(3)
    return [sys.executable, "-m", "builder", "serve", str(repository), "--http-port", str(http_port), "--grpc-port",
            str(grpc_port), "--metrics-port", str(metrics_port), *options], http_port


ECHO_CONFIG = """
name: "{name}"
backend: "python"
max_batch_size: 8
input [ {{ name: "INPUT" data_type: TYPE_STRING dims: [ 1 ] }} ]
output [ {{ name: "OUTPUT" data_type: TYPE_STRING dims: [ 1 ] }} ]
instance_group [ {{ count: 1 kind: KIND_CPU }} ]
"""

# A Python model for tests of the server itself. It reverses the UTF-8 text of every row: bytes travel intact both
# ways (non-ASCII included).
ECHO_MODEL = """
import numpy as np
import psutil
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            rows = pb_utils.get_input_tensor_by_name(request, "INPUT").as_numpy()
            out = np.array([[row[0].decode("utf-8")[::-1].encode("utf-8")] for row in rows], dtype=object)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT", out)]))
        return responses
"""


def write_model(repo: Path, name: str, source: str) -> None:
    (repo / name / "1").mkdir(parents=True)
    (repo / name / "config.pbtxt").write_text(ECHO_CONFIG.format(name=name))
    (repo / name / "1" / "model.py").write_text(source)
