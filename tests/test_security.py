"""Other local users are untrusted: the tests play the attacker against a real tritonserver started by `serve`.

- A backend folder pre-created at the old predictable path by another uid, whose stub that user keeps re-planting:
  our server must never run it (it used to, as root).
- The shared-memory, model-repository, trace and logging APIs over loopback without the admin token: refused on HTTP
  and gRPC (a local user used to register a root-only /dev/shm file as an input region and read it back).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

import builder.serve as serve_module
from builder.serve import PYTHON_STUB, ServerError
from servers import server_on_free_ports


pytestmark = pytest.mark.server

ATTACKER_UID = 65534  # nobody
# The attacker cannot use our interpreter (it may live under root's home): a system one.
ATTACKER_PYTHON = shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin") or sys.executable
TOKEN = "adm1n-token-for-the-test-0123456789"

# Plants its own stub in the predictable folder and swaps it back whenever someone re-links it (the owner of a folder
# may replace any entry in it). Its stub only records who ran it.
ATTACKER_SCRIPT = r"""
import os, sys, time
base, marker, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
python_dir = os.path.join(base, "python")
os.makedirs(python_dir, exist_ok=True)
os.chmod(base, 0o755)
os.chmod(python_dir, 0o755)
evil = os.path.join(base, "evil_stub")
with open(evil, "w") as f:
    f.write("#!/bin/sh\nid -u > " + marker + "\nexit 1\n")
os.chmod(evil, 0o755)
stub = os.path.join(python_dir, "triton_python_backend_stub")
print("planted", flush=True)
deadline = time.monotonic() + seconds
while time.monotonic() < deadline:
    if not (os.path.islink(stub) and os.readlink(stub) == evil):
        swap = stub + ".swap"
        if os.path.lexists(swap):
            os.unlink(swap)
        os.symlink(evil, swap)
        os.replace(swap, stub)
    time.sleep(0.002)
"""


@pytest.fixture
def shared_tmp(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A world-writable sticky folder standing in for /tmp (so the real /tmp of other servers is left alone)."""
    folder = Path(tempfile.mkdtemp(prefix="gpt-triton-shared-tmp-"))
    folder.chmod(0o1777)
    monkeypatch.setenv("TMPDIR", str(folder))
    monkeypatch.setattr(tempfile, "tempdir", None)  # gettempdir() caches its answer
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def backend_dir_of(command: list[str]) -> Path:
    return Path(next(arg.split("=", 1)[1] for arg in command if arg.startswith("--backend-directory=")))


def test_backend_folder_planted_by_another_user_is_never_used(echo_repo: Path, shared_tmp: Path) -> None:
    py_version = f"{sys.version_info.major}.{sys.version_info.minor}"
    predictable = shared_tmp / f"gpt-triton-backends-{os.getuid()}-py{py_version}"
    marker = shared_tmp / "attacker-stub-ran"
    script = shared_tmp / "attacker.py"
    script.write_text(ATTACKER_SCRIPT)
    script.chmod(0o644)
    as_other_user = {"user": ATTACKER_UID, "group": ATTACKER_UID} if os.getuid() == 0 else {}
    attacker = subprocess.Popen([ATTACKER_PYTHON, "-I", str(script), str(predictable), str(marker), "60"],
                                stdout=subprocess.PIPE, text=True, **as_other_user)
    server = server_on_free_ports(echo_repo, startup_timeout_s=30)
    try:
        assert attacker.stdout is not None and attacker.stdout.readline().strip() == "planted"
        if as_other_user:
            assert predictable.stat().st_uid == ATTACKER_UID
        try:
            server.start()
        except ServerError as err:
            pytest.fail(f"the server did not start: {err}\nattacker's stub ran: {marker.exists()}")
        backends = server.backend_directory
        stubs = [p.cmdline()[0] for p in psutil.Process(server.process.pid).children()
                 if p.cmdline() and p.cmdline()[0].endswith(PYTHON_STUB)]
        time.sleep(0.5)  # the attacker keeps swapping; give a late exec the chance to show
        assert not marker.exists(), f"the planted stub ran as uid {marker.read_text().strip()}"
        assert predictable not in backends.parents and backends != predictable
        info = backends.lstat()
        assert info.st_uid == os.getuid() and stat.S_IMODE(info.st_mode) == 0o700 and stat.S_ISDIR(info.st_mode)
        assert stubs and all(Path(stub).parent == backends / "python" for stub in stubs), stubs
        assert os.readlink(backends / "python" / PYTHON_STUB) == str(
            serve_module._pytriton_root().resolve() / "python_backend_stubs" / py_version / PYTHON_STUB)
    finally:
        server.stop()
        attacker.kill()
        attacker.wait()
    assert not backends.exists()  # removed with the server


def fake_pytriton(root: Path, py_version: str) -> Path:
    """Another checkout's nvidia-pytriton: the same layout, a different stub."""
    (root / "backends" / "python").mkdir(parents=True)
    (root / "backends" / "python" / "libtriton_python.so").write_bytes(b"other install")
    (root / "backends" / "python" / "triton_python_backend_utils.py").write_text("# other install\n")
    stub = root / "python_backend_stubs" / py_version / PYTHON_STUB
    stub.parent.mkdir(parents=True)
    stub.write_text("#!/bin/sh\nexit 1\n")
    (root / "bin").mkdir()
    (root / "bin" / "tritonserver").write_text("#!/bin/sh\nexit 1\n")
    return stub


def test_two_installs_never_relink_each_others_stub(echo_repo: Path, tmp_path: Path, shared_tmp: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    py_version = f"{sys.version_info.major}.{sys.version_info.minor}"
    ours, theirs = server_on_free_ports(echo_repo), server_on_free_ports(echo_repo)
    try:
        our_dir = backend_dir_of(ours.command())
        our_stub = os.readlink(our_dir / "python" / PYTHON_STUB)
        other_stub = fake_pytriton(tmp_path / "other-checkout", py_version)
        monkeypatch.setattr(serve_module, "_pytriton_root", lambda: tmp_path / "other-checkout")
        their_dir = backend_dir_of(theirs.command())
        assert their_dir != our_dir
        assert os.readlink(their_dir / "python" / PYTHON_STUB) == str(other_stub.resolve())
        assert os.readlink(our_dir / "python" / PYTHON_STUB) == our_stub  # untouched by the other install
    finally:
        ours.stop()
        theirs.stop()


# -- admin APIs over loopback ------------------------------------------------------------------------------------------
def refused(call) -> str:
    """Run `call`, which must be refused by the admin restriction; the error text."""
    with pytest.raises(Exception) as caught:
        call()
    message = str(caught.value)
    assert "restricted" in message.lower(), message
    return message


def raw_post(url: str, body: dict) -> int:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


@pytest.fixture
def secret_region() -> Iterator[str]:
    """A root-only /dev/shm file holding a secret: what the attacker wanted to map."""
    path = Path("/dev/shm") / f"gpt-triton-test-secret-{os.getpid()}"
    path.write_bytes(b"TOPSECRET" * 8)
    path.chmod(0o600)
    yield "/" + path.name
    path.unlink(missing_ok=True)


def test_admin_apis_refused_on_loopback_without_the_token(echo_repo: Path, start_server, secret_region: str,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_ADMIN_TOKEN", raising=False)
    server = start_server(echo_repo, model_control_mode="explicit", extra_args=["--load-model=echo"])
    assert server.config.address == "127.0.0.1"
    http = httpclient.InferenceServerClient(server.http_url)
    grpc = grpcclient.InferenceServerClient(server.grpc_url)

    refused(lambda: http.register_system_shared_memory("stolen", secret_region, 72))
    refused(lambda: grpc.register_system_shared_memory("stolen", secret_region, 72))
    # A header guessed from the documentation does not help either.
    refused(lambda: http.register_system_shared_memory("stolen", secret_region, 72,
                                                       headers={"triton-admin": "closed"}))
    url = f"http://{server.http_url}/v2/systemsharedmemory/region/stolen/register"
    assert raw_post(url, {"key": secret_region, "offset": 0, "byte_size": 72}) == 403
    refused(lambda: http.get_system_shared_memory_status())
    refused(lambda: grpc.get_system_shared_memory_status())
    refused(lambda: http.register_cuda_shared_memory("stolen", b"\0" * 64, 0, 72))
    refused(lambda: http.unload_model("echo"))
    refused(lambda: grpc.unload_model("echo"))
    refused(lambda: http.load_model("echo"))
    refused(lambda: http.update_trace_settings(settings={"trace_file": "/tmp/x"}))
    refused(lambda: http.update_log_settings(settings={"log_file": "/tmp/x"}))
    refused(lambda: grpc.update_log_settings(settings={"log_file": "/tmp/x"}))

    # Nothing changed, and inference stays open.
    assert http.is_model_ready("echo") and grpc.is_model_ready("echo")
    data = np.array([[b"abc"]], dtype=object)
    inputs = [httpclient.InferInput("INPUT", [1, 1], "BYTES")]
    inputs[0].set_data_from_numpy(data)
    assert http.infer("echo", inputs).as_numpy("OUTPUT")[0][0] == b"cba"
    http.close()
    grpc.close()


def test_admin_apis_open_to_the_token(echo_repo: Path, start_server) -> None:
    server = start_server(echo_repo, admin_token=TOKEN, model_control_mode="explicit",
                          extra_args=["--load-model=echo"])
    http = httpclient.InferenceServerClient(server.http_url)
    grpc = grpcclient.InferenceServerClient(server.grpc_url)
    http_admin, grpc_admin = server.admin_headers("http"), server.admin_headers("grpc")
    region = Path("/dev/shm") / f"gpt-triton-test-region-{os.getpid()}"  # a POSIX shm object is a file there
    region.write_bytes(bytes(64))
    key = "/" + region.name
    try:
        http.register_system_shared_memory("ours", key, 64, headers=http_admin)
        assert [r["name"] for r in http.get_system_shared_memory_status(headers=http_admin)] == ["ours"]
        http.unregister_system_shared_memory("ours", headers=http_admin)
        grpc.register_system_shared_memory("ours", key, 64, headers=grpc_admin)
        assert "ours" in grpc.get_system_shared_memory_status(headers=grpc_admin).regions
        grpc.unregister_system_shared_memory("ours", headers=grpc_admin)
    finally:
        region.unlink()
    http.unload_model("echo", headers=http_admin)
    deadline = time.monotonic() + 30
    while http.is_model_ready("echo") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not http.is_model_ready("echo")
    grpc.load_model("echo", headers=grpc_admin)
    assert http.is_model_ready("echo")
    http.close()
    grpc.close()
