"""How a row picks the token it keeps at an accepted position: drawn from its tempered distribution (optionally
cut to its top-k / top-p tokens), or the argmax (greedy). One pick per row, made once per request by its driver
(`pick_for`), so the step never tests a request's parameters."""

from __future__ import annotations

from typing import Protocol

import torch

from ..sampling import TopKTopP


class Pick(Protocol):
    draws: bool  # whether the kept tokens are drawn (False: the argmax, nothing drawn)

    def sample(self, sampler, probs: torch.Tensor, accepted: torch.Tensor, argmax: torch.Tensor,
               generator) -> torch.Tensor:
        """The kept tokens (...,) from probs (..., V) at the accepted positions (elsewhere anything), with
        `sampler` (draws.TokenSampler) and `generator`."""


class Draw:
    """Drawn from the tempered distribution, cut by `keep` (None: the whole distribution)."""

    draws = True

    def __init__(self, keep: TopKTopP | None = None):
        self.keep = keep

    def sample(self, sampler, probs, accepted, argmax, generator):
        return sampler.sample(probs, accepted, generator, self.keep)


class Greedy:
    """The argmax (a request's temperature 0); nothing is drawn. Entropies, acceptance and self-conditioning
    still read the tempered distribution."""

    draws = False

    def sample(self, sampler, probs, accepted, argmax, generator):
        return argmax.clone()


DRAW = Draw()
GREEDY = Greedy()


def pick_for(greedy: bool, top_k: int | None = None, top_p: float | None = None, vocab_size: int | None = None) -> Pick:
    """The pick of a row: greedy, or drawn with a top-k / top-p cut (left off where it keeps every token: top_k
    at least the vocabulary, top_p 1)."""
    if greedy:
        return GREEDY
    top_k = None if top_k is None or (vocab_size is not None and top_k >= vocab_size) else top_k
    top_p = None if top_p is None or top_p >= 1 else top_p
    return DRAW if top_k is None and top_p is None else Draw(TopKTopP(top_k, top_p))
