"""Refused oversized requests must not grow the server's memory for good.

Triton 2.51 has no front-door size limit we could set (`--http-max-input-size` arrived in 2.59; gRPC accepts 2 GiB
messages), so a 16 MB prompt reaches the preprocessing stub, whose shared-memory pool grows to hold it and never
shrinks: the first oversized request sets a high-water mark. What must not happen is what happened before: every
refused prompt staying in the stub (+48 MB RSS, +16 MB /dev/shm each), because the kept error's traceback pinned the
request's arrays in a reference cycle.
"""

from __future__ import annotations

import gc
import time
import weakref
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from builder import GPT2_TOKENIZER_DIR
from builder.runtime.preprocess import PreprocessConfig, RequestError, preprocess_requests
from builder.runtime.tokenizer import GptTokenizer
from builder.serve import PYTHON_STUB, TritonServer
from servers import server_on_free_ports

ASSETS = GPT2_TOKENIZER_DIR
PROMPT_BYTES = 16 * 1024 * 1024
REFUSED_PROMPTS = 50  # half over HTTP, half over gRPC
GROWTH_ALLOWED = 1.10


def test_a_refused_request_keeps_no_reference_to_its_inputs() -> None:
    tokenizer = GptTokenizer.from_directory(ASSETS)
    config = PreprocessConfig(max_pos_seq_len=64, vocab_size=50304)
    prompt = np.array([[b"1 " * 100_000]], dtype=np.object_)  # far over 64 tokens x 128 bytes: refused
    alive = weakref.ref(prompt)
    gc.disable()  # the stub's collector may not run for a long time: nothing may wait for it
    try:
        results = preprocess_requests([{"text_input": prompt, "max_tokens": np.array([[4]], dtype=np.int32)}],
                                      tokenizer, config)
        assert isinstance(results[0], RequestError) and "text_input" in str(results[0])
        del prompt
        assert alive() is None, "the refused request's error still holds its prompt"
        assert results[0].__traceback__ is None
    finally:
        gc.enable()


# -- against the served demo ensemble --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(demo_repository: Path) -> Iterator[TritonServer]:
    with server_on_free_ports(demo_repository) as running:
        yield running


def preprocessing_memory(server: TritonServer) -> dict[str, tuple[int, int]]:
    """Preprocessing instance -> (settled RSS, bytes of its /dev/shm region).

    RSS is the smallest of a few samples over half a second: right after a request the stub is still freeing it.
    """
    assert server.process is not None
    stubs = {}
    for child in psutil.Process(server.process.pid).children():
        argv = child.cmdline()
        # argv: stub model.py shm-region shm-size shm-growth parent-pid backend-dir ipc instance ...
        if argv and argv[0].endswith(PYTHON_STUB) and argv[8].startswith("preprocessing"):
            stubs[argv[8]] = (child, Path("/dev/shm") / argv[2].lstrip("/"))
    assert stubs, "no preprocessing stub found"
    rss: dict[str, list[int]] = {name: [] for name in stubs}
    for _ in range(5):
        for name, (process, _) in stubs.items():
            rss[name].append(process.memory_info().rss)
        time.sleep(0.1)
    return {name: (min(rss[name]), region.stat().st_blocks * 512) for name, (_, region) in stubs.items()}


def send_refused_prompts(server: TritonServer, count: int) -> None:
    prompt = np.array([[b"1 " * (PROMPT_BYTES // 2)]], dtype=np.object_)
    max_tokens = np.array([[4]], dtype=np.int32)
    http = httpclient.InferenceServerClient(server.http_url, network_timeout=120)
    grpc = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        for index in range(count):
            client, module = (http, httpclient) if index % 2 == 0 else (grpc, grpcclient)
            inputs = [module.InferInput("text_input", [1, 1], "BYTES"),
                      module.InferInput("max_tokens", [1, 1], "INT32")]
            inputs[0].set_data_from_numpy(prompt)
            inputs[1].set_data_from_numpy(max_tokens)
            with pytest.raises(Exception, match="text_input.*16777216 bytes"):
                client.infer("ensemble", inputs)
    finally:
        http.close()
        grpc.close()


def test_refused_16mb_prompts_do_not_grow_the_stubs(server: TritonServer) -> None:
    # The first oversized prompt per instance sets the high-water mark (Triton 2.51 cannot refuse it sooner).
    send_refused_prompts(server, 4)
    before = preprocessing_memory(server)
    server_rss_before = psutil.Process(server.process.pid).memory_info().rss
    started = time.monotonic()
    send_refused_prompts(server, REFUSED_PROMPTS)
    sending_s = time.monotonic() - started
    after = preprocessing_memory(server)
    server_rss_after = psutil.Process(server.process.pid).memory_info().rss
    report = {name: f"RSS {before[name][0] / 1e6:.0f} -> {after[name][0] / 1e6:.0f} MB, "
                    f"shm {before[name][1] / 1e6:.1f} -> {after[name][1] / 1e6:.1f} MB" for name in before}
    print(f"{REFUSED_PROMPTS} refused 16 MB prompts in {sending_s:.1f} s: {report}; tritonserver RSS "
          f"{server_rss_before / 1e6:.0f} -> {server_rss_after / 1e6:.0f} MB")
    for name, (rss, shm) in after.items():
        assert rss <= before[name][0] * GROWTH_ALLOWED, report
        assert shm <= before[name][1] * GROWTH_ALLOWED, report
