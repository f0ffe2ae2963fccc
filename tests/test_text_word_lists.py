"""FT word-list format ([B, 2, N]: ids padded with 0, exclusive end offsets padded with -1) and word variants."""

from __future__ import annotations

import numpy as np
import pytest

from builder import GPT2_TOKENIZER_DIR
from builder.runtime.tokenizer import GptTokenizer
from builder.runtime.word_lists import (decode_word_list, distinct_words, encode_word_lists, tokenize_word_lists,
                                        word_variants)

ASSETS = GPT2_TOKENIZER_DIR


@pytest.fixture(scope="module")
def tokenizer() -> GptTokenizer:
    return GptTokenizer.from_directory(ASSETS)


def test_ft_documented_example() -> None:
    a, b, c = 11, 22, 33
    encoded = encode_word_lists([[[a, b], [c]]])  # w1 -> [a, b], w2 -> [c]
    assert encoded.dtype == np.int32
    assert encoded.tolist() == [[[a, b, c], [2, 3, -1]]]


def test_empty_list_is_zero_minus_one() -> None:
    assert encode_word_lists([[]]).tolist() == [[[0], [-1]]]
    assert encode_word_lists([[[], []]]).tolist() == [[[0], [-1]]]  # empty words are skipped
    assert decode_word_list(np.array([[0], [-1]])) == []


def test_rows_pad_to_the_longest() -> None:
    encoded = encode_word_lists([[[5, 6], [7]], [[8]], []])
    assert encoded.shape == (3, 2, 3)
    assert encoded[0].tolist() == [[5, 6, 7], [2, 3, -1]]
    assert encoded[1].tolist() == [[8, 0, 0], [1, -1, -1]]
    assert encoded[2].tolist() == [[0, 0, 0], [-1, -1, -1]]


def test_decode_round_trips() -> None:
    rows = [[[5, 6], [7], [1, 2, 3]], [[9]]]
    encoded = encode_word_lists(rows)
    assert [decode_word_list(row) for row in encoded] == rows


def test_decode_rejects_bad_shapes_and_offsets() -> None:
    with pytest.raises(ValueError, match=r"\[2, N\]"):
        decode_word_list(np.zeros((3, 2), dtype=np.int32))
    with pytest.raises(ValueError, match="offsets"):
        decode_word_list(np.array([[1, 2], [2, 1]]))
    with pytest.raises(ValueError, match="offsets"):
        decode_word_list(np.array([[1, 2], [5, -1]]))


def test_variants_with_and_without_leading_space() -> None:
    assert word_variants(["Hawks"]) == ["Hawks", " Hawks"]
    assert word_variants([" Hawks"]) == [" Hawks", "Hawks"]
    assert word_variants(["Hawks", " Hawks", "", "Hawks"]) == ["Hawks", " Hawks"]
    assert word_variants([" "]) == [" "]  # the space-less variant is empty, hence skipped
    assert word_variants([]) == []


def test_tokenized_lists_match_the_tokenizer(tokenizer: GptTokenizer) -> None:
    rows = tokenize_word_lists(tokenizer, [["Hawks", "end of story"], [], [""]])
    expected = [tokenizer.encode(w) for w in ["Hawks", " Hawks", "end of story", " end of story"]]
    assert rows[0] == expected
    assert expected[0] != expected[1]  # " Hawks" really tokenizes differently
    assert rows[1] == [] and rows[2] == []
    encoded = encode_word_lists(rows)
    flat = [token for word in expected for token in word]
    assert encoded[0, 0].tolist() == flat
    assert encoded[0, 1, :4].tolist() == np.cumsum([len(w) for w in expected]).tolist()
    assert encoded[1].tolist() == [[0] * len(flat), [-1] * len(flat)]


def test_distinct_words_drops_duplicates_and_empties() -> None:
    assert distinct_words([[1, 2], [], [1, 2], [3]]) == [[1, 2], [3]]


def test_bad_offsets_are_not_echoed() -> None:
    # The offsets may be read from a shared-memory region: the message names the rule, never the values.
    secret = int.from_bytes(b"TOPS", "little")
    with pytest.raises(ValueError) as err:
        decode_word_list(np.array([[1, 2, 3], [2, secret, 3]], dtype=np.int32))
    assert "non-decreasing" in str(err.value) and str(secret) not in str(err.value)
