"""One denoising step for any set of canvas rows (see the package docstring for its numbered parts)."""

from __future__ import annotations

import torch

from ..model import DiffusionGemma
from ..model.model import ForwardPlan
from .head import StepRows
from .state import CanvasState


def denoise_step(model: DiffusionGemma, state: CanvasState, plan: ForwardPlan, head, draws,
                 temps: torch.Tensor, bounds: torch.Tensor, generators: list, picks: list,
                 rows: list[int] | None = None, settle: torch.Tensor | None = None,
                 last: torch.Tensor | None = None, first: bool = False) -> torch.Tensor:
    """Advance `rows` of `state` (None: all, in order) by one denoising step; returns whether each row has
    stopped, (R,) bool, on the device.

    head, draws: the strategies the driver chose (head.BatchedHead or RowsHead; draws.SharedDraws or
    PerRowDraws); plan: the decoder's forward plan for those rows (model.plan); temps, bounds: each row's
    temperature and entropy bound this step, (R,) or one for all (scalar tensors); generators, picks: each row's
    generator and pick.Pick, (R,) lists; settle (R,) bool: rows whose settled prefix is pinned (serving); last
    (R,) bool: rows on their last allowed step; first: every row is on its first step (zero signal)."""
    ids = list(range(state.num_rows)) if rows is None else rows
    # whole-state rows use plain slices: no index tensor, so the step can be captured as a CUDA graph
    idx = slice(None) if rows is None else torch.tensor(rows, device=state.device)
    # i-iii. decoder, temper, accept, sample
    argmax, entropy, accepted, sampled, signal = head(
        model, state, plan, StepRows(ids, idx, temps, bounds, generators, picks, first), draws)
    # iii. renoise the rest
    noise = draws.noise(generators, len(ids), state.canvas_length, state.vocab_size, state.device)
    finished = state.finished[idx]
    state.steps[idx] += ~finished
    canvas = torch.where(accepted, sampled, noise)
    prev_argmax = state.argmax[idx]
    if state.any_pins or settle is not None:
        canvas, argmax = _pin(state, idx, canvas, argmax, prev_argmax, accepted, entropy, settle)
    # iv. stopped rows keep their state; the stop test
    keep = finished[:, None]
    state.canvas[idx] = torch.where(keep, state.canvas[idx], canvas)
    argmax = torch.where(keep, prev_argmax, argmax)
    state.argmax[idx] = argmax
    state.signal[idx] = torch.where(keep[..., None], state.signal[idx], signal)
    state.accepted[idx] = accepted & ~keep
    done = finished | state.stopper(argmax, entropy, None if rows is None else idx)
    if last is not None:
        done = done | last
    state.finished[idx] = done
    return done


def _pin(state, idx, canvas, argmax, prev_argmax, accepted, entropy, settle):
    """Pinned positions keep their token. With `settle`, the settled prefix joins them: a position has settled
    once it and every position before it have been accepted with entropy below the confidence threshold and an
    unchanged argmax for stability_threshold + 1 consecutive steps (caller pins count as settled). A settled
    position stays fixed for the rest of the canvas, so the settled prefix is final and can be streamed."""
    positions = state.positions[None]
    prefix = positions < state.num_settled[idx][:, None]  # (R, C)
    pinned = state.pinned[idx] | prefix
    argmax = torch.where(pinned, torch.where(state.pinned[idx], state.pin_values[idx], prev_argmax), argmax)
    if settle is not None:
        confident = accepted & (entropy < state.confidence_threshold)
        streak = torch.where(confident, torch.where(argmax == prev_argmax, state.streak[idx] + 1, 1), 0)
        settled = (streak > state.stability_threshold) | pinned
        num_settled = torch.where(settle, settled.long().cumprod(dim=-1).sum(dim=-1), 0)  # (R,)
        state.streak[idx] = streak
        state.num_settled[idx] = num_settled
        pinned = state.pinned[idx] | (positions < num_settled[:, None])
    return torch.where(pinned, argmax, canvas), argmax
