"""Refused numeric values are never echoed in error messages (issue 11, item 2).

A local user registered a root-only /dev/shm file as a Triton shared-memory input region and read it back four bytes
at a time through our errors: `invalid input 'top_k': 1397772116 ...` is "TOPS". Any input can come from such a
region, so an error names the input and the limit, never the value. Each case sends the bytes of a secret as the
value and checks that no rendering of it (nor of another input's value) appears, while the input and limit do.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

from builder import GPT2_TOKENIZER_DIR
from builder.runtime import core_io, preprocess
from builder.runtime.tokenizer import GptTokenizer

SECRET = b"TOPS"
AS_INT32 = int(np.frombuffer(SECRET, np.int32)[0])  # 1397772116
AS_FP32 = float(np.frombuffer(SECRET, np.float32)[0])
NEGATIVE_FP32 = float(np.frombuffer(SECRET[:3] + bytes([SECRET[3] | 0x80]), np.float32)[0])  # sign bit set
ASSETS = GPT2_TOKENIZER_DIR
CONFIG = preprocess.PreprocessConfig(max_pos_seq_len=64, vocab_size=50304)


def renderings(value: float) -> set[str]:
    """How a value could show up in a message."""
    shown = {str(value), repr(value), f"{value:g}", f"{value:.6g}"}
    if isinstance(value, float):
        shown |= {str(np.float32(value)), f"{value:.3g}", f"{value:e}"}
        if value.is_integer() and abs(value) < 2**63:
            shown.add(str(int(value)))
    return shown


def assert_hidden(message: str, input_name: str, limit: str, *values: float) -> None:
    assert input_name in message and limit in message, message
    for value in values:
        for text in renderings(value):  # as a whole number: "7" must not match inside "[1, 8]" or "max_seq_len 64"
            assert not re.search(rf"(?<![\d.]){re.escape(text)}(?![\d.])", message), \
                f"{text!r} (a value the client sent) echoed in: {message}"


@pytest.fixture(scope="module")
def tokenizer() -> GptTokenizer:
    return GptTokenizer.from_directory(ASSETS)


def text_request(max_tokens: int = 5, prompt: str = "1 2 3 4 5", **scalars: np.ndarray) -> dict[str, np.ndarray]:
    return {"text_input": np.array([[prompt.encode()]], dtype=np.object_),
            "max_tokens": np.array([[max_tokens]], dtype=np.int32), **scalars}


def i32(value: int) -> np.ndarray:
    return np.array([[value]], dtype=np.int32)


def f32(value: float) -> np.ndarray:
    return np.array([[value]], dtype=np.float32)


# (case, request, input named, limit in the message, values that must not appear)
PREPROCESS_CASES = [
    ("max_tokens", text_request(AS_INT32), "'max_tokens'", "[1, 63]", AS_INT32),
    ("max_tokens negative", text_request(-AS_INT32), "'max_tokens'", "[1, 63]", -AS_INT32),
    ("top_k", text_request(top_k=i32(AS_INT32)), "'top_k'", "[0, 50304]", AS_INT32),
    ("top_k negative", text_request(top_k=i32(-AS_INT32)), "'top_k'", "[0, 50304]", -AS_INT32),
    ("top_p", text_request(top_p=f32(AS_FP32)), "'top_p'", "[0, 1]", AS_FP32),
    ("temperature", text_request(temperature=f32(NEGATIVE_FP32)), "'temperature'", ">= 0", NEGATIVE_FP32),
    ("repetition_penalty", text_request(repetition_penalty=f32(NEGATIVE_FP32)), "'repetition_penalty'", "> 0",
     NEGATIVE_FP32),
    ("beam_width", text_request(beam_width=i32(AS_INT32)), "'beam_width'", "[1, 8]", AS_INT32),
    ("end_id", text_request(end_id=i32(AS_INT32)), "'end_id'", "[0, 50304)", AS_INT32),
    ("pad_id", text_request(pad_id=i32(AS_INT32)), "'pad_id'", "[0, 50304)", AS_INT32),
    ("min_tokens negative", text_request(min_tokens=i32(-AS_INT32)), "'min_tokens'", ">= 0", -AS_INT32),
    ("num_return_sequences", text_request(num_return_sequences=i32(AS_INT32)), "'num_return_sequences'", "must be 1",
     AS_INT32),
    # max_tokens passed its own check here, but its value still must not leak through another input's error.
    ("min_tokens above max_tokens", text_request(37, min_tokens=i32(61)), "'min_tokens'", "<= max_tokens", 61, 37),
    ("prompt tokens + max_tokens", text_request(61), "'text_input'", "max_pos_seq_len 64", 61, 66),
    ("prompt bytes + max_tokens", text_request(37, prompt="1 " * 5000), "'text_input'", "max_pos_seq_len 64", 37,
     64 - 37),
]


@pytest.mark.parametrize("inputs, input_name, limit, hidden", [(c[1], c[2], c[3], c[4:]) for c in PREPROCESS_CASES],
                         ids=[c[0] for c in PREPROCESS_CASES])
def test_preprocessing_errors_name_input_and_limit_but_not_the_value(tokenizer: GptTokenizer, inputs: dict,
                                                                    input_name: str, limit: str,
                                                                    hidden: tuple) -> None:
    (result,) = preprocess.preprocess_requests([inputs], tokenizer, CONFIG)
    assert isinstance(result, preprocess.RequestError), result
    assert_hidden(str(result), input_name, limit, *hidden)


def test_every_numeric_preprocessing_input_is_covered() -> None:
    # any value fits, or true/false
    flags = ("random_seed", "return_log_probs", "stream", "exclude_input_in_output", "return_num_input_tokens",
             "return_num_output_tokens")
    numeric = {spec.name for spec in preprocess.SCALAR_INPUTS if spec.name not in flags}
    # refused only as inf/NaN: nothing but "finite" to tell
    numeric -= {"presence_penalty", "frequency_penalty", "len_penalty"}
    covered = {case[0].split()[0] for case in PREPROCESS_CASES}
    assert numeric | {"max_tokens"} <= covered


LIMITS = core_io.EngineLimits(vocab_size=1000, max_seq_len=64, max_batch_size=8, default_end_id=999)


def ft_request(**inputs: np.ndarray) -> dict[str, np.ndarray]:
    base = {"input_ids": np.array([[1, 2, 3]], np.uint32), "input_lengths": np.array([[3]], np.uint32),
            "request_output_len": np.array([[4]], np.uint32)}
    return {**base, **inputs}


def u32(value: int) -> np.ndarray:
    return np.array([[value]], dtype=np.uint32)


WORDS = np.array([[[AS_INT32, 7], [1, 2]]], np.int32)  # a secret read as a token id
OFFSETS = np.array([[[5, 6], [AS_INT32, -1]]], np.int32)  # a secret read as an offset
CORE_CASES = [
    ("input_lengths", ft_request(input_lengths=u32(AS_INT32)), "input_lengths", "[1, 3]", AS_INT32),
    ("request_output_len", ft_request(request_output_len=u32(AS_INT32)), "request_output_len", "max_seq_len 64",
     AS_INT32, AS_INT32 + 3),
    ("runtime_top_k", ft_request(runtime_top_k=u32(AS_INT32)), "runtime_top_k", "[0, 1000]", AS_INT32),
    ("runtime_top_p", ft_request(runtime_top_p=f32(AS_FP32)), "runtime_top_p", "[0, 1]", AS_FP32),
    ("temperature", ft_request(temperature=f32(NEGATIVE_FP32)), "temperature", ">= 0", NEGATIVE_FP32),
    ("repetition_penalty", ft_request(repetition_penalty=f32(NEGATIVE_FP32)), "repetition_penalty", "> 0",
     NEGATIVE_FP32),
    ("beam_width", ft_request(beam_width=u32(AS_INT32)), "beam_width", "[1, 8]", AS_INT32),
    ("beam_width x rows", ft_request(input_ids=np.ones((3, 3), np.uint32), input_lengths=np.full((3, 1), 3, np.uint32),
                                     request_output_len=np.full((3, 1), 4, np.uint32),
                                     beam_width=np.full((3, 1), 7, np.uint32)),
     "beam_width", "max_batch_size 8", 7, 21),
    ("mixed beam widths", ft_request(input_ids=np.ones((2, 3), np.uint32), input_lengths=np.full((2, 1), 3, np.uint32),
                                     request_output_len=np.full((2, 1), 4, np.uint32),
                                     beam_width=np.array([[5], [6]], np.uint32)),
     "beam_width", "the same for all rows", 5, 6),
    ("end_id", ft_request(end_id=u32(AS_INT32)), "end_id", "[0, 1000)", AS_INT32),
    ("min_length", ft_request(min_length=np.array([[-AS_INT32]], np.int64)), "min_length", ">= 0", -AS_INT32),
    ("stop word token id", ft_request(stop_words_list=WORDS), "stop_words_list", "[0, 1000)", AS_INT32),
    ("bad word offsets", ft_request(bad_words_list=OFFSETS), "bad_words_list", "non-decreasing", AS_INT32),
]


@pytest.mark.parametrize("inputs, input_name, limit, hidden", [(c[1], c[2], c[3], c[4:]) for c in CORE_CASES],
                         ids=[c[0] for c in CORE_CASES])
def test_core_model_errors_name_input_and_limit_but_not_the_value(inputs: dict, input_name: str, limit: str,
                                                                 hidden: tuple) -> None:
    with pytest.raises(core_io.RequestError) as info:
        core_io.parse_request(inputs, LIMITS)
    assert info.value.input_name == input_name
    assert_hidden(str(info.value), input_name, limit, *hidden)
