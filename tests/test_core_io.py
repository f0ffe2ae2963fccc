"""FT tensor contract: request parsing/validation, word lists, output layout. No torch needed by the module."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from builder.runtime.core_io import (CAPABILITIES, EngineLimits, GenerationRequest, RequestError, RowOutput,
                                     StreamState, ft_outputs, parse_request, parse_word_list)
from builder.runtime.word_lists import encode_word_lists

LIMITS = EngineLimits(vocab_size=1000, max_seq_len=64, max_batch_size=8, default_end_id=999)


def ft_inputs(ids: list[list[int]], lengths: list[int], output_len: int, **optional: np.ndarray) -> dict:
    """The arrays one Triton request carries (batch dim first), as the seed client sends them."""
    return {"input_ids": np.array(ids, dtype=np.uint32), "input_lengths": np.array(lengths, np.uint32)[:, None],
            "request_output_len": np.full((len(ids), 1), output_len, np.uint32), **optional}


def test_seed_client_request_parses_with_ft_defaults() -> None:
    parsed = parse_request(ft_inputs([[5, 6, 7, 0]], [3], 10, runtime_top_k=np.array([[1]], np.uint32),
                                     runtime_top_p=np.array([[0.0]], np.float32),
                                     temperature=np.array([[1.0]], np.float32)), LIMITS)
    (row,) = parsed.rows
    assert row.input_ids.tolist() == [5, 6, 7] and row.output_len == 10 and row.is_greedy
    assert row.end_id == 999 and row.beam_width == 1 and row.random_seed == 0 and not row.return_log_probs
    # No `stream` input: one final response, what Triton's /generate (and the seed's own client) can take.
    assert not parsed.stream
    streamed = parse_request(ft_inputs([[5, 6, 7, 0]], [3], 10, stream=np.array([[True]])), LIMITS)
    assert streamed.stream


@pytest.mark.parametrize(("inputs", "input_name", "limit"), [
    (dict(input_lengths=np.array([[5]], np.uint32)), "input_lengths", r"\[1, 3\]"),
    (dict(request_output_len=np.array([[62]], np.uint32)), "request_output_len", "max_seq_len 64"),
    (dict(runtime_top_p=np.array([[1.5]], np.float32)), "runtime_top_p", r"\[0, 1\]"),
    (dict(temperature=np.array([[-1.0]], np.float32)), "temperature", ">= 0"),
    (dict(repetition_penalty=np.array([[0.0]], np.float32)), "repetition_penalty", "> 0"),
    (dict(beam_width=np.array([[9]], np.uint32)), "beam_width", r"\[1, 8\]"),
    (dict(end_id=np.array([[1000]], np.uint32)), "end_id", r"\[0, 1000\)"),
    (dict(input_ids=np.array([[1, 2, 1000]], np.uint32)), "input_ids", r"\[0, 1000\)"),
    (dict(input_ids=np.array([[1, -2, 3]], np.int32)), "input_ids", r"\[0, 1000\)"),
    (dict(input_ids=np.array([[1.0, 2.0, 3.0]], np.float32)), "input_ids", "must be integers"),
    (dict(stop_words_list=np.array([[[1, 2], [3, -1]]], np.int32)), "stop_words_list", "offsets"),
    (dict(bad_words_list=np.array([[[1, 2], [1, 2], [2, -1]]], np.int32)), "bad_words_list", r"\[2, N\]"),
    (dict(beam_search_diversity_rate=np.array([[0.5]], np.float32)), "beam_search_diversity_rate", "not supported"),
])
def test_bad_requests_name_the_input_and_the_limit(inputs: dict, input_name: str, limit: str) -> None:
    request = {**ft_inputs([[1, 2, 3]], [3], 4), **inputs}
    with pytest.raises(RequestError, match=limit) as info:
        parse_request(request, LIMITS)
    assert info.value.input_name == input_name and str(info.value).startswith(f"invalid input '{input_name}'")


def test_missing_required_input() -> None:
    request = ft_inputs([[1, 2, 3]], [3], 4)
    del request["input_lengths"]
    with pytest.raises(RequestError, match="'input_lengths': is required"):
        parse_request(request, LIMITS)


def test_rows_times_beams_must_fit_the_cache() -> None:
    request = ft_inputs([[1, 2]] * 3, [2, 2, 2], 4, beam_width=np.full((3, 1), 4, np.uint32))
    with pytest.raises(RequestError, match=r"'beam_width': rows x beam_width must be <= .*max_batch_size 8.*3 rows") \
            as info:
        parse_request(request, LIMITS)
    assert "4" not in str(info.value)  # the beam width the client sent is not echoed


def test_mixed_beam_widths_in_one_request_are_refused() -> None:
    request = ft_inputs([[1, 2]] * 2, [2, 2], 4, beam_width=np.array([[1], [2]], np.uint32))
    with pytest.raises(RequestError, match="'beam_width': must be the same"):
        parse_request(request, LIMITS)


def test_per_row_values_and_padding_removed() -> None:
    parsed = parse_request(ft_inputs([[1, 2, 3], [4, 0, 0]], [3, 1], 5,
                                     runtime_top_k=np.array([[0], [4]], np.uint32),
                                     random_seed=np.array([[2**64 - 1], [7]], np.uint64),
                                     is_return_log_probs=np.array([[False], [True]])), LIMITS)
    assert [r.input_ids.tolist() for r in parsed.rows] == [[1, 2, 3], [4]]
    assert [r.top_k for r in parsed.rows] == [0, 4]
    assert [r.random_seed for r in parsed.rows] == [2**64 - 1, 7]
    assert parsed.return_log_probs


def test_word_lists_round_trip_with_the_preprocessing_encoder() -> None:
    words = [[[10, 11], [12]], [], [[13, 14, 15]]]
    encoded = encode_word_lists(words)  # what preprocessing sends: [B, 2, N]
    assert parse_word_list(encoded, "stop_words_list", 3, 1000) == [((10, 11), (12,)), (), ((13, 14, 15),)]
    shared = encoded[0]  # a [2, N] list applies to every row
    assert parse_word_list(shared, "stop_words_list", 2, 1000) == [((10, 11), (12,))] * 2
    assert parse_word_list(np.array([[0], [-1]], np.int32), "bad_words_list", 1, 1000) == [()]  # FT's "no words"
    assert parse_word_list(np.array([[0], [0]], np.int32), "bad_words_list", 1, 1000) == [()]  # zero-length word


def test_ft_output_layout_with_beams_and_log_probs() -> None:
    rows = [GenerationRequest(input_ids=(1, 2, 3), output_len=4, end_id=9, beam_width=2),
            GenerationRequest(input_ids=(5,), output_len=2, end_id=8, beam_width=2)]
    outputs = [RowOutput(prompt_len=3, beams=[np.array([1, 2, 3, 4, 9]), np.array([1, 2, 3, 6, 7, 8, 5])],
                         cum_log_probs=np.array([-1.0, -2.0]),
                         output_log_probs=[np.array([-0.5, -0.5]), np.array([-0.5, -0.5, -0.5, -0.5])]),
               RowOutput(prompt_len=1, beams=[np.array([5, 6, 7]), np.array([5, 8])],
                         cum_log_probs=np.array([-3.0, -4.0]), output_log_probs=[np.array([-1.5, -1.5]),
                                                                                 np.array([-4.0])])]
    arrays = ft_outputs(rows, outputs, with_log_probs=True)
    assert arrays["output_ids"].shape == (2, 2, 3 + 4) and arrays["output_ids"].dtype == np.uint32
    assert arrays["output_ids"][0, 0].tolist() == [1, 2, 3, 4, 9, 9, 9]  # end_id fill
    assert arrays["output_ids"][1, 1].tolist() == [5, 8, 8, 8, 8, 8, 8]
    assert arrays["sequence_length"].tolist() == [[5, 7], [3, 2]]
    assert arrays["response_input_lengths"].tolist() == [[3, 3], [1, 1]]
    assert arrays["response_input_lengths"].dtype == np.int32
    assert arrays["cum_log_probs"].shape == (2, 2) and arrays["output_log_probs"].shape == (2, 2, 4)
    assert arrays["output_log_probs"][1, 1].tolist() == [-4.0, 0.0, 0.0, 0.0]
    assert "cum_log_probs" not in ft_outputs(rows, outputs, with_log_probs=False)


def test_capabilities_import_without_torch() -> None:
    code = ("import sys; from builder.runtime.core_io import CAPABILITIES; "
            "assert 'torch' not in sys.modules, 'core_io imported torch'; print(sorted(CAPABILITIES))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert {"runtime_top_k", "stop_words_list", "beam_width", "stream"} <= CAPABILITIES


def test_stream_acks_tell_an_abandoned_stream_from_a_direct_call() -> None:
    """stream_ack.py over real loopback UDP: a stream that postprocessing acknowledged and then stopped acknowledging
    is abandoned after the threshold; one never acknowledged (the core called directly) never is; other keys (another
    user's guesses) change nothing."""
    import time

    from builder.runtime.stream_ack import AckListener, AckSender

    listener, sender = AckListener(abandon_after_s=0.2), AckSender()
    try:
        behind_ensemble, direct = listener.new_key(), listener.new_key()
        sender.send([(listener.port, behind_ensemble), (listener.port, 12345), (0, direct), (listener.port, 0)])
        deadline = time.monotonic() + 5
        while behind_ensemble not in listener._ever_acked and time.monotonic() < deadline:
            time.sleep(0.01)
        start = time.monotonic()
        for key in (behind_ensemble, direct):
            listener.sent(key, now=start)
        assert not listener.abandoned(behind_ensemble, now=start + 0.1)
        assert listener.abandoned(behind_ensemble, now=start + 0.3)  # acked before, silent since its last send
        assert not listener.abandoned(direct, now=start + 10)  # never acked: not behind postprocessing
        sender.send([(listener.port, behind_ensemble)])  # postprocessing caught up: alive again
        deadline = time.monotonic() + 5
        while listener.abandoned(behind_ensemble, now=start + 0.3) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not listener.abandoned(behind_ensemble, now=start + 0.3)
        listener.forget(behind_ensemble)
        assert not listener.abandoned(behind_ensemble, now=start + 10)
    finally:
        listener.close()


def test_a_stream_behind_the_ensemble_is_not_polled_over_ipc() -> None:
    """Once postprocessing acknowledged a stream, its sink asks only the acknowledgements whether it was abandoned:
    Triton never cancels a core request behind the ensemble, so the transport's is_cancelled (an IPC round trip in
    Triton) is not called; a stream never acknowledged (the core called directly) still asks the transport."""
    import time

    from builder.runtime.core_adapter import _Sink
    from builder.runtime.core_io import GenerationRequest
    from builder.runtime.stream_ack import AckListener

    class Transport:
        polls = 0

        def send(self, reply: object, final: bool) -> None:
            pass

        def is_cancelled(self) -> bool:
            self.polls += 1
            return False

    listener = AckListener(abandon_after_s=0.2)
    try:
        rows = [GenerationRequest(input_ids=(1, 2), output_len=4, end_id=0)]
        behind, direct = Transport(), Transport()
        behind_sink = _Sink(behind, rows, listener, stream=True, log_probs=False)
        direct_sink = _Sink(direct, rows, listener, stream=True, log_probs=False)
        listener.acknowledge([behind_sink.key])
        assert not behind_sink.is_cancelled() and not direct_sink.is_cancelled()
        assert (behind.polls, direct.polls) == (0, 1)
        listener.sent(behind_sink.key, now=time.monotonic() - 1)  # sent a second ago, never acknowledged since
        assert behind_sink.is_cancelled() and behind.polls == 0
    finally:
        listener.close()


@pytest.mark.parametrize(("kv_slots", "decoupled", "device", "expected"), [
    ("0", True, "cuda:0", (256, True)),  # streaming on a GPU: as many as fit, up to 256, whatever max_batch_size
    ("0", True, "cpu", (8, False)),  # no free-memory reading on a CPU: Triton's max_batch_size
    ("0", False, "cuda:0", (8, True)),  # static batching: the dynamic batch, shrunk to fit
    ("96", True, "cuda:0", (96, False)),  # given: exactly that many
])
def test_kv_slots_are_sized_apart_from_tritons_max_batch_size(kv_slots: str, decoupled: bool, device: str,
                                                               expected: tuple[int, bool]) -> None:
    import json

    from builder.runtime.core_adapter import CoreSettings

    config = {"max_batch_size": 8, "model_transaction_policy": {"decoupled": decoupled},
              "parameters": {"kv_slots": {"string_value": kv_slots}, "data_type": {"string_value": "fp16"}}}
    settings = CoreSettings.from_args({"model_config": json.dumps(config), "model_repository": "/repo/core",
                                       "model_version": "1"})
    assert settings.slots_for(device) == expected
    assert str(settings.model_dir) == "/repo/core/1/1-gpu"
    config["parameters"]["kv_slots"] = {"string_value": "-3"}
    with pytest.raises(ValueError, match="kv_slots"):
        CoreSettings.from_args({"model_config": json.dumps(config), "model_repository": "/r", "model_version": "1"})


# ---- FT's own clients and the streaming repository's single answers (issue 13) ------------------------------------

def test_ft_samples_start_id_and_diversity_rate_zero_are_accepted() -> None:
    parsed = parse_request(ft_inputs([[1, 2, 3]], [3], 4, start_id=np.array([[999]], np.uint32),
                                     beam_search_diversity_rate=np.array([[0.0]], np.float32)), LIMITS)
    assert parsed.rows[0].input_ids.tolist() == [1, 2, 3] and parsed.ft_stream  # no `stream`: FT's decoupled behaviour
    with pytest.raises(RequestError, match=r"\[0, 1000\)") as info:
        parse_request(ft_inputs([[1, 2, 3]], [3], 4, start_id=np.array([[1000]], np.uint32)), LIMITS)
    assert info.value.input_name == "start_id"


def test_frequency_penalty_is_parsed_and_checked() -> None:
    parsed = parse_request(ft_inputs([[1, 2]], [2], 4, frequency_penalty=np.array([[0.5]], np.float32)), LIMITS)
    assert parsed.rows[0].frequency_penalty == 0.5
    with pytest.raises(RequestError, match="finite"):
        parse_request(ft_inputs([[1, 2]], [2], 4, frequency_penalty=np.array([[np.inf]], np.float32)), LIMITS)


def test_stream_false_answer_carries_stop_length_and_echo_start() -> None:
    request = ft_inputs([[1, 2]], [2], 5, stop_words_list=encode_word_lists([[[7, 8]]]),
                        stream=np.array([[False]]), exclude_input_in_output=np.array([[False]]))
    parsed = parse_request(request, LIMITS)
    assert not parsed.stream and not parsed.exclude_input and not parsed.ft_stream
    out = RowOutput(prompt_len=2, beams=[np.array([1, 2, 5, 7, 8])], finished=True, finish_reason="stop")
    arrays = StreamState(parsed.rows, stream=False, log_probs=False, exclude_input=False).final([out])
    assert arrays["stop_length"].tolist() == [[2]]  # the stop word [7, 8] ends it: postprocessing trims it
    assert arrays["delta_start"].tolist() == [[0]]  # the text starts with the prompt
    assert arrays["output_ids"][0, 0, :5].tolist() == [1, 2, 5, 7, 8]  # FT's layout, stop word kept for token clients
    streamed = StreamState(parsed.rows, stream=True, log_probs=False)
    assert streamed.final([out])["stop_length"].tolist() == [[0]]  # streamed text cannot take it back


def test_ft_stream_updates_use_the_cumulative_layout() -> None:
    rows = parse_request(ft_inputs([[1, 2, 3]], [3], 20), LIMITS).rows
    state = StreamState(rows, stream=False, log_probs=False, cumulative=True)
    for step in range(1, 8):
        out = RowOutput(prompt_len=3, beams=[np.array([1, 2, 3, *range(10, 10 + step)])])
        arrays = state.update([out])
        length = int(arrays["sequence_length"][0, 0])
        assert length == 3 + step
        assert arrays["output_ids"][0, 0, :length].tolist() == [1, 2, 3, *range(10, 10 + step)]  # prompt included


@pytest.mark.parametrize("per_response", [False, True])
def test_streamed_counts_cumulative_or_per_response(per_response: bool) -> None:
    """return_num_output_tokens (the OpenAI frontend sums the streamed counts): `counted` says what earlier responses
    counted, so postprocessing's num_output_tokens is per response; without it 0 keeps the counts cumulative."""
    inputs = ft_inputs([[1, 2, 3]], [3], 20, stream=np.array([[True]]),
                       return_num_output_tokens=np.array([[per_response]]))
    parsed = parse_request(inputs, LIMITS)
    state = StreamState(parsed.rows, stream=True, log_probs=False, count_per_response=parsed.count_per_response)
    counted = []
    for generated in (1, 3, 4):
        out = RowOutput(prompt_len=3, beams=[np.array([1, 2, 3, *range(10, 10 + generated)])])
        counted.append(int(state.update([out])["counted"][0, 0]))
    assert counted == ([0, 1, 3] if per_response else [0, 0, 0])
