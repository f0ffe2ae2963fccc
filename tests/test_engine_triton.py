"""The torch engine's Triton adapter (model_repository_templates/gpt_torch/1/model.py) in a real tritonserver.

The core model's config.pbtxt is written here by hand (FT's contract, ragged inputs, dynamic batching), next to the
adapter, a copy of builder/runtime as gpt_runtime/, and the tiny model's FT weights.
"""

from __future__ import annotations

import queue
import shutil
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from engine_testing import TinyGpt, hf_generate, random_prompts
from servers import server_on_free_ports

pytestmark = [pytest.mark.server, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
OPTIONAL_SCALARS = {"runtime_top_k": "UINT32", "runtime_top_p": "FP32", "temperature": "FP32",
                    "repetition_penalty": "FP32", "presence_penalty": "FP32", "min_length": "UINT32",
                    "len_penalty": "FP32", "beam_width": "UINT32", "random_seed": "UINT64", "end_id": "UINT32",
                    "is_return_log_probs": "BOOL"}
OUTPUTS = {"output_ids": ("UINT32", "[ -1, -1 ]"), "sequence_length": ("UINT32", "[ -1 ]"),
           "response_input_lengths": ("INT32", "[ -1 ]"), "cum_log_probs": ("FP32", "[ -1 ]"),
           "output_log_probs": ("FP32", "[ -1, -1 ]")}
STREAM_OUTPUTS = {"delta_start": ("INT32", "[ -1 ]"), "finish_code": ("INT32", "[ -1 ]"),
                  "stream_ack": ("INT64", "[ 2 ]")}


def core_config(name: str, *, decoupled: bool) -> str:
    inputs = ['{ name: "input_ids" data_type: TYPE_UINT32 dims: [ -1 ] allow_ragged_batch: true }',
              '{ name: "input_lengths" data_type: TYPE_UINT32 dims: [ 1 ] }',
              '{ name: "request_output_len" data_type: TYPE_UINT32 dims: [ 1 ] }']
    scalars = {**OPTIONAL_SCALARS, **({"stream": "BOOL"} if decoupled else {})}
    inputs += [f'{{ name: "{n}" data_type: TYPE_{t} dims: [ 1 ] optional: true }}' for n, t in scalars.items()]
    inputs += [f'{{ name: "{n}" data_type: TYPE_INT32 dims: [ 2, -1 ] optional: true allow_ragged_batch: true }}'
               for n in ("stop_words_list", "bad_words_list")]
    streaming = STREAM_OUTPUTS if decoupled else {}
    outputs = [f'{{ name: "{n}" data_type: TYPE_{t} dims: {d} }}' for n, (t, d) in {**OUTPUTS, **streaming}.items()]
    return "\n".join([
        f'name: "{name}"', 'backend: "python"', "max_batch_size: 8",
        f"model_transaction_policy {{ decoupled: {'true' if decoupled else 'false'} }}",
        "dynamic_batching { max_queue_delay_microseconds: 300000 }",
        "input [\n  " + ",\n  ".join(inputs) + "\n]", "output [\n  " + ",\n  ".join(outputs) + "\n]",
        "instance_group [ { count: 1 kind: KIND_CPU } ]",
        'parameters { key: "model_dir" value: { string_value: "1-gpu" } }',
        'parameters { key: "data_type" value: { string_value: "fp32" } }',
        'parameters { key: "max_batch_size" value: { string_value: "16" } }',
    ]) + "\n"


@pytest.fixture(scope="module")
def repository(tiny: TinyGpt, tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("repo")
    for name, decoupled in (("gpt3_1.3b", False), ("gpt_stream", True)):
        version = repo / name / "1"
        version.mkdir(parents=True)
        (repo / name / "config.pbtxt").write_text(core_config(name, decoupled=decoupled))
        shutil.copy(ROOT / "model_repository_templates" / "gpt_torch" / "1" / "model.py", version / "model.py")
        shutil.copytree(ROOT / "builder" / "runtime", version / "gpt_runtime",
                        ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copytree(tiny.ft_dir, version / "1-gpu")
    return repo


@pytest.fixture(scope="module")
def server(repository: Path):
    with server_on_free_ports(repository) as running:  # __enter__ starts it
        yield running


def seed_inputs(prompt: list[int], output_len: int, module=httpclient, **extra: np.ndarray) -> list:
    """The seed client's request: uint32 ids [1, n], lengths [1, 1], output len [1, 1], sampling scalars."""
    arrays = {"input_ids": np.array([prompt], np.uint32), "input_lengths": np.array([[len(prompt)]], np.uint32),
              "request_output_len": np.array([[output_len]], np.uint32),
              "runtime_top_k": np.array([[1]], np.uint32), "runtime_top_p": np.array([[0.0]], np.float32),
              "temperature": np.array([[1.0]], np.float32), **extra}
    inputs = []
    for name, value in arrays.items():
        tensor = module.InferInput(name, list(value.shape), "BOOL" if value.dtype == bool else
                                   {np.uint32: "UINT32", np.float32: "FP32", np.uint64: "UINT64",
                                    np.int32: "INT32"}[value.dtype.type])
        tensor.set_data_from_numpy(value)
        inputs.append(tensor)
    return inputs


def test_seed_request_returns_ft_layout(tiny: TinyGpt, server) -> None:
    prompt, output_len = [16, 362, 113, 204, 242, 318], 8  # ids within the tiny vocabulary
    client = httpclient.InferenceServerClient(server.http_url)
    result = client.infer("gpt3_1.3b", seed_inputs(prompt, output_len))
    output_ids = result.as_numpy("output_ids")
    assert output_ids.shape == (1, 1, len(prompt) + output_len) and output_ids.dtype == np.uint32
    assert output_ids[0, 0].tolist() == hf_generate(tiny.hf, prompt, output_len)
    assert result.as_numpy("sequence_length").tolist() == [[len(prompt) + output_len]]
    assert result.as_numpy("response_input_lengths").tolist() == [[len(prompt)]]


def test_concurrent_requests_are_batched_and_answered_separately(tiny: TinyGpt, server) -> None:
    prompts = random_prompts(4, seed=5, min_len=2, max_len=10)
    client = httpclient.InferenceServerClient(server.http_url, concurrency=len(prompts))
    before = client.get_inference_statistics("gpt3_1.3b")["model_stats"][0]
    pending = [client.async_infer("gpt3_1.3b", seed_inputs(p, 6)) for p in prompts]
    results = [p.get_result() for p in pending]
    after = client.get_inference_statistics("gpt3_1.3b")["model_stats"][0]
    for prompt, result in zip(prompts, results):
        assert result.as_numpy("output_ids")[0, 0].tolist() == hf_generate(tiny.hf, prompt, 6)
    executions = after["execution_count"] - before["execution_count"]
    inferences = after["inference_count"] - before["inference_count"]
    assert inferences == len(prompts) and executions < inferences, "requests were not batched"


def test_bad_request_fails_alone(tiny: TinyGpt, server) -> None:
    client = httpclient.InferenceServerClient(server.http_url, concurrency=2)
    good_prompt = [5, 6, 7]
    bad = seed_inputs([5, 6, 7], 126)  # 3 + 126 > max_pos_seq_len 128
    with ThreadPoolExecutor(2) as pool:
        good_future = pool.submit(client.infer, "gpt3_1.3b", seed_inputs(good_prompt, 5))
        bad_future = pool.submit(client.infer, "gpt3_1.3b", bad)
        with pytest.raises(InferenceServerException, match="request_output_len.*max_seq_len 128") as info:
            bad_future.result()
        assert info.value.status() == "400"  # INVALID_ARG
        assert good_future.result().as_numpy("output_ids")[0, 0].tolist() == hf_generate(tiny.hf, good_prompt, 5)


def _stream(server, inputs: list) -> list:
    responses: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(server.grpc_url)
    client.start_stream(callback=partial(lambda q, result, error: q.put((result, error)), responses))
    client.async_stream_infer("gpt_stream", inputs, enable_empty_final_response=False)
    collected = []
    while True:
        result, error = responses.get(timeout=60)
        assert error is None, error
        collected.append(result)
        if result.get_response().parameters["triton_final_response"].bool_param:
            break
    client.stop_stream()
    return collected


def test_streaming_sends_the_new_tokens_of_each_step(tiny: TinyGpt, server) -> None:
    """stream=true: every response carries the tokens since the previous one (one each at this load; several when
    sending falls behind), as the tail of the sequence (core_io.py): together they are the generation."""
    prompt, output_len = [11, 12, 13, 14], 6
    responses = _stream(server, seed_inputs(prompt, output_len, module=grpcclient, stream=np.array([[True]])))
    expected = hf_generate(tiny.hf, prompt, output_len)
    assert 1 <= len(responses) <= output_len
    streamed, previous = [], len(prompt)
    for result in responses:
        length = int(result.as_numpy("sequence_length")[0, 0])
        start = int(result.as_numpy("delta_start")[0, 0])
        tail = result.as_numpy("output_ids")[0, 0]
        assert start == previous < length and len(tail) < length  # a tail, not the cumulative layout
        streamed += tail[len(tail) - (length - start):].tolist()
        previous = length
    assert streamed == expected[len(prompt):]
    assert result.as_numpy("finish_code")[0, 0] == 2  # "length", on the last response only


def test_stream_false_sends_only_the_final_response(tiny: TinyGpt, server) -> None:
    prompt = [21, 22, 23]
    responses = _stream(server, seed_inputs(prompt, 5, module=grpcclient, stream=np.array([[False]])))
    assert len(responses) == 1
    assert responses[0].as_numpy("output_ids")[0, 0].tolist() == hf_generate(tiny.hf, prompt, 5)
