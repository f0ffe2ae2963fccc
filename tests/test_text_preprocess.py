"""Preprocessing logic: per-request validation naming the input, defaults, multi-row requests, batched tokenization."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest

from builder.runtime.preprocess import (FT_OUTPUT_DTYPES, PreprocessConfig, PreprocessConfigError, RequestError,
                                        preprocess_requests)
from builder.runtime.tokenizer import GptTokenizer
from builder.runtime.word_lists import decode_word_list

ASSETS = Path(__file__).resolve().parents[1] / "builder" / "assets" / "gpt2"
CONFIG = PreprocessConfig(max_pos_seq_len=64, vocab_size=50304)


@pytest.fixture(scope="module")
def tokenizer() -> GptTokenizer:
    return GptTokenizer.from_directory(ASSETS)


def strings(*values: str | bytes) -> np.ndarray:
    """A STRING input of one row: shape [1, len(values)]."""
    return np.array([[v.encode() if isinstance(v, str) else v for v in values]], dtype=np.object_)


def scalar(value: float, dtype: type) -> np.ndarray:
    return np.array([[value]], dtype=dtype)


def request(**overrides: np.ndarray | None) -> dict[str, np.ndarray]:
    inputs: dict[str, np.ndarray | None] = {"text_input": strings("1 2 3 4 5"),
                                            "max_tokens": scalar(5, np.int32), **overrides}
    return {name: value for name, value in inputs.items() if value is not None}


BAD_REQUESTS = [
    # (case, overrides, input named in the error, text the message must contain)
    ("empty prompt", {"text_input": strings("")}, "text_input", "empty"),
    ("invalid utf-8", {"text_input": strings(b"ok \xff\xfe")}, "text_input", "UTF-8"),
    ("no prompt", {"text_input": None}, "text_input", "required"),
    ("no max_tokens", {"max_tokens": None}, "max_tokens", "required"),
    ("max_tokens 0", {"max_tokens": scalar(0, np.int32)}, "max_tokens", "[1, 63]"),
    ("max_tokens negative", {"max_tokens": scalar(-5, np.int32)}, "max_tokens", "[1, 63]"),
    ("max_tokens two values", {"max_tokens": np.array([[5, 6]], dtype=np.int32)}, "max_tokens", "shape"),
    ("too long", {"max_tokens": scalar(60, np.int32)}, "text_input", "+ max_tokens must be <= max_pos_seq_len 64"),
    ("top_k negative", {"top_k": scalar(-1, np.int32)}, "top_k", "[0, 50304]"),
    ("top_k above vocab", {"top_k": scalar(60000, np.int32)}, "top_k", "[0, 50304]"),
    ("top_p above 1", {"top_p": scalar(1.5, np.float32)}, "top_p", "[0, 1]"),
    ("top_p negative", {"top_p": scalar(-0.1, np.float32)}, "top_p", "[0, 1]"),
    ("top_p nan", {"top_p": scalar(math.nan, np.float32)}, "top_p", "[0, 1]"),
    ("temperature negative", {"temperature": scalar(-1, np.float32)}, "temperature", ">= 0"),
    ("temperature inf", {"temperature": scalar(math.inf, np.float32)}, "temperature", "finite"),
    ("repetition_penalty 0", {"repetition_penalty": scalar(0, np.float32)}, "repetition_penalty", "> 0"),
    ("presence_penalty inf", {"presence_penalty": scalar(math.inf, np.float32)}, "presence_penalty", "finite"),
    ("len_penalty nan", {"len_penalty": scalar(math.nan, np.float32)}, "len_penalty", "finite"),
    ("min_tokens above max", {"min_tokens": scalar(6, np.int32)}, "min_tokens", "must be <= max_tokens"),
    ("min_tokens negative", {"min_tokens": scalar(-1, np.int32)}, "min_tokens", ">= 0"),
    ("beam_width 0", {"beam_width": scalar(0, np.int32)}, "beam_width", "[1, 8]"),
    ("beam_width 9", {"beam_width": scalar(9, np.int32)}, "beam_width", "[1, 8]"),
    ("end_id = vocab", {"end_id": scalar(50304, np.int32)}, "end_id", "[0, 50304)"),
    ("end_id negative", {"end_id": scalar(-1, np.int32)}, "end_id", "[0, 50304)"),
    ("pad_id too big", {"pad_id": scalar(99999, np.int32)}, "pad_id", "[0, 50304)"),
    ("too many stop words", {"stop_words": strings(*[f"w{i}" for i in range(65)])}, "stop_words", "limit is 64"),
    ("stop word too long", {"stop_words": strings("x" * 300)}, "stop_words", "limit is 256"),
    ("bad word invalid utf-8", {"bad_words": strings(b"\xc3")}, "bad_words", "UTF-8"),
]


# Values sent (or derived from them) that the message must not echo: any input can come from a shared-memory region
# (tests/test_error_values.py plays that attack).
NOT_ECHOED = {
    "max_tokens negative": ("-5",), "too long": ("60", "65"), "top_k above vocab": ("60000",),
    "top_p above 1": ("1.5",), "top_p negative": ("-0.1",), "temperature negative": ("-1",), "beam_width 9": ("9",),
    "min_tokens above max": ("6", "5"), "end_id negative": ("-1",), "pad_id too big": ("99999",),
}


@pytest.mark.parametrize("case, overrides, input_name, fragment", BAD_REQUESTS, ids=[case[0] for case in BAD_REQUESTS])
def test_bad_request_names_input_and_limit(tokenizer: GptTokenizer, case: str, overrides: dict, input_name: str,
                                           fragment: str) -> None:
    (result,) = preprocess_requests([request(**overrides)], tokenizer, CONFIG)
    assert isinstance(result, RequestError), result
    assert result.input_name == input_name
    assert fragment in str(result) and f"'{input_name}'" in str(result)
    for value in NOT_ECHOED.get(case, ()):
        assert not re.search(rf"(?<![\d.]){re.escape(value)}(?![\d.])", str(result)), str(result)


def test_word_list_token_limit(tokenizer: GptTokenizer) -> None:
    config = PreprocessConfig(max_pos_seq_len=64, vocab_size=50304, max_word_list_tokens=5)
    (result,) = preprocess_requests([request(stop_words=strings("one two three"))], tokenizer, config)
    assert isinstance(result, RequestError) and result.input_name == "stop_words"
    assert "limit is 5" in str(result)


def test_bad_row_is_named(tokenizer: GptTokenizer) -> None:
    inputs = {"text_input": np.array([[b"a"], [b"b"], [b"c"]], dtype=np.object_),
              "max_tokens": np.array([[1], [2], [3]], dtype=np.int32),
              "top_p": np.array([[0.5], [2.0], [0.5]], dtype=np.float32)}
    (result,) = preprocess_requests([inputs], tokenizer, CONFIG)
    assert isinstance(result, RequestError) and result.input_name == "top_p" and "(row 1)" in str(result)


def test_bad_request_does_not_affect_the_others(tokenizer: GptTokenizer) -> None:
    good_a, good_b = request(), request(text_input=strings("Hello world"), top_k=scalar(3, np.int32))
    results = preprocess_requests([good_a, request(top_k=scalar(-1, np.int32)), good_b], tokenizer, CONFIG)
    assert isinstance(results[1], RequestError)
    for got, alone in zip((results[0], results[2]), (good_a, good_b)):
        (expected,) = preprocess_requests([alone], tokenizer, CONFIG)
        assert got.keys() == expected.keys()
        for name in got:
            np.testing.assert_array_equal(got[name], expected[name])


def test_defaults_fill_every_ft_tensor(tokenizer: GptTokenizer) -> None:
    (result,) = preprocess_requests([request()], tokenizer, CONFIG)
    assert list(result) == list(FT_OUTPUT_DTYPES)
    for name, array in result.items():
        assert array.dtype == FT_OUTPUT_DTYPES[name], name
    prompt = tokenizer.encode("1 2 3 4 5")
    assert result["input_ids"].tolist() == [prompt]
    assert result["input_lengths"].tolist() == [[len(prompt)]]
    assert result["request_output_len"].tolist() == [[5]]
    expected = {"runtime_top_k": 0, "runtime_top_p": 0.0, "temperature": 1.0, "repetition_penalty": 1.0,
                "presence_penalty": 0.0, "min_length": 0, "len_penalty": 0.0, "beam_width": 1, "random_seed": 0,
                "end_id": 50256, "is_return_log_probs": False}
    assert {name: result[name].tolist() for name in expected} == {name: [[v]] for name, v in expected.items()}
    assert result["stop_words_list"].tolist() == [[[0], [-1]]]
    assert result["bad_words_list"].tolist() == [[[0], [-1]]]


def test_given_values_pass_through(tokenizer: GptTokenizer) -> None:
    (result,) = preprocess_requests([request(top_k=scalar(40, np.int32), top_p=scalar(0.9, np.float32),
                                             temperature=scalar(0.7, np.float32), beam_width=scalar(4, np.int32),
                                             random_seed=scalar(2**63 + 5, np.uint64),
                                             return_log_probs=scalar(True, np.bool_),
                                             min_tokens=scalar(2, np.int32), end_id=scalar(13, np.int32))],
                                    tokenizer, CONFIG)
    assert result["runtime_top_k"].tolist() == [[40]]
    assert result["runtime_top_p"].tolist() == [[np.float32(0.9)]]
    assert result["temperature"].tolist() == [[np.float32(0.7)]]
    assert result["beam_width"].tolist() == [[4]]
    assert result["random_seed"].tolist() == [[2**63 + 5]]
    assert result["is_return_log_probs"].tolist() == [[True]]
    assert result["min_length"].tolist() == [[2]]
    assert result["end_id"].tolist() == [[13]]


def test_temperature_zero_means_greedy(tokenizer: GptTokenizer) -> None:
    (result,) = preprocess_requests([request(temperature=scalar(0.0, np.float32), top_p=scalar(0.9, np.float32))],
                                    tokenizer, CONFIG)
    assert (result["runtime_top_k"].item(), result["runtime_top_p"].item(), result["temperature"].item()) == \
        (1, 0.0, 1.0)


def test_eight_prompts_in_one_request(tokenizer: GptTokenizer) -> None:
    from transformers import GPT2TokenizerFast

    hf = GPT2TokenizerFast.from_pretrained(str(ASSETS))
    prompts = ["1 2 3", "Hello world", "日本語", "a", "emoji 😀 here", " leading space", "x\ny", "The end."]
    inputs = {"text_input": np.array([[p.encode()] for p in prompts], dtype=np.object_),
              "max_tokens": np.arange(1, 9, dtype=np.int32).reshape(8, 1),
              "pad_id": np.full((8, 1), 7, dtype=np.int32),
              "stop_words": np.array([[b"Hawks", b""]] * 8, dtype=np.object_)}
    (result,) = preprocess_requests([inputs], tokenizer, CONFIG)
    expected = [hf.encode(p) for p in prompts]
    width = max(map(len, expected))
    assert result["input_ids"].shape == (8, width)
    assert result["input_ids"].tolist() == [ids + [7] * (width - len(ids)) for ids in expected]
    assert result["input_lengths"].tolist() == [[len(ids)] for ids in expected]
    assert result["request_output_len"].tolist() == [[n] for n in range(1, 9)]
    assert result["temperature"].shape == (8, 1)
    assert result["stop_words_list"].shape[:2] == (8, 2)
    for row in result["stop_words_list"]:
        assert decode_word_list(row) == [hf.encode("Hawks"), hf.encode(" Hawks")]


def test_one_encode_call_per_execute(tokenizer: GptTokenizer) -> None:
    calls: list[int] = []

    class CountingTokenizer(GptTokenizer):
        def encode_batch(self, texts):
            calls.append(len(texts))
            return super().encode_batch(texts)

    counting = CountingTokenizer(tokenizer._tokenizer, tokenizer.token_bytes, tokenizer.eos_id)
    requests = [request(stop_words=strings("a", "b")), request(), request(bad_words=strings("c"))]
    results = preprocess_requests(requests, counting, CONFIG)
    assert all(isinstance(r, dict) for r in results)
    assert calls == [3 + 4 + 2]  # 3 prompts + 4 stop-word variants + 2 bad-word variants


def test_output_subset(tokenizer: GptTokenizer) -> None:
    config = PreprocessConfig(max_pos_seq_len=64, vocab_size=50304,
                              outputs=("input_ids", "input_lengths", "request_output_len", "runtime_top_k"))
    (result,) = preprocess_requests([request(temperature=scalar(0.0, np.float32))], tokenizer, config)
    assert list(result) == ["input_ids", "input_lengths", "request_output_len", "runtime_top_k"]


@pytest.mark.parametrize("parameters, outputs, fragment", [
    ({"vocab_size": "50304"}, ["input_ids", "input_lengths", "request_output_len"], "max_pos_seq_len"),
    ({"max_pos_seq_len": "x", "vocab_size": "50304"}, ["input_ids", "input_lengths", "request_output_len"],
     "integer"),
    ({"max_pos_seq_len": "0", "vocab_size": "50304"}, ["input_ids", "input_lengths", "request_output_len"], ">= 1"),
    ({"max_pos_seq_len": "64", "vocab_size": "100", "end_id": "50256"},
     ["input_ids", "input_lengths", "request_output_len"], "end_id"),
    ({"max_pos_seq_len": "64", "vocab_size": "50304"}, ["input_ids", "input_lengths"], "request_output_len"),
    ({"max_pos_seq_len": "64", "vocab_size": "50304"}, ["input_ids", "input_lengths", "request_output_len", "foo"],
     "foo"),
])
def test_config_errors(parameters: dict, outputs: list, fragment: str) -> None:
    with pytest.raises(PreprocessConfigError, match=fragment):
        PreprocessConfig.from_parameters(parameters, outputs)


def test_config_from_parameters() -> None:
    config = PreprocessConfig.from_parameters({"max_pos_seq_len": "2048", "vocab_size": "50304", "pad_id": "0"},
                                              ["input_ids", "input_lengths", "request_output_len"])
    assert (config.max_pos_seq_len, config.vocab_size, config.end_id, config.default_pad_id) == (2048, 50304, 50256, 0)


# ---- names other clients send (issue 13; docs/client_compat.md) ---------------------------------------------------

@pytest.mark.parametrize(("alias", "name", "value", "dtype", "output"), [
    ("seed", "random_seed", 7, np.uint64, "random_seed"),
    ("min_length", "min_tokens", 3, np.int32, "min_length"),
    ("length_penalty", "len_penalty", 0.5, np.float32, "len_penalty"),
])
def test_client_aliases_mean_our_names(tokenizer: GptTokenizer, alias: str, name: str, value: float, dtype: type,
                                       output: str) -> None:
    (by_alias,) = preprocess_requests([request(**{alias: scalar(value, dtype)})], tokenizer, CONFIG)
    (by_name,) = preprocess_requests([request(**{name: scalar(value, dtype)})], tokenizer, CONFIG)
    assert not isinstance(by_alias, RequestError) and not isinstance(by_name, RequestError), (by_alias, by_name)
    assert by_alias[output].tolist() == by_name[output].tolist() == [[value]]
    (both,) = preprocess_requests([request(**{alias: scalar(value, dtype), name: scalar(value, dtype)})], tokenizer,
                                  CONFIG)
    assert isinstance(both, RequestError) and both.input_name == alias and f"'{name}'" in str(both)


def test_num_return_sequences_one_is_accepted_and_more_refused(tokenizer: GptTokenizer) -> None:
    (one,) = preprocess_requests([request(num_return_sequences=scalar(1, np.int32))], tokenizer, CONFIG)
    assert not isinstance(one, RequestError), one
    (two,) = preprocess_requests([request(num_return_sequences=scalar(2, np.int32))], tokenizer, CONFIG)
    assert isinstance(two, RequestError) and two.input_name == "num_return_sequences" and "beam_width" in str(two)


def test_stream_is_refused_by_name_where_the_repository_cannot_honour_it(tokenizer: GptTokenizer) -> None:
    plain = CONFIG
    ft_streaming = PreprocessConfig(max_pos_seq_len=64, vocab_size=50304, streaming=True,
                                    outputs=tuple(n for n in FT_OUTPUT_DTYPES if n != "stream"))
    torch_streaming = PreprocessConfig(max_pos_seq_len=64, vocab_size=50304, streaming=True)
    cases = [(plain, False, None), (plain, True, "--streaming"), (ft_streaming, True, None),
             (ft_streaming, False, "must be true"), (torch_streaming, True, None), (torch_streaming, False, None)]
    for config, stream, refusal in cases:
        (result,) = preprocess_requests([request(stream=scalar(stream, np.bool_))], tokenizer, config)
        if refusal is None:
            assert not isinstance(result, RequestError), (config, stream, result)
            if "stream" in config.outputs:  # a streaming torch core gets it explicitly
                assert result["stream"].tolist() == [[stream]]
        else:
            assert isinstance(result, RequestError) and result.input_name == "stream" and refusal in str(result)


def test_exclude_input_in_output_reaches_a_streaming_core(tokenizer: GptTokenizer) -> None:
    config = PreprocessConfig(max_pos_seq_len=64, vocab_size=50304, streaming=True)
    (absent,) = preprocess_requests([request()], tokenizer, config)
    (echo,) = preprocess_requests([request(exclude_input_in_output=scalar(False, np.bool_))], tokenizer, config)
    assert not isinstance(absent, RequestError) and not isinstance(echo, RequestError)
    assert absent["exclude_input_in_output"].tolist() == [[True]]
    assert echo["exclude_input_in_output"].tolist() == [[False]]
    assert absent["stream"].tolist() == [[False]]  # always explicit: no `stream` means FT's streaming to the core


def test_frequency_penalty_reaches_the_core(tokenizer: GptTokenizer) -> None:
    (result,) = preprocess_requests([request(frequency_penalty=scalar(0.5, np.float32))], tokenizer, CONFIG)
    assert not isinstance(result, RequestError) and result["frequency_penalty"].tolist() == [[0.5]]
    (bad,) = preprocess_requests([request(frequency_penalty=scalar(math.inf, np.float32))], tokenizer, CONFIG)
    assert isinstance(bad, RequestError) and bad.input_name == "frequency_penalty" and "finite" in str(bad)


@pytest.mark.parametrize("overrides", [{}, {"top_k": scalar(5, np.int32), "stop_words": strings("3")},
                                       {"temperature": scalar(0.0, np.float32), "exclude_input_in_output":
                                        scalar(False, np.bool_), "random_seed": scalar(7, np.uint64)}])
@pytest.mark.parametrize("streaming", [True, False])
def test_left_out_defaults_give_the_core_the_same_request(tokenizer: GptTokenizer, overrides: dict,
                                                          streaming: bool) -> None:
    """omit_defaults: the tensors a request does not set stay out, and the core parses what is left into exactly the
    rows it parses from every tensor (its defaults for a missing input are preprocessing's). What a non-streaming
    repository's postprocessing reads from preprocessing stays in."""
    from builder.runtime.core_io import EngineLimits, parse_request

    every = PreprocessConfig(max_pos_seq_len=64, vocab_size=50304, streaming=streaming, end_id=50256)
    fewer = PreprocessConfig(max_pos_seq_len=64, vocab_size=50304, streaming=streaming, end_id=50256,
                             omit_defaults=True)
    (full,) = preprocess_requests([request(**overrides)], tokenizer, every)
    (short,) = preprocess_requests([request(**overrides)], tokenizer, fewer)
    assert not isinstance(full, RequestError) and not isinstance(short, RequestError)
    assert set(short) < set(full)
    assert {"input_ids", "input_lengths", "request_output_len", "stream", "end_id"} <= set(short)
    # (temperature 0 is sent as top_k 1: greedy in FT's terms)
    assert ("runtime_top_k" in short) == bool({"top_k", "temperature"} & set(overrides))
    assert ("stop_words_list" in short) == ("stop_words" in overrides or not streaming)
    limits = EngineLimits(vocab_size=50304, max_seq_len=64, max_batch_size=8, default_end_id=50256)
    assert parse_request(short, limits) == parse_request(full, limits)


def test_a_vocabulary_smaller_than_the_tokenizers_is_refused() -> None:
    config = PreprocessConfig(max_pos_seq_len=64, vocab_size=1000, end_id=0)
    config.check_tokenizer(1000)
    with pytest.raises(PreprocessConfigError, match=r"vocab_size 1000 is smaller than the tokenizer's 50257 tokens"):
        config.check_tokenizer(50257)


TEXT_CORE_REQUESTS = [
    {}, {"top_k": scalar(5, np.int32), "stop_words": strings("3", "4 5")}, {"temperature": scalar(0.0, np.float32)},
    {"temperature": scalar(0.7, np.float32), "top_p": scalar(0.9, np.float32), "random_seed": scalar(7, np.uint64)},
    {"bad_words": strings("2", "", "4"), "min_tokens": scalar(3, np.int32), "end_id": scalar(13, np.int32)},
    {"repetition_penalty": scalar(1.3, np.float32), "presence_penalty": scalar(0.5, np.float32),
     "frequency_penalty": scalar(-0.25, np.float32), "len_penalty": scalar(0.1, np.float32)},
    {"beam_width": scalar(2, np.int32), "return_log_probs": scalar(True, np.bool_)},
    {"stream": scalar(True, np.bool_), "exclude_input_in_output": scalar(False, np.bool_),
     "return_num_output_tokens": scalar(True, np.bool_)},
    {"text_input": np.array([[b"1 2 3"], [b"Hello there, world"], [b"x"]], dtype=np.object_),
     "max_tokens": np.array([[5], [3], [9]], dtype=np.int32), "top_k": np.array([[1], [0], [7]], dtype=np.int32),
     "stop_words": np.array([[b"a", b"b"], [b"", b""], [b"world", b""]], dtype=np.object_),
     "pad_id": np.array([[0], [1], [2]], dtype=np.int32)},
]


@pytest.mark.parametrize("overrides", TEXT_CORE_REQUESTS, ids=[",".join(r) or "defaults" for r in TEXT_CORE_REQUESTS])
@pytest.mark.parametrize("omit_defaults", [True, False])
def test_a_text_core_gets_the_rows_the_core_parses_from_the_tensors(tokenizer: GptTokenizer, overrides: dict,
                                                                    omit_defaults: bool) -> None:
    """core_requests (a text core: no FT tensors between) == parse_request(preprocess_requests(...)): every field of
    every row, and the request's streaming flags."""
    from builder.runtime.core_io import EngineLimits, parse_request
    from builder.runtime.preprocess import core_requests

    config = PreprocessConfig(max_pos_seq_len=64, vocab_size=50304, streaming=True, end_id=50256,
                              omit_defaults=omit_defaults)
    limits = EngineLimits(vocab_size=50304, max_seq_len=64, max_batch_size=8, default_end_id=50256)
    (tensors,) = preprocess_requests([request(**overrides)], tokenizer, config)
    (direct,) = core_requests([request(**overrides)], tokenizer, config, limits)
    assert not isinstance(tensors, RequestError) and not isinstance(direct, RequestError), (tensors, direct)
    assert direct == parse_request(tensors, limits)
    assert len(direct.rows) == len(request(**overrides)["text_input"])


@pytest.mark.parametrize("case, overrides, input_name, fragment", BAD_REQUESTS, ids=[case[0] for case in BAD_REQUESTS])
def test_a_text_core_refuses_what_preprocessing_refuses(tokenizer: GptTokenizer, case: str, overrides: dict,
                                                        input_name: str, fragment: str) -> None:
    from builder.runtime.core_io import EngineLimits
    from builder.runtime.preprocess import core_requests

    limits = EngineLimits(vocab_size=50304, max_seq_len=64, max_batch_size=8, default_end_id=50256)
    (direct,) = core_requests([request(**overrides)], tokenizer, CONFIG, limits)
    assert isinstance(direct, RequestError) and direct.input_name == input_name and fragment in str(direct)


@pytest.mark.parametrize("limits_change, overrides, fragment", [
    ({"max_seq_len": 8}, {}, "input_lengths + request_output_len must be <= the engine's max_seq_len 8"),
    ({"max_batch_size": 3}, {"beam_width": scalar(4, np.int32)}, "rows x beam_width must be <= the engine's"),
    ({"vocab_size": 10}, {}, "end_id': row 0: must be a token id in [0, 10)"),  # the default end id 50256
])
def test_a_text_core_checks_the_engine_limits_as_the_core_does(tokenizer: GptTokenizer, limits_change: dict,
                                                               overrides: dict, fragment: str) -> None:
    """What only the engine can refuse (its sequence length, slots, vocabulary): the same error either way."""
    import dataclasses

    from builder.runtime.core_io import EngineLimits, parse_request
    from builder.runtime.preprocess import core_requests

    limits = dataclasses.replace(EngineLimits(vocab_size=50304, max_seq_len=64, max_batch_size=8,
                                              default_end_id=50256), **limits_change)
    (tensors,) = preprocess_requests([request(**overrides)], tokenizer, CONFIG)
    with pytest.raises(RequestError) as expected:
        parse_request(tensors, limits)
    (direct,) = core_requests([request(**overrides)], tokenizer, CONFIG, limits)
    assert isinstance(direct, RequestError) and fragment in str(direct)
    assert (direct.input_name, str(direct)) == (expected.value.input_name, str(expected.value))
