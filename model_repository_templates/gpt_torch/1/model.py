"""Triton Python-backend adapter: FasterTransformer's GPT tensor contract in front of the PyTorch engine.

Tensor work lives in `gpt_runtime/` (a copy of builder/runtime next to this file): `core_io` validates requests and
lays out FT's outputs, `generation.GptEngine` generates. Every valid request of a dynamic batch goes into ONE engine
call; a bad request gets its own INVALID_ARG error and the others still run. Decoupled mode streams one response per
generated token (cumulative output_ids, as FT does) to requests whose `stream` input is not false, then the final one.

Parameters (config.pbtxt): model_dir (FT weight folder, absolute or relative to the version folder; default
"<tensor_para_size>-gpu"), data_type (fp32|fp16|bf16), max_batch_size (KV-cache slots; default: Triton's
max_batch_size, shrunk to the free GPU memory), max_seq_len (default: the model's max_pos_seq_len), vocab_limit
(ids >= it are never generated, e.g. 50257 for GPT-2's padded 50304; default: none excluded, as FT).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpt_runtime.core_io import (  # noqa: E402  (needs the sys.path entry above)
    CAPABILITIES, REQUIRED_INPUTS, GenerationRequest, RequestError, RowOutput, ft_outputs, parse_request)

INPUT_NAMES = (*REQUIRED_INPUTS, *sorted(CAPABILITIES))
DATA_TYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def _error(message: str, code: int) -> "pb_utils.InferenceResponse":
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message, code))


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        import torch

        from gpt_runtime.generation import GptEngine

        model_config = json.loads(args["model_config"])
        params = {key: value["string_value"] for key, value in model_config.get("parameters", {}).items()}
        model_dir = Path(params.get("model_dir", f"{params.get('tensor_para_size', '1')}-gpu"))
        if not model_dir.is_absolute():
            model_dir = Path(args["model_repository"]) / args["model_version"] / model_dir
        data_type = params.get("data_type", "fp32")
        if data_type not in DATA_TYPES:
            raise ValueError(f"parameter data_type must be one of {sorted(DATA_TYPES)}, got {data_type!r}")
        gpu = args["model_instance_kind"] == "GPU"
        device = f"cuda:{args['model_instance_device_id']}" if gpu else "cpu"
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(model_config)
        self.engine = GptEngine.from_ft_dir(
            model_dir, device=device, dtype=getattr(torch, DATA_TYPES[data_type]),
            max_batch_size=int(params.get("max_batch_size", model_config.get("max_batch_size") or 1)),
            max_seq_len=int(params["max_seq_len"]) if "max_seq_len" in params else None,
            vocab_limit=int(params["vocab_limit"]) if "vocab_limit" in params else None,
            shrink_to_fit="max_batch_size" not in params)
        pb_utils.Logger.log_info(
            f"{args['model_name']}: {model_dir} on {device} ({data_type}), {self.engine.limits.max_batch_size} "
            f"KV-cache slots x {self.engine.limits.max_seq_len} tokens = {self.engine.kv_cache_bytes / 2**30:.2f} "
            f"GiB, decoupled={self.decoupled}")

    def execute(self, requests: list) -> list | None:
        senders = [r.get_response_sender() for r in requests] if self.decoupled else []
        responses: list = [None] * len(requests)
        parsed: dict[int, tuple[list[GenerationRequest], bool, bool]] = {}  # request -> (rows, stream, log probs)
        for i, request in enumerate(requests):
            inputs = {}
            for name in INPUT_NAMES:
                tensor = pb_utils.get_input_tensor_by_name(request, name)
                if tensor is not None:
                    inputs[name] = tensor.as_numpy()
            try:
                result = parse_request(inputs, self.engine.limits)
            except RequestError as err:
                responses[i] = _error(str(err), pb_utils.TritonError.INVALID_ARG)
                continue
            parsed[i] = (result.rows, result.stream and self.decoupled, result.return_log_probs)

        rows: list[GenerationRequest] = []
        owner: list[int] = []  # engine row -> Triton request
        first_row: dict[int, int] = {}
        for i, (request_rows, _, _) in parsed.items():
            first_row[i] = len(rows)
            rows += request_rows
            owner += [i] * len(request_rows)
        latest: list[RowOutput | None] = [None] * len(rows)
        cancelled_requests: set[int] = set()
        sent_lengths: dict[int, np.ndarray] = {}  # request -> sequence_length of its previous response

        def cumulative(i: int) -> dict:
            request_rows, _, log_probs = parsed[i]
            start = first_row[i]
            outputs = [latest[start + k] or RowOutput(prompt_len=len(row.input_ids),
                                                     beams=[list(row.input_ids)] * row.beam_width)
                       for k, row in enumerate(request_rows)]
            arrays = ft_outputs(request_rows, outputs, with_log_probs=log_probs)
            if self.decoupled:  # where this response's new tokens start (stateless postprocessing needs it)
                arrays["delta_start"] = sent_lengths.get(i, arrays["response_input_lengths"]).astype(np.int32)
                sent_lengths[i] = arrays["sequence_length"].astype(np.int32)
            return arrays

        def on_step(updates: list[tuple[int, RowOutput]]) -> None:
            touched = set()
            for row, output in updates:
                latest[row] = output
                touched.add(owner[row])
            for i in sorted(touched):
                rows_done = all(latest[first_row[i] + k] is not None and latest[first_row[i] + k].finished
                                for k in range(len(parsed[i][0])))
                # A request's last token goes out with the final response, so each response adds one token.
                if parsed[i][1] and not rows_done and i not in cancelled_requests:
                    senders[i].send(self._response(cumulative(i)))

        def cancelled_rows() -> list[int]:  # polled by the engine a few times a second
            for i in parsed:
                if i not in cancelled_requests and self._cancelled(senders[i] if self.decoupled else requests[i]):
                    cancelled_requests.add(i)
            return [row for row, i in enumerate(owner) if i in cancelled_requests]

        streaming = any(stream for _, stream, _ in parsed.values())
        try:
            if rows:
                latest = list(self.engine.generate(rows, on_step=on_step if streaming else None,
                                                   is_cancelled=cancelled_rows))
        except Exception as err:  # noqa: BLE001  (one failed batch must not take the server down)
            for i in parsed:
                responses[i] = _error(f"generation failed: {err}", pb_utils.TritonError.INTERNAL)
        else:
            for i in parsed:
                if any(latest[first_row[i] + k].cancelled for k in range(len(parsed[i][0]))):
                    responses[i] = _error("request cancelled", pb_utils.TritonError.CANCELLED)
                else:
                    responses[i] = self._response(cumulative(i))

        if not self.decoupled:
            return responses
        for sender, response in zip(senders, responses):
            sender.send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None

    @staticmethod
    def _cancelled(request_or_sender: object) -> bool:
        check = getattr(request_or_sender, "is_cancelled", None)  # absent before Triton 23.10
        return bool(check()) if check is not None else False

    @staticmethod
    def _response(arrays: dict) -> "pb_utils.InferenceResponse":
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(name, value)
                                                          for name, value in arrays.items()])

    def finalize(self) -> None:
        self.engine = None
