"""The most probable canvas a constraint allows: DINGO-style dynamic programming (Suresh et al. 2025, 2505.23061).

A denoising step gives, for one canvas, log-probabilities (C, V) that are independent across positions. Among
all token sequences of length C that the automaton accepts from `start_state` (every token allowed where it
stands), `best_valid_tokens` returns the one with the largest sum of log-probabilities.

Convention at the end of the canvas: the state after the last position must still be completable within
`tokens_after` more tokens (`min_tokens_to_accept <= tokens_after`; None: any live state will do, 0: the canvas
must end complete). EOS may stand only where the text is complete; after it every position is EOS or pad
(the automaton's DONE state), and those positions score their own EOS/pad log-probabilities.

Exact, with no top-k cut: tokens that behave alike in every state share a class (constraint.py), so the best
token of a class at a position stands for the whole class. The cost is one copy of (C, V) grouped by class for
the class maxima (step 1) plus a loop over positions whose size is the number of (state, next state) pairs, not V
(moves.py lays the pairs out for it).

1. best[c, k]: the largest log-prob at position c among the tokens of class k.
2. pair[c, p]: the best class move for each (state, next state) pair p: max over classes leading along p.
3. Forward: score[c + 1, t] = max over pairs p = (s, t) of score[c, s] + pair[c, p]; score[0] is 0 at the start.
   For a large automaton, by branch and bound (bounded.py): only where a best sequence can pass, the same scores.
4. End: the best state that meets the budget rule above.
5. Backward: at each position, the first pair into the current state that attains its score, then the first
   class along that pair that attains the pair's value.
6. Tokens: at each position, the first token of the chosen class with the class's best log-prob.
When the best class at every position already makes a sequence the automaton allows (a confident model whose tokens
obey the constraint), that sequence is the answer, and steps 2-5 are one walk along it (`_allowed_walk`).

Log-probs of -inf (masked or pinned-away tokens) count as a finite floor (-1e30), so when the automaton admits
any sequence one is returned, taking the fewest such tokens (next to 1e30 the finite log-probs barely count).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .bounded import Layout, bounded_scores, layout_of, path_score
from .constraint import INVALID, Constraint, ConstraintError
from .moves import done_only_from, moves_of, tokens_to_done
from .reading import FLOOR, ClassScores, class_scores, tokens_of

PREFER_PENALTY = 1e-3  # solve(prefer=): a token other than the preferred one counts at this share of its probability
# (pairs x lanes) from which a canvas read on its accelerator (reading.py's scatter) runs the forward pass there too
# rather than in numpy on the host. Not yet timed on a GPU: gpu_check.py's constrained-step part times both sides
DEVICE_PAIRS = 1 << 15


@dataclass(frozen=True)
class ValidTokens:
    """tokens (C,) long; states (C,) long, the automaton state after each position (states[-1] carries into
    the next canvas); log_prob, the sum of the chosen tokens' log-probs (with -inf counted as FLOOR)."""

    tokens: torch.Tensor
    states: torch.Tensor
    log_prob: float


def best_valid_tokens(log_probs: torch.Tensor, constraint: Constraint, start_state: int | None = None,
                      tokens_after: int | None = None, probs: bool = False, hard: torch.Tensor | None = None,
                      prefer: torch.Tensor | None = None) -> ValidTokens:
    """The most probable token sequence of length C that `constraint` allows from `start_state` (default: its
    initial state) and that ends completable within `tokens_after` more tokens. With `probs`, `log_probs` holds
    probabilities instead (the same answer, without a log pass over (C, V)). log_probs: (C, V) for one
    canvas, on the CPU. `hard`/`prefer`: see `solve`. ConstraintError when no sequence qualifies (e.g. the canvas
    is too short to finish and tokens_after is 0)."""
    ends = None if tokens_after is None else completable_states(constraint, {}, 0, tokens_after)
    return solve(class_scores(log_probs, constraint, probs), start_state, hard, prefer, ends)


def solve(scores: ClassScores, start_state: int | None = None, hard: torch.Tensor | None = None,
          prefer: torch.Tensor | None = None, end_states: np.ndarray | None = None,
          done_from: int | None = None) -> ValidTokens:
    """Steps 2-6 over shared class scores. end_states (S,) bool: the states the canvas may end in (`completable_states`:
    the rest of the output fits the budget and meets the later pins; None: any live state). done_from: the canvas
    position from which the automaton must be in DONE (the output budget ends inside this canvas: EOS comes before
    it, and the positions from it on, which the output never shows, are EOS or pad). hard (C,) long: where >= 0,
    the token that position must keep; any other token there costs more than every floored token elsewhere together, so
    hard tokens are kept whenever some valid sequence keeps them (held text that was valid and completable when it
    settled). prefer (C,) long: where >= 0, a token counted as certain there, every other token at PREFER_PENALTY of its
    probability (a sampler's draw, kept unless the constraint forbids it). Positions given both take `hard`."""
    return solve_each(scores, [prefer], start_state, hard, end_states, done_from)[0]


def solve_each(scores: ClassScores, prefers: list, start_state: int | None = None, hard: torch.Tensor | None = None,
               end_states: np.ndarray | None = None, done_from: int | None = None) -> list[ValidTokens]:
    """`solve` once for each of `prefers` (each None or a prefer (C,)), the forward passes run as lanes of one
    (moves.Forward.run): two lanes over Snowplow sp_87's 124k pairs took 161 ms against 239 ms for two passes."""
    constraint = scores.constraint
    start = constraint.initial_state if start_state is None else int(start_state)
    if not 0 <= start < constraint.num_states:
        raise ValueError(f"start_state {start} is not a state of the constraint (0..{constraint.num_states - 1})")
    moves = moves_of(constraint)
    steered = [_steered(scores.best, constraint, hard, prefer) for prefer in prefers]  # (class scores, fixed)
    walk = _held_walk(constraint, start, hard, done_from)
    if len(walk) > 1:  # a held prefix: the pass starts after it, unless some held token has to go
        try:
            answers = _answers(scores, moves, steered, walk, end_states, done_from)
            if all(bool(((hard < 0) | (a.tokens == hard)).all()) for a in answers):
                return answers
        except ConstraintError:
            pass
    return _answers(scores, moves, steered, [start], end_states, done_from)


def _held_walk(constraint: Constraint, start: int, hard: torch.Tensor | None, done_from: int | None) -> list[int]:
    """The states at positions 0..n of the canvas's held prefix (hard >= 0 at positions 0..n-1: pins, the
    settled prefix), from `start`, when every one of its tokens is allowed there (in DONE from done_from on);
    else [start]. When some valid sequence keeps every held token, each keeps this prefix (the automaton is
    deterministic), so the best one is the best from position n on: a forward pass over the free positions only.
    A step in the settled part of a canvas then costs the DP its unsettled share."""
    if hard is None:
        return [start]
    table, token_class = constraint.transitions.numpy(), constraint.token_class.numpy()
    walk = [start]
    for position, token in enumerate(hard.tolist()):
        if token < 0:
            break
        state = int(table[walk[-1], token_class[token]])
        if state == INVALID or (done_from is not None and position + 1 >= done_from
                                and state != constraint.done_state):
            return [start]  # not every held token can stay: the whole pass decides which goes
        walk.append(state)
    return walk


def _answers(scores: ClassScores, moves, steered: list, walk: list[int], end_states: np.ndarray | None,
             done_from: int | None) -> list[ValidTokens]:
    """3-6 for every lane, the forward pass from the end of `walk` (Forward.run); a lane whose best class at each
    position already makes a sequence the constraint allows (`_allowed_walk`) takes it without the pass."""
    constraint = scores.constraint
    answers = []
    for best, fixed in steered:
        classes = best.argmax(axis=1)
        states = _allowed_walk(constraint, best, classes, walk[0], end_states, done_from)
        answers.append(None if states is None else _answer(scores, moves, states, classes, fixed))
    rest = [lane for lane, answer in enumerate(answers) if answer is None]
    if not rest:
        return answers
    on_device = scores.token_class is not None and len(moves.pair_src) * len(rest) >= DEVICE_PAIRS
    # 2. best class move per (position, class set): a pair's value is its set's
    values = np.stack([np.maximum.reduceat(np.take(steered[lane][0], moves.set_members, axis=1), moves.set_start,
                                           axis=1) for lane in rest], axis=-1)  # (C, Q, L)
    bests = [steered[lane][0] for lane in rest]
    paths = _paths(constraint, moves, values, bests, walk, end_states, done_from,
                   scores.log_probs.device if on_device else None)
    for lane, (states, classes, _) in zip(rest, paths):
        answers[lane] = _answer(scores, moves, states, classes, steered[lane][1])
    return answers


def _paths(constraint: Constraint, moves, values: np.ndarray, bests: list, walk: list[int],
           end_states: np.ndarray | None, done_from: int | None, device: torch.device | None) -> list[tuple]:
    """3-5 for each lane: (states, classes, pairs), each (C,). The forward scores come by branch and bound
    (bounded.py) for an automaton of at least BOUNDED_PAIRS pairs on the host, where the bound holds, and from the
    full pass (Forward.run, the lanes left together) for the rest. A lane solved by branch and bound hands the next
    lane its path's score under that lane's values as the bar to beat, in place of a beam: the lanes differ where
    draws are preferred (a few positions), so that path is nearly the next lane's best. values (C, Q, L)."""
    lanes = values.shape[2]
    found: list = [None] * lanes
    layout = None if device is not None else _bounded_layout(constraint)
    if layout is not None:
        internal = moves.forward.internal
        end_ok = np.zeros(moves.num_states + 1, dtype=bool)
        end_ok[internal[:-1]] = True if end_states is None else end_states
        renumbered = [int(internal[state]) for state in walk]
        for i in range(lanes):
            lane_values = np.ascontiguousarray(values[:, :, i])
            bar = None  # the previous lane's path, scored under this lane's values
            if i and found[i - 1] is not None:
                bar = path_score(lane_values, moves.pair_set[found[i - 1][2]], len(walk) - 1)
            score = bounded_scores(layout, lane_values, renumbered, done_from, end_ok, bar)
            if score is not None:
                found[i] = _walk_back(constraint, moves, score, lane_values, bests[i], walk[0], end_states, done_from)
    rest = [i for i, path in enumerate(found) if path is None]
    if rest:
        on_device = None if device is None else constraint.derived(("pairs on", device),
                                                                    lambda: moves.forward.on(device))
        full = moves.forward.run(values[:, :, rest], walk, done_from, torch.get_num_threads(), on_device, reuse=True)
        for j, i in enumerate(rest):
            found[i] = _walk_back(constraint, moves, full[:, :, j], values[:, :, i], bests[i], walk[0], end_states,
                                  done_from)
    return found


def _walk_back(constraint: Constraint, moves, score, set_value: np.ndarray, best: np.ndarray, start: int,
               end_states: np.ndarray | None, done_from: int | None) -> tuple:
    """4-5 for one lane's forward scores: (states, classes, pairs)."""
    state = _end_state(constraint, moves, score, start, end_states, done_from)
    return _backward(moves, score, set_value, best, state)


BOUNDED_PAIRS = 1 << 16  # the fewest pairs for which the forward pass is tried by branch and bound (bounded.py)


def _bounded_layout(constraint: Constraint) -> Layout | None:
    """The branch and bound's layout of `constraint` (made once), when it has at least BOUNDED_PAIRS pairs."""
    return layout_of(constraint) if len(moves_of(constraint).pair_src) >= BOUNDED_PAIRS else None


def _answer(scores: ClassScores, moves, states: np.ndarray, classes: np.ndarray, fixed: dict) -> ValidTokens:
    """6. The tokens of the chosen classes, and their log-prob."""
    tokens = tokens_of(scores, moves, classes, fixed)
    chosen = scores.log_probs.gather(1, tokens[:, None].to(scores.log_probs.device)).double().cpu()
    log_prob = float((chosen.log() if scores.probs else chosen).clamp(min=FLOOR).sum())
    return ValidTokens(tokens, torch.from_numpy(states), log_prob)


def _allowed_walk(constraint: Constraint, best: np.ndarray, classes: np.ndarray, start: int,
                  end_states: np.ndarray | None, done_from: int | None) -> np.ndarray | None:
    """The states after each position when the best class at every position (`classes`, above the floor) makes a
    sequence the constraint allows from `start`, in DONE from `done_from` on and ending in `end_states`; else
    None. That sequence is then the best valid one (no valid sequence scores more than the best of each position):
    one walk instead of the forward pass, as when a confident model's tokens already obey the constraint."""
    canvas_length = len(classes)
    if not (best[np.arange(canvas_length), classes] > FLOOR).all():
        return None
    table, states = constraint.transitions.numpy(), np.empty(canvas_length, dtype=np.int64)
    only_done_from = done_only_from(canvas_length, done_from)
    state = start
    for c, cls in enumerate(classes.tolist()):
        state = int(table[state, cls])
        if state == INVALID or (c + 1 >= only_done_from and state != constraint.done_state):
            return None
        states[c] = state
    return states if end_states is None or end_states[state] else None


def _end_state(constraint: Constraint, moves, score: np.ndarray, start: int, end_states: np.ndarray | None,
               done_from: int | None) -> int:
    """4. The best end state (old numbering) from which the rest of the output fits; score (C+1, S+1) one lane's
    forward scores (renumbered)."""
    canvas_length = score.shape[0] - 1
    last = score[canvas_length, moves.forward.internal[:-1]]  # (S,) old numbering from here on
    end_ok = last > -np.inf
    if end_states is not None:
        end_ok &= end_states
    if not end_ok.any():
        fits = "" if end_states is None else " and ends where the rest of the output fits (its budget, later pins)"
        fits += "" if done_from is None else f" with EOS within its first {done_from}"
        raise ConstraintError(f"{constraint.description}: no sequence of {canvas_length} tokens from state {start} "
                              f"is allowed{fits}")
    return int(np.where(end_ok, last, -np.inf).argmax())


def _backward(moves, score: np.ndarray, set_value: np.ndarray, best: np.ndarray, state: int
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """5. Backward from `state`: at each position the first pair into the current state that attains its score,
    then the first class along that pair that attains the pair's value. (states, classes, pairs), each (C,)."""
    fwd = moves.forward
    canvas_length = len(best)
    states, classes, pairs = (np.empty(canvas_length, dtype=np.int64) for _ in range(3))
    target = score[canvas_length, fwd.internal[state]]  # the current state's score; then the chosen source's
    for c in range(canvas_length - 1, -1, -1):
        states[c] = state
        slot = moves.slot_of_dst[state]
        lo, hi = moves.dst_pairs_start[slot], moves.dst_pairs_end[slot]
        values = set_value[c, moves.pair_set[lo:hi]]
        sources = score[c, fwd.pair_src[lo:hi]]
        k = int((sources + values == target).argmax())
        pair = pairs[c] = lo + k
        candidates = moves.set_classes[moves.pair_set[pair]]
        classes[c] = candidates[(best[c, candidates] == values[k]).argmax()]
        state, target = int(moves.pair_src[pair]), sources[k]
    return states, classes, pairs


def _steered(best_np: np.ndarray, constraint: Constraint, hard: torch.Tensor | None, prefer: torch.Tensor | None
             ) -> tuple[np.ndarray, dict]:
    """Class scores with `solve`'s held (`hard`) and preferred tokens applied, and position -> the token each
    steered position is steered to."""
    fixed = {}
    if prefer is None and hard is None:
        return best_np, fixed
    best_np = best_np.copy()
    for steer, other in ((prefer, np.log(PREFER_PENALTY)), (hard, FLOOR * (best_np.shape[0] + 1))):
        if steer is None:
            continue
        at = torch.nonzero(steer >= 0).squeeze(1)
        if len(at) == 0:
            continue
        toks = steer[at]
        rows, cls = at.numpy(), constraint.token_class[toks].numpy()
        if steer is hard:
            best_np[rows] = other
        else:
            best_np[rows] += other
        best_np[rows, cls] = 0.0
        fixed.update(zip(rows.tolist(), toks.tolist()))
    return best_np, fixed


def completable_states(constraint: Constraint, pinned: dict[int, int], start: int,
                       max_new: int | None, eos: bool = False) -> np.ndarray:
    """(S,) bool: the states from which output positions [start, max_new) can hold every pin that falls there
    (output position -> token id) and the text be complete at max_new (max_new None: no budget, so after the last
    pin any live state will do); with `eos`, complete with its EOS among those positions (in DONE at max_new: an
    output that ends within max_tokens). Without pins at or after `start` this is `distance <= max_new - start`
    (with `eos`, `tokens_to_done`), the budget rule of `best_valid_tokens`'s tokens_after. Backward from the last
    pin: a pinned position moves along its token's class only, any other position along every move the constraint
    allows; O(pairs) per position."""
    moves = moves_of(constraint)
    later = [p for p in pinned if p >= start]
    end = max(later) + 1 if later else start
    if max_new is None:
        ok = np.ones(moves.num_states, dtype=bool)
    else:
        ok = (tokens_to_done(constraint) if eos else constraint.distance.numpy()) <= max(max_new - end, 0)
    table = constraint.transitions.numpy()
    for position in range(end - 1, start - 1, -1):
        token = pinned.get(position)
        if token is None:
            reach = np.zeros_like(ok)
            reach[moves.pair_src[ok[moves.pair_dst]]] = True
        else:
            nxt = table[:, int(constraint.token_class[token])]
            reach = (nxt != INVALID) & ok[np.maximum(nxt, 0)]
        ok = reach
    return ok


def canvas_rule(constraint: Constraint, pinned: dict[int, int], index: int, canvas_length: int,
                max_new: int | None) -> tuple[np.ndarray, int | None]:
    """How canvas `index` of an output of at most `max_new` tokens (None: no budget) must end under `constraint`:
    the states it may end in (every later pin reachable, the text and its EOS within the budget:
    `completable_states`), and the canvas position from which it must be in DONE when the budget ends inside it
    (else None). So the last canvas may be partial: its text ends with EOS before the budget does."""
    end = (index + 1) * canvas_length
    done_from = None
    if max_new is not None and max_new < end:
        done_from = max(max_new - index * canvas_length, 0)
    return completable_states(constraint, pinned, end, max_new, eos=True), done_from


def suffix_fits(constraint: Constraint, suffix: list[int], longest: int) -> np.ndarray:
    """(longest,) bool: for each middle length L = 1..longest, whether some text the constraint allows is L tokens
    of middle, then `suffix`, complete there (so an EOS may follow): fill in the middle under a constraint.
    Forward from the initial state over the middle (every allowed move), and once over the states, the suffix's
    walk from each."""
    moves = moves_of(constraint)
    table = constraint.transitions.numpy()
    walked = np.arange(moves.num_states)
    for token in suffix:
        nxt = table[np.maximum(walked, 0), int(constraint.token_class[token])]
        walked = np.where(walked >= 0, nxt, INVALID)
    good = (walked >= 0) & constraint.final.numpy()[np.maximum(walked, 0)]  # (S,) a suffix from here ends complete
    reach = np.zeros(moves.num_states, dtype=bool)
    reach[constraint.initial_state] = True
    fits = np.zeros(longest, dtype=bool)
    for length in range(1, longest + 1):
        nxt = np.zeros_like(reach)
        nxt[moves.pair_dst[reach[moves.pair_src]]] = True
        reach = nxt
        fits[length - 1] = bool((reach & good).any())
    return fits


class CanvasDP:
    """A row's constraint over one canvas, as the denoising step asks for it (step.constraint.CanvasConstraint):
    this module's DP from the automaton state where the canvas starts, ending in one of `end_states` ((S,) bool,
    `completable_states`; None: any live state) and in DONE from position `done_from` on (`canvas_rule`)."""

    def __init__(self, constraint: Constraint, start_state: int, end_states: np.ndarray | None,
                 done_from: int | None = None):
        self.constraint, self.start_state, self.end_states = constraint, start_state, end_states
        self.done_from = done_from
        self.end_state = start_state
        _bounded_layout(constraint)  # made with the canvas, not in its first step

    def read(self, probs: torch.Tensor) -> ClassScores:
        return class_scores(probs.float(), self.constraint, probs=True, reuse=True)  # `probs` is read, never written

    def best(self, read: ClassScores, held: torch.Tensor | None) -> torch.Tensor:
        best = solve(read, self.start_state, hard=held, end_states=self.end_states, done_from=self.done_from)
        self.end_state = int(best.states[-1])
        return best.tokens

    def best_and_nearest(self, read: ClassScores, held: torch.Tensor | None, prefer: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        best, nearest = solve_each(read, [None, prefer], self.start_state, held, self.end_states, self.done_from)
        self.end_state = int(best.states[-1])
        return best.tokens, nearest.tokens


def canvas_constraints(start: dict) -> dict:
    """What control.pins.canvas_start gives, as step.CanvasState.start takes it: each constrained row's automaton,
    the state its canvas starts in and how it must end (`canvas_rule`) become one CanvasDP."""
    rows = zip(start.pop("constraints"), start.pop("constraint_start"), start.pop("end_rules"))
    return dict(start, constraints=[None if c is None else CanvasDP(c, s, *rule) for c, s, rule in rows])
