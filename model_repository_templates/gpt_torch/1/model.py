"""Triton Python-backend adapter: FasterTransformer's GPT tensor contract in front of the PyTorch engine.

The logic lives in `gpt_runtime/` (a copy of builder/runtime): core_adapter.py loads the engine and runs requests,
core_io.py validates them and lays out FT's outputs, text_core.py adds text in and out (render --text-in-core).
Decoupled (streaming repositories): each request is queued on the in-flight scheduler, here or in an engine process
(engine_process.py), and answered from a sender thread (updates only when `stream` is true; core_io.py describes the
streamed layout). Otherwise each dynamic batch runs as one static batch.
"""

from __future__ import annotations

import sys
from pathlib import Path

import triton_python_backend_utils as pb_utils

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpt_runtime.core_adapter import (  # needs the sys.path entry above
    CANCELLED, INTERNAL, INVALID, UNAVAILABLE, CoreSettings, EngineMetrics, Reply, release, run_static, start_model)
from gpt_runtime.text_core import TextCodec

CODES = {INVALID: "INVALID_ARG", UNAVAILABLE: "UNAVAILABLE", INTERNAL: "INTERNAL", CANCELLED: "CANCELLED"}


def _inputs(request: object) -> dict:
    return {tensor.name(): tensor.as_numpy() for tensor in request.inputs()}  # one call: a lookup per name is slower


def _response(reply: Reply) -> pb_utils.InferenceResponse:
    if reply.error is not None:
        error = pb_utils.TritonError(reply.error, getattr(pb_utils.TritonError, CODES[reply.kind]))
        return pb_utils.InferenceResponse(output_tensors=[], error=error)
    return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(n, a) for n, a in reply.arrays.items()])


def _cancelled(request_or_sender: object) -> bool:
    check = getattr(request_or_sender, "is_cancelled", None)  # absent before Triton 23.10
    return bool(check()) if check is not None else False


class _Transport:
    """core_adapter.Transport over a decoupled request's response sender."""

    def __init__(self, sender: object) -> None:
        self.sender = sender

    def send(self, reply: Reply, final: bool) -> None:
        self.sender.send(_response(reply), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL if final else 0)

    def is_cancelled(self) -> bool:
        return _cancelled(self.sender)


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        settings = CoreSettings.from_args(args)
        device = f"cuda:{args['model_instance_device_id']}" if args["model_instance_kind"] == "GPU" else "cpu"
        # Verbose: a line per admission and cancellation; info: the scheduler's timeline every 10 s of work.
        self.engine, self.core, self.metrics = start_model(
            settings, device, lambda slots: EngineMetrics(pb_utils, args["model_name"], args["model_instance_name"],
                                                          slots_total=slots),
            pb_utils.Logger.log_verbose, lambda text: pb_utils.Logger.log_info(f"{args['model_name']}: {text}"))
        self.text = TextCodec.from_args(args, Path(__file__).parent)  # None: FT's token tensors in and out
        self.core = self.core if self.text is None else self.text.around(self.core)

    def execute(self, requests: list) -> list | None:
        if self.core is not None:
            for request in requests:
                self.core.submit(_inputs(request), _Transport(request.get_response_sender()))
            return None
        run = run_static if self.text is None else self.text.run_static
        replies = run(self.engine, [_inputs(r) for r in requests], [lambda r=r: _cancelled(r) for r in requests],
                      self.metrics)
        return [_response(reply) for reply in replies]

    def finalize(self) -> None:
        if self.core is not None:
            pb_utils.Logger.log_info(self.core.stop())
        self.engine = release(self.engine)  # a tensor-parallel engine stops its worker processes
        self.metrics.stop()
