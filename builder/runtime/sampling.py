"""Logit processing and token selection on the device, one entry per KV-cache slot, without host syncs.

Order of operations follows FasterTransformer: temperature, then repetition (multiplicative, HF/CTRL style) and
presence (additive) penalties over every token seen so far (prompt included), the frequency penalty (OpenAI's: the
count of each token in the generated text so far, times the penalty, subtracted), then bad words, the min_length ban of
end_id, and the mask of ids >= the usable vocabulary. A row these bans leave without any allowed token ends with
end_id; a temperature below GREEDY_TEMPERATURE is greedy, like 0. Selection: argmax for greedy rows; otherwise top-k,
then top-p over the renormalised top-k distribution (FT's combined semantics), then inverse-CDF sampling with one
uniform number per row and step from a counter-based hash of (random_seed, step). The same seed therefore gives the
same tokens whatever else is in the batch, and no per-row generator objects are needed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .core_io import GenerationRequest

NEG_INF = float("-inf")
WORD_PAD = -1  # left padding of right-aligned words in a WordTable
BEFORE_START = -2  # window entries before the first token of a sequence (never equal to a token or WORD_PAD)
TOPK_FAST_LIMIT = 1024  # when every sampling row has 0 < top_k <= this, use topk() instead of a full vocab sort
_MASK32 = 0xFFFFFFFF
# A temperature below this is greedy, as temperature 0 is. Dividing logits by 1e-44 overflows float32 (inf - inf =
# NaN in the softmax, so random tokens); at 1e-5 even a logit of 1e33 stays finite, and softmax(logits / T) is
# already one-hot in float32 for any gap >= 1e-3 between the two best logits (exp(-100) is below float32's normal
# range), so greedy changes no outcome but near-ties. vLLM uses the same cut-off.
GREEDY_TEMPERATURE = 1e-5


def topk_width(max_top_k: int) -> int:
    """The topk() width for a batch whose largest top_k is `max_top_k` (<= TOPK_FAST_LIMIT): the next power of two.
    Each row still masks past its own top_k, so the tokens are the same; the width is part of a step graph's key
    (step_graphs.py), and clients choose top_k, so exact widths would let them make the server capture a graph per
    value."""
    return min(TOPK_FAST_LIMIT, 1 << (max_top_k - 1).bit_length())


def is_greedy(request: GenerationRequest) -> bool:
    """The row picks the argmax: FT's greedy settings, or a temperature too small to sample with."""
    return request.is_greedy or request.temperature < GREEDY_TEMPERATURE


def effective_temperature(request: GenerationRequest) -> float:
    """What the logits are divided by: 1 for rows whose temperature means greedy (log-probs as for temperature 0)."""
    return 1.0 if request.temperature < GREEDY_TEMPERATURE else request.temperature


# SlotParams' tensor columns and their dtypes (the fields' comments below).
COLUMN_DTYPES: dict[str, torch.dtype] = {
    "temperature": torch.float32, "top_k": torch.long, "top_p": torch.float32, "greedy": torch.bool,
    "repetition_penalty": torch.float32, "presence_penalty": torch.float32, "frequency_penalty": torch.float32,
    "min_length": torch.long, "end_id": torch.long, "seed_lo": torch.long, "seed_hi": torch.long}


@dataclass
class SlotParams:
    """Per-slot decoding parameters on the device, plus host flags that skip work no row needs."""
    temperature: torch.Tensor  # [n] float32 (1 where the request says 0: those rows are greedy)
    top_k: torch.Tensor  # [n] int64, 0 = off
    top_p: torch.Tensor  # [n] float32, 0 or 1 = off
    greedy: torch.Tensor  # [n] bool
    repetition_penalty: torch.Tensor  # [n] float32
    presence_penalty: torch.Tensor  # [n] float32
    frequency_penalty: torch.Tensor  # [n] float32
    min_length: torch.Tensor  # [n] int64
    end_id: torch.Tensor  # [n] int64
    seed_lo: torch.Tensor  # [n] int64 in [0, 2^32)
    seed_hi: torch.Tensor  # [n] int64 in [0, 2^32)
    any_sampling: bool
    any_greedy: bool
    max_top_k: int | None  # set when the topk() shortcut is valid for every sampling row
    use_temperature: bool
    use_repetition: bool
    use_presence: bool
    use_min_length: bool
    use_frequency: bool = False

    @property
    def uses_seen_tokens(self) -> bool:
        return self.use_repetition or self.use_presence

    @staticmethod
    def values(request: GenerationRequest) -> dict[str, float | int | bool]:
        """One request's entry of each column (`build`'s; the in-flight scheduler writes them into a slot)."""
        return dict(temperature=effective_temperature(request), top_k=request.top_k, top_p=request.top_p,
                    greedy=is_greedy(request), repetition_penalty=request.repetition_penalty,
                    presence_penalty=request.presence_penalty, frequency_penalty=request.frequency_penalty,
                    min_length=request.min_length, end_id=request.end_id, seed_lo=request.random_seed & _MASK32,
                    seed_hi=request.random_seed >> 32)

    @classmethod
    def build(cls, requests: Sequence[GenerationRequest], repeat: int, device: torch.device) -> SlotParams:
        """One entry per slot: each request's values repeated `repeat` times (its beams)."""
        entries = [cls.values(r) for r in requests]

        def column(name: str) -> torch.Tensor:
            return torch.tensor([entry[name] for entry in entries for _ in range(repeat)], dtype=COLUMN_DTYPES[name],
                                device=device)

        sampling = [r for r in requests if not is_greedy(r)]
        top_ks = [r.top_k for r in sampling]
        bounded = bool(sampling) and all(0 < k <= TOPK_FAST_LIMIT for k in top_ks)
        temperatures = [entry["temperature"] for entry in entries]
        return cls(
            **{name: column(name) for name in COLUMN_DTYPES},  # the tensor fields
            any_sampling=bool(sampling),
            any_greedy=len(sampling) < len(requests),
            max_top_k=topk_width(max(top_ks)) if bounded else None,
            use_temperature=any(t != 1.0 for t in temperatures),
            use_repetition=any(r.repetition_penalty != 1.0 for r in requests),
            use_presence=any(r.presence_penalty != 0.0 for r in requests),
            use_min_length=any(r.min_length > 0 for r in requests),
            use_frequency=any(r.frequency_penalty != 0.0 for r in requests),
        )


def last_tokens(history: torch.Tensor, lengths: torch.Tensor, width: int) -> torch.Tensor:
    """history [R, S], lengths [R] -> the last `width` tokens of each row [R, width], BEFORE_START-padded."""
    index = lengths[:, None] - width + torch.arange(width, device=history.device)  # [R, width]
    return history.gather(1, index.clamp(min=0)).masked_fill(index < 0, BEFORE_START)


@dataclass
class WordTable:
    """Words (token-id sequences) of many rows, right-aligned in one tensor so all rows match in one shot."""
    rows: torch.Tensor  # [W] the row (slot or request) each word belongs to
    tokens: torch.Tensor  # [W, width], WORD_PAD on the left of shorter words

    @property
    def width(self) -> int:
        return self.tokens.shape[1]

    @classmethod
    def build(cls, words_per_row: Sequence[Sequence[Sequence[int]]], device: torch.device) -> WordTable | None:
        entries = [(row, tuple(word)) for row, words in enumerate(words_per_row) for word in words]
        if not entries:
            return None
        width = max(len(word) for _, word in entries)
        tokens = torch.full((len(entries), width), WORD_PAD, dtype=torch.long)
        for j, (_, word) in enumerate(entries):
            if word:
                tokens[j, width - len(word):] = torch.tensor(word, dtype=torch.long)
        rows = torch.tensor([row for row, _ in entries], dtype=torch.long)
        return cls(rows=rows.to(device), tokens=tokens.to(device))

    def hits(self, windows: torch.Tensor) -> torch.Tensor:
        """windows [R, ..., width] (each row's last tokens) -> [W, ...]: the word ends its row's window."""
        window = windows[self.rows]  # [W, ..., width]
        words = self.tokens.view(self.tokens.shape[0], *([1] * (window.dim() - 2)), self.width)
        return ((words == WORD_PAD) | (words == window)).all(dim=-1)

    def rows_hit(self, windows: torch.Tensor) -> torch.Tensor:
        """windows [R, ..., width] -> [R, ...] bool: some word of the row ends its window."""
        hits = self.hits(windows)
        counts = torch.zeros((windows.shape[0], *hits.shape[1:]), dtype=torch.float32, device=windows.device)
        return counts.index_add_(0, self.rows, hits.to(torch.float32)) > 0


@dataclass
class BadWords:
    """FT bad-word semantics: a word's last token is banned when the tokens before it end the sequence so far
    (a 1-token word is always banned)."""
    prefixes: WordTable  # each word without its last token (possibly empty: always matches)
    banned: torch.Tensor  # [W] each word's last token

    @classmethod
    def build(cls, words_per_slot: Sequence[Sequence[Sequence[int]]], device: torch.device) -> BadWords | None:
        prefixes = WordTable.build([[word[:-1] for word in words] for words in words_per_slot], device)
        if prefixes is None:
            return None
        banned = [word[-1] for words in words_per_slot for word in words]
        return cls(prefixes=prefixes, banned=torch.tensor(banned, dtype=torch.long, device=device))

    def apply(self, logits: torch.Tensor, history: torch.Tensor, lengths: torch.Tensor) -> None:
        match = self.prefixes.hits(last_tokens(history, lengths, self.prefixes.width))  # [W]
        penalty = torch.where(match, NEG_INF, 0.0).to(logits.dtype)
        logits.index_put_((self.prefixes.rows, self.banned), penalty, accumulate=True)  # -inf + x = -inf


def generated_counts(history: torch.Tensor, lengths: torch.Tensor, generated: torch.Tensor, vocab: int
                     ) -> torch.Tensor:
    """[n, vocab] float32: how often each token occurs among each row's generated tokens (OpenAI's frequency
    penalty counts the completion only, not the prompt). Counted from the history on demand, so rows that never ask
    for the penalty keep no per-token state; history [n, S] holds positions lengths - generated .. lengths - 1."""
    positions = torch.arange(history.shape[1], device=history.device)[None, :]  # [1, S]
    mask = (positions >= (lengths - generated)[:, None]) & (positions < lengths[:, None])  # [n, S]
    tokens = torch.where(mask, history, 0).clamp(max=vocab - 1)
    counts = torch.zeros((history.shape[0], vocab), dtype=torch.float32, device=history.device)
    return counts.scatter_add_(1, tokens, mask.to(torch.float32))


def process_logits(logits: torch.Tensor, params: SlotParams, *, generated: torch.Tensor, seen: torch.Tensor | None,
                   bad_words: BadWords | None, history: torch.Tensor, lengths: torch.Tensor,
                   vocab_limit: int) -> torch.Tensor:
    """Model logits [n, V] -> float32 logits the selection works on (a new tensor; the input is left alone).

    generated [n]: tokens generated so far per slot; seen [n, >=V] bool: tokens in the sequence so far.
    """
    logits = logits.to(torch.float32, copy=True)
    vocab = logits.shape[1]
    if params.use_temperature:
        logits /= params.temperature[:, None]
    if seen is not None:
        seen = seen[:, :vocab]
        if params.use_repetition:
            penalty = params.repetition_penalty[:, None]
            logits = torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)
        if params.use_presence:
            logits -= seen.to(torch.float32) * params.presence_penalty[:, None]
    if params.use_frequency:
        logits -= generated_counts(history, lengths, generated, vocab) * params.frequency_penalty[:, None]
    if bad_words is not None:
        bad_words.apply(logits, history, lengths)
    if params.use_min_length:
        end = params.end_id[:, None]
        too_short = (generated < params.min_length)[:, None]
        logits.scatter_(1, end, torch.where(too_short, NEG_INF, logits.gather(1, end)))
    if vocab_limit < vocab:
        logits[:, vocab_limit:] = NEG_INF
    if bad_words is not None or params.use_min_length:
        # Bans can leave a row no allowed token (bad words covering the vocabulary, or all but end_id with
        # min_length banning end_id): argmax would then pick a banned id and sampling a random one (softmax of all
        # -inf is NaN). Such a row ends instead: end_id becomes its only choice, so it finishes with reason "stop".
        exhausted = (logits.amax(dim=1) == NEG_INF)[:, None]  # [n, 1]
        end = params.end_id[:, None]
        logits.scatter_(1, end, torch.where(exhausted, 0.0, logits.gather(1, end)))
    return logits


def _mix32(x: int | torch.Tensor) -> int | torch.Tensor:
    """A 32-bit integer hash (xorshift-multiply rounds) of a Python int or int64 lanes holding values in [0, 2^32).

    The multipliers are odd and below 2^31, so no product reaches 2^63: the arithmetic is exact on every device.
    """
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x2C1B3C6D) & _MASK32
    return x ^ (x >> 16)


def counter_uniform(seed_lo: torch.Tensor, seed_hi: torch.Tensor, step: int | torch.Tensor) -> torch.Tensor:
    """A uniform number in (0, 1) per row that depends only on (seed, step): float32 [n].

    A Python-int step is hashed on the host, so no host-to-device copy (and no stream sync) happens per step.
    """
    step_key = _mix32((step + 0x632BE5AB) & _MASK32)
    h = _mix32(seed_lo ^ _mix32(seed_hi ^ step_key))
    return ((h >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))  # type: ignore[union-attr]  # seeds: tensors


def sample_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, uniform: torch.Tensor,
                       max_top_k: int | None) -> torch.Tensor:
    """Per-row top-k (0 = off), then top-p (0 or 1 = off) over the renormalised top-k, then inverse-CDF sampling."""
    if max_top_k is not None:
        values, indices = logits.topk(max_top_k, dim=-1)  # sorted, descending
    else:
        values, indices = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(values.shape[1], device=logits.device)
    values = values.masked_fill((top_k[:, None] > 0) & (ranks[None, :] >= top_k[:, None]), NEG_INF)
    probs = values.softmax(dim=-1)
    nucleus = ((top_p > 0) & (top_p < 1))[:, None]
    # Keep the smallest prefix whose mass reaches top_p: drop a token when the mass before it already does.
    probs = probs.masked_fill(nucleus & (probs.cumsum(dim=-1) - probs >= top_p[:, None]), 0.0)
    cdf = probs.cumsum(dim=-1)
    target = uniform[:, None] * cdf[:, -1:]
    choice = torch.searchsorted(cdf, target, right=True).clamp_(max=values.shape[1] - 1)
    return indices.gather(1, choice).squeeze(1)


def select_tokens(logits: torch.Tensor, params: SlotParams, step: int | torch.Tensor) -> torch.Tensor:
    """Processed logits [n, V] -> next token per slot [n] (int64). step: the decode step, for all rows or per row."""
    if not params.any_sampling:
        return logits.argmax(dim=-1)
    uniform = counter_uniform(params.seed_lo, params.seed_hi, step)
    sampled = sample_top_k_top_p(logits, params.top_k, params.top_p, uniform, params.max_top_k)
    return torch.where(params.greedy, logits.argmax(dim=-1), sampled) if params.any_greedy else sampled


@dataclass
class RowState:
    """Per-row decoding state on the device, [n] (history [n, S], seen [n, >=V]); `advance_rows` updates it."""
    history: torch.Tensor
    lengths: torch.Tensor
    generated: torch.Tensor
    finished: torch.Tensor
    stopped: torch.Tensor
    output_len: torch.Tensor
    seen: torch.Tensor | None


def advance_rows(processed: torch.Tensor, params: SlotParams, step: int | torch.Tensor, state: RowState,
                 stop_words: WordTable | None, want_log_probs: bool
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One decode step's bookkeeping, in place and without a host sync: select each row's token, append it, and mark
    rows that hit end_id, a stop word or their length. Returns (tokens, rows that were active, chosen log-probs)."""
    tokens = select_tokens(processed, params, step)
    active = ~state.finished
    tokens = torch.where(active, tokens, params.end_id)  # finished rows emit end_id and stay put
    log_probs = None
    if want_log_probs:
        chosen = processed.log_softmax(dim=-1).gather(1, tokens[:, None]).squeeze(1)
        log_probs = torch.where(active, chosen, 0.0)
    state.history.scatter_(1, state.lengths[:, None], tokens[:, None])
    state.lengths += active
    state.generated += active
    if state.seen is not None:
        state.seen.scatter_(1, tokens[:, None], True)
    hit_stop = tokens == params.end_id
    if stop_words is not None:
        hit_stop |= stop_words.rows_hit(last_tokens(state.history, state.lengths, stop_words.width))
    state.stopped |= active & hit_stop
    state.finished |= active & (hit_stop | (state.generated >= state.output_len))
    return tokens, active, log_probs
