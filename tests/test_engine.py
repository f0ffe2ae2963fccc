"""GptEngine against Hugging Face's GPT2LMHeadModel (same weights via `builder convert` -> FT files -> from_ft_dir).

Deterministic decoding (greedy, beam search, penalties, word lists, log-probs) must equal HF token for token.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from builder.runtime.core_io import ft_outputs
from builder.runtime.generation import GptEngine
from engine_testing import END_ID, TinyGpt, hf_generate, random_prompts, request

NEW_TOKENS = 10


@pytest.fixture(scope="module")
def engine(tiny: TinyGpt) -> GptEngine:
    return GptEngine.from_ft_dir(tiny.ft_dir, device="cpu", dtype=torch.float32, max_batch_size=32)


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    return random_prompts(9, seed=1)


@pytest.fixture(scope="module")
def greedy_reference(tiny: TinyGpt, prompts: list[list[int]]) -> list[list[int]]:
    return [hf_generate(tiny.hf, p, NEW_TOKENS) for p in prompts]


def tokens(output) -> list[int]:  # the best beam of a RowOutput
    return output.beams[0].tolist()


def test_greedy_ragged_batch_equals_hf(engine: GptEngine, prompts, greedy_reference) -> None:
    assert len({len(p) for p in prompts}) > 3, "the batch must be ragged"
    outputs = engine.generate([request(p, NEW_TOKENS) for p in prompts])
    assert [tokens(o) for o in outputs] == greedy_reference


@pytest.mark.parametrize("sampling", [dict(top_k=1), dict(top_k=1, top_p=0.9, temperature=0.7, random_seed=5),
                                      dict(top_k=0, top_p=0.0)])
def test_ft_greedy_settings_equal_greedy(engine: GptEngine, prompts, greedy_reference, sampling) -> None:
    outputs = engine.generate([request(p, NEW_TOKENS, **sampling) for p in prompts])
    assert [tokens(o) for o in outputs] == greedy_reference


def test_ft_output_layout(engine: GptEngine, prompts, greedy_reference) -> None:
    rows = [request(p, NEW_TOKENS) for p in prompts[:3]]
    arrays = ft_outputs(rows, engine.generate(rows), with_log_probs=False)
    max_input = max(len(p) for p in prompts[:3])
    assert arrays["output_ids"].shape == (3, 1, max_input + NEW_TOKENS)
    assert arrays["output_ids"].dtype == np.uint32 and arrays["sequence_length"].dtype == np.uint32
    for i, prompt in enumerate(prompts[:3]):
        n = len(greedy_reference[i])
        assert arrays["output_ids"][i, 0, :n].tolist() == greedy_reference[i]
        assert (arrays["output_ids"][i, 0, n:] == END_ID).all()
        assert arrays["sequence_length"][i, 0] == n
        assert arrays["response_input_lengths"][i, 0] == len(prompt)


def _likely_token(greedy_reference: list[list[int]], prompts: list[list[int]]) -> int:
    """The token greedy decoding produces most often: an end_id that beam search will actually meet."""
    counts = Counter(t for ref, p in zip(greedy_reference, prompts) for t in ref[len(p):])
    return counts.most_common(1)[0][0]


@pytest.mark.parametrize("len_penalty", [0.0, 1.0, 2.0])
def test_beam_search_best_beam_equals_hf(tiny: TinyGpt, engine: GptEngine, prompts, greedy_reference,
                                         len_penalty: float) -> None:
    end_id = _likely_token(greedy_reference, prompts)
    rows = [request(p, NEW_TOKENS, beam_width=4, len_penalty=len_penalty, end_id=end_id, return_log_probs=True)
            for p in prompts]
    outputs = engine.generate(rows)
    ended_early = 0
    for prompt, output in zip(prompts, outputs):
        reference = tiny.hf.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, num_beams=4,
                                     do_sample=False, early_stopping=False, length_penalty=len_penalty,
                                     eos_token_id=end_id, pad_token_id=end_id, output_scores=True,
                                     return_dict_in_generate=True)
        assert tokens(output) == reference.sequences[0].tolist()
        generated = len(tokens(output)) - len(prompt)
        ended_early += generated < NEW_TOKENS
        # HF's sequence score is the length-normalised cumulative log-prob of the best beam.
        assert output.cum_log_probs[0] / generated ** len_penalty == pytest.approx(
            reference.sequences_scores[0].item(), abs=1e-4)
        assert len(output.beams) == 4
        assert output.output_log_probs[0].sum() == pytest.approx(output.cum_log_probs[0], abs=1e-4)
    if len_penalty == 0.0:  # without length normalisation short finished hypotheses win and survive
        assert ended_early > 0, "end_id was never generated: the finished-hypothesis path went untested"


def test_log_probs_equal_hf_scores(tiny: TinyGpt, engine: GptEngine, prompts) -> None:
    outputs = engine.generate([request(p, NEW_TOKENS, return_log_probs=True) for p in prompts])
    for prompt, output in zip(prompts, outputs):
        reference = tiny.hf.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                     eos_token_id=END_ID, pad_token_id=END_ID, output_scores=True,
                                     return_dict_in_generate=True)
        expected = tiny.hf.compute_transition_scores(reference.sequences, reference.scores, normalize_logits=True)[0]
        np.testing.assert_allclose(output.output_log_probs[0], expected.numpy(), atol=1e-4)
        assert output.cum_log_probs[0] == pytest.approx(expected.sum().item(), abs=1e-3)


def test_repetition_penalty_equals_hf(tiny: TinyGpt, engine: GptEngine, prompts) -> None:
    outputs = engine.generate([request(p, NEW_TOKENS, repetition_penalty=1.8) for p in prompts])
    expected = [hf_generate(tiny.hf, p, NEW_TOKENS, repetition_penalty=1.8) for p in prompts]
    assert [tokens(o) for o in outputs] == expected


class PresencePenalty(LogitsProcessor):
    """The definition of FT's presence penalty: subtract it once from the logit of every token seen so far."""

    def __init__(self, penalty: float) -> None:
        self.penalty = penalty

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        seen = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, input_ids, True)
        return scores - seen.to(scores.dtype) * self.penalty


def test_presence_penalty_equals_definition(tiny: TinyGpt, engine: GptEngine, prompts, greedy_reference) -> None:
    outputs = engine.generate([request(p, NEW_TOKENS, presence_penalty=2.0) for p in prompts])
    expected = [hf_generate(tiny.hf, p, NEW_TOKENS, logits_processor=LogitsProcessorList([PresencePenalty(2.0)]))
                for p in prompts]
    assert [tokens(o) for o in outputs] == expected
    assert expected != greedy_reference, "the penalty changed nothing: the test cannot tell it works"


def test_min_length_bans_end_id(tiny: TinyGpt, engine: GptEngine, prompts, greedy_reference) -> None:
    for prompt, greedy in zip(prompts[:4], greedy_reference):
        end_id = greedy[len(prompt) + 1]  # greedy would end after 2 tokens
        plain = engine.generate([request(prompt, NEW_TOKENS, end_id=end_id)])[0]
        assert len(tokens(plain)) <= len(prompt) + 2 and tokens(plain)[-1] == end_id
        output = engine.generate([request(prompt, NEW_TOKENS, end_id=end_id, min_length=5)])[0]
        assert end_id not in tokens(output)[len(prompt):len(prompt) + 5]
        assert tokens(output) == hf_generate(tiny.hf, prompt, NEW_TOKENS, eos_token_id=end_id, min_new_tokens=5)


def test_end_id_counts_in_sequence_length(engine: GptEngine, prompts, greedy_reference) -> None:
    prompt, greedy = prompts[0], greedy_reference[0]
    end_id = greedy[len(prompt) + 3]
    first = greedy.index(end_id, len(prompt))  # it may occur earlier too
    row = request(prompt, NEW_TOKENS, end_id=end_id)
    output = engine.generate([row])[0]
    assert tokens(output) == greedy[:first + 1] and output.finish_reason == "stop"
    arrays = ft_outputs([row], [output], with_log_probs=False)
    assert arrays["sequence_length"][0, 0] == first + 1  # FT counts the end_id token
    assert (arrays["output_ids"][0, 0, first + 1:] == end_id).all()


def test_stop_word_ends_sequence_with_ft_semantics(engine: GptEngine, prompts, greedy_reference) -> None:
    prompt, greedy = prompts[2], greedy_reference[2]
    generated = greedy[len(prompt):]
    word = (generated[2], generated[3])
    # Expected stop: the first place the word ends at a generated token (it may start in the prompt).
    stop_at = next(j for j in range(len(prompt), len(greedy)) if tuple(greedy[j - 1:j + 1]) == word)
    # A word whose first token is generated but not followed by its second one must not stop anything.
    near_miss = (generated[1], next(t for t in range(1, 512) if t not in generated))
    rows = [request(prompt, NEW_TOKENS, stop_words=(word, (511, 510, 509))), request(prompts[3], NEW_TOKENS),
            request(prompt, NEW_TOKENS, stop_words=(near_miss,))]
    outputs = engine.generate(rows)
    assert tokens(outputs[0]) == greedy[:stop_at + 1]  # the stop word stays in the output
    assert outputs[0].finish_reason == "stop"
    assert tokens(outputs[1]) == greedy_reference[3] and outputs[1].finish_reason == "length"
    assert tokens(outputs[2]) == greedy and outputs[2].finish_reason == "length"
    arrays = ft_outputs(rows[:1], outputs[:1], with_log_probs=False)
    assert arrays["sequence_length"][0, 0] == stop_at + 1


def test_bad_words_never_appear_and_equal_hf(tiny: TinyGpt, engine: GptEngine, prompts, greedy_reference) -> None:
    for prompt, greedy in zip(prompts[:4], greedy_reference):
        generated = greedy[len(prompt):]
        single, pair = (generated[0],), (generated[1], generated[2])
        output = tokens(engine.generate([request(prompt, NEW_TOKENS, bad_words=(single, pair))])[0])
        assert single[0] not in output[len(prompt):]
        assert all(tuple(output[j - 1:j + 1]) != pair for j in range(len(prompt), len(output)))
        assert output == hf_generate(tiny.hf, prompt, NEW_TOKENS, bad_words_ids=[list(single), list(pair)])


def test_requests_of_several_beam_widths_and_more_rows_than_slots(tiny: TinyGpt, prompts, greedy_reference) -> None:
    small = GptEngine.from_ft_dir(tiny.ft_dir, max_batch_size=4)  # 9 greedy rows -> 3 chunks; beams of 4 -> 1 row
    rows = [request(p, NEW_TOKENS) for p in prompts] + [request(prompts[0], 6, beam_width=4, len_penalty=1.0),
                                                         request(prompts[1], 6, beam_width=2, len_penalty=1.0)]
    outputs = small.generate(rows)
    assert [tokens(o) for o in outputs[:9]] == greedy_reference
    for prompt, width, output in ((prompts[0], 4, outputs[9]), (prompts[1], 2, outputs[10])):
        assert len(output.beams) == width
        assert tokens(output) == hf_generate(tiny.hf, prompt, 6, num_beams=width, length_penalty=1.0)
