"""GPT-2 tokenizer: canonical ids, equality with HF, byte table, stateless UTF-8-safe streaming deltas."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from builder import GPT2_TOKENIZER_DIR
from builder.runtime.tokenizer import GptTokenizer, TokenizerError, byte_level_alphabet

ASSETS = GPT2_TOKENIZER_DIR

SAMPLES = [
    "Hello world", " world", "1 2 3 4 5 6", " The quick brown fox", "", " ", "   leading and trailing   ",
    "line one\nline two\r\n\ttabbed", "naïve café résumé Ærøskøbing", "日本語のテキストと中文文本",
    "emoji 😀👍🏽 family 👨‍👩‍👧",
    "code: def f(x):\n    return x ** 2  # comment", "it's they're we've I'm you'll he'd",
    "<|endoftext|>", "a<|endoftext|>b",
    "ÿ\x00\x01 control \x7f", "Ω≈ç√∫˜µ≤≥÷ ①②③", "🇫🇷 flags and ñ",
]

# Characters for random texts: ASCII, accents, CJK, emoji (4-byte), combining marks, whitespace.
ALPHABET = list("abcXYZ 019.,!?'\n\t") + list("éüñçøß") + list("日本語中文한국") + ["😀", "🎉", "👍🏽", "\u0301", "  "]


@pytest.fixture(scope="module")
def tokenizer() -> GptTokenizer:
    return GptTokenizer.from_directory(ASSETS)


@pytest.fixture(scope="module")
def hf_tokenizer():
    transformers = pytest.importorskip("transformers")
    return transformers.GPT2TokenizerFast.from_pretrained(str(ASSETS))


def random_texts(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(ALPHABET) for _ in range(rng.randrange(1, 40))) for _ in range(count)]


def test_canonical_ids(tokenizer: GptTokenizer) -> None:
    assert tokenizer.encode(" world") == [995]
    assert tokenizer.encode("1 2 3 4 5 6") == [16, 362, 513, 604, 642, 718]
    assert tokenizer.encode("Hello world") == [15496, 995]
    assert tokenizer.eos_id == 50256
    assert tokenizer.vocab_size == 50257


def test_encode_and_decode_match_hf(tokenizer: GptTokenizer, hf_tokenizer) -> None:
    texts = SAMPLES + random_texts(200, seed=1)
    ours = tokenizer.encode_batch(texts)
    assert ours == [hf_tokenizer.encode(text) for text in texts]
    assert tokenizer.decode_batch(ours) == [hf_tokenizer.decode(ids) for ids in ours]
    assert tokenizer.decode_batch(ours) == texts


def test_byte_table_is_the_byte_level_alphabet(tokenizer: GptTokenizer) -> None:
    from tokenizers import pre_tokenizers

    alphabet = byte_level_alphabet()
    assert sorted(alphabet.values()) == list(range(256))
    assert sorted(alphabet) == sorted(pre_tokenizers.ByteLevel.alphabet())
    for text in SAMPLES + random_texts(50, seed=2):
        assert tokenizer.bytes_of(tokenizer.encode(text)) == text.encode("utf-8")


def test_unknown_ids_decode_to_nothing(tokenizer: GptTokenizer, hf_tokenizer) -> None:
    ids = [995, 50300, 995]  # 50300: a padded-vocab id without a token (a random-weight model can sample it)
    assert tokenizer.decode(ids) == hf_tokenizer.decode(ids) == " world world"
    assert tokenizer.bytes_of(ids) == b" world world"


def reference(tokenizer: GptTokenizer) -> GptTokenizer:
    """The same tables encoding with `tokenizers` only (the path other tables take)."""
    return GptTokenizer(tokenizer._tokenizer, tokenizer.token_bytes, tokenizer.eos_id)


def test_fast_encoding_equals_tokenizers_on_every_token_and_random_texts(tokenizer: GptTokenizer) -> None:
    """The GPT-2 tables encode with tiktoken; its merge rule (lowest-id concatenation) must give BPE's ids. The text
    of every token is where the two rules could part (a token reachable by several splits), so all 50,257 are here,
    alone and run together, beside random Unicode and whitespace runs."""
    assert tokenizer._fast is not None and tokenizer.encoder.startswith("tiktoken ")
    rng = random.Random(7)
    token_texts = [token.decode("utf-8", "replace") for token in tokenizer.token_bytes]
    texts = (SAMPLES + token_texts + random_texts(3000, seed=3)
             + ["".join(rng.choice(token_texts) for _ in range(rng.randrange(2, 30))) for _ in range(3000)]
             + [" " * 300 + "x", "\n\n\n a  b\t\t", "9" * 2000, "a" * 5000])
    assert tokenizer.encode_batch(texts) == reference(tokenizer).encode_batch(texts)


def test_other_tables_encode_with_tokenizers(tmp_path: Path, tokenizer: GptTokenizer) -> None:
    """Tables that differ from GPT-2's in one merge get no fast path: tiktoken's rule is not known to hold there."""
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / name).write_bytes((ASSETS / name).read_bytes())
    merges = (tmp_path / "merges.txt").read_text(encoding="utf-8").splitlines()
    merges[1], merges[2] = merges[2], merges[1]  # "Ġ t" and "Ġ a" swap ranks
    (tmp_path / "merges.txt").write_text("\n".join(merges) + "\n", encoding="utf-8")
    other = GptTokenizer.from_directory(tmp_path)
    assert other._fast is None and other.encoder.startswith("tokenizers ")
    assert other.encode(" the cat sat") == reference(tokenizer).encode(" the cat sat")


def test_a_tiktoken_with_quadratic_merges_is_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    """tiktoken < 0.13 merges one long piece in quadratic time (seconds for a prompt the byte limit lets in)."""
    import importlib.metadata

    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.12.0")
    old = GptTokenizer.from_directory(ASSETS)
    assert old._fast is None
    assert old.encode("Hello world") == [15496, 995]


def test_missing_files_raise(tmp_path: Path) -> None:
    (tmp_path / "vocab.json").write_text("{}")
    with pytest.raises(TokenizerError, match="merges.txt"):
        GptTokenizer.from_directory(tmp_path)


def stream(tokenizer: GptTokenizer, ids: list[int]) -> list[str]:
    """Deltas of a stateless step per token, as the postprocessing model computes them."""
    return [tokenizer.stream_delta(ids[:count], 1) for count in range(1, len(ids) + 1)]


def test_emoji_split_across_tokens_is_held_back(tokenizer: GptTokenizer) -> None:
    ids = tokenizer.encode(" 🦙!")
    # The llama's 4 bytes are split 3/1/1 over the first three tokens: ' \xf0\x9f', '\xa6', '\x99'.
    assert [tokenizer.token_bytes[i] for i in ids[:3]] == [b" \xf0\x9f", b"\xa6", b"\x99"]
    assert stream(tokenizer, ids) == [" ", "", "🦙", "!"]


@pytest.mark.parametrize("text", ["日本語のテキスト", "naïve café", "👨‍👩‍👧 family", "🇫🇷🇩🇪", " Ærø", "  two spaces"])
def test_stream_concatenation_equals_full_decode(tokenizer: GptTokenizer, text: str) -> None:
    deltas = stream(tokenizer, tokenizer.encode(text))
    assert "".join(deltas) == text
    assert all("\ufffd" not in delta for delta in deltas)


def test_stream_property_random_texts(tokenizer: GptTokenizer) -> None:
    for text in random_texts(300, seed=3):
        ids = tokenizer.encode(text)
        assert "".join(stream(tokenizer, ids)) == tokenizer.decode(ids) == text


def test_stream_property_random_ids_with_invalid_utf8(tokenizer: GptTokenizer) -> None:
    """Arbitrary ids (lone continuation bytes, truncated characters): deltas + final flush == lossy full decode."""
    rng = random.Random(4)
    byte_tokens = [i for i, raw in enumerate(tokenizer.token_bytes) if len(raw) == 1 and raw[0] >= 0x80]
    for _ in range(300):
        ids = [rng.choice(byte_tokens) if rng.random() < 0.7 else rng.randrange(50257)
               for _ in range(rng.randrange(1, 25))]
        streamed = "".join(stream(tokenizer, ids)) + tokenizer.stream_delta(ids, 0, final=True)
        assert streamed == tokenizer.decode(ids), ids


def test_stream_delta_of_several_new_tokens(tokenizer: GptTokenizer) -> None:
    ids = tokenizer.encode("abc 日本 def")
    assert tokenizer.stream_delta(ids, len(ids)) == "abc 日本 def"
    assert tokenizer.stream_delta(ids, 0) == ""
    with pytest.raises(ValueError, match="num_new"):
        tokenizer.stream_delta(ids, len(ids) + 1)
