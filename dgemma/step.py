"""One denoising step, for any set of canvas rows. `generate` (lockstep, one generator) and the serving engine
(continuous batching, one generator per request) both call `denoise_step`; nothing else denoises.

Per step, for every stepped row that has not stopped this canvas:
  i.   decoder pass over the canvas, self-conditioned on the previous step's tempered probabilities;
  ii.  temper the logits (each row at its own step of its own schedule);
  iii. sample a token per position; accept the entropy-bound set; renoise the rest uniformly. Pinned positions
       (fixed by the caller, or the settled prefix) keep their token and count as certain (entropy 0);
  iv.  stop the row once its argmax canvas is stable and its mean entropy is below the threshold, or its steps
       run out. A row that has stopped keeps its state until its canvas is restarted.

Two choices are named and made once by the driver:
- `Draws`, how random numbers are drawn. *lockstep*: one shared generator in the reference's order (per stepped
  row, the sample's draws; then the renoising tokens of every row in one call), which reference parity needs.
  *per request*: each row draws from its own generator (its sample's draws, then its renoising tokens), so a
  seed gives the same tokens whatever else is batched. The sampler is `exact` (torch.multinomial's own draws,
  an Exp(1) race over the whole vocabulary per position) or `fast` (one uniform per position, inverse CDF).
- `Strategy`: BATCHED runs the head and sampler over all rows at once (a fixed kernel sequence, CUDA-graph
  capturable); ROWS (CPU) runs them a row at a time through one reused (C, V) buffer and skips the decoder for
  rows that have stopped, drawing (and discarding) their random numbers so every other row's are unchanged.
"""

from __future__ import annotations

import enum

import torch

from .model import DiffusionGemma
from .model.model import ForwardPlan
from .sampling import (StableAndConfident, entropy_bound_accept, inverse_cdf_sample, race_matches_multinomial,
                       race_sample, random_tokens, skip_inverse_cdf, skip_race, temper_and_score)


class Sampler(str, enum.Enum):
    EXACT = "exact"  # torch.multinomial's draws (reference parity)
    FAST = "fast"  # the same distribution from one uniform per position


class Strategy(str, enum.Enum):
    BATCHED = "batched"
    ROWS = "rows"


def default_strategy(device: torch.device, sampler: Sampler) -> Strategy:
    """ROWS on CPU (memory and cache locality; needs the race to reproduce multinomial for the exact sampler, as
    rows then draw one after another), BATCHED elsewhere."""
    if torch.device(device).type != "cpu":
        return Strategy.BATCHED
    return Strategy.ROWS if sampler is Sampler.FAST or race_matches_multinomial(device) else Strategy.BATCHED


class Draws:
    """The random-draw policy of a step (see the module docstring)."""

    def __init__(self, sampler: Sampler | str = Sampler.EXACT, lockstep: bool = True):
        self.sampler = Sampler(sampler)
        self.lockstep = lockstep

    @classmethod
    def shared(cls, sampler: Sampler | str = Sampler.EXACT) -> Draws:
        """Lockstep: every row draws from one generator, in the reference's order (generate)."""
        return cls(sampler, lockstep=True)

    @classmethod
    def per_request(cls, sampler: Sampler | str = Sampler.FAST) -> Draws:
        """One generator per row (the serving engine)."""
        return cls(sampler, lockstep=False)

    def sample(self, probs: torch.Tensor, accepted: torch.Tensor, generator) -> torch.Tensor:
        """A token per position of probs (..., V), kept where accepted (elsewhere 0)."""
        if self.sampler is Sampler.EXACT:
            return race_sample(probs, accepted, generator)
        return inverse_cdf_sample(probs, accepted, generator)

    def skip(self, positions: int, vocab_size: int, generator, device: torch.device) -> None:
        """Advance `generator` as sampling `positions` positions would (a row whose work is skipped)."""
        if self.sampler is Sampler.EXACT:
            if device.type == "cpu":
                skip_race(positions, vocab_size, generator)
            else:
                torch.empty(positions, vocab_size, device=device).exponential_(generator=generator)
        else:
            skip_inverse_cdf(positions, generator, device)

    def noise(self, generators: list, num_rows: int, canvas_length: int, vocab_size: int,
              device: torch.device) -> torch.Tensor:
        """The renoising tokens of every stepped row, (R, C)."""
        if self.lockstep:
            return random_tokens((num_rows, canvas_length), vocab_size, generators[0], device)
        return torch.cat([random_tokens((1, canvas_length), vocab_size, g, device) for g in generators])


class CanvasState:
    """The denoising state of `num_rows` canvas rows, allocated once and updated in place (CUDA-graph safe):

    canvas (S, C)      the tokens the decoder reads next step
    argmax (S, C)      the argmax canvas (what a commit writes)
    signal (S, C, H)   self-conditioning for the next step (zeros: none)
    accepted (S, C)    positions accepted by the last step
    finished (S,)      stopped denoising this canvas
    steps (S,)         denoising steps run this canvas
    pinned (S, C)      positions fixed by the caller; pin_values (S, C) their tokens
    streak (S, C), num_settled (S,)   the settled prefix (serving's pin_prefix): see `denoise_step`
    """

    def __init__(self, model: DiffusionGemma, num_rows: int, stability_threshold: int,
                 confidence_threshold: float):
        S, C, H, dev = num_rows, model.canvas_length, model.config.hidden_size, model.device
        self.num_rows, self.canvas_length, self.vocab_size, self.device = S, C, model.config.vocab_size, dev
        self.stability_threshold, self.confidence_threshold = stability_threshold, confidence_threshold
        self.canvas = torch.zeros(S, C, dtype=torch.long, device=dev)
        self.argmax = torch.zeros(S, C, dtype=torch.long, device=dev)
        self.signal = torch.zeros(S, C, H, dtype=model.dtype, device=dev)
        self.accepted = torch.zeros(S, C, dtype=torch.bool, device=dev)
        self.finished = torch.zeros(S, dtype=torch.bool, device=dev)
        self.steps = torch.zeros(S, dtype=torch.long, device=dev)
        self.pinned = torch.zeros(S, C, dtype=torch.bool, device=dev)
        self.pin_values = torch.zeros(S, C, dtype=torch.long, device=dev)
        self.streak = torch.zeros(S, C, dtype=torch.long, device=dev)
        self.num_settled = torch.zeros(S, dtype=torch.long, device=dev)
        self.eos_until = [0] * S  # host: EOS may not be sampled before this canvas position (an output must
        self.eos_ids: list[int] = []  # reach its last pin)
        # per row, host: a constraint automaton (control/constraint.py), its state where this canvas starts, the
        # states it may end in (the text stays completable within the budget, later pins reachable), and the
        # state after the canvas's current argmax
        self.constraints: list = [None] * S
        self.constraint_start = [0] * S
        self.end_states: list = [None] * S
        self.constraint_end = [0] * S
        self.stopper = StableAndConfident(stability_threshold, confidence_threshold, S, C, dev)
        self.positions = torch.arange(C, device=dev)
        self.any_pins = False  # host flag: some row has caller pins (skips the pin work when none has)
        self.rows_skipped = 0  # decoder passes not run because the row had stopped (ROWS strategy)
        self._row_buffer: torch.Tensor | None = None

    def start(self, rows: list[int] | None, canvas: torch.Tensor, pinned: torch.Tensor | None = None,
              pin_values: torch.Tensor | None = None, eos_until: list[int] | None = None,
              eos_ids: list[int] | None = None, constraints: list | None = None,
              constraint_start: list[int] | None = None, end_states: list | None = None) -> None:
        """Begin a canvas on `rows` (None: all) from `canvas` (R, C) (the caller draws it, in its draw order),
        optionally with pinned positions (R, C) bool and their tokens (R, C), and per row the canvas position
        before which no EOS (`eos_ids`) may be sampled; and per row a constraint, the automaton state the canvas
        starts in and the states it may end in ((S,) bool, control.dp.completable_states; None: any)."""
        idx = slice(None) if rows is None else torch.tensor(rows, device=self.device)
        for i, r in enumerate(range(self.num_rows) if rows is None else rows):
            self.eos_until[r] = 0 if eos_until is None else eos_until[i]
            self.constraints[r] = None if constraints is None else constraints[i]
            if self.constraints[r] is not None:
                self.constraint_start[r] = self.constraint_end[r] = constraint_start[i]
                self.end_states[r] = end_states[i]
        if eos_ids is not None:
            self.eos_ids = list(eos_ids)
        if pinned is not None:
            canvas = torch.where(pinned, pin_values, canvas)
            self.any_pins = True
        self.canvas[idx] = canvas
        self.argmax[idx] = canvas
        self.signal[idx] = 0
        self.accepted[idx] = False
        self.finished[idx] = False
        self.steps[idx] = 0
        self.pinned[idx] = False if pinned is None else pinned
        if pin_values is not None:
            self.pin_values[idx] = pin_values
        self.streak[idx] = 0
        self.num_settled[idx] = 0
        self.stopper.reset(None if rows is None else idx)

    def row_buffer(self) -> torch.Tensor:
        """The one (C, V) fp32 buffer the ROWS strategy reuses for every row's logits and probabilities."""
        if self._row_buffer is None:
            self._row_buffer = torch.empty(self.canvas_length, self.vocab_size, dtype=torch.float32,
                                           device=self.device)
        return self._row_buffer

    def nbytes(self) -> int:
        tensors = [self.canvas, self.argmax, self.signal, self.pin_values, self.streak]
        buffer = self._row_buffer.nbytes if self._row_buffer is not None else 0
        return sum(t.nbytes for t in tensors) + buffer


def denoise_step(model: DiffusionGemma, state: CanvasState, plan: ForwardPlan, temps: torch.Tensor,
                 bounds: torch.Tensor, draws: Draws, strategy: Strategy, generators: list,
                 rows: list[int] | None = None, greedy: list[bool] | None = None,
                 settle: torch.Tensor | None = None, last: torch.Tensor | None = None,
                 first: bool = False) -> torch.Tensor:
    """Advance `rows` of `state` (None: all, in order) by one denoising step; returns whether each row has
    stopped, (R,) bool, on the device.

    plan: the decoder's forward plan for those rows (model.plan); temps, bounds (R,): each row's temperature and
    entropy bound this step; generators: one per row (a lockstep policy uses generators[0]); greedy: rows whose
    sample is the argmax (nothing drawn for it); settle (R,) bool: rows whose settled prefix is pinned (serving);
    last (R,) bool: rows on their last allowed step; first: every row is on its first step (zero signal)."""
    R = state.num_rows if rows is None else len(rows)
    # whole-state rows use plain slices: no index tensor, so the step can be captured as a CUDA graph
    idx = slice(None) if rows is None else torch.tensor(rows, device=state.device)
    if strategy is Strategy.ROWS:
        argmax, entropy, accepted, sampled, signal = _head_and_sample_rows(
            model, state, plan, idx, R, temps, bounds, draws, generators, greedy, first)
    else:
        argmax, entropy, accepted, sampled, signal = _head_and_sample_batched(
            model, state, plan, idx, temps, bounds, draws, generators, greedy, first)
    noise = draws.noise(generators, R, state.canvas_length, state.vocab_size, state.device)
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


def _head_and_sample_batched(model, state, plan, idx, temps, bounds, draws, generators, greedy, first):
    """Steps i-iii for all rows at once: a fixed kernel sequence (stopped rows are computed and discarded)."""
    signal = None if first else state.signal[idx]
    hidden = model.decode(state.canvas[idx], signal, plan)  # (R, C, H)
    logits = model.logits(hidden)  # (R, C, V), soft-capped
    until = [state.eos_until[r] for r in _row_list(idx, logits.shape[0])]
    if any(until):
        ban = state.positions[None] < torch.tensor(until, device=state.device)[:, None]  # (R, C)
        for e in state.eos_ids:
            logits[..., e].masked_fill_(ban, float("-inf"))
    # in place: (R, C, V) tensors are the largest of a step, so at most two live at once
    probs, argmax, entropy = temper_and_score(logits, temps[:, None, None] if temps.dim() else temps)
    del logits
    if state.any_pins:
        entropy = torch.where(state.pinned[idx], 0.0, entropy)
    accepted = entropy_bound_accept(entropy, bounds[:, None] if bounds.dim() else bounds)
    if draws.lockstep and not greedy:
        sampled = draws.sample(probs, accepted, generators[0])
    else:
        sampled = argmax.clone()
        for i in range(sampled.shape[0]):  # every row (lockstep: one shared generator, in row order)
            if not (greedy and greedy[i]):
                sampled[i] = draws.sample(probs[i], accepted[i], generators[0] if draws.lockstep else generators[i])
    for i, row in enumerate(_row_list(idx, probs.shape[0])):
        if state.constraints[row] is not None:
            drawn = None if greedy and greedy[i] else sampled[i]
            argmax[i], sampled[i] = _constrain(state, row, probs[i], drawn, accepted[i])
    signal = model.embed_probs(probs)  # (R, C, H) self-conditioning for the next step
    return argmax, entropy, accepted, sampled, signal


def _head_and_sample_rows(model, state, plan, idx, R, temps, bounds, draws, generators, greedy, first):
    """Steps i-iii on CPU. The decoder runs over the rows still denoising; then, row by row, the head writes the
    row's raw logits into one reused (C, V) buffer, the sampler caps, tempers and scores them block by block in
    cache and leaves the probabilities in their place, and the sample and the next signal read them there. A row
    that has stopped only advances its generator, in row order, so every row draws what a whole-batch step
    would give it."""
    C, V, dev = state.canvas_length, state.vocab_size, state.device
    finished = state.finished[idx].tolist()  # a host sync, free on CPU
    computed = [i for i in range(R) if not finished[i]]
    argmax = torch.zeros(R, C, dtype=torch.long, device=dev)
    sampled = torch.zeros(R, C, dtype=torch.long, device=dev)
    entropy = torch.full((R, C), float("inf"), device=dev)  # inf: never confident; a stopped row stays as it was
    accepted = torch.zeros(R, C, dtype=torch.bool, device=dev)
    signal = torch.zeros(R, C, state.signal.shape[-1], dtype=state.signal.dtype, device=dev)
    state.rows_skipped += R - len(computed)
    hidden = None
    if computed:
        at = torch.tensor(computed, device=dev)
        stepped = idx if isinstance(idx, torch.Tensor) else torch.arange(R, device=dev)
        sel = stepped[at]
        hidden = model.decode(state.canvas[sel], None if first else state.signal[sel], plan.select(computed))
    buffer = state.row_buffer()
    cap = model.config.final_logit_softcapping
    j = 0
    for i in range(R):
        g = generators[0] if draws.lockstep else generators[i]
        if finished[i]:
            draws.skip(C, V, g, dev)
            continue
        logits = model.head_into(hidden[j], buffer)
        j += 1
        until = state.eos_until[idx[i].item() if isinstance(idx, torch.Tensor) else i]
        probs, argmax[i], row_entropy = temper_and_score(logits, temps[i] if temps.dim() else temps, cap,
                                                        probs_in_place=True,
                                                        ban=(until, state.eos_ids) if until else None)
        if state.any_pins:
            row = idx[i] if isinstance(idx, torch.Tensor) else i
            row_entropy = torch.where(state.pinned[row], 0.0, row_entropy)
        entropy[i] = row_entropy
        accepted[i] = entropy_bound_accept(row_entropy, bounds[i] if bounds.dim() else bounds)
        row = idx[i].item() if isinstance(idx, torch.Tensor) else i
        if state.constraints[row] is not None:
            # the draws are an unconstrained row's (so other rows' draws are unchanged); the constraint then
            # moves the argmax and the sample only where they are invalid
            drawn = None if greedy and greedy[i] else draws.sample(probs, accepted[i], g)
            argmax[i], sampled[i] = _constrain(state, row, probs, drawn, accepted[i])
        else:
            sampled[i] = argmax[i] if greedy and greedy[i] else draws.sample(probs, accepted[i], g)
        signal[i] = model.embed_probs(probs)
    return argmax, entropy, accepted, sampled, signal


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


def _row_list(idx, R: int) -> list[int]:
    return list(range(R)) if not isinstance(idx, torch.Tensor) else idx.tolist()


def _constrain(state: CanvasState, row: int, probs: torch.Tensor, sample: torch.Tensor | None,
               accepted: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The row's argmax and kept sample under its constraint (control/dp.py), each a canvas (C,) that the constraint
    allows from the state the canvas starts in and that ends in one of the row's end states (the text completable
    within the tokens that may follow, every later pin still reachable). Held positions (pins, the settled prefix)
    keep their token: a pin was checked against the constraint when the request came (Steering.check), a settled
    token was valid and completable when it was fixed. The argmax is the most probable valid canvas; it is what the
    stop test reads and what is committed, and the state it ends in is recorded. The sample's drawn tokens (at
    accepted positions) stay as drawn when the argmax holds them too; otherwise the sample is the most probable
    valid canvas with the draws preferred (kept unless the constraint forbids them). So a constraint the model
    already meets changes nothing, draws included. A greedy row (sample None) keeps the argmax. Both solves share
    one pass over (C, V)."""
    from .control.dp import class_scores, solve

    held = (state.pinned[row] | (state.positions < state.num_settled[row])).cpu()  # pinned, or settled prefix
    hard = None
    if held.any():
        values = torch.where(state.pinned[row], state.pin_values[row], state.argmax[row]).cpu()
        hard = torch.where(held, values, -1)
    constraint, start, ends = state.constraints[row], state.constraint_start[row], state.end_states[row]
    scores = class_scores(probs.float().cpu(), constraint, probs=True)  # `probs` is read, never written
    best = solve(scores, start, hard=hard, end_states=ends)
    state.constraint_end[row] = int(best.states[-1])
    argmax = best.tokens.to(probs.device)
    if sample is None:
        return argmax, argmax
    drawn = sample.cpu()
    keep = (accepted.cpu() & ~held)
    if bool((drawn[keep] == best.tokens[keep]).all()):
        return argmax, sample
    projected = solve(scores, start, hard=hard, prefer=torch.where(keep, drawn, -1),
                      end_states=ends).tokens.to(probs.device)
    return argmax, torch.where(accepted, projected, sample)
