"""GPT-2 byte-level BPE: batched encode/decode and stateless, UTF-8-safe incremental detokenization.

Loaded once from a directory holding `vocab.json` + `merges.txt` with the `tokenizers` library (no hub, no remote
code). Ids match `GPT2TokenizerFast.from_pretrained(<dir>)`, including `<|endoftext|>` written in the text mapping to
the eos id (HF behaviour).

Encoding runs on `tiktoken` where its merge rule is known to give the same ids: the GPT-2 tables (those NeMo GPT
checkpoints carry), ~7x faster than `tokenizers` for a 512-token prompt, which is on every request's path to its
first token. Any other tables encode with `tokenizers`, the reference.

Byte-level BPE maps every token to an exact byte string, so the text of any token sequence is the UTF-8 decoding of the
concatenated bytes (invalid bytes -> U+FFFD, as `tokenizers` does). Streaming uses that: the text added by the last
token(s) is computed from the token bytes alone, holding back an unfinished multi-byte character.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import logging
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tiktoken import Encoding
    from tokenizers import Tokenizer

log = logging.getLogger(__name__)

VOCAB_FILE = "vocab.json"
MERGES_FILE = "merges.txt"
EOS_TOKEN = "<|endoftext|>"
# GPT-2's pre-tokenizer split (the ByteLevel pre-tokenizer's regex), in tiktoken's syntax.
GPT2_SPLIT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# Older tiktokens merge one long piece in quadratic time: a 250 kB run of one letter (the prompt byte limit lets it
# in) took 33 s with 0.12 on this project's CPU VM, 0.1 s with 0.13 and 0.14.
TIKTOKEN_MIN = (0, 13)
# sha256 of `_tables_digest` over builder/assets/gpt2 (OpenAI's GPT-2 tables). tiktoken merges the adjacent pair whose
# concatenation has the lowest id; BPE merges the listed pair of lowest rank. On these tables the two agree (ids are
# merge order; tests/test_text_tokenizer.py checks every token's own text and random texts against `tokenizers`), so
# only these tables take the fast path.
GPT2_TABLES_SHA256 = "233fc844abd6a111df959f7807e1db982eaeb797508ba373d46c476599c5bbde"


class TokenizerError(RuntimeError):
    """The tokenizer files are missing or unusable."""


@lru_cache(maxsize=1)
def byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the printable character standing for each byte value (char -> byte).

    Printable Latin-1 bytes stand for themselves; the other 68 bytes (controls, space, ...) are shifted to code points
    256, 257, ... in byte order, so every byte has a visible, non-whitespace character that BPE can merge.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    char_to_byte = {chr(b): b for b in printable}
    shifted = 0
    for byte in range(256):
        if byte not in printable:
            char_to_byte[chr(256 + shifted)] = byte
            shifted += 1
    return char_to_byte


def _tables_digest(token_bytes: list[bytes], entries: int, merges: str) -> str:
    """Digest of the tables' content (not their formatting): each id's bytes in id order (length-prefixed), the
    vocabulary's entry count (ids shared by two entries would otherwise hide), the merge lines in order. Built from
    the id table `from_directory` makes anyway: ~40 ms, where sorting the vocabulary took ~200 ms of every load."""
    digest = hashlib.sha256(b"".join(len(token).to_bytes(4, "little") + token for token in token_bytes))
    digest.update(entries.to_bytes(4, "little"))
    lines = (line.strip() for line in merges.splitlines() if line.strip() and not line.startswith("#version"))
    digest.update("\n".join(lines).encode("utf-8"))
    return digest.hexdigest()


def _tiktoken_encoding(token_bytes: list[bytes], eos_id: int) -> Encoding | None:
    """tiktoken over the GPT-2 tables (ids as ranks), `<|endoftext|>` in text -> eos as in HF; None (encode with
    tokenizers) without tiktoken >= TIKTOKEN_MIN."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        found: str | None = version("tiktoken")
        recent = tuple(int(part) for part in str(found).split(".")[:2]) >= TIKTOKEN_MIN
    except (PackageNotFoundError, ValueError):  # not installed, or a version string we cannot read
        found, recent = None, False
    if not recent:
        log.warning("tiktoken >= %s is not installed (found %s): prompts encode with tokenizers, ~7x slower",
                    ".".join(map(str, TIKTOKEN_MIN)), found)
        return None
    import tiktoken

    ranks = {token: token_id for token_id, token in enumerate(token_bytes) if token_id != eos_id}
    return tiktoken.Encoding("gpt2-tables", pat_str=GPT2_SPLIT, mergeable_ranks=ranks,
                             special_tokens={EOS_TOKEN: eos_id})


def _is_utf8_continuation(byte: int) -> bool:
    return 0x80 <= byte <= 0xBF


class GptTokenizer:
    """GPT-2 byte-level BPE tokenizer. Build with `from_directory`; thread-safe for reads."""

    def __init__(self, tokenizer: Tokenizer, token_bytes: list[bytes], eos_id: int, fast: Encoding | None = None):
        self._tokenizer = tokenizer
        self._fast = fast  # tiktoken, for tables it gives the same ids on (see GPT2_TABLES_SHA256)
        self.token_bytes = token_bytes  # id -> the exact bytes the token stands for
        self.eos_id = eos_id
        # Every token covers at most this many bytes of text, so a text of n bytes has >= n / max_token_bytes
        # tokens: lets callers refuse an oversized prompt without tokenizing it.
        self.max_token_bytes = max(len(EOS_TOKEN.encode()), *(len(token) for token in token_bytes))

    @classmethod
    def from_directory(cls, directory: Path | str) -> GptTokenizer:
        from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

        directory = Path(directory)
        vocab_path, merges_path = directory / VOCAB_FILE, directory / MERGES_FILE
        for path in (vocab_path, merges_path):
            if not path.is_file():
                raise TokenizerError(f"tokenizer file {path} is missing (need {VOCAB_FILE} and {MERGES_FILE})")
        try:
            vocab: dict[str, int] = json.loads(vocab_path.read_text(encoding="utf-8"))
            merges = merges_path.read_text(encoding="utf-8")
            tokenizer = Tokenizer(models.BPE.from_file(str(vocab_path), str(merges_path)))
        except Exception as err:  # json, OSError, and tokenizers' plain Exception for bad merges
            raise TokenizerError(f"cannot load the BPE tables in {directory}: {err}") from err
        if EOS_TOKEN not in vocab:
            raise TokenizerError(f"{vocab_path} has no {EOS_TOKEN} entry; not a GPT-2 vocabulary")
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        tokenizer.add_special_tokens([AddedToken(EOS_TOKEN, special=True, normalized=False)])

        alphabet = byte_level_alphabet()
        token_bytes = [b""] * (max(vocab.values()) + 1)
        for token, token_id in vocab.items():
            if token == EOS_TOKEN:
                token_bytes[token_id] = token.encode()
                continue
            try:
                token_bytes[token_id] = bytes(alphabet[char] for char in token)
            except KeyError as err:
                raise TokenizerError(f"{vocab_path}: token {token!r} has a character outside the byte-level "
                                     "alphabet; not a byte-level BPE vocabulary") from err
        fast = None
        if _tables_digest(token_bytes, len(vocab), merges) == GPT2_TABLES_SHA256:
            fast = _tiktoken_encoding(token_bytes, vocab[EOS_TOKEN])
        return cls(tokenizer, token_bytes, vocab[EOS_TOKEN], fast)

    def tokenizer_json(self) -> str:
        """The whole tokenizer as a `tokenizers` JSON document (tokenizer.json), which HF's AutoTokenizer loads."""
        return self._tokenizer.to_str()

    @property
    def encoder(self) -> str:
        """The library that encodes prompts, with its version ("tiktoken 0.14.0", else "tokenizers ..."): without
        tiktoken a 512-token prompt encodes ~7x slower, which every first-token figure carries, so benchmarks record
        it."""
        from importlib.metadata import version

        name = "tiktoken" if self._fast is not None else "tokenizers"
        return f"{name} {version(name)}"

    @property
    def vocab_size(self) -> int:
        """Number of ids with a token (a model's embedding table may be padded beyond this)."""
        return len(self.token_bytes)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of every text (no BOS/EOS added), in one call to the Rust tokenizer."""
        if not texts:
            return []
        if self._fast is not None:  # releases the GIL while it encodes; a thread pool did not pay for a Triton batch
            return [self._fast.encode(text, allowed_special="all") for text in texts]
        # encode_batch_fast (tokenizers >= 0.21) skips the character offsets nobody here reads: ~30 % less time for a
        # 512-token prompt, which is on every request's path to its first token.
        encode = getattr(self._tokenizer, "encode_batch_fast", self._tokenizer.encode_batch)
        return [encoding.ids for encoding in encode(list(texts), add_special_tokens=False)]

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def decode_batch(self, sequences: Sequence[Sequence[int]]) -> list[str]:
        """Text of every id sequence, in one call. Invalid UTF-8 -> U+FFFD; ids without a token are skipped."""
        if not sequences:
            return []
        return self._tokenizer.decode_batch([list(map(int, ids)) for ids in sequences], skip_special_tokens=False)

    def decode(self, ids: Sequence[int]) -> str:
        return self.decode_batch([ids])[0]

    def bytes_of(self, ids: Sequence[int]) -> bytes:
        table, size = self.token_bytes, len(self.token_bytes)
        return b"".join(table[i] if 0 <= i < size else b"" for i in map(int, ids))

    def stream_delta(self, generated: Sequence[int], num_new: int, final: bool = False) -> str:
        """Text added by the last `num_new` tokens of `generated` (the whole generation so far), statelessly.

        Equals `emitted(generated) - emitted(generated[:-num_new])` where `emitted(x)` is the decoding of x's bytes
        without its trailing unfinished character (held back until a later token completes it). With `final`, held
        bytes are flushed (as U+FFFD, like a full decode). Concatenating the deltas of consecutive calls therefore
        reproduces `decode(generated)` exactly.

        Only a short context window is decoded: the window starts at the latest token (before the new ones) whose
        first byte is not a UTF-8 continuation byte. A UTF-8 decoder always restarts at such a byte, so decoding
        from there groups the following bytes exactly as decoding from the start does.
        """
        total = len(generated)
        if not 0 <= num_new <= total:
            raise ValueError(f"num_new must be in [0, {total}], got {num_new}")
        first_new = total - num_new
        start = first_new
        while start > 0:
            start -= 1
            head = self.bytes_of(generated[start:start + 1])
            if head and not _is_utf8_continuation(head[0]):
                break
        context = self.bytes_of(generated[start:first_new])
        new = self.bytes_of(generated[first_new:])
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        context_text = decoder.decode(context, final=False)
        full_text = context_text + decoder.decode(new, final=final)
        return full_text[len(context_text):]
