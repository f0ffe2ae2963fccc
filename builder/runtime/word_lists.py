"""Stop/bad word lists in FasterTransformer's `[B, 2, N]` int32 format.

Per row: `[0, :]` = the token ids of all words concatenated, padded with 0; `[1, :]` = each word's exclusive end offset
into that row, padded with -1. N = max(1, longest row), so a row without words is `[[0], [-1]]` ("no words").
Example: words [a, b] and [c] -> `[[a, b, c], [2, 3, -1]]`.

Words arrive as plain strings (one word or phrase per element). A word tokenizes differently at the start of a text
and after a space ("Hawks" vs " Hawks"), and the engine matches token ids, so each word is listed in both forms.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .tokenizer import GptTokenizer

WORD_ID_PAD = 0
OFFSET_PAD = -1


def word_variants(words: Iterable[str]) -> list[str]:
    """Each non-empty word with and without one leading space, duplicates removed, first-seen order kept."""
    variants: dict[str, None] = {}
    for word in words:
        if not word:
            continue
        other = word[1:] if word.startswith(" ") else " " + word
        for variant in (word, other):
            if variant:
                variants.setdefault(variant, None)
    return list(variants)


def distinct_words(encoded_words: Iterable[Sequence[int]]) -> list[list[int]]:
    """The non-empty id sequences, duplicates removed (two variants may tokenize alike), first-seen order kept."""
    distinct: dict[tuple[int, ...], None] = {}
    for ids in encoded_words:
        if len(ids) > 0:
            distinct.setdefault(tuple(int(token) for token in ids), None)
    return [list(ids) for ids in distinct]


def tokenize_word_lists(tokenizer: GptTokenizer, rows: Sequence[Sequence[str]]) -> list[list[list[int]]]:
    """Per row, the distinct token-id sequences of all variants of its words (one batched encode for all rows)."""
    row_variants = [word_variants(words) for words in rows]
    encoded = tokenizer.encode_batch([variant for variants in row_variants for variant in variants])
    result: list[list[list[int]]] = []
    start = 0
    for variants in row_variants:
        result.append(distinct_words(encoded[start:start + len(variants)]))
        start += len(variants)
    return result


def encode_word_lists(rows: Sequence[Sequence[Sequence[int]]]) -> np.ndarray:
    """Token-id words per row -> int32 `[B, 2, N]` (see module doc). Empty words are skipped."""
    flat_rows: list[list[int]] = []
    offset_rows: list[list[int]] = []
    for words in rows:
        flat: list[int] = []
        offsets: list[int] = []
        for word in words:
            if len(word) == 0:
                continue
            flat.extend(int(token) for token in word)
            offsets.append(len(flat))
        flat_rows.append(flat)
        offset_rows.append(offsets)
    width = max([1, *(len(flat) for flat in flat_rows)])
    encoded = np.empty((len(rows), 2, width), dtype=np.int32)
    encoded[:, 0, :] = WORD_ID_PAD
    encoded[:, 1, :] = OFFSET_PAD
    for row, (flat, offsets) in enumerate(zip(flat_rows, offset_rows)):
        encoded[row, 0, :len(flat)] = flat
        encoded[row, 1, :len(offsets)] = offsets
    return encoded


def decode_word_list(word_list: np.ndarray) -> list[list[int]]:
    """One row `[2, N]` -> its words as id lists. Offsets < 0 end the list (FT ignores them too)."""
    word_list = np.asarray(word_list)
    if word_list.ndim != 2 or word_list.shape[0] != 2:
        raise ValueError(f"a word list row must have shape [2, N], got {list(word_list.shape)}")
    ids, offsets = word_list[0].tolist(), word_list[1].tolist()
    words: list[list[int]] = []
    start = 0
    for end in offsets:
        if end < 0:
            break
        if end < start or end > len(ids):
            # The offsets are not echoed: they may come from a shared-memory region the client could not read otherwise.
            raise ValueError(f"word list offsets must be non-decreasing and <= {len(ids)}")
        if end > start:
            words.append(ids[start:end])
        start = end
    return words
