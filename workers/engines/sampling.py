"""Choosing the next token from a model's logits: one rule for every engine.

The repetition penalty (CTRL style: positive logits divided by it, negative ones multiplied)
applies to the tokens generated in this call, and to the prompt only when the sampling says
``penalize_prompt``. Answers leave the prompt alone: with retrieved excerpts in an answer
prompt, every word of the excerpts was penalized and SmolLM2's answers drifted into
unrelated words ("[insert text here]", "T&E"), scoring below answers given without them.
Summaries penalize it: without, the model copied lines of its notes (summary memory, key
moments) into the final summary and scored below a summary made without notes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from workers.engines.base import Sampling


def penalized(context: Sequence[int], generated: Sequence[int], sampling: Sampling) -> list[int]:
    """The tokens the repetition penalty covers at this step of a ``generate`` call."""
    return [*context, *generated] if sampling.penalize_prompt else list(generated)


def pick_token(
    logits: torch.Tensor, penalize: Sequence[int], sampling: Sampling,
    generator: torch.Generator,
) -> int:
    """The next token from ``logits`` ``[V]`` (any device and dtype; picked on the CPU in
    fp32, so the choice is reproducible), with the repetition penalty on the tokens in
    ``penalize`` (see ``penalized``): greedy at temperature 0, else temperature and top-p
    sampling from ``generator``."""
    logits = logits.detach().float().cpu().clone()
    if sampling.repetition_penalty != 1.0 and penalize:
        seen = torch.tensor(sorted(set(penalize)), dtype=torch.long)
        picked = logits[seen]
        penalty = float(sampling.repetition_penalty)
        logits[seen] = torch.where(picked > 0, picked / penalty, picked * penalty)
    if sampling.temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / float(sampling.temperature), dim=-1)
    if sampling.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        keep = (torch.cumsum(sorted_probs, dim=0) - sorted_probs) < float(sampling.top_p)
        keep[0] = True
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs, 1, generator=generator))
