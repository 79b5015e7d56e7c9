"""Fill in the middle: choose the middle's length, then pin the suffix (and an EOS) after it.

The output is middle + suffix + EOS, with the suffix and the EOS pinned, so the middle is denoised seeing the
prompt (in the cache) and the suffix (in the canvas). The middle's length L is chosen by the model itself: one
decoder pass over a uniform-noise canvas after the prompt gives, at every canvas position, the model's
distribution for that position given only the prompt; L scores the mean log-probability of the suffix's tokens
at positions L, L+1, ... and the best-scoring L within the budget wins (ties: the shortest). One pass scores
every candidate at once. It is a prior over where the suffix begins, not the suffix's likelihood given a
finished middle (which would cost a full generation per candidate).

Limits: the suffix, its EOS and the middle are placed in the first canvas (L + len(suffix) + 1 <= canvas).
"""

from __future__ import annotations

import torch

from ..model import DiffusionGemma
from .pins import Steering, SteeringError


def check_suffix(suffix: list[int], canvas_length: int, max_middle: int | None) -> int:
    """The largest middle length allowed; refuses a suffix that leaves no room, naming `suffix`."""
    room = canvas_length - len(suffix) - 1
    if not suffix:
        raise SteeringError("suffix is empty", "suffix")
    if room < 1:
        raise SteeringError(f"suffix has {len(suffix)} tokens; with its EOS it must leave room for a middle in a "
                            f"{canvas_length}-token canvas", "suffix")
    longest = room if max_middle is None else min(room, max_middle)
    if longest < 1:
        raise SteeringError(f"the output budget ({max_middle} tokens for the middle) leaves no room for a middle "
                            f"before the suffix", "max_tokens")
    return longest


@torch.inference_mode()
def middle_length(model: DiffusionGemma, cache, row: int, suffix: list[int], max_middle: int) -> int:
    """The middle length in [1, max_middle] under which the suffix is most probable (see the module docstring).
    `row`'s cache holds the encoded prompt; the pass writes only scratch slots. Draws nothing from the caller's
    generators (the noise canvas comes from a fixed private seed)."""
    C, V, device = model.canvas_length, model.config.vocab_size, model.device
    noise = torch.randint(0, V, (1, C), generator=torch.Generator().manual_seed(0)).to(device)
    plan = model.plan(cache, [row], C, encoder=False)
    logp = torch.log_softmax(model.logits(model.decode(noise, None, plan))[0], dim=-1)  # (C, V)
    S = len(suffix)
    ids = torch.tensor(suffix, device=device)
    starts = torch.arange(1, max_middle + 1, device=device)  # (K,) candidate lengths
    at = starts[:, None] + torch.arange(S, device=device)  # (K, S) suffix positions per candidate
    scores = logp[at, ids[None].expand_as(at)].mean(dim=-1)  # (K,)
    return int(starts[int(torch.argmax(scores))])


def infill_steering(suffix: list[int], length: int, eos_id: int, base: Steering | None = None) -> Steering:
    """Pins for a middle of `length` tokens: the suffix right after it, then EOS."""
    pinned = dict(base.pinned) if base is not None else {}
    pinned.update({length + j: t for j, t in enumerate(suffix)})
    pinned[length + len(suffix)] = eos_id
    return Steering(pinned=pinned, seed_tokens=base.seed_tokens if base else None,
                    strength=base.strength if base else 1.0)
