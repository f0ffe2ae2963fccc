"""Postprocessing logic: FT outputs -> text, end_id/stop-word trimming, finish_reason, stateless streaming deltas."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from builder.runtime.postprocess import PostprocessConfig, PostprocessConfigError, postprocess_requests
from builder.runtime.preprocess import RequestError
from builder.runtime.tokenizer import GptTokenizer
from builder.runtime.word_lists import encode_word_lists

ASSETS = Path(__file__).resolve().parents[1] / "builder" / "assets" / "gpt2"
EOS = 50256
FINAL = PostprocessConfig(streaming=False, end_id=EOS)
STREAMING = PostprocessConfig(streaming=True, end_id=EOS)


@pytest.fixture(scope="module")
def tokenizer() -> GptTokenizer:
    return GptTokenizer.from_directory(ASSETS)


def core_outputs(rows: list[list[tuple[list[int], list[int]]]], total_len: int | None = None,
                 end_id: int = EOS) -> dict[str, np.ndarray]:
    """What the core model returns for one request, laid out as FT does: per row and beam the prompt, then the
    generated tokens (an end_id included), then end_id filling up to the buffer length. rows[b][w] = (prompt, gen)."""
    lengths = [len(prompt) + len(gen) for beams in rows for prompt, gen in beams]
    total_len = total_len or max(lengths)
    batch, width = len(rows), len(rows[0])
    output_ids = np.full((batch, width, total_len), end_id, dtype=np.uint32)
    sequence_length = np.zeros((batch, width), dtype=np.uint32)
    input_lengths = np.zeros((batch, width), dtype=np.int32)
    for b, beams in enumerate(rows):
        for w, (prompt, gen) in enumerate(beams):
            output_ids[b, w, :len(prompt) + len(gen)] = prompt + gen
            sequence_length[b, w] = len(prompt) + len(gen)
            input_lengths[b, w] = len(prompt)
    return {"output_ids": output_ids, "sequence_length": sequence_length, "response_input_lengths": input_lengths}


def single(tokenizer: GptTokenizer, prompt: str, generated: list[int], **extra: np.ndarray) -> dict[str, np.ndarray]:
    return {**core_outputs([[(tokenizer.encode(prompt), generated)]]), **extra}


def texts(result: dict[str, np.ndarray]) -> list[list[str]]:
    """text_output is [B * beams], row-major (TRT-LLM's layout); finish_reason is [B, beams]."""
    assert result["text_output"].ndim == 1 and result["text_output"].size == result["finish_reason"].size
    return [[value.decode() for value in row] for row in result["text_output"].reshape(result["finish_reason"].shape)]


def reasons(result: dict[str, np.ndarray]) -> list[list[str]]:
    return [[value.decode() for value in row] for row in result["finish_reason"]]


def test_generated_text_only_until_end_id(tokenizer: GptTokenizer) -> None:
    generated = tokenizer.encode(" 7 8 9") + [EOS]
    inputs = {**core_outputs([[(tokenizer.encode("1 2 3 4 5 6"), generated)]], total_len=20),
              "end_id": np.array([[EOS]], dtype=np.uint32)}
    (result,) = postprocess_requests([inputs], tokenizer, FINAL)
    assert texts(result) == [[" 7 8 9"]]
    assert reasons(result) == [["stop"]]
    assert result["num_input_tokens"].tolist() == [[6]]
    assert result["num_output_tokens"].tolist() == [[3]]
    assert result["num_input_tokens"].dtype == result["num_output_tokens"].dtype == np.int32


def test_length_when_no_end(tokenizer: GptTokenizer) -> None:
    generated = tokenizer.encode(" 7 8 9 10")
    (result,) = postprocess_requests([single(tokenizer, "1 2 3", generated)], tokenizer, FINAL)
    assert texts(result) == [[" 7 8 9 10"]] and reasons(result) == [["length"]]
    assert result["num_output_tokens"].tolist() == [[len(generated)]]


def test_stop_word_trimmed_from_the_end(tokenizer: GptTokenizer) -> None:
    generated = tokenizer.encode(" go team go Hawks")
    stop = encode_word_lists([[tokenizer.encode("Hawks"), tokenizer.encode(" Hawks")]])
    (result,) = postprocess_requests([single(tokenizer, "Say:", generated, stop_words_list=stop)], tokenizer, FINAL)
    assert texts(result) == [[" go team go"]] and reasons(result) == [["stop"]]
    assert result["num_output_tokens"].tolist() == [[len(generated)]]  # stop-word tokens count


def test_stop_word_elsewhere_is_not_trimmed(tokenizer: GptTokenizer) -> None:
    generated = tokenizer.encode(" Hawks win again")
    stop = encode_word_lists([[tokenizer.encode(" Hawks")]])
    (result,) = postprocess_requests([single(tokenizer, "Say:", generated, stop_words_list=stop)], tokenizer, FINAL)
    assert texts(result) == [[" Hawks win again"]] and reasons(result) == [["length"]]


def test_custom_end_id_and_echo(tokenizer: GptTokenizer) -> None:
    end = tokenizer.encode(".")[0]
    generated = tokenizer.encode(" 日本語 😀") + [end]
    inputs = single(tokenizer, "Prompt é", generated, end_id=np.array([[end]], dtype=np.uint32),
                    exclude_input_in_output=np.array([[False]]))
    (result,) = postprocess_requests([inputs], tokenizer, FINAL)
    assert texts(result) == [["Prompt é 日本語 😀"]] and reasons(result) == [["stop"]]


def test_rows_and_beams(tokenizer: GptTokenizer) -> None:
    short, long = tokenizer.encode("a b"), tokenizer.encode("a longer prompt here")
    rows = [[(short, tokenizer.encode(" one") + [EOS]), (short, tokenizer.encode(" two three"))],
            [(long, tokenizer.encode(" x")), (long, [EOS])]]
    (result,) = postprocess_requests([core_outputs(rows, total_len=12)], tokenizer, FINAL)
    assert texts(result) == [[" one", " two three"], [" x", ""]]
    assert reasons(result) == [["stop", "length"], ["length", "stop"]]
    assert result["num_input_tokens"].tolist() == [[len(short)], [len(long)]]
    assert result["num_output_tokens"].tolist() == [[1, 2], [1, 0]]


def test_one_decode_call_for_the_whole_execute(tokenizer: GptTokenizer) -> None:
    calls: list[int] = []

    class CountingTokenizer(GptTokenizer):
        def decode_batch(self, sequences):
            calls.append(len(sequences))
            return super().decode_batch(sequences)

    counting = CountingTokenizer(tokenizer._tokenizer, tokenizer.token_bytes, tokenizer.eos_id)
    two_rows = core_outputs([[([1], [2, 3])], [([4], [5])]])
    results = postprocess_requests([single(tokenizer, "x", [6]), two_rows], counting, FINAL)
    assert calls == [3]
    assert texts(results[1]) == [[tokenizer.decode([2, 3])], [tokenizer.decode([5])]]


def test_bad_request_isolated(tokenizer: GptTokenizer) -> None:
    broken = single(tokenizer, "x", [6])
    broken["sequence_length"] = np.array([[99]], dtype=np.uint32)  # beyond output_ids
    missing = single(tokenizer, "x", [6])
    del missing["response_input_lengths"]
    results = postprocess_requests([single(tokenizer, "x", [6]), broken, missing], tokenizer, FINAL)
    assert texts(results[0]) == [[tokenizer.decode([6])]]
    assert isinstance(results[1], RequestError) and results[1].input_name == "sequence_length"
    assert isinstance(results[2], RequestError) and results[2].input_name == "response_input_lengths"


def stream_responses(tokenizer: GptTokenizer, rows: list[tuple[list[int], list[int]]], total_len: int
                     ) -> list[dict[str, np.ndarray]]:
    """Run the streaming postprocessing on every step of a decoupled core model: after step s each row holds its
    first s generated tokens (fewer when it has finished), in an end_id-filled buffer of constant length (FT)."""
    steps = max(len(gen) for _, gen in rows)
    results = []
    for step in range(1, steps + 1):
        partial = [[(prompt, gen[:step])] for prompt, gen in rows]
        (result,) = postprocess_requests([core_outputs(partial, total_len=total_len)], tokenizer, STREAMING)
        results.append(result)
    return results


def test_streaming_concatenation_equals_final_text(tokenizer: GptTokenizer) -> None:
    rng = random.Random(5)
    pieces = [" héllo", " 日本語", " 😀", "👍🏽", " naïve", " 中文", "!", " 🎉🎉", "\n", " Ærø"]
    for _ in range(40):
        text = "".join(rng.choice(pieces) for _ in range(rng.randrange(1, 8)))
        generated = tokenizer.encode(text) + [EOS]
        prompt = tokenizer.encode("Prompt:")
        responses = stream_responses(tokenizer, [(prompt, generated)], total_len=len(prompt) + len(generated) + 3)
        deltas = [texts(r)[0][0] for r in responses]
        (final,) = postprocess_requests([core_outputs([[(prompt, generated)]])], tokenizer, FINAL)
        assert "".join(deltas) == texts(final)[0][0] == text
        assert all("\ufffd" not in delta for delta in deltas)
        assert [reasons(r)[0][0] for r in responses] == [""] * (len(responses) - 1) + ["stop"]
        assert responses[-1]["num_output_tokens"].tolist() == final["num_output_tokens"].tolist()


def test_first_streamed_response_is_the_first_token(tokenizer: GptTokenizer) -> None:
    prompt, generated = tokenizer.encode("1 2 3"), tokenizer.encode(" 4 5")
    first = stream_responses(tokenizer, [(prompt, generated)], total_len=10)[0]
    assert texts(first) == [[" 4"]]  # leading space kept, no prompt
    assert first["num_input_tokens"].tolist() == [[3]] and first["num_output_tokens"].tolist() == [[1]]


def test_streaming_row_that_finished_early_gets_empty_deltas(tokenizer: GptTokenizer) -> None:
    short, long = tokenizer.encode(" done") + [EOS], tokenizer.encode(" and on and on and on")
    responses = stream_responses(tokenizer, [(tokenizer.encode("a"), short), (tokenizer.encode("b c"), long)], 16)
    row0 = [texts(r)[0][0] for r in responses]
    row1 = [texts(r)[1][0] for r in responses]
    assert "".join(row0) == " done" and "".join(row1) == " and on and on and on"
    assert row0[len(short):] == [""] * (len(long) - len(short))  # no repeats once finished
    assert [reasons(r)[0][0] for r in responses][len(short) - 1:] == ["stop"] * (len(long) - len(short) + 1)


def test_streaming_stop_word_is_not_trimmed(tokenizer: GptTokenizer) -> None:
    generated = tokenizer.encode(" go Hawks")
    responses = stream_responses(tokenizer, [(tokenizer.encode("x"), generated)], total_len=8)
    assert "".join(texts(r)[0][0] for r in responses) == " go Hawks"
    assert reasons(responses[-1]) == [[""]]


def test_config_parameters() -> None:
    assert PostprocessConfig.from_parameters({"streaming": "true"}, default_end_id=EOS) == STREAMING
    assert PostprocessConfig.from_parameters({"streaming": "False", "end_id": "7"}, default_end_id=EOS) == \
        PostprocessConfig(streaming=False, end_id=7)
    with pytest.raises(PostprocessConfigError, match="streaming"):
        PostprocessConfig.from_parameters({}, default_end_id=EOS)
    with pytest.raises(PostprocessConfigError, match="end_id"):
        PostprocessConfig.from_parameters({"streaming": "true", "end_id": "x"}, default_end_id=EOS)


def test_streaming_delta_start_gives_all_new_tokens_of_a_single_final_response() -> None:
    """A decoupled core answering `stream` false sends one response: delta_start = the prompt length."""
    from pathlib import Path as _Path

    from builder.runtime.postprocess import PostprocessConfig, postprocess_requests
    from builder.runtime.tokenizer import GptTokenizer as _Tokenizer

    tokenizer = _Tokenizer.from_directory(_Path(__file__).resolve().parents[1] / "builder" / "assets" / "gpt2")
    prompt, generated = tokenizer.encode("Count:"), tokenizer.encode(" 1 2 3 数字 🚀")
    ids = np.array([[prompt + generated]], dtype=np.uint32)
    inputs = {"output_ids": ids, "sequence_length": np.array([[ids.shape[2]]], np.uint32),
              "response_input_lengths": np.array([[len(prompt)]], np.int32)}
    config = PostprocessConfig(streaming=True, end_id=tokenizer.eos_id)
    whole = postprocess_requests([{**inputs, "delta_start": np.array([[len(prompt)]], np.int32)}], tokenizer, config)
    assert whole[0]["text_output"][0].decode() == " 1 2 3 数字 🚀"
    last_only = postprocess_requests([inputs], tokenizer, config)  # without it: one new token per response
    assert last_only[0]["text_output"][0].decode() != " 1 2 3 数字 🚀"


def byte_tokens(tokenizer: GptTokenizer, text: str) -> list[int]:
    """Token ids that spell `text` one BYTE per token (GPT-2 has a token per byte): multi-byte characters split."""
    single = {}
    for i in range(50257):
        piece = tokenizer.bytes_of([i])
        if len(piece) == 1:
            single.setdefault(piece, i)
    return [single[bytes([b])] for b in text.encode()]


@pytest.mark.parametrize("seed", range(6))
def test_coalesced_stream_tails_decode_to_the_final_text(tokenizer: GptTokenizer, seed: int) -> None:
    """The torch core's streamed responses (core_io.StreamState: tails of the sequences, several new tokens each when
    sending falls behind, finish_code on the last) through streaming postprocessing concatenate to exactly the
    final text, multi-byte characters split across tokens and responses included; finish_reason only at the end."""
    from builder.runtime.core_io import GenerationRequest, RowOutput, StreamState

    rng = random.Random(seed)
    generated = (tokenizer.encode(" naïve café, 数字と絵文字 🚀 ok") + byte_tokens(tokenizer, "é🚀字")
                 + tokenizer.encode(" end"))[:rng.randint(8, 40)]
    prompt = tokenizer.encode("Once upon a time")
    ends_with_eos = seed % 2 == 0
    if ends_with_eos:
        generated = generated + [EOS]
    spec = GenerationRequest(input_ids=tuple(prompt), output_len=len(generated) + (0 if ends_with_eos else 0),
                             end_id=EOS)
    state = StreamState([spec], stream=True, log_probs=False, ack=(1234, 99))
    sequence = np.array(prompt + generated, dtype=np.int64)
    produced, pieces, reasons_seen = len(prompt), [], []
    while produced < len(sequence):
        produced = min(len(sequence), produced + rng.choice([1, 1, 2, 3, 7]))  # coalesced: 1..7 new tokens
        final = produced == len(sequence)
        output = RowOutput(prompt_len=len(prompt), beams=[sequence[:produced]], finished=final,
                           finish_reason="stop" if ends_with_eos else "length")
        arrays = state.final([output]) if final else state.update([output])
        assert arrays["output_ids"].shape[2] < produced  # a tail, never the whole sequence
        assert arrays["stream_ack"].tolist() == [[1234, 99]]
        [result] = postprocess_requests([arrays], tokenizer, STREAMING)
        pieces.append(texts(result)[0][0])
        reasons_seen.append(reasons(result)[0][0])
    expected = tokenizer.decode(generated[:-1] if ends_with_eos else generated)
    assert "".join(pieces) == expected
    assert reasons_seen[-1] == ("stop" if ends_with_eos else "length") and set(reasons_seen[:-1]) <= {""}


def test_stream_false_final_keeps_the_cumulative_layout(tokenizer: GptTokenizer) -> None:
    """stream false: one final response in FT's cumulative layout (token-id clients read output_ids as before)."""
    from builder.runtime.core_io import GenerationRequest, RowOutput, StreamState

    prompt, generated = tokenizer.encode("Hello"), tokenizer.encode(" there, world")
    spec = GenerationRequest(input_ids=tuple(prompt), output_len=len(generated) + 3, end_id=EOS)
    arrays = StreamState([spec], stream=False, log_probs=False).final(
        [RowOutput(prompt_len=len(prompt), beams=[np.array(prompt + generated)], finished=True)])
    assert arrays["output_ids"][0, 0, :len(prompt) + len(generated)].tolist() == prompt + generated
    assert arrays["delta_start"].tolist() == [[len(prompt)]] and arrays["finish_code"].tolist() == [[2]]
    [result] = postprocess_requests([arrays], tokenizer, STREAMING)
    assert texts(result) == [[tokenizer.decode(generated)]] and reasons(result) == [["length"]]


def test_stream_false_answer_of_a_streaming_repository_trims_the_stop_word_and_can_echo(
        tokenizer: GptTokenizer) -> None:
    """One final response (delta_start = the prompt's end, or 0 to echo it) with the core's stop_length."""
    prompt, generated = tokenizer.encode("1 2 3"), tokenizer.encode(" 4 5 6")
    base = single(tokenizer, "1 2 3", generated, finish_code=np.array([[1]], np.int32),
                  stop_length=np.array([[len(tokenizer.encode(" 6"))]], np.int32))
    (trimmed,) = postprocess_requests([{**base, "delta_start": np.array([[len(prompt)]], np.int32)}], tokenizer,
                                      STREAMING)
    assert texts(trimmed) == [[" 4 5"]] and reasons(trimmed) == [["stop"]]
    assert trimmed["num_output_tokens"].tolist() == [[len(generated)]]  # the stop word was generated: counted
    (echoed,) = postprocess_requests([{**base, "delta_start": np.array([[0]], np.int32)}], tokenizer, STREAMING)
    assert texts(echoed) == [["1 2 3 4 5"]]
    untrimmed = {**base, "delta_start": np.array([[len(prompt)]], np.int32), "stop_length": np.array([[0]], np.int32)}
    assert texts(postprocess_requests([untrimmed], tokenizer, STREAMING)[0]) == [[" 4 5 6"]]
