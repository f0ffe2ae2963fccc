"""Sampling, streaming, cancellation, limits and dtypes of GptEngine (HF's teacher-forced logits as the oracle)."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from builder.runtime.core_io import RequestError
from builder.runtime.generation import GptEngine
from builder.runtime.sampling import (GREEDY_TEMPERATURE, SlotParams, counter_uniform, generated_counts,
                                       sample_top_k_top_p, topk_width)
from builder.runtime.scheduler import InflightScheduler
from engine_testing import END_ID, TinyGpt, hf_generate, hf_next_token_logits, random_prompts, request

NEW_TOKENS = 12
SAMPLING = dict(top_k=20, top_p=0.9, temperature=1.3)


@pytest.fixture(scope="module")
def engine(tiny: TinyGpt) -> GptEngine:
    return GptEngine.from_ft_dir(tiny.ft_dir, max_batch_size=16)


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    return random_prompts(6, seed=2)


def generated(output, prompt: list[int]) -> list[int]:
    return output.beams[0].tolist()[len(prompt):]


def test_same_seed_same_tokens_whatever_the_batch(engine: GptEngine, prompts) -> None:
    target = request(prompts[0], NEW_TOKENS, random_seed=1234, **SAMPLING)
    alone = engine.generate([target])[0]
    others = [request(p, NEW_TOKENS, random_seed=i, **SAMPLING) for i, p in enumerate(prompts[1:])]
    in_batch = engine.generate([*others[:2], target, *others[2:]])[2]
    assert generated(in_batch, prompts[0]) == generated(alone, prompts[0])
    assert generated(engine.generate([target])[0], prompts[0]) == generated(alone, prompts[0])


def test_different_seeds_different_tokens(engine: GptEngine, prompts) -> None:
    outputs = engine.generate([request(prompts[0], NEW_TOKENS, random_seed=seed, **SAMPLING) for seed in range(6)])
    assert len({tuple(generated(o, prompts[0])) for o in outputs}) >= 5


def test_sampled_tokens_respect_top_k_and_top_p(tiny: TinyGpt, engine: GptEngine, prompts) -> None:
    temperature = 1.5
    cases = [dict(top_k=3), dict(top_p=0.5), dict(top_k=5, top_p=0.6)]
    rows = [request(p, NEW_TOKENS, random_seed=7 + i, temperature=temperature, return_log_probs=True, **case)
            for i, case in enumerate(cases) for p in prompts]
    outputs = engine.generate(rows)
    for row, output in zip(rows, outputs):
        sequence = output.beams[0].tolist()
        prompt_len = len(row.input_ids)
        logits = hf_next_token_logits(tiny.hf, sequence)[prompt_len - 1:-1] / temperature  # [generated, V]
        for step, token in enumerate(sequence[prompt_len:]):
            probs = logits[step].softmax(-1)
            order = probs.argsort(descending=True)
            rank = int((order == token).nonzero())
            if row.top_k:
                assert rank < row.top_k
                probs = torch.zeros_like(probs).scatter_(0, order[:row.top_k], probs[order[:row.top_k]])
                probs /= probs.sum()
            if row.top_p:
                mass_before = probs[order[:rank]].sum().item()
                assert mass_before < row.top_p + 1e-5
        # log-probs are those of the temperature-scaled distribution, before truncation
        expected = logits.log_softmax(-1).gather(1, torch.tensor(sequence[prompt_len:])[:, None]).squeeze(1)
        np.testing.assert_allclose(output.output_log_probs[0], expected.numpy(), atol=1e-4)


def test_sampler_follows_the_distribution() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    draws = 20000
    uniform = counter_uniform(torch.tensor([99]), torch.tensor([0]), torch.arange(draws))
    assert 0.0 < uniform.min() and uniform.max() < 1.0
    tokens = sample_top_k_top_p(logits.expand(draws, -1), torch.full((draws,), 4), torch.zeros(draws), uniform,
                                max_top_k=4)
    frequencies = torch.bincount(tokens, minlength=6).double() / draws
    expected = torch.cat([logits[0, :4].softmax(-1), torch.zeros(2)]).double()
    assert (frequencies - expected).abs().sum() / 2 < 0.015  # total variation
    nucleus = sample_top_k_top_p(logits.expand(draws, -1), torch.zeros(draws, dtype=torch.long),
                                 torch.full((draws,), 0.6), uniform, max_top_k=None)
    assert set(nucleus.tolist()) == {0, 1}  # p(0) = 0.53 < 0.6 <= p(0) + p(1)


def test_a_wider_topk_picks_the_same_tokens() -> None:
    """The topk() width is rounded up to a power of two (so clients' top_k values cannot each add a step graph);
    every row still keeps only its own top_k, so the sampled tokens equal those of the exact width."""
    assert [topk_width(k) for k in (1, 2, 3, 5, 64, 65, 1000, 1024)] == [1, 2, 4, 8, 64, 128, 1024, 1024]
    rows = 512
    generator = torch.Generator().manual_seed(5)
    logits = torch.randn(rows, 300, generator=generator)
    top_k = torch.randint(1, 38, (rows,), generator=generator)
    top_p = torch.where(torch.arange(rows) % 2 == 0, 0.0, torch.rand(rows, generator=generator))
    uniform = counter_uniform(torch.arange(rows), torch.zeros(rows, dtype=torch.long), 3)
    exact = sample_top_k_top_p(logits, top_k, top_p, uniform, max_top_k=int(top_k.max()))
    wider = sample_top_k_top_p(logits, top_k, top_p, uniform, max_top_k=topk_width(int(top_k.max())))
    assert topk_width(int(top_k.max())) > int(top_k.max())  # the test exercises a wider width
    assert torch.equal(exact, wider)
    assert bool((exact != logits.argmax(-1)).any())  # sampled, not all greedy


def test_streaming_reports_every_step_cumulatively(engine: GptEngine, prompts) -> None:
    rows = [request(prompts[0], NEW_TOKENS, **SAMPLING, random_seed=3),
            request(prompts[1], 4, return_log_probs=True)]
    seen: dict[int, list[list[int]]] = {0: [], 1: []}
    finished_flags: dict[int, list[bool]] = {0: [], 1: []}

    def on_step(updates) -> None:
        for index, output in updates:
            seen[index].append(output.beams[0].tolist())
            finished_flags[index].append(output.finished)

    outputs = engine.generate(rows, on_step=on_step)
    assert [o.beams[0].tolist() for o in outputs] == [o.beams[0].tolist() for o in engine.generate(rows)]
    for index, row in enumerate(rows):
        steps = seen[index]
        assert len(steps) == row.output_len
        assert finished_flags[index] == [False] * (row.output_len - 1) + [True]
        for k, cumulative in enumerate(steps):
            assert len(cumulative) == len(row.input_ids) + k + 1
            assert cumulative == outputs[index].beams[0].tolist()[:len(cumulative)]


def test_cancelled_row_stops_and_others_finish(engine: GptEngine, prompts) -> None:
    steps_seen = {0: 0}

    def on_step(updates) -> None:
        for index, _ in updates:
            steps_seen[index] = steps_seen.get(index, 0) + 1

    rows = [request(prompts[0], NEW_TOKENS), request(prompts[1], NEW_TOKENS)]
    engine.cancel_poll_s = 0.0  # poll after every step
    outputs = engine.generate(rows, on_step=on_step, is_cancelled=lambda: [0] if steps_seen[0] >= 3 else [])
    assert outputs[0].cancelled and outputs[0].finish_reason == "cancelled"
    assert len(outputs[0].beams[0]) == len(prompts[0]) + 3
    assert outputs[1].beams[0].tolist() == engine.generate([rows[1]])[0].beams[0].tolist()
    assert len(outputs[1].beams[0]) == len(prompts[1]) + NEW_TOKENS


def test_requests_beyond_the_limits_are_refused(engine: GptEngine, prompts) -> None:
    too_long = request(prompts[0], engine.limits.max_seq_len)
    with pytest.raises(RequestError, match="request_output_len.*max_seq_len"):
        engine.generate([too_long])
    with pytest.raises(RequestError, match="input_ids"):
        engine.generate([request([engine.limits.vocab_size], 2)])


def test_kv_cache_budget(tiny: TinyGpt, engine: GptEngine) -> None:
    config = engine.config
    per_token = 2 * config.num_layer * config.head_num * config.size_per_head * 4
    assert engine.kv_cache_bytes == 16 * config.max_pos_seq_len * per_token
    assert 16 * engine.model.slot_bytes(config.max_pos_seq_len) == engine.kv_cache_bytes
    assert sum(c.numel() * c.element_size() for c in engine.model.k_cache + engine.model.v_cache) == \
        engine.kv_cache_bytes


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_runs_close_to_fp32(tiny: TinyGpt, engine: GptEngine, prompts, dtype: torch.dtype) -> None:
    half = GptEngine.from_ft_dir(tiny.ft_dir, dtype=dtype, max_batch_size=4)
    row = request(prompts[0], 4, return_log_probs=True)
    output = half.generate([row])[0]
    assert len(output.beams[0]) == len(prompts[0]) + 4
    # The first token is decided by the prefill logits: compare them with fp32 (bf16 keeps ~3 significant digits).
    with torch.inference_mode():
        tokens = torch.tensor([prompts[0]])
        lengths = torch.tensor([len(prompts[0])])
        ref = engine.model.prefill(tokens, lengths).float()
        got = half.model.prefill(tokens, lengths).float()
    error = (got - ref).abs().max().item()
    assert error < 0.05 * ref.abs().max().item()
    top2 = ref[0].topk(2).values
    if (top2[0] - top2[1]).item() > 2 * error:  # not a near-tie: reduced precision must pick the same token
        assert output.beams[0][len(prompts[0])] == hf_generate(tiny.hf, prompts[0], 1)[-1]


# ---- allowed but extreme values (issue 11) ------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1e-44, 1e-30, 9e-6])
def test_tiny_temperature_is_greedy(tiny: TinyGpt, engine: GptEngine, prompts, temperature: float) -> None:
    """logits / 1e-44 overflowed float32 and top_p then sampled random tokens: below GREEDY_TEMPERATURE a temperature
    means greedy, exactly as 0 does (tokens and log-probs), next to a row that really samples."""
    rows = [request(p, NEW_TOKENS, temperature=temperature, top_p=0.9, random_seed=i, return_log_probs=True)
            for i, p in enumerate(prompts)]
    sampler = request(prompts[0], NEW_TOKENS, random_seed=5, **SAMPLING)
    outputs = engine.generate([*rows, sampler])
    as_zero = engine.generate([request(p, NEW_TOKENS, temperature=0.0, top_p=0.9, return_log_probs=True)
                               for p in prompts])
    for prompt, output, zero in zip(prompts, outputs, as_zero):
        assert output.beams[0].tolist() == hf_generate(tiny.hf, prompt, NEW_TOKENS)
        np.testing.assert_allclose(output.output_log_probs[0], zero.output_log_probs[0], atol=1e-5)
        assert np.isfinite(output.output_log_probs[0]).all()
    assert generated(outputs[-1], prompts[0]) == generated(engine.generate([sampler])[0], prompts[0])


def test_greedy_temperature_boundary() -> None:
    rows = [request([1], 1, temperature=t, top_p=0.9) for t in (0.0, 1e-44, 0.99e-5, 1e-5, 1e-4)]
    params = SlotParams.build(rows, 1, torch.device("cpu"))
    assert params.greedy.tolist() == [True, True, True, False, False]
    assert params.temperature.tolist() == pytest.approx([1.0, 1.0, 1.0, 1e-5, 1e-4])
    assert GREEDY_TEMPERATURE == 1e-5


EVERY_ID = tuple((token,) for token in range(512))  # the tiny model's whole vocabulary, one-token bad words


@pytest.mark.parametrize("mode", ["greedy", "sampling", "beam"])
def test_bad_words_banning_every_id_end_the_row_with_the_end_token(engine: GptEngine, prompts, mode: str) -> None:
    """Banning every id used to emit a banned id anyway (argmax over all -inf, or a NaN softmax); now such a row ends
    with its end token, finish_reason "stop", whatever the decoding mode."""
    end_id = 5  # not id 0, which argmax over all -inf happens to return
    options = {"greedy": {}, "sampling": dict(SAMPLING, random_seed=3), "beam": dict(beam_width=2)}[mode]
    rows = [request(p, NEW_TOKENS, end_id=end_id, bad_words=EVERY_ID, **options) for p in prompts[:3]]
    for prompt, output in zip(prompts, engine.generate(rows)):
        assert output.beams[0].tolist() == prompt + [end_id], output.beams[0].tolist()
        assert output.finish_reason == "stop"


def test_bans_that_leave_no_token_end_the_row_even_before_min_length(engine: GptEngine, prompts) -> None:
    """Everything but end_id is a bad word and min_length bans end_id: the row ends (a conflict resolved towards
    never emitting a banned token); a row with one id left keeps generating that id up to its length."""
    end_id = 5
    all_but_end = tuple(word for word in EVERY_ID if word != (end_id,))
    all_but_seven = tuple(word for word in EVERY_ID if word != (7,))
    ended, sevens = engine.generate([request(prompts[0], NEW_TOKENS, end_id=end_id, bad_words=all_but_end,
                                             min_length=4),
                                     request(prompts[1], NEW_TOKENS, end_id=end_id, bad_words=all_but_seven)])
    assert ended.beams[0].tolist() == prompts[0] + [end_id] and ended.finish_reason == "stop"
    assert sevens.beams[0].tolist() == prompts[1] + [7] * NEW_TOKENS and sevens.finish_reason == "length"


class _FinalSink:
    """Keeps the final response of one request submitted to the in-flight scheduler."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.outputs: list | None = None
        self.error: Exception | None = None

    def update(self, outputs) -> None:
        pass

    def finish(self, outputs) -> None:
        self.outputs = outputs
        self.done.set()

    def fail(self, error: Exception) -> None:
        self.error = error
        self.done.set()

    def is_cancelled(self) -> bool:
        return False


def test_in_flight_scheduler_treats_tiny_temperatures_and_total_bans_alike(tiny: TinyGpt, prompts) -> None:
    """The streaming path (InflightScheduler) builds its slot parameters and processes logits with the same code."""
    scheduler = InflightScheduler(GptEngine.from_ft_dir(tiny.ft_dir, max_batch_size=8)).start()
    try:
        sinks = [_FinalSink(), _FinalSink()]
        scheduler.submit([request(prompts[0], NEW_TOKENS, temperature=1e-44, top_p=0.9, random_seed=1)], sinks[0])
        scheduler.submit([request(prompts[1], NEW_TOKENS, end_id=5, bad_words=EVERY_ID, **SAMPLING)], sinks[1])
        for sink in sinks:
            assert sink.done.wait(60) and sink.error is None, sink.error
    finally:
        scheduler.stop()
    assert sinks[0].outputs[0].beams[0].tolist() == hf_generate(tiny.hf, prompts[0], NEW_TOKENS)
    assert sinks[1].outputs[0].beams[0].tolist() == prompts[1] + [5]
    assert sinks[1].outputs[0].finish_reason == "stop"


# ---- frequency_penalty (issue 13: the name TRT-LLM's clients and OpenAI's API send) --------------------------------

def frequency_reference(tiny: TinyGpt, prompt: list[int], new_tokens: int, penalty: float) -> list[int]:
    """Greedy decoding with OpenAI's frequency penalty, step by step on HF's logits: each step subtracts penalty x
    (times the token occurs in the generated text so far; the prompt does not count)."""
    sequence = list(prompt)
    for _ in range(new_tokens):
        logits = hf_next_token_logits(tiny.hf, sequence)[-1].clone()
        for token in set(sequence[len(prompt):]):
            logits[token] -= penalty * sequence[len(prompt):].count(token)
        token = int(logits.argmax())
        sequence.append(token)
        if token == END_ID:
            break
    return sequence


def test_generated_counts_match_a_plain_count() -> None:
    history = torch.tensor([[5, 6, 5, 5, 7, 9], [1, 1, 2, 3, 3, 9]])  # rows: prompt, generated, padding
    lengths, generated = torch.tensor([5, 5]), torch.tensor([3, 4])  # row 0 generated [5, 5, 7]; row 1 [1, 2, 3, 3]
    counts = generated_counts(history, lengths, generated, vocab=10)
    for row in range(2):
        tokens = history[row, int(lengths[row] - generated[row]):int(lengths[row])].tolist()
        assert counts[row].tolist() == [float(tokens.count(t)) for t in range(10)]


@pytest.mark.parametrize("penalty", [1.5, -0.5])
def test_frequency_penalty_matches_the_reference(tiny: TinyGpt, engine: GptEngine, prompts, penalty: float) -> None:
    rows = [request(p, NEW_TOKENS, frequency_penalty=penalty) for p in prompts]
    expected = [frequency_reference(tiny, p, NEW_TOKENS, penalty) for p in prompts]
    static = engine.generate([*rows, request(prompts[0], NEW_TOKENS)])  # a row without the penalty alongside
    assert [o.beams[0].tolist() for o in static[:-1]] == expected
    assert static[-1].beams[0].tolist() == hf_generate(tiny.hf, prompts[0], NEW_TOKENS)
    # The penalty changes something (else this test could not fail): greedy without it differs for some prompt.
    assert any(e != hf_generate(tiny.hf, p, NEW_TOKENS) for e, p in zip(expected, prompts))
    scheduler = InflightScheduler(GptEngine.from_ft_dir(tiny.ft_dir, max_batch_size=8)).start()
    try:
        sinks = [_FinalSink() for _ in rows]
        for row, sink in zip(rows, sinks):
            scheduler.submit([row], sink)
        for sink in sinks:
            assert sink.done.wait(60) and sink.error is None, sink.error
    finally:
        scheduler.stop()
    assert [sink.outputs[0].beams[0].tolist() for sink in sinks] == expected
