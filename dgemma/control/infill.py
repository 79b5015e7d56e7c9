"""Fill in the middle: choose the middle's length, then pin the suffix (and an EOS) after it.

The output is middle + suffix + EOS, with the suffix and the EOS pinned, so the middle is denoised seeing the
prompt (in the cache) and the suffix (in its canvas). The middle's length L is chosen by the model itself: one
decoder pass over a uniform-noise span after the prompt gives, at every position of the span, the model's
distribution for that position given only the prompt; L scores the mean log-probability of the suffix's tokens
at positions L, L+1, ... and the best-scoring L within the budget wins (ties: the shortest). One pass scores
every candidate at once. It is a prior over where the suffix begins, not the suffix's likelihood given a
finished middle (which would cost a full generation per candidate).

Across canvases: middle + suffix + EOS may span up to MAX_CANVASES canvases (and max_tokens). The scoring pass
then runs over a noise span longer than one canvas (the model was trained on canvas-long spans, so this is a
heuristic there), and the suffix is pinned wherever it falls: the canvases wholly before it are denoised seeing
the prompt and the committed text only, as any canvas is; the canvas that holds the suffix sees it.
"""

from __future__ import annotations

import dataclasses

import torch

from ..model import DiffusionGemma
from .pins import Steering, SteeringError

# Middle + suffix + EOS fit in this many canvases (1,024 tokens with the release's 256-token canvas): it bounds
# the one scoring pass (attention over the whole span) whatever max_tokens says.
MAX_CANVASES = 4


def check_suffix(suffix: list[int], canvas_length: int, max_new: int, constraint=None) -> int:
    """The largest middle length allowed when the output may hold `max_new` tokens (middle, suffix and EOS count
    in it); refuses a suffix that leaves no room, or (with a `constraint`) that no allowed text can end with,
    naming `suffix`."""
    if not suffix:
        raise SteeringError("suffix is empty", "suffix")
    span = min(max_new, MAX_CANVASES * canvas_length)
    longest = span - len(suffix) - 1
    if longest < 1:
        raise SteeringError(f"suffix has {len(suffix)} tokens; with its EOS and a middle of at least one token it "
                            f"needs {len(suffix) + 2}, and the output may hold {span} (max_tokens, at most "
                            f"{MAX_CANVASES} canvases of {canvas_length})", "suffix")
    if constraint is not None:
        fitting_lengths(constraint, suffix, longest)
    return longest


def fitting_lengths(constraint, suffix: list[int], longest: int) -> torch.Tensor:
    """(longest,) bool: the middle lengths 1..longest after which `suffix` can complete a text `constraint`
    allows (control.dp.suffix_fits); SteeringError when there is none."""
    from .dp import suffix_fits

    fits = torch.from_numpy(suffix_fits(constraint, suffix, longest))
    if not fits.any():
        raise SteeringError(f"{constraint.description}: no text it allows ends with the suffix within "
                            f"{longest + len(suffix) + 1} tokens", "suffix")
    return fits


@torch.inference_mode()
def middle_length(model: DiffusionGemma, cache, row: int, suffix: list[int], max_middle: int,
                  chunk: int = 256, constraint=None) -> int:
    """The middle length in [1, max_middle] under which the suffix is most probable (see the module docstring);
    with a `constraint` (control.Constraint), among the lengths after which the suffix can complete a text it
    allows (control.dp.suffix_fits), and SteeringError when there is none.
    `row`'s cache holds the encoded prompt; the pass writes only scratch slots. Draws nothing from the caller's
    generators (the noise span comes from a fixed private seed). The head runs `chunk` positions at a time, so a
    long span over a large vocabulary never holds all its logits at once."""
    V, device = model.config.vocab_size, model.device
    S = len(suffix)
    fits = None if constraint is None else fitting_lengths(constraint, suffix, max_middle).to(device)
    span = max(max_middle + S, model.canvas_length)
    noise = torch.randint(0, V, (1, span), generator=torch.Generator().manual_seed(0)).to(device)
    plan = model.plan(cache, [row], span, encoder=False)
    hidden = model.decode(noise, None, plan)[0]  # (span, H)
    ids = torch.tensor(suffix, device=device)
    logp = torch.cat([_suffix_logp(model, hidden[i:i + chunk], ids) for i in range(0, span, chunk)])  # (span, S)
    starts = torch.arange(1, max_middle + 1, device=device)  # (K,) candidate lengths
    at = starts[:, None] + torch.arange(S, device=device)  # (K, S) suffix positions per candidate
    scores = logp[at, torch.arange(S, device=device).expand_as(at)].mean(dim=-1)  # (K,)
    if fits is not None:
        scores = scores.masked_fill(~fits, float("-inf"))
    return int(starts[int(torch.argmax(scores))])


def _suffix_logp(model: DiffusionGemma, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log p(each suffix token) at each of these positions: hidden (T, H) -> (T, S)."""
    logits = model.logits(hidden[None])[0]  # (T, V)
    return logits[:, ids] - torch.logsumexp(logits, dim=-1, keepdim=True)


def infill_steering(suffix: list[int], length: int, eos_id: int, base: Steering | None = None) -> Steering:
    """Pins for a middle of `length` tokens: the suffix right after it, then EOS."""
    pinned = dict(base.pinned) if base is not None else {}
    pinned.update({length + j: t for j, t in enumerate(suffix)})
    pinned[length + len(suffix)] = eos_id
    if base is None:
        return Steering(pinned=pinned)
    return dataclasses.replace(base, pinned=pinned, suffix=None)
