"""Text in, text out inside the torch core model (`render --text-in-core`): no preprocessing/postprocessing models.

Why: every Python-backend model a request passes through costs a hand-over to its stub process and back, ~0.45 ms
of Triton's time even for an empty model on an H200 host, and in a streaming ensemble postprocessing is one such hop
per response (docs/benchmarks.md: the ensemble added 3.0 ms to the first token). Here the core model does the same
work in its own stub with the same plain modules: `preprocess_requests` turns each request's text inputs into the FT
tensors the core parses, and `postprocess_requests` turns each reply into text on the thread that sends it (the
sender thread of a decoupled core, never the engine's decode loop); a streamed request of one beam without log-probs
gets its text straight from its tokens there (`_TextStream`, the same rule per sequence: postprocess.stream_piece).

The model keeps the ensemble's tensors and name, so clients cannot tell the difference, and Triton cancels its
requests itself (no stream acknowledgements: stream_ack.py is for a core behind an ensemble).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import numpy as np

from . import contract
from .contract import RequestError
from .core_adapter import INTERNAL, INVALID, Reply, StreamingCore, Transport, run_static
from .core_io import STREAM_CONTEXT_TOKENS, RowOutput
from .metrics import EngineMetrics
from .postprocess import PostprocessConfig, postprocess_requests, stream_piece, text_arrays
from .preprocess import PreprocessConfig, core_requests, preprocess_requests
from .tokenizer import GptTokenizer

if TYPE_CHECKING:
    from .generation import GptEngine  # imports torch

Request = tuple[dict[str, np.ndarray], dict[str, np.ndarray]]  # (the core's FT inputs, what postprocessing reads)


Result = TypeVar("Result")


def _or_replies(count: int, preprocess: Callable[[], Sequence[Result | RequestError]]) -> list[Result | Reply]:
    """Preprocessing's answer for each of `count` requests, its errors as replies: a RequestError -> INVALID; an
    exception (a bug, not a bad request) -> INTERNAL, said to every request of the call."""
    try:
        results = preprocess()
    except Exception as err:  # noqa: BLE001  (a bug, not a bad request: every request of the call is told)
        return [Reply(error=f"preprocessing failed: {err}", kind=INTERNAL) for _ in range(count)]
    return [Reply(error=str(result), kind=INVALID) if isinstance(result, RequestError) else result
            for result in results]


@dataclass(frozen=True)
class TextCodec:
    tokenizer: GptTokenizer
    pre: PreprocessConfig
    post: PostprocessConfig
    outputs: tuple[str, ...]  # the model config's outputs (the text ensemble's)

    @classmethod
    def from_args(cls, args: Mapping[str, str], folder: Path) -> TextCodec | None:
        """From the model's Triton args; None where its config does not say `text_io` (FT's token tensors in and
        out)."""
        config = json.loads(args["model_config"])
        parameters = contract.model_parameters(config)
        if parameters.get("text_io", "false").strip().lower() != "true":
            return None
        tokenizer = GptTokenizer.from_directory(folder)
        core_inputs = [name for name in parameters.get("core_inputs", "").split(",") if name]
        pre = PreprocessConfig.from_parameters(parameters, core_inputs, default_end_id=tokenizer.eos_id)
        pre.check_tokenizer(tokenizer.vocab_size)
        post = PostprocessConfig.from_parameters(parameters, default_end_id=tokenizer.eos_id)
        return cls(tokenizer, pre, post, tuple(tensor["name"] for tensor in config.get("output", [])))

    def requests(self, inputs: Sequence[Mapping[str, np.ndarray]]) -> list[Request | Reply]:
        """Each request's text inputs -> its FT tensors and what its replies' postprocessing reads, or its error."""
        results = _or_replies(len(inputs), lambda: preprocess_requests(inputs, self.tokenizer, self.pre))
        requests: list[Request | Reply] = []
        for text_inputs, result in zip(inputs, results):
            if isinstance(result, Reply):
                requests.append(result)
                continue
            # Non-streaming postprocessing trims stop words and drops the prompt itself (postprocess.py).
            passed = {} if self.post.streaming else {
                **{name: result[name] for name in contract.POSTPROCESSING_FROM_PREPROCESSING if name in result},
                **{name: text_inputs[name] for name in (contract.EXCLUDE_INPUT,) if name in text_inputs}}
            requests.append((result, passed))
        return requests

    def reply(self, reply: Reply, passed: Mapping[str, np.ndarray]) -> Reply:
        """The core's reply (FT tensors) -> the text outputs; errors pass through."""
        if reply.arrays is None:
            return reply
        try:
            result = postprocess_requests([{**reply.arrays, **passed}], self.tokenizer, self.post)[0]
        except Exception as err:  # noqa: BLE001  (a bug: fail this request, not the sender thread)
            return Reply(error=f"postprocessing failed: {err}", kind=INTERNAL)
        if isinstance(result, RequestError):
            return Reply(error=str(result), kind=INVALID)
        arrays = {**result, **{name: reply.arrays[name] for name in contract.LOG_PROB_OUTPUTS if name in reply.arrays}}
        return Reply(arrays={name: arrays[name] for name in self.outputs if name in arrays})

    def around(self, core: StreamingCore | None) -> TextCore | None:
        """A decoupled core with text in and out (None, not decoupled: run_static below)."""
        if core is not None and not self.post.streaming:
            raise ValueError("a decoupled text core needs the streaming postprocessing (parameter streaming: true)")
        return None if core is None else TextCore(self, core)

    def run_static(self, engine: GptEngine, inputs: Sequence[Mapping[str, np.ndarray]],
                   cancelled: Sequence[Callable[[], bool]], metrics: EngineMetrics | None = None) -> list[Reply]:
        """core_adapter.run_static with text in and out."""
        answers = self.requests(inputs)
        valid = {i: request for i, request in enumerate(answers) if not isinstance(request, Reply)}
        replies = run_static(engine, [ft for ft, _ in valid.values()], [cancelled[i] for i in valid], metrics)
        for (i, (_, passed)), reply in zip(valid.items(), replies):
            answers[i] = self.reply(reply, passed)
        return [answer for answer in answers if isinstance(answer, Reply)]  # all of them by now


class TextCore:
    """A decoupled core (core_adapter.StreamingCore) with text in and out."""

    def __init__(self, codec: TextCodec, core: StreamingCore) -> None:
        self.codec, self.core = codec, core

    def submit(self, inputs: Mapping[str, np.ndarray], transport: Transport) -> None:
        """The request's rows straight from its text (preprocess.core_requests: no FT tensors between; on an H200 host
        0.07 ms less of the stub's time before a 512-token prompt reaches the scheduler, docs/gpu/runs-2026-12-04)."""
        (request,) = _or_replies(1, lambda: core_requests([inputs], self.codec.tokenizer, self.codec.pre,
                                                          self.core.limits))
        if isinstance(request, Reply):
            transport.send(request, final=True)
        elif request.stream and not request.return_log_probs and request.rows[0].beam_width == 1:
            self.core.submit_parsed(request, transport, _TextStream(self.codec, request.count_per_response))
        else:  # streaming postprocessing (the only kind a decoupled core has) reads nothing from preprocessing
            self.core.submit_parsed(request, _TextTransport(self.codec, transport, {}))

    def stop(self) -> str:
        return self.core.stop()


class _TextStream:
    """The responses of a streamed request of one beam without log-probs, straight from its rows' tokens: what
    core_io.StreamState's tail arrays become through `TextCodec.reply`, without those arrays between: on an H200 host
    0.06 ms of the stub's time per response where the arrays and their text took 0.18-0.24 (a token-id core's arrays:
    0.10; docs/gpu/runs-2026-12-04d). tests/test_text_in_core.py holds the two ways equal."""

    def __init__(self, codec: TextCodec, count_per_response: bool) -> None:
        self.codec, self.count_per_response = codec, count_per_response
        self.sent: list[int] | None = None  # each row's sequence length at the previous response

    def update(self, outputs: Sequence[RowOutput]) -> dict[str, np.ndarray]:
        texts, reasons, counts, lengths, prompts = [], [], [], [], []
        for row, out in enumerate(outputs):
            tokens, prompt = out.beams[0], out.prompt_len
            length = len(tokens)
            lengths.append(length)
            prompts.append(prompt)
            start = prompt if self.sent is None else self.sent[row]
            # the new tokens and a few before them: a character split across tokens needs its first bytes
            generated = tokens[max(prompt, min(start, length) - STREAM_CONTEXT_TOKENS):length].tolist()
            reason = out.finish_reason if out.finished or out.cancelled else ""
            text, reason, dropped = stream_piece(self.codec.tokenizer, generated, min(max(length - start, 0),
                                                 len(generated)), reason, self.codec.post.end_id)
            counted = start - prompt if self.count_per_response and self.sent is not None else 0
            texts.append(text.encode("utf-8"))
            reasons.append([reason])
            counts.append([length - prompt - dropped - counted])
        self.sent = lengths
        arrays = text_arrays(texts, reasons, prompts, counts)
        return {name: arrays[name] for name in self.codec.outputs if name in arrays}

    final = update  # a streamed request's last response is an update with its finish reason


class _TextTransport:
    """Turns each reply into text on the way out (on the core's sender thread)."""

    def __init__(self, codec: TextCodec, transport: Transport, passed: Mapping[str, np.ndarray]) -> None:
        self.codec, self.transport, self.passed = codec, transport, passed

    def send(self, reply: Reply, final: bool) -> None:
        self.transport.send(self.codec.reply(reply, self.passed), final)

    def is_cancelled(self) -> bool:
        return self.transport.is_cancelled()
