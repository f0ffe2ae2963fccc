"""The preprocessing/postprocessing model.py adapters without a server: config validation in `initialize` and one
response per request in `execute`, with a stand-in for `triton_python_backend_utils`."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import builder.runtime

ROOT = Path(__file__).resolve().parents[1]
TEMPLATES = ROOT / "model_repository_templates"
NUMPY_TYPES = {"TYPE_BOOL": bool, "TYPE_UINT32": np.uint32, "TYPE_UINT64": np.uint64, "TYPE_INT32": np.int32,
               "TYPE_FP32": np.float32, "TYPE_STRING": np.object_}


class FakeError:
    INVALID_ARG, INTERNAL = "INVALID_ARG", "INTERNAL"

    def __init__(self, message: str, code: str = "UNKNOWN"):
        self.message, self.code = message, code


class FakeResponse:
    def __init__(self, output_tensors: list | None = None, error: FakeError | None = None):
        self.tensors = {tensor.name(): tensor.array for tensor in output_tensors or []}
        self.error = error


class FakeTensor:
    def __init__(self, name: str, array: np.ndarray):
        self._name, self.array = name, array

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> np.ndarray:
        return self.array


class FakeRequest:
    """pb_utils.InferenceRequest as the adapters read it: `inputs()`, the tensors the request carries."""

    def __init__(self, **arrays: np.ndarray):
        self.tensors = [FakeTensor(name, array) for name, array in arrays.items()]

    def inputs(self) -> list[FakeTensor]:
        return self.tensors


@pytest.fixture
def pb_utils(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    module = types.ModuleType("triton_python_backend_utils")
    module.triton_string_to_numpy = NUMPY_TYPES.__getitem__
    module.Logger = types.SimpleNamespace(log_info=lambda msg: None, log_error=lambda msg: None)
    module.TritonError, module.InferenceResponse, module.Tensor = FakeError, FakeResponse, FakeTensor
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", module)
    monkeypatch.setitem(sys.modules, "gpt_runtime", builder.runtime)  # the renderer copies it as gpt_runtime/
    for name in ("contract", "tokenizer", "preprocess", "postprocess", "word_lists"):
        monkeypatch.setitem(sys.modules, f"gpt_runtime.{name}", importlib.import_module(f"builder.runtime.{name}"))
    return module


def load_model(tmp_path: Path, name: str, config: dict[str, Any], with_tokenizer: bool = True) -> Any:
    """Instantiate `name`'s TritonPythonModel from a copy laid out as in a rendered repository, and initialize it."""
    version = tmp_path / name / "1"
    version.mkdir(parents=True)
    shutil.copy(TEMPLATES / name / "1" / "model.py", version / "model.py")
    if with_tokenizer:
        for file in ("vocab.json", "merges.txt"):
            shutil.copy(ROOT / "builder" / "assets" / "gpt2" / file, version / file)
    spec = importlib.util.spec_from_file_location(f"adapter_{name}", version / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.TritonPythonModel()
    model.initialize({"model_config": json.dumps(config)})
    return model


def tensors(**types_by_name: str) -> list[dict[str, str]]:
    return [{"name": name, "data_type": data_type} for name, data_type in types_by_name.items()]


def params(**values: str) -> dict[str, dict[str, str]]:
    return {key: {"string_value": value} for key, value in values.items()}


PRE_INPUTS = {"text_input": "TYPE_STRING", "max_tokens": "TYPE_INT32", "top_k": "TYPE_INT32"}
PRE_OUTPUTS = {"input_ids": "TYPE_UINT32", "input_lengths": "TYPE_UINT32", "request_output_len": "TYPE_UINT32",
               "runtime_top_k": "TYPE_UINT32", "is_return_log_probs": "TYPE_BOOL"}
PRE_PARAMS = {"max_pos_seq_len": "64", "vocab_size": "50304"}


def pre_config(inputs: dict = PRE_INPUTS, outputs: dict = PRE_OUTPUTS, parameters: dict = PRE_PARAMS) -> dict:
    return {"input": tensors(**inputs), "output": tensors(**outputs), "parameters": params(**parameters)}


def test_preprocessing_execute_answers_each_request(tmp_path: Path, pb_utils: types.ModuleType) -> None:
    model = load_model(tmp_path, "preprocessing", pre_config())
    good = {"text_input": np.array([[b"1 2 3"]], dtype=np.object_), "max_tokens": np.array([[4]], dtype=np.int32)}
    bad = {**good, "top_k": np.array([[-1]], dtype=np.int32)}
    responses = model.execute([FakeRequest(**good), FakeRequest(**bad), FakeRequest(**good)])
    assert len(responses) == 3
    assert responses[0].error is None and responses[0].tensors["input_ids"].tolist() == [[16, 362, 513]]
    assert list(responses[0].tensors) == list(PRE_OUTPUTS)
    assert responses[1].error.code == FakeError.INVALID_ARG and "'top_k'" in responses[1].error.message
    assert responses[2].error is None


@pytest.mark.parametrize("config, fragment", [
    (pre_config(inputs={**PRE_INPUTS, "embedding_bias_words": "TYPE_STRING"}), "embedding_bias_words"),
    (pre_config(inputs={"text_input": "TYPE_STRING"}), "max_tokens"),
    (pre_config(inputs={**PRE_INPUTS, "top_k": "TYPE_FP32"}), "top_k"),
    (pre_config(outputs={**PRE_OUTPUTS, "runtime_top_k": "TYPE_INT32"}), "runtime_top_k"),
    (pre_config(parameters={"vocab_size": "50304"}), "max_pos_seq_len"),
    (pre_config(parameters={"max_pos_seq_len": "64", "vocab_size": "1000"}), "vocab_size"),
])
def test_preprocessing_rejects_bad_configs(tmp_path: Path, pb_utils: types.ModuleType, config: dict,
                                          fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        load_model(tmp_path, "preprocessing", config)


def test_missing_tokenizer_files_fail_initialize(tmp_path: Path, pb_utils: types.ModuleType) -> None:
    with pytest.raises(RuntimeError, match="vocab.json"):
        load_model(tmp_path, "preprocessing", pre_config(), with_tokenizer=False)


POST_INPUTS = {"output_ids": "TYPE_UINT32", "sequence_length": "TYPE_UINT32", "response_input_lengths": "TYPE_INT32"}
POST_OUTPUTS = {"text_output": "TYPE_STRING", "finish_reason": "TYPE_STRING"}


def post_config(streaming: str, inputs: dict = POST_INPUTS, outputs: dict = POST_OUTPUTS) -> dict:
    return {"input": tensors(**inputs), "output": tensors(**outputs), "parameters": params(streaming=streaming)}


def test_postprocessing_streaming_deltas(tmp_path: Path, pb_utils: types.ModuleType) -> None:
    model = load_model(tmp_path, "postprocessing", post_config("true"))
    request = FakeRequest(output_ids=np.array([[[16, 362, 513, 50256]]], dtype=np.uint32),
                          sequence_length=np.array([[3]], dtype=np.uint32),
                          response_input_lengths=np.array([[1]], dtype=np.int32))
    (response,) = model.execute([request])
    assert response.error is None
    assert response.tensors["text_output"].tolist() == [b" 3"]  # only the newest token; [B * beams] (TRT-LLM's)
    assert list(response.tensors) == list(POST_OUTPUTS)


@pytest.mark.parametrize("config, fragment", [
    (post_config("true", inputs={**POST_INPUTS, "stop_words_list": "TYPE_INT32"}), "stop_words_list"),
    (post_config("maybe"), "streaming"),
    (post_config("false", inputs={"output_ids": "TYPE_UINT32"}), "sequence_length"),
    (post_config("false", outputs={"text_output": "TYPE_INT32"}), "text_output"),
    (post_config("false", outputs={"finish_reason": "TYPE_STRING"}), "text_output"),
])
def test_postprocessing_rejects_bad_configs(tmp_path: Path, pb_utils: types.ModuleType, config: dict,
                                           fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        load_model(tmp_path, "postprocessing", config)
