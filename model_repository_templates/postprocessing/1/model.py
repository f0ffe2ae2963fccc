"""Triton adapter: FT output tensors -> text (final, or delta per streamed response).

The logic lives in gpt_runtime.postprocess (plain, tested).
"""

from __future__ import annotations

import json
from pathlib import Path

import triton_python_backend_utils as pb_utils

from gpt_runtime.postprocess import PostprocessConfig, postprocess_requests
from gpt_runtime.preprocess import RequestError
from gpt_runtime.tokenizer import GptTokenizer

CORE_INPUTS = {"output_ids": "TYPE_UINT32", "sequence_length": "TYPE_UINT32", "response_input_lengths": "TYPE_INT32"}
# From preprocessing or the ensemble: a step after a decoupled model may not read them, so non-streaming only.
# request_output_len is accepted for wiring symmetry but not needed: sequence_length and end_id tell how it ended.
REQUEST_INPUTS = {"request_output_len": "TYPE_UINT32", "end_id": "TYPE_UINT32", "stop_words_list": "TYPE_INT32",
                  "exclude_input_in_output": "TYPE_BOOL"}
# Streaming only, from a decoupled torch core: where each response's new tokens start in output_ids.
STREAM_INPUTS = {"delta_start": "TYPE_INT32"}
OUTPUTS = {"text_output": "TYPE_STRING", "finish_reason": "TYPE_STRING", "num_input_tokens": "TYPE_INT32",
           "num_output_tokens": "TYPE_INT32"}


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        model_config = json.loads(args["model_config"])
        parameters = {key: value.get("string_value", "")
                      for key, value in model_config.get("parameters", {}).items()}
        self.tokenizer = GptTokenizer.from_directory(Path(__file__).parent)
        self.config = PostprocessConfig.from_parameters(parameters, default_end_id=self.tokenizer.eos_id)

        inputs = {tensor["name"]: tensor["data_type"] for tensor in model_config.get("input", [])}
        allowed = {**CORE_INPUTS, **(STREAM_INPUTS if self.config.streaming else REQUEST_INPUTS)}
        unknown = sorted(set(inputs) - set(allowed))
        if unknown:
            mode = "streaming" if self.config.streaming else "non-streaming"
            raise ValueError(f"postprocessing ({mode}): config declares inputs it cannot use: {unknown}; "
                             f"allowed: {sorted(allowed)}")
        missing = sorted(set(CORE_INPUTS) - set(inputs))
        if missing:
            raise ValueError(f"postprocessing: config must declare the inputs {missing}")
        outputs = {tensor["name"]: tensor["data_type"] for tensor in model_config.get("output", [])}
        for name, data_type in {**inputs, **outputs}.items():
            expected = {**allowed, **OUTPUTS}.get(name)
            if expected is None:
                raise ValueError(f"postprocessing: unknown output '{name}'; known: {sorted(OUTPUTS)}")
            if data_type != expected:
                raise ValueError(f"postprocessing: '{name}' must be {expected}, config says {data_type}")
        if "text_output" not in outputs:
            raise ValueError("postprocessing: config must declare the output 'text_output'")
        self.input_names = list(inputs)
        self.output_names = list(outputs)
        self.logger = pb_utils.Logger
        self.logger.log_info(f"postprocessing: streaming={self.config.streaming}, end_id {self.config.end_id}, "
                             f"outputs {self.output_names}")

    def execute(self, requests: list) -> list:
        batch_inputs = []
        for request in requests:
            tensors = {}
            for name in self.input_names:
                tensor = pb_utils.get_input_tensor_by_name(request, name)
                if tensor is not None:
                    tensors[name] = tensor.as_numpy()
            batch_inputs.append(tensors)
        try:
            results = postprocess_requests(batch_inputs, self.tokenizer, self.config)
        except Exception as err:  # a bug, not a bad request: say so to every request of the call
            self.logger.log_error(f"postprocessing failed: {err!r}")
            error = pb_utils.TritonError(f"postprocessing failed: {err}", pb_utils.TritonError.INTERNAL)
            return [pb_utils.InferenceResponse(error=error) for _ in requests]

        responses = []
        for result in results:
            if isinstance(result, RequestError):
                error = pb_utils.TritonError(str(result), pb_utils.TritonError.INVALID_ARG)
                responses.append(pb_utils.InferenceResponse(error=error))
            else:
                responses.append(pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor(name, result[name]) for name in self.output_names]))
        return responses

    def finalize(self) -> None:
        self.logger.log_info("postprocessing: unloaded")
