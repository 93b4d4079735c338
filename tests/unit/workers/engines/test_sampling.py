"""One token-picking rule for every engine: greedy or seeded top-p sampling, and a repetition
penalty on what this call generated, and on the prompt only when the sampling asks for it."""

from __future__ import annotations

import torch

from workers.engines.base import Sampling
from workers.engines.sampling import penalized, pick_token
from workers.processing.prompts import ANSWER_SAMPLING, SUMMARY_SAMPLING


def _pick(logits: list[float], generated: list[int], sampling: Sampling, seed: int = 0) -> int:
    return pick_token(torch.tensor(logits), generated, sampling,
                      torch.Generator().manual_seed(seed))


def test_greedy_takes_the_top_logit_when_nothing_is_penalized() -> None:
    assert _pick([0.0, 3.0, 2.9, -1.0], [], Sampling(repetition_penalty=1.3)) == 1


def test_a_generated_token_is_penalized_by_dividing_or_multiplying() -> None:
    penalized = Sampling(repetition_penalty=1.3)
    assert _pick([0.0, 3.0, 2.9, -1.0], [1], penalized) == 2  # 3.0 / 1.3 < 2.9
    # a negative logit is multiplied (-0.9 -> -1.17), never divided towards zero
    assert _pick([-1.0, -0.9, -1.1], [1], penalized) == 0
    assert _pick([0.0, 3.0, 2.9], [1], Sampling(repetition_penalty=1.0)) == 1


def test_sampling_is_reproducible_from_its_seed_and_respects_top_p() -> None:
    logits = [2.0, 1.9, 1.8, -9.0]
    hot = Sampling(temperature=1.0, top_p=0.99, seed=3)
    picks = {_pick(logits, [], hot, seed=s) for s in range(40)}
    assert picks <= {0, 1, 2} and len(picks) > 1  # never the tail token, not always greedy
    assert [_pick(logits, [], hot, seed=7) for _ in range(5)] == [_pick(logits, [], hot, 7)] * 5
    only_top = Sampling(temperature=1.0, top_p=0.01)
    assert {_pick(logits, [], only_top, seed=s) for s in range(20)} == {0}


def test_the_prompt_is_penalized_only_when_the_sampling_says_so() -> None:
    prompt, generated = [5, 6], [7]
    assert penalized(prompt, generated, Sampling()) == [7]
    assert penalized(prompt, generated, Sampling(penalize_prompt=True)) == [5, 6, 7]
    # a summary must not copy its notes; an answer may reuse the question's words
    assert SUMMARY_SAMPLING.penalize_prompt and not ANSWER_SAMPLING.penalize_prompt
    logits = [0.0, 3.0, 2.9]
    assert _pick(logits, penalized([1], [], ANSWER_SAMPLING), ANSWER_SAMPLING) == 1
    assert _pick(logits, penalized([1], [], SUMMARY_SAMPLING), SUMMARY_SAMPLING) == 2
