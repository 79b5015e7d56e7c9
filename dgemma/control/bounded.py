"""Step 3 of the canvas DP (dp.py) by branch and bound: the same answer from a small share of a large automaton's
pairs.

The full forward pass (moves.Forward) reads every (state, next state) pair at every position, so it is linear in
the pairs: about 300 ms a lane over Snowplow sp_338's 525,849 pairs and a 256-position canvas on one CPU core,
as long as a `small`-preset step. Most of those pairs extend prefixes that no best sequence goes through: every
set value is a log-prob (<= 0), so a prefix only loses score, and one that is already further behind than the
rest of the canvas could make up is done with. So:

1. Bound: U[r], the most any sequence can still gain from row r on (the sum of each later position's best set
   value; float64).
2. Incumbent: a beam (BEAM states a row, the best-scoring, among the states that can still meet the end rule in
   time) finds a sequence the constraint allows; its score T bounds the best from below. Its scores are sums
   taken in the order the pass takes them, so T is a sequence's score exactly as the pass would score it. A
   step's second lane (its draws preferred, dp.solve_each) differs from the first at a few positions only: the
   first lane's answer, scored under the second's values (`path_score`), is its bar, and its beam is not run.
3. Pass: only from states whose score plus U reaches T (less MARGIN for float32 rounding) and that can still meet
   the end rule in time (`_limits`: the fewest tokens to DONE, `tokens_to_done`, within what the canvas and
   the budget leave). A best sequence's prefixes all qualify, and so do the prefixes of any sequence that ties
   it, so the states on those score as in the full pass, bit for bit (max and + of the same numbers), and every
   other state no more than there (or -inf): the end state and the backward walk (dp.py, steps 4-5) are the
   same, ties included.
Where the bound is weak (the pass would read more than PASS_SHARE of the full pass's pairs, or ROW_SHARE in one
row) or the beam finds no sequence, `bounded_scores` gives None and the full pass runs. Over the first canvas of
sp_338 under a random `small` model (8 solves), the pass read 0.06% to 3.6% of the pairs; a two-lane solve took
85-110 ms on one thread where the full pass took 450-550.
"""

from __future__ import annotations

import numpy as np

from .dfa import ranges
from .constraint import Constraint
from .kept import array_bytes
from .moves import done_only_from, moves_of, tokens_to_done

BEAM = 128  # states kept a row by the incumbent's beam
PASS_SHARE = 1 / 16  # the most pairs the bounded pass reads, as a share of the full pass's, before giving up
# (a pair read here costs about 8 of the full pass's: 1/16 of its reads is about half its time) ...
ROW_SHARE = 0.9  # ... or a row after the first 8 reads this share of the pairs (sp_87: nearly all, row after row)
MAX_SKIP = 64  # after k passes in a row that gave up, the next min(2**k, MAX_SKIP) lanes run the full pass
MARGIN = 2 * 2.0 ** -24  # per position, relative to the score: twice float32's rounding of a sum that only falls


class Layout:
    """A constraint's pairs grouped by source state, in the forward pass's numbering (Forward.internal), with
    each pair's next state and class set, and each state's fewest tokens to DONE. Kept with the constraint."""

    def __init__(self, constraint: Constraint):
        moves = moves_of(constraint)
        fwd = moves.forward
        order = np.argsort(fwd.pair_src, kind="stable")
        self.dst, self.set = fwd.pair_dst[order], fwd.pair_set[order]  # (P,) each
        self.src_start = np.searchsorted(fwd.pair_src[order], np.arange(moves.num_states + 2))  # (S+2,)
        self.out_count = np.diff(self.src_start)  # (S+1,) pairs out of each state
        to_done = np.zeros(moves.num_states + 1, dtype=np.int64)  # the padding state S: 0, it has no pairs
        to_done[fwd.internal[:-1]] = tokens_to_done(constraint)
        self.dst_to_done = to_done[self.dst]  # (P,)
        self.to_done = to_done
        self.width = moves.num_states + 1  # a row of scores: the states and the forward pass's padding state
        self.done, self.done_loop = int(fwd.internal[fwd.done]), fwd.done_loop
        self.misses = self.skip = 0  # passes given up in a row; lanes still to give the full pass

    @property
    def nbytes(self) -> int:
        return array_bytes(vars(self))


def layout_of(constraint: Constraint) -> Layout:
    return constraint.derived("bounded layout", lambda: Layout(constraint))


def bounded_scores(layout: Layout, set_value: np.ndarray, walk: list[int], done_from: int | None,
                   end_ok: np.ndarray, incumbent: float | None = None) -> KeptScores | None:
    """One lane's forward scores (C+1, S+1) in the pass's numbering (`KeptScores`), as Forward.run gives them
    where a best sequence (or one tying it) can pass and -inf elsewhere; or None (weak bound, no incumbent: run the full
    pass). set_value (C, Q) float, every value <= 0; walk: the held prefix's states, new numbering (dp._held_walk
    renumbered); end_ok (S+1,) bool: the states the canvas may end in, new numbering. incumbent: the score of a
    sequence the constraint allows there (`path_score`), the bar in place of the beam's. An automaton whose bound
    keeps failing (Snowplow sp_87: most prefixes stay within reach of the best) is given the full pass for a
    while (MAX_SKIP): the answers are the same either way, only the time differs."""
    if layout.skip:
        layout.skip -= 1
        return None
    score = _bounded(layout, set_value, walk, done_from, end_ok, incumbent)
    layout.misses = 0 if score is not None else layout.misses + 1
    layout.skip = min(2 ** layout.misses, MAX_SKIP) if layout.misses else 0
    return score


def _bounded(layout: Layout, set_value: np.ndarray, walk: list[int], done_from: int | None, end_ok: np.ndarray,
             incumbent: float | None) -> KeptScores | None:
    canvas_length = set_value.shape[0]
    row_best = set_value.max(axis=1)
    if not len(layout.dst) or row_best.max(initial=0.0) > 0:
        return None  # the bound needs scores that only fall
    first = len(walk) - 1
    limit, only_done = _limits(canvas_length, done_from, layout.to_done[end_ok])
    gain = np.append(np.cumsum(row_best[::-1], dtype=np.float64)[::-1], 0.0)  # (C+1,) U
    if incumbent is None:
        incumbent = _beam(layout, set_value, walk[-1], first, limit, only_done, end_ok)
    if incumbent is None:
        return None
    floor = incumbent - MARGIN * canvas_length * max(abs(incumbent), 1.0) - gain  # (C+1,) the least kept score
    rows = [(np.array([state]), np.zeros(1, dtype=set_value.dtype)) for state in walk]
    budget = PASS_SHARE * len(layout.dst) * (canvas_length - first)
    merge, read = Merge(layout.width, set_value.dtype), 0
    for row in range(first, canvas_length):
        frontier, scores = rows[-1]
        if row >= only_done:  # DONE's own loop: nothing to prune
            at_done = (frontier == layout.done) & (layout.done_loop >= 0)
            rows.append((frontier[at_done], scores[at_done] + set_value[row, layout.done_loop]))
            continue
        count = layout.out_count[frontier]
        count[layout.to_done[frontier] > limit[row]] = 0  # too far from DONE: so is every state before it
        reads = int(count.sum())
        read += reads
        if read > budget or (row >= first + 8 and reads > ROW_SHARE * len(layout.dst)):
            return None
        pair, moved = _moved(layout, frontier, scores, count, set_value[row])
        keep = moved >= floor[row + 1]
        if row + 1 >= only_done:
            keep &= _in_time(layout, pair, row + 1, limit, only_done)
        rows.append(merge(layout.dst[pair[keep]], moved[keep]))
    return KeptScores(rows, layout.width)


class Merge:
    """Moves into the same state merged by their best score: (states ascending, their best scores), through a
    dense row kept at -inf between calls."""

    def __init__(self, width: int, dtype):
        self.best, self.seen = np.full(width, -np.inf, dtype=dtype), np.zeros(width, dtype=bool)

    def __call__(self, into: np.ndarray, moved: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        np.maximum.at(self.best, into, moved)
        self.seen[into] = True
        states = np.flatnonzero(self.seen)
        self.seen[states] = False
        scores = self.best[states]
        self.best[states] = -np.inf
        return states, scores


class KeptScores:
    """The bounded pass's scores, read as the (C+1, S+1) array of Forward.run is (score[row, states]): each row's
    kept states (ascending) with their scores, -inf for every other state (the module's step 3 says which are
    exact). No (C+1, S+1) array is made: for sp_338 that was 52 MB to fill with -inf, a lane."""

    def __init__(self, rows: list[tuple[np.ndarray, np.ndarray]], width: int):
        self.rows, self.shape = rows, (len(rows), width)

    def __getitem__(self, key):
        row, index = key
        states, scores = self.rows[row]
        if not len(states):
            return np.full(np.shape(index), -np.inf, dtype=scores.dtype)[()]
        at = np.minimum(np.searchsorted(states, index), len(states) - 1)
        return np.where(states[at] == index, scores[at], scores.dtype.type(-np.inf))[()]


def path_score(set_value: np.ndarray, sets: np.ndarray, first: int) -> float:
    """The score the pass gives a sequence whose move at each row r from `first` on is along class set sets[r]:
    its set values added row by row in set_value's dtype, as the pass adds them. set_value (C, Q), sets (C,)."""
    total = set_value.dtype.type(0)
    for row in range(first, len(sets)):
        total = total + set_value[row, sets[row]]
    return float(total)


def _limits(canvas_length: int, done_from: int | None, end_to_done: np.ndarray) -> tuple[np.ndarray, int]:
    """(C+1,) the most tokens to DONE a state may need after each row and still end the canvas where the rule
    allows (in `end_ok`, whose states need at most max(end_to_done) more; in DONE from `done_from` on), and the
    first row in which only DONE stands. A state needing more cannot make it: each token brings DONE one nearer
    at most."""
    only_done = done_only_from(canvas_length, done_from)
    rows = np.arange(canvas_length + 1)
    after = int(end_to_done.max()) if len(end_to_done) else -(canvas_length + 1)
    limit = canvas_length - rows + after
    if done_from is not None:
        limit = np.where(rows < only_done, np.minimum(limit, only_done - rows), 0)
    return limit, only_done


def _moved(layout: Layout, states: np.ndarray, scores: np.ndarray, count: np.ndarray, values: np.ndarray
           ) -> tuple[np.ndarray, np.ndarray]:
    """The first `count` pairs out of each of `states` (all of them, or none for a state ruled out), and the score
    of each move: its state's score plus its class set's value in `values` (one row)."""
    pair = ranges(layout.src_start[states], count)
    return pair, np.repeat(scores, count) + values[layout.set[pair]]


def _in_time(layout: Layout, pair: np.ndarray, row: int, limit: np.ndarray, only_done: int) -> np.ndarray:
    """Whether each of `pair`'s next states can still meet the end rule after `row` (DONE itself from
    only_done on)."""
    if row >= only_done:
        return layout.dst[pair] == layout.done
    return layout.dst_to_done[pair] <= limit[row]


def _beam(layout: Layout, set_value: np.ndarray, start: int, first: int, limit: np.ndarray, only_done: int,
          end_ok: np.ndarray) -> float | None:
    """The score of a sequence the constraint allows from `start` at row `first` to a state of `end_ok`: each row
    keeps the BEAM best states that can still make it (`limit`). None when the beam finds none."""
    canvas_length = set_value.shape[0]
    states, scores = np.array([start]), np.zeros(1, dtype=set_value.dtype)
    merge = Merge(layout.width, set_value.dtype)
    for row in range(first, canvas_length):
        if row >= only_done:
            at_done = states == layout.done
            if layout.done_loop < 0 or not at_done.any():
                return None
            states, scores = states[at_done], scores[at_done] + set_value[row, layout.done_loop]
            continue
        pair, moved = _moved(layout, states, scores, layout.out_count[states], set_value[row])
        keep = _in_time(layout, pair, row + 1, limit, only_done)
        states, scores = merge(layout.dst[pair[keep]], moved[keep])
        if len(states) > BEAM:
            top = np.sort(np.argpartition(-scores, BEAM)[:BEAM])
            states, scores = states[top], scores[top]
        if not len(states):
            return None
    ends = end_ok[states]
    return float(scores[ends].max()) if ends.any() else None
