"""Triton adapter: FT output tensors -> text (final, or delta per streamed response).

The logic lives in gpt_runtime.postprocess (plain, tested). In streaming repositories it first acknowledges each
request's stream to the core model (gpt_runtime/stream_ack.py: how the core notices a client that went away).
"""

from __future__ import annotations

import json
from pathlib import Path

import triton_python_backend_utils as pb_utils

from gpt_runtime.postprocess import PostprocessConfig, check_model_tensors, postprocess_requests, stream_acks
from gpt_runtime.contract import RequestError, model_parameters
from gpt_runtime.stream_ack import AckSender
from gpt_runtime.tokenizer import GptTokenizer


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        model_config = json.loads(args["model_config"])
        parameters = model_parameters(model_config)
        self.tokenizer = GptTokenizer.from_directory(Path(__file__).parent)
        self.config = PostprocessConfig.from_parameters(parameters, default_end_id=self.tokenizer.eos_id)
        inputs = {tensor["name"]: tensor["data_type"] for tensor in model_config.get("input", [])}
        outputs = {tensor["name"]: tensor["data_type"] for tensor in model_config.get("output", [])}
        check_model_tensors(self.config, inputs, outputs)
        self.output_names = list(outputs)
        self.acks = AckSender() if "stream_ack" in inputs else None
        self.logger = pb_utils.Logger
        self.logger.log_info(f"postprocessing: streaming={self.config.streaming}, end_id {self.config.end_id}, "
                             f"outputs {self.output_names}")

    def execute(self, requests: list) -> list:
        # The inputs a request carries, in one call: a lookup per declared input (25 in preprocessing) cost ~40 us.
        batch_inputs = [{tensor.name(): tensor.as_numpy() for tensor in request.inputs()} for request in requests]
        if self.acks is not None:
            self.acks.send(stream_acks(batch_inputs))
        try:
            results = postprocess_requests(batch_inputs, self.tokenizer, self.config)
        except Exception as err:  # noqa: BLE001  (a bug, not a bad request: say so to every request of the call)
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
