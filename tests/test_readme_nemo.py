"""The README's "From a NeMo checkpoint to a served model" block, run as written on this machine (no GPU needed).

The archive is the tiny random-weight `.nemo` the README suggests for trying the commands, written under the README's
file name. The commands are read from README.md itself, so the test follows the README; only the ports differ (the
server, the client and curl get free ones, so parallel test runs do not collide), and `source .venv/bin/activate` is
replaced by running this interpreter.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from builder.serve import free_ports

pytestmark = pytest.mark.server

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
# The commands run this checkout's `builder` and `client`, whichever checkout the editable install points at.
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))}
SECTION = "## From a NeMo checkpoint to a served model"
ARCHIVE = "nemo_gpt1.3B_fp16.nemo"


def readme_commands() -> list[list[str]]:
    """The section's bash block, one argv per line (comments dropped)."""
    section = README.read_text().split(SECTION, 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    return [shlex.split(line, comments=True) for line in block.splitlines() if line.strip()]


def run(argv: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout, check=False)


def python(argv: list[str]) -> list[str]:
    assert argv[:2] == ["python", "-m"], argv
    return [sys.executable, *argv[1:]]


def wait_ready(port: int, server: subprocess.Popen[str], timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            output = server.stdout.read() if server.stdout else ""
            raise AssertionError(f"serve exited with {server.returncode}:\n{output}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(1)
    raise AssertionError(f"the server was not ready within {timeout_s} s")


def test_readme_nemo_section_runs_as_written(tmp_path: Path) -> None:
    commands = readme_commands()
    tools = [argv[:3] if argv[0] == "python" else argv[:1] for argv in commands]
    assert tools == [["source"], ["python", "-m", "builder"], ["python", "-m", "builder"],
                     ["python", "-m", "builder"], ["python", "-m", "builder"], ["python", "-m", "client"], ["curl"]]
    activate, convert, render, validate, serve, client, curl = commands
    assert ARCHIVE in convert

    made = run([sys.executable, "-m", "builder", "checkpoint", "--preset", "tiny", "--out", ARCHIVE], tmp_path)
    assert made.returncode == 0, made.stderr
    for argv in (convert, render):
        done = run(python(argv), tmp_path)
        assert done.returncode == 0, f"{argv}: {done.stdout}{done.stderr}"
    checked = run(python(validate), tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "warning" not in checked.stdout, checked.stdout  # the README's render suits this machine as it is

    http, grpc, metrics = free_ports(3)
    server = subprocess.Popen(python(serve) + ["--http-port", str(http), "--grpc-port", str(grpc),
                                               "--metrics-port", str(metrics)],
                              cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True)
    try:
        wait_ready(http, server)
        answered = run(python(client) + ["--server", f"localhost:{http}"], tmp_path, timeout=120)
        assert answered.returncode == 0, answered.stdout + answered.stderr
        assert answered.stdout.strip(), "the client printed nothing"
        curl = [arg.replace("localhost:8000", f"localhost:{http}") for arg in curl]
        assert any(f"localhost:{http}" in arg for arg in curl), curl
        fetched = run(curl, tmp_path, timeout=120)
        assert fetched.returncode == 0, fetched.stderr
        body = json.loads(fetched.stdout)
        assert 1 <= body.get("num_output_tokens", 0) <= json.loads(curl[-1])["max_tokens"], body
        assert body["finish_reason"] in ("stop", "length") and isinstance(body["text_output"], str)
    finally:
        server.send_signal(signal.SIGTERM)  # serve stops tritonserver and its stubs
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
