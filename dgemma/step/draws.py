"""How a step draws its random numbers: a token sampler (exact or fast) and a draw order (shared or per row).

Both are chosen once by the driver:
- the sampler: `ExactSampler` draws what torch.multinomial draws (an Exp(1) race over the whole vocabulary per
  position), which reference parity needs; `FastSampler` samples the same distribution from one uniform per
  position (inverse CDF), not with multinomial's draws.
- the order: `SharedDraws` (generate, lockstep): every row draws from one generator in the reference's order (the
  whole batch's sample in one call, then the renoising tokens of every row in one call). `PerRowDraws` (the
  serving engine): each row draws from its own generator (its sample's draws, then its renoising tokens), so a
  seed gives the same tokens whatever else is batched.
"""

from __future__ import annotations

import enum
from typing import Protocol

import torch

from ..sampling import (TopKTopP, inverse_cdf_sample, race_sample, random_tokens, skip_inverse_cdf, skip_race)
from .pick import Pick


class Sampler(str, enum.Enum):
    """The names of the token samplers (the CLI's and generate's `sampler`)."""

    EXACT = "exact"  # torch.multinomial's draws (reference parity)
    FAST = "fast"  # the same distribution from one uniform per position


class TokenSampler(Protocol):
    kind: Sampler

    def sample(self, probs: torch.Tensor, accepted: torch.Tensor, generator,
               keep: TopKTopP | None = None) -> torch.Tensor:
        """A token per position of probs (..., V), drawn from the tokens `keep` keeps (None: all), kept where
        accepted (elsewhere 0)."""

    def skip(self, positions: int, generator) -> None:
        """Advance `generator` as sampling `positions` positions would (a row whose work is skipped)."""


class ExactSampler:
    kind = Sampler.EXACT

    def __init__(self, vocab_size: int, device: torch.device):
        self.vocab_size, self.device = vocab_size, torch.device(device)
        # on CPU the race's uniforms are drawn in blocks (sampling.race_sample); elsewhere the race itself
        self.skip = self._skip_cpu if self.device.type == "cpu" else self._skip_device

    def sample(self, probs, accepted, generator, keep=None):
        return race_sample(probs, accepted, generator, keep)

    def _skip_cpu(self, positions: int, generator) -> None:
        skip_race(positions, self.vocab_size, generator)

    def _skip_device(self, positions: int, generator) -> None:
        torch.empty(positions, self.vocab_size, device=self.device).exponential_(generator=generator)


class FastSampler:
    kind = Sampler.FAST

    def __init__(self, vocab_size: int, device: torch.device):
        self.device = torch.device(device)

    def sample(self, probs, accepted, generator, keep=None):
        return inverse_cdf_sample(probs, accepted, generator, keep)

    def skip(self, positions: int, generator) -> None:
        skip_inverse_cdf(positions, generator, self.device)


def token_sampler(kind: Sampler | str, vocab_size: int, device: torch.device) -> TokenSampler:
    return (ExactSampler if Sampler(kind) is Sampler.EXACT else FastSampler)(vocab_size, device)


class SharedDraws:
    """Lockstep: one generator (generators[0]) and one pick (picks[0]) for every row, in the reference's order."""

    def __init__(self, sampler: TokenSampler):
        self.sampler = sampler

    def sample(self, probs: torch.Tensor, accepted: torch.Tensor, argmax: torch.Tensor, generators: list,
               picks: list[Pick]) -> torch.Tensor:
        """The kept sample of every row, (R, C), from probs (R, C, V): the whole batch in one call."""
        return picks[0].sample(self.sampler, probs, accepted, argmax, generators[0])

    def noise(self, generators: list, num_rows: int, canvas_length: int, vocab_size: int,
              device: torch.device) -> torch.Tensor:
        """The renoising tokens of every stepped row, (R, C), in one call."""
        return random_tokens((num_rows, canvas_length), vocab_size, generators[0], device)


class PerRowDraws:
    """One generator and one pick per row (the serving engine)."""

    def __init__(self, sampler: TokenSampler):
        self.sampler = sampler

    def sample(self, probs, accepted, argmax, generators, picks):
        """The kept sample of every row, (R, C), a row at a time from its own generator."""
        return torch.stack([pick.sample(self.sampler, p, a, m, g)
                            for pick, p, a, m, g in zip(picks, probs, accepted, argmax, generators)])

    def noise(self, generators, num_rows, canvas_length, vocab_size, device):
        """The renoising tokens of every stepped row, (R, C), each from its own generator."""
        return torch.cat([random_tokens((1, canvas_length), vocab_size, g, device) for g in generators])
