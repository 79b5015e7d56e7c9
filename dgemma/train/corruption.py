"""Uniform-state corruption: the forward noising process of block-diffusion training.

There is no mask token. At noise level t each token is, independently with probability t, replaced by a token
drawn uniformly from the whole vocabulary (which may, with probability 1/V, be the token itself). At inference
the canvas starts from the same distribution at t = 1 (see sampling.random_tokens).
"""

from __future__ import annotations

import torch


def sample_noise_level(batch_size: int, eps: float = 1e-3, generator: torch.Generator | None = None,
                       device: torch.device | str = "cpu") -> torch.Tensor:
    """One noise level per example, t ~ U(eps, 1 - eps). -> (B,) float32.

    eps keeps t away from 0 (nothing to learn) and 1 (the canvas carries no information); Google uses 1e-4,
    Megatron clips to [1e-3, 1 - 1e-3]."""
    if not 0.0 <= eps < 0.5:
        raise ValueError(f"eps must be in [0, 0.5), got {eps}")
    u = torch.rand(batch_size, generator=generator, device=device)
    return eps + (1.0 - 2.0 * eps) * u


def uniform_corrupt(tokens: torch.Tensor, t: torch.Tensor, vocab_size: int, valid_mask: torch.Tensor | None = None,
                    generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace each token of `tokens` (B, C) by a uniform random vocabulary token with probability t (B,).

    Positions where `valid_mask` (B, C) is False are left alone. Returns (noisy tokens, replaced mask); "replaced"
    counts a draw that happened to hit the original token as replaced."""
    B, C = tokens.shape
    u = torch.rand((B, C), generator=generator, device=tokens.device)
    replaced = u < t.to(tokens.device)[:, None]
    if valid_mask is not None:
        replaced &= valid_mask
    noise = torch.randint(0, vocab_size, (B, C), generator=generator, device=tokens.device)
    return torch.where(replaced, noise, tokens), replaced
