"""Triton Python-backend adapter: FasterTransformer's GPT tensor contract in front of the PyTorch engine.

Tensor work lives in `gpt_runtime/` (a copy of builder/runtime next to this file): `core_io` validates requests and
lays out FT's outputs, `generation.GptEngine` generates. A bad request gets its own INVALID_ARG error and the others
still run.
- Decoupled (streaming) mode batches in flight: `execute()` validates each request, hands the valid ones to an
  `InflightScheduler` (gpt_runtime/scheduler.py) and returns at once; the scheduler thread admits their rows into the
  running batch at the next step boundary and sends the responses through each request's response sender: with
  `stream` not false, one per generated token (cumulative output_ids, as FT does) and then the final one; otherwise
  only the final one. Each carries `delta_start`: where its new tokens start in output_ids (the previous response's
  sequence_length, or the prompt length for the first).
- Otherwise `execute()` runs every valid request of its dynamic batch as one static batch (GptEngine.generate) and
  returns their responses.

Parameters: model_dir (FT weights, relative to the version folder or absolute), data_type (fp32|fp16|bf16),
max_batch_size (KV-cache slots; default Triton's, shrunk to free GPU memory), max_seq_len, vocab_limit (ids >= it
are never generated: GPT-2's 50257 of a padded 50304).
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
        self.scheduler = None
        if self.decoupled:
            from gpt_runtime.scheduler import InflightScheduler

            # One line per admission and per cancellation, visible with --log-verbose=1.
            self.scheduler = InflightScheduler(self.engine, event_log=pb_utils.Logger.log_verbose).start()

    def execute(self, requests: list) -> list | None:
        if self.scheduler is not None:
            self._submit(requests)
            return None
        return self._execute_batch(requests)

    def _submit(self, requests: list) -> None:
        """Decoupled: validate each request and queue it; its responses come from the scheduler thread."""
        from gpt_runtime.generation import ResourceError

        for request in requests:
            sender = request.get_response_sender()
            try:
                parsed = parse_request(self._inputs(request), self.engine.limits)
                sink = _ResponseSink(sender, parsed.rows, log_probs=parsed.return_log_probs)
                self.scheduler.submit(parsed.rows, sink, stream=parsed.stream)
            except (RequestError, ResourceError) as err:
                sender.send(_error(str(err), pb_utils.TritonError.INVALID_ARG),
                            flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            except RuntimeError as err:  # the scheduler stopped (model unloading)
                sender.send(_error(str(err), pb_utils.TritonError.UNAVAILABLE),
                            flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    @staticmethod
    def _inputs(request: object) -> dict:
        inputs = {}
        for name in INPUT_NAMES:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is not None:
                inputs[name] = tensor.as_numpy()
        return inputs

    def _execute_batch(self, requests: list) -> list:
        """Not decoupled: every valid request of the dynamic batch in one engine call; one response each."""
        responses: list = [None] * len(requests)
        parsed: dict[int, tuple[list[GenerationRequest], bool]] = {}  # request -> (rows, log probs)
        for i, request in enumerate(requests):
            try:
                result = parse_request(self._inputs(request), self.engine.limits)
            except RequestError as err:
                responses[i] = _error(str(err), pb_utils.TritonError.INVALID_ARG)
                continue
            parsed[i] = (result.rows, result.return_log_probs)

        rows: list[GenerationRequest] = []
        owner: list[int] = []  # engine row -> Triton request
        first_row: dict[int, int] = {}
        for i, (request_rows, _) in parsed.items():
            first_row[i] = len(rows)
            rows += request_rows
            owner += [i] * len(request_rows)
        cancelled_requests: set[int] = set()

        def cancelled_rows() -> list[int]:  # polled by the engine a few times a second
            for i in parsed:
                if i not in cancelled_requests and _cancelled(requests[i]):
                    cancelled_requests.add(i)
            return [row for row, i in enumerate(owner) if i in cancelled_requests]

        try:
            outputs = self.engine.generate(rows, is_cancelled=cancelled_rows) if rows else []
        except Exception as err:  # noqa: BLE001  (one failed batch must not take the server down)
            for i in parsed:
                responses[i] = _error(f"generation failed: {err}", pb_utils.TritonError.INTERNAL)
            return responses
        for i, (request_rows, log_probs) in parsed.items():
            request_outputs = outputs[first_row[i]:first_row[i] + len(request_rows)]
            if any(output.cancelled for output in request_outputs):
                responses[i] = _error("request cancelled", pb_utils.TritonError.CANCELLED)
            else:
                responses[i] = _response(ft_outputs(request_rows, request_outputs, with_log_probs=log_probs))
        return responses

    def finalize(self) -> None:
        if self.scheduler is not None:
            stats = self.scheduler.stats
            self.scheduler.stop()
            pb_utils.Logger.log_info(
                f"in-flight scheduler: {stats.steps} steps, {stats.admitted_rows} rows admitted "
                f"({stats.joined_running_rows} joined a running batch), peak {stats.peak_rows} rows, "
                f"{stats.finished_requests} requests finished, {stats.failed_requests} failed")
        self.engine = None


def _cancelled(request_or_sender: object) -> bool:
    check = getattr(request_or_sender, "is_cancelled", None)  # absent before Triton 23.10
    return bool(check()) if check is not None else False


def _response(arrays: dict) -> "pb_utils.InferenceResponse":
    return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(name, value) for name, value in arrays.items()])


class _ResponseSink:
    """One decoupled request's responses, sent from the scheduler thread (gpt_runtime.scheduler.ResponseSink)."""

    def __init__(self, sender: object, rows: list[GenerationRequest], *, log_probs: bool) -> None:
        self.sender, self.rows, self.log_probs = sender, rows, log_probs
        self.sent_lengths: np.ndarray | None = None  # sequence_length of the previous response

    def _arrays(self, outputs: list[RowOutput]) -> dict:
        arrays = ft_outputs(self.rows, outputs, with_log_probs=self.log_probs)
        # Where this response's new tokens start (stateless postprocessing needs it): the previous response's
        # sequence_length, or the prompt length for the first one.
        start = arrays["response_input_lengths"] if self.sent_lengths is None else self.sent_lengths
        arrays["delta_start"] = start.astype(np.int32)
        self.sent_lengths = arrays["sequence_length"].astype(np.int32)
        return arrays

    def update(self, outputs: list[RowOutput]) -> None:
        self.sender.send(_response(self._arrays(outputs)))

    def finish(self, outputs: list[RowOutput]) -> None:
        if any(output.cancelled for output in outputs):
            response = _error("request cancelled", pb_utils.TritonError.CANCELLED)
        else:
            response = _response(self._arrays(outputs))
        self.sender.send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def fail(self, error: Exception) -> None:
        self.sender.send(_error(f"generation failed: {error}", pb_utils.TritonError.INTERNAL),
                         flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def is_cancelled(self) -> bool:
        return _cancelled(self.sender)
