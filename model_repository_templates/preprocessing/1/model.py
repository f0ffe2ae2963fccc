"""Triton adapter: text requests -> FT request tensors. The logic lives in gpt_runtime.preprocess (plain, tested)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from gpt_runtime.contract import RequestError, model_parameters
from gpt_runtime.preprocess import (FT_OUTPUT_DTYPES, INPUT_TYPES, MAX_TOKENS, TEXT_INPUT, PreprocessConfig,
                                    preprocess_requests)
from gpt_runtime.tokenizer import GptTokenizer


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        model_config = json.loads(args["model_config"])
        inputs = {tensor["name"]: tensor["data_type"] for tensor in model_config.get("input", [])}
        unknown = sorted(set(inputs) - set(INPUT_TYPES))
        if unknown:
            raise ValueError(f"preprocessing: config declares inputs it cannot handle: {unknown}; "
                             f"known: {sorted(INPUT_TYPES)}")
        for name in (TEXT_INPUT, MAX_TOKENS):
            if name not in inputs:
                raise ValueError(f"preprocessing: config must declare the input '{name}'")
        for name, data_type in inputs.items():
            if data_type != INPUT_TYPES[name]:
                raise ValueError(f"preprocessing: input '{name}' must be {INPUT_TYPES[name]}, config says {data_type}")
        outputs = [tensor["name"] for tensor in model_config.get("output", [])]
        for tensor in model_config.get("output", []):
            expected = FT_OUTPUT_DTYPES.get(tensor["name"])
            if expected is not None and np.dtype(pb_utils.triton_string_to_numpy(tensor["data_type"])) != expected:
                raise ValueError(f"preprocessing: output '{tensor['name']}' must have dtype {np.dtype(expected)}, "
                                 f"config says {tensor['data_type']}")

        self.tokenizer = GptTokenizer.from_directory(Path(__file__).parent)
        parameters = model_parameters(model_config)
        self.config = PreprocessConfig.from_parameters(parameters, outputs, default_end_id=self.tokenizer.eos_id)
        self.config.check_tokenizer(self.tokenizer.vocab_size)
        self.logger = pb_utils.Logger
        self.logger.log_info(f"preprocessing: {self.tokenizer.vocab_size} tokens, max_pos_seq_len "
                             f"{self.config.max_pos_seq_len}, outputs {list(self.config.outputs)}")

    def execute(self, requests: list) -> list:
        # The inputs a request carries, in one call: a lookup per declared input (25 in preprocessing) cost ~40 us.
        batch_inputs = [{tensor.name(): tensor.as_numpy() for tensor in request.inputs()} for request in requests]
        try:
            results = preprocess_requests(batch_inputs, self.tokenizer, self.config)
        except Exception as err:  # noqa: BLE001  (a bug, not a bad request: say so to every request of the call)
            self.logger.log_error(f"preprocessing failed: {err!r}")
            error = pb_utils.TritonError(f"preprocessing failed: {err}", pb_utils.TritonError.INTERNAL)
            return [pb_utils.InferenceResponse(error=error) for _ in requests]

        responses = []
        for result in results:
            if isinstance(result, RequestError):
                error = pb_utils.TritonError(str(result), pb_utils.TritonError.INVALID_ARG)
                responses.append(pb_utils.InferenceResponse(error=error))
            else:
                responses.append(pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor(name, array) for name, array in result.items()]))
        return responses

    def finalize(self) -> None:
        self.logger.log_info("preprocessing: unloaded")
