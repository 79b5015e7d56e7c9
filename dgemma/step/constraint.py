"""What the step asks of a row's constraint, and how it applies the answer.

The step knows nothing of JSON, regexes or Sudoku: a constrained row carries a `CanvasConstraint`, made by its
driver when the canvas starts (control/dp.py's CanvasDP implements it over the constraint automaton's DP), and
the step asks it for the most probable valid canvas.
"""

from __future__ import annotations

from typing import Protocol

import torch


class CanvasConstraint(Protocol):
    """A row's constraint over one canvas: the canvases it allows from the state where this canvas starts, ending
    where the rest of the output can still be completed (within its budget, every later pin reachable)."""

    end_state: int  # where the last canvas `best` returned leaves the constraint (the next canvas starts there)

    def read(self, probs: torch.Tensor) -> object:
        """One pass over the row's probabilities (C, V) (read, never written); what `best` and `best_and_nearest`
        take."""

    def best(self, read: object, held: torch.Tensor | None) -> torch.Tensor:
        """The most probable allowed canvas (C,) (CPU), with the held tokens (held (C,), -1: free) in place.
        Records its end state."""

    def best_and_nearest(self, read: object, held: torch.Tensor | None, prefer: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """`best`, and the most probable allowed canvas (C,) (CPU) with the held tokens in place that keeps the
        preferred tokens (prefer (C,), -1: none) wherever the constraint allows them: both at once, which costs
        less than two solves. Records best's end state."""


def constrain_row(state, row: int, probs: torch.Tensor, sample: torch.Tensor | None,
                  accepted: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The row's argmax and kept sample under its constraint (state.constraints[row]), each a canvas (C,) that the
    constraint allows. Held positions (pins, the settled prefix) keep their token: a pin was checked against the
    constraint when the request came (Steering.check), a settled token was valid and completable when it was
    fixed. The argmax is the most probable valid canvas; it is what the stop test reads and what is committed.
    The sample's drawn tokens (at accepted positions) stay as drawn when the argmax holds them too; otherwise the
    sample is the most probable valid canvas with the draws preferred (kept unless the constraint forbids them).
    So a constraint the model already meets changes nothing, draws included. A greedy row (sample None) keeps
    the argmax. A sampled row asks for both canvases at once (one forward pass with two lanes), as the draws
    rarely all agree with the argmax; both share one read of the row's probabilities."""
    held = (state.pinned[row] | (state.positions < state.num_settled[row])).cpu()  # pinned, or settled prefix
    hard = None
    if held.any():
        values = torch.where(state.pinned[row], state.pin_values[row], state.argmax[row]).cpu()
        hard = torch.where(held, values, -1)
    constraint = state.constraints[row]
    read = constraint.read(probs)
    if sample is None:
        argmax = constraint.best(read, hard).to(probs.device)
        return argmax, argmax
    drawn = sample.cpu()
    keep = accepted.cpu() & ~held
    best, projected = constraint.best_and_nearest(read, hard, torch.where(keep, drawn, -1))
    argmax = best.to(probs.device)
    if bool((drawn[keep] == best[keep]).all()):
        return argmax, sample
    return argmax, torch.where(accepted, projected.to(probs.device), sample)
