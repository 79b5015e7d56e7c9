"""Pinned positions and seeded canvases: the two primitives that steer a canvas by data, not by branches.

- *Pinned* output positions hold a given token in every step of their canvas: never renoised, counted as
  certain (entropy 0) by the acceptance set and the stop test, and read by the decoder and by self-conditioning
  like any other token. A template's literal text and an infill's suffix are pins.
  EOS may not be sampled before the last pinned position, so an output always reaches its pins.
- A *seeded* canvas starts from given tokens instead of uniform noise: each seed token is kept with probability
  1 - strength and renoised otherwise (strength 1 is plain generation, 0 keeps the whole seed). The keep draws
  come right after the canvas's own uniform draw, from the same generator, one uniform per position of a row
  that has seed tokens in this canvas. Seeded positions are not pinned: the model may correct them.

Positions count from the first output token, across canvases: canvas k holds positions [k*C, (k+1)*C).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..config.checks import is_int
from ..errors import DgemmaError


# The renoise strength of a prediction (OpenAI's Predicted Outputs) when the request sets none. Measured with the
# Sudoku model, repairing solutions with 5 wrong cells (BENCHMARKS.md, "Steering the canvas"): strength 0.2 took
# the fewest steps (0.0 and 0.5 took more), every repair valid.
DEFAULT_PREDICTION_STRENGTH = 0.2


class SteeringError(DgemmaError, ValueError):
    """Bad pins or seed; `param` names the request field."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Steering:
    """One row's steering, built once (control/steering.py: build_steering) and never changed afterwards."""

    pinned: dict[int, int] = field(default_factory=dict)  # output position -> token id
    seed_tokens: list[int] | None = None  # output tokens the canvases start from, from position 0
    strength: float = 1.0  # probability that each seed token is renoised when its canvas starts
    suffix: list[int] | None = None  # fill in the middle (control/infill.py): resolved into pins at prefill
    constraint: object | None = None  # a control.Constraint: every committed canvas keeps the output valid
    pins_from: str = "pinned"  # the request field the pins came from, which errors name ("template": its literals)
    seed_from: str = "seed_tokens"  # the request field the seed came from ("prediction": its text's tokens)

    def check(self, vocab_size: int, max_new: int, span: int | None = None) -> None:
        """Refuse what cannot be run, naming the field: ids outside the vocabulary, pins and seed tokens outside
        the canvases the output spans (`span` tokens: whole canvases; None: `max_new`), a strength outside [0, 1].
        A pin or seed token past max_new but inside the output's last canvas steers that canvas (a vLLM structured
        read seeds and pins its whole canvas with max_tokens below the canvas length); it is never returned."""
        span = max_new if span is None else max(span, max_new)
        if not isinstance(self.pinned, dict):
            raise SteeringError("pinned must map output positions to token ids", self.pins_from)
        for pos, tok in self.pinned.items():
            if not is_int(pos) or not 0 <= pos < span:
                raise SteeringError(f"pinned position {pos!r} is outside the output's canvases [0, {span})",
                                    self.pins_from)
            if not is_int(tok) or not 0 <= tok < vocab_size:
                raise SteeringError(f"pinned token id {tok!r} is outside the vocabulary [0, {vocab_size})",
                                    self.pins_from)
        if self.seed_tokens is not None:
            if not isinstance(self.seed_tokens, list) or not self.seed_tokens:
                raise SteeringError(f"{self.seed_from} must be a non-empty list of token ids", self.seed_from)
            bad = next((t for t in self.seed_tokens if not (is_int(t) and 0 <= t < vocab_size)), None)
            if bad is not None:
                raise SteeringError(f"seed token id {bad!r} is outside the vocabulary [0, {vocab_size})",
                                    self.seed_from)
            if len(self.seed_tokens) > span:
                raise SteeringError(f"{self.seed_from} has {len(self.seed_tokens)} tokens, more than the {span} "
                                    f"the output's canvases hold", self.seed_from)
        if self.suffix is not None:
            if not isinstance(self.suffix, list) or not self.suffix:
                raise SteeringError("suffix must be a non-empty list of token ids", "suffix")
            bad = next((t for t in self.suffix if not (is_int(t) and 0 <= t < vocab_size)), None)
            if bad is not None:
                raise SteeringError(f"suffix token id {bad!r} is outside the vocabulary [0, {vocab_size})", "suffix")
        if self.constraint is not None:
            from .constraint import ConstraintError
            from .dp import completable_states

            if self.constraint.vocab_size < vocab_size:
                raise SteeringError(f"the constraint was built for {self.constraint.vocab_size} tokens, the model "
                                    f"has {vocab_size}", "response_format")
            c = self.constraint
            if self.pinned and self.suffix is not None:
                raise SteeringError("a constraint with a suffix cannot also take pinned positions", self.pins_from)
            if self.pinned and not completable_states(c, self.pinned, 0, max_new, eos=True)[c.initial_state]:
                raise SteeringError(f"{c.description}: no text it allows holds the pinned tokens at their positions "
                                    f"within max_tokens={max_new}", self.pins_from)
            try:
                self.constraint.check_budget(max_new)
            except ConstraintError as e:
                raise SteeringError(str(e), "max_tokens") from None
        s = self.strength
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or not 0 <= s <= 1:
            raise SteeringError(f"strength must be a number in [0, 1], got {s!r}", "strength")

    def is_empty(self) -> bool:
        return not self.pinned and self.seed_tokens is None and self.suffix is None and self.constraint is None

    def pins_for_canvas(self, index: int, canvas_length: int) -> list[tuple[int, int]]:
        """(position within canvas `index`, token) of the pins that fall in it."""
        lo = index * canvas_length
        return [(p - lo, t) for p, t in self.pinned.items() if lo <= p < lo + canvas_length]

    def eos_until(self, index: int, canvas_length: int) -> int:
        """Canvas `index`'s positions before this one may not be EOS: an output reaches its last pin."""
        if not self.pinned:
            return 0
        return min(max(max(self.pinned) - index * canvas_length, 0), canvas_length)

    def seed_for_canvas(self, index: int, canvas_length: int) -> list[int]:
        """The seed tokens that fall in canvas `index` (from its first position; possibly fewer than C)."""
        if self.seed_tokens is None:
            return []
        return self.seed_tokens[index * canvas_length:(index + 1) * canvas_length]


def start_canvas(canvas: torch.Tensor, steerings: list[Steering | None], index: int | list[int],
                 generators: list) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Seed and pin a batch's canvases: canvas (R, C) is their uniform draw, `index` the canvas each row is at
    (one for all rows, or one per row); row r draws its seed's keep uniforms from generators[r] (the same
    generator for every row in lockstep). Returns the canvas and, if any row has pins here, pinned (R, C) bool
    and the pinned tokens (R, C)."""
    R, C = canvas.shape
    device = canvas.device
    indices = index if isinstance(index, list) else [index] * R
    pinned = values = None
    for r, steering in enumerate(steerings):
        if steering is None:
            continue
        seed = steering.seed_for_canvas(indices[r], C)
        if seed:
            keep = torch.rand(C, generator=generators[r], device=device) >= steering.strength
            n = len(seed)
            canvas[r, :n] = torch.where(keep[:n], torch.tensor(seed, device=device), canvas[r, :n])
        pins = steering.pins_for_canvas(indices[r], C)
        if pins:
            if pinned is None:
                pinned = torch.zeros(R, C, dtype=torch.bool, device=device)
                values = torch.zeros(R, C, dtype=torch.long, device=device)
            at = torch.tensor([p for p, _ in pins], device=device)
            pinned[r, at] = True
            values[r, at] = torch.tensor([t for _, t in pins], device=device)
    return canvas, pinned, values


def canvas_start(canvas: torch.Tensor, steerings: list[Steering | None], indices: list[int], generators: list,
                 automaton_states: list[int | None], max_new: list[int | None]) -> dict:
    """What step.CanvasState.start takes from the rows' steering, for rows at canvases `indices`: the seeded
    canvas, the pins, where EOS is banned, and for each constrained row the automaton state its canvas starts in
    (`automaton_states`: where the last commit left it, None before the first) and the states it may end in: the
    text and its EOS within the row's output budget (`max_new`), every later pin still reachable: dp.canvas_rule)."""
    from .dp import canvas_rule

    C = canvas.shape[1]
    canvas, pinned, values = start_canvas(canvas, steerings, indices, generators)
    constraints = [None if s is None else s.constraint for s in steerings]
    return dict(canvas=canvas, pinned=pinned, pin_values=values,
                eos_until=[0 if s is None else s.eos_until(k, C) for s, k in zip(steerings, indices)],
                constraints=constraints,
                constraint_start=[c.initial_state if c is not None and a is None else a
                                  for c, a in zip(constraints, automaton_states)],
                end_rules=[None if c is None else canvas_rule(c, s.pinned, k, C, m)
                           for c, s, k, m in zip(constraints, steerings, indices, max_new)])
