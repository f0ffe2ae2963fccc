"""Smoke test of the preprocessing and postprocessing model.py adapters in a real tritonserver (no core model):
hand-written configs in a temporary repository, laid out as the renderer does (gpt_runtime/ + tokenizer files next to
model.py), called over HTTP."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from builder import GPT2_TOKENIZER_DIR
from builder.runtime.tokenizer import GptTokenizer

ROOT = Path(__file__).resolve().parents[1]
ASSETS = GPT2_TOKENIZER_DIR
EOS = 50256

pytestmark = pytest.mark.server

PREPROCESSING_CONFIG = """
name: "preprocessing"
backend: "python"
max_batch_size: 8
dynamic_batching { max_queue_delay_microseconds: 300000 }
input [
  { name: "text_input" data_type: TYPE_STRING dims: [1] },
  { name: "max_tokens" data_type: TYPE_INT32 dims: [1] },
  { name: "stop_words" data_type: TYPE_STRING dims: [-1] optional: true allow_ragged_batch: true },
  { name: "top_k" data_type: TYPE_INT32 dims: [1] optional: true }
]
output [
  { name: "input_ids" data_type: TYPE_UINT32 dims: [-1] },
  { name: "input_lengths" data_type: TYPE_UINT32 dims: [1] },
  { name: "request_output_len" data_type: TYPE_UINT32 dims: [1] },
  { name: "runtime_top_k" data_type: TYPE_UINT32 dims: [1] },
  { name: "end_id" data_type: TYPE_UINT32 dims: [1] },
  { name: "stop_words_list" data_type: TYPE_INT32 dims: [2, -1] }
]
instance_group [ { count: 1 kind: KIND_CPU } ]
parameters { key: "max_pos_seq_len" value: { string_value: "32" } }
parameters { key: "vocab_size" value: { string_value: "50304" } }
parameters { key: "end_id" value: { string_value: "50256" } }
parameters { key: "pad_id" value: { string_value: "50256" } }
"""

POSTPROCESSING_CONFIG = """
name: "postprocessing"
backend: "python"
max_batch_size: 8
input [
  { name: "output_ids" data_type: TYPE_UINT32 dims: [-1, -1] },
  { name: "sequence_length" data_type: TYPE_UINT32 dims: [-1] },
  { name: "response_input_lengths" data_type: TYPE_INT32 dims: [-1] },
  { name: "end_id" data_type: TYPE_UINT32 dims: [1] optional: true },
  { name: "stop_words_list" data_type: TYPE_INT32 dims: [2, -1] optional: true }
]
output [
  { name: "text_output" data_type: TYPE_STRING dims: [-1] },
  { name: "finish_reason" data_type: TYPE_STRING dims: [-1] },
  { name: "num_input_tokens" data_type: TYPE_INT32 dims: [1] },
  { name: "num_output_tokens" data_type: TYPE_INT32 dims: [-1] }
]
instance_group [ { count: 1 kind: KIND_CPU } ]
parameters { key: "streaming" value: { string_value: "false" } }
"""


def add_model(repo: Path, name: str, config: str) -> None:
    version = repo / name / "1"
    version.mkdir(parents=True)
    (repo / name / "config.pbtxt").write_text(config)
    shutil.copy(ROOT / "model_repository_templates" / name / "1" / "model.py", version / "model.py")
    shutil.copytree(ROOT / "builder" / "runtime", version / "gpt_runtime",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for file in ("vocab.json", "merges.txt"):
        shutil.copy(ASSETS / file, version / file)


@pytest.fixture(scope="module")
def tokenizer() -> GptTokenizer:
    return GptTokenizer.from_directory(ASSETS)


def test_adapters_in_tritonserver(tmp_path: Path, start_server, tokenizer: GptTokenizer) -> None:
    httpclient = pytest.importorskip("tritonclient.http")
    from tritonclient.utils import InferenceServerException

    add_model(tmp_path, "preprocessing", PREPROCESSING_CONFIG)
    add_model(tmp_path, "postprocessing", POSTPROCESSING_CONFIG)
    server = start_server(tmp_path)
    client = httpclient.InferenceServerClient(server.http_url, concurrency=4)

    def preprocessing_inputs(prompts: list[str], max_tokens: int, top_k: int | None = None) -> list:
        tensors = [("text_input", np.array([[p.encode()] for p in prompts], dtype=np.object_), "BYTES"),
                   ("max_tokens", np.full((len(prompts), 1), max_tokens, dtype=np.int32), "INT32"),
                   ("stop_words", np.array([[b"Hawks"]] * len(prompts), dtype=np.object_), "BYTES")]
        if top_k is not None:
            tensors.append(("top_k", np.full((len(prompts), 1), top_k, dtype=np.int32), "INT32"))
        inputs = []
        for name, array, dtype in tensors:
            tensor = httpclient.InferInput(name, list(array.shape), dtype)
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        return inputs

    # Two rows in one request: right-padded ids, defaults filled, word list in FT format.
    result = client.infer("preprocessing", preprocessing_inputs(["1 2 3 4 5 6", "Hello"], max_tokens=4))
    ids = [tokenizer.encode("1 2 3 4 5 6"), tokenizer.encode("Hello")]
    assert result.as_numpy("input_ids").tolist() == [ids[0], ids[1] + [EOS] * 5]
    assert result.as_numpy("input_lengths").tolist() == [[6], [1]]
    assert result.as_numpy("runtime_top_k").tolist() == [[0], [0]]
    assert result.as_numpy("stop_words_list")[0].tolist() == [tokenizer.encode("Hawks") + tokenizer.encode(" Hawks"),
                                                              [2, 3, -1]]

    # Concurrent requests land in one dynamic batch; the bad ones fail alone, naming the input.
    pending = [client.async_infer("preprocessing", preprocessing_inputs(*args))
               for args in ((["a b c"], 4), (["a b c"], 4, -3), (["x " * 20], 20), (["d e"], 4, 2))]
    outcomes = []
    for request in pending:
        try:
            outcomes.append(request.get_result())
        except InferenceServerException as err:
            outcomes.append(err)
    assert outcomes[0].as_numpy("input_ids").tolist() == [tokenizer.encode("a b c")]
    assert isinstance(outcomes[1], InferenceServerException) and "'top_k'" in str(outcomes[1])
    assert isinstance(outcomes[2], InferenceServerException) and "max_pos_seq_len 32" in str(outcomes[2])
    assert outcomes[3].as_numpy("runtime_top_k").tolist() == [[2]]
    stats = client.get_inference_statistics("preprocessing")["model_stats"][0]
    assert stats["execution_count"] < stats["inference_count"], stats  # some requests did share an execute

    # Postprocessing: prompt cut off, end_id dropped, stop word trimmed.
    prompt = tokenizer.encode("Count:")
    rows = [tokenizer.encode(" 1 2 3") + [EOS], tokenizer.encode(" go Hawks")]
    total = len(prompt) + max(map(len, rows)) + 2
    output_ids = np.full((2, 1, total), EOS, dtype=np.uint32)
    for row, generated in enumerate(rows):
        output_ids[row, 0, :len(prompt) + len(generated)] = prompt + generated
    arrays = {"output_ids": output_ids,
              "sequence_length": np.array([[len(prompt) + len(g)] for g in rows], dtype=np.uint32),
              "response_input_lengths": np.full((2, 1), len(prompt), dtype=np.int32),
              "stop_words_list": np.array([[tokenizer.encode(" Hawks"), [1]]] * 2, dtype=np.int32)}
    inputs = []
    for name, array in arrays.items():
        tensor = httpclient.InferInput(name, list(array.shape), "UINT32" if array.dtype == np.uint32 else "INT32")
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    result = client.infer("postprocessing", inputs)
    assert result.as_numpy("text_output").tolist() == [b" 1 2 3", b" go"]  # [B * beams]: TRT-LLM's layout
    assert result.as_numpy("finish_reason").tolist() == [[b"stop"], [b"stop"]]
    assert result.as_numpy("num_input_tokens").tolist() == [[len(prompt)], [len(prompt)]]
    assert result.as_numpy("num_output_tokens").tolist() == [[len(rows[0]) - 1], [len(rows[1])]]
    client.close()
