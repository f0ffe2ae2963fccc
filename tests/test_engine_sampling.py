"""Sampling, streaming, cancellation, limits and dtypes of GptEngine (HF's teacher-forced logits as the oracle)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from builder.runtime.core_io import RequestError
from builder.runtime.generation import GptEngine
from builder.runtime.gpt import GptModel
from builder.runtime.sampling import counter_uniform, sample_top_k_top_p
from engine_testing import TinyGpt, hf_generate, hf_next_token_logits, make_tiny_gpt, random_prompts, request

NEW_TOKENS = 12
SAMPLING = dict(top_k=20, top_p=0.9, temperature=1.3)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyGpt:
    return make_tiny_gpt(tmp_path_factory.mktemp("tiny_gpt"))


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
    assert GptModel.kv_cache_bytes(config, 16, config.max_pos_seq_len, torch.float32) == engine.kv_cache_bytes
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
