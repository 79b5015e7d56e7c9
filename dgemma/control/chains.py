"""Counting chains in a DFA: states that differ only in how much of a bounded repetition is left.

A string written with `maxLength` 64 becomes 65 states "k characters left" (and their states inside a UTF-8
character or an escape), each the one below it with one more character allowed. The token walk (token_walk.py)
walks the tokens from the bottom of such a chain and derives the states above it, walking only what the extra
character allows. This module finds the chains, as a *shift*: a map `shift` from a state p to a state q = shift(p)
such that, for every byte b alive from p,

    step(q, b) = shift*(step(p, b)),   where shift*(x) = shift(x) if x has a shift, else x.        (*)

By induction over the bytes, a text alive from p is alive from shift(p); while every state it passes has a shift,
it ends at shift(the end from p), and once it passes a state without one, both walks are in the same state and stay
together. `level(x)` is how many times the shift applies to x (0 without one).

Finding it:
1. Seeds: (p, q) with p = step(q, b) for some byte and the same bytes alive from both (the chain "k+1 left"
   steps to "k left" on a character).
2. Closure: a pair needs, for every byte alive from p, the pair of its successors (unless they are equal, or the
   successor of q is dead: then the pair fails). Needed pairs are added, up to a bound on pairs and rounds (past
   it, a needed pair that is missing fails the pair that needs it).
3. The pairs that hold are the greatest set whose needs hold (failures spread back to the pairs that need them).
4. One shift per state (the first pair), one source per target, then (*) is checked exactly on the map itself and
   states that fail lose their shift until every one left holds; states on a cycle lose theirs too.
Whatever the heuristics in 1-2 find, step 4 keeps only a shift for which (*) holds, which is all the walk relies on.
"""

from __future__ import annotations

import numpy as np
from numpy.random import default_rng

_MAX_PAIRS_PER_STATE = 4  # the closure's bounds: pairs per state of the DFA,
_CLOSURE_ROUNDS = 16  # and rounds (a chain's pairs come within 2-3 rounds: every level of a string is a seed)


def _seed_pairs(columns: np.ndarray) -> np.ndarray:
    """Step 1: (n, 2) unique (p, q) with p = columns[q, c] for some c, p != q, and equal alive sets."""
    num_states, width = columns.shape
    alive = columns >= 0
    weights = default_rng(1).integers(1, 2**62, size=width, dtype=np.int64)
    key = alive.astype(np.int64) @ weights
    q, c = np.nonzero(alive)
    p = columns[q, c].astype(np.int64)
    keep = (p != q) & (key[p] == key[q])
    p, q = p[keep], q[keep]
    keep = (alive[p] == alive[q]).all(axis=1)
    codes = np.unique(p[keep] * num_states + q[keep])
    return np.stack([codes // num_states, codes % num_states], axis=1)


def _closed_pairs(columns: np.ndarray, seeds: np.ndarray) -> np.ndarray:
    """Steps 2-3: the pairs (n, 2) that hold, from the seeds and the pairs they need."""
    num_states = columns.shape[0]
    codes = seeds[:, 0] * num_states + seeds[:, 1]
    new = codes
    for _ in range(_CLOSURE_ROUNDS):
        if not len(new) or len(codes) >= _MAX_PAIRS_PER_STATE * num_states:
            break
        x, y = columns[new // num_states], columns[new % num_states]
        need = (x >= 0) & (y >= 0) & (x != y)
        x, y = x[need].astype(np.int64), y[need].astype(np.int64)
        holds = ~((columns[x] >= 0) & (columns[y] < 0)).any(axis=1)  # a pair that fails at once needs nothing
        more = np.unique(x[holds] * num_states + y[holds])
        more = more[~np.isin(more, codes, assume_unique=True)]
        codes, new = np.concatenate([codes, more]), more
    codes = np.sort(codes)
    p, q = codes // num_states, codes % num_states
    x, y = columns[p], columns[q]  # (n, C)
    fails = ((x >= 0) & (y < 0)).any(axis=1)
    need = (x >= 0) & (x != y) & (y >= 0)
    source, col = np.nonzero(need)
    wanted = x[source, col].astype(np.int64) * num_states + y[source, col]
    at = np.minimum(np.searchsorted(codes, wanted), len(codes) - 1)
    fails[source[codes[at] != wanted]] = True  # a needed pair past the bound
    holds = ~fails
    while True:
        broken = source[~holds[at]] if len(at) else source[:0]
        now = holds.copy()
        now[broken] = False
        if np.array_equal(now, holds):
            return np.stack([p[holds], q[holds]], axis=1)
        holds = now


def _violations(columns: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """The states with a shift for which (*) fails."""
    has = np.flatnonzero(shift >= 0)
    x, y = columns[has], columns[shift[has]]
    shifted = shift[np.maximum(x, 0)]
    mapped = np.where(shifted >= 0, shifted, x)  # shift*(x); never compared where x is dead
    return has[((x >= 0) & (y != mapped)).any(axis=1)]


def _on_cycles(shift: np.ndarray) -> np.ndarray:
    """The states from which following the shift never ends (pointer doubling: after 2^r >= S steps)."""
    far = shift.copy()
    for _ in range(max(1, int(len(shift)).bit_length())):
        far = np.where(far >= 0, far[np.maximum(far, 0)], -1)
    return np.flatnonzero(far >= 0)


def _levels(shift: np.ndarray) -> np.ndarray:
    """How many times the shift applies to each state (no cycles)."""
    level = np.zeros(len(shift), dtype=np.int64)
    going = np.flatnonzero(shift >= 0)
    at = shift[going]
    while len(going):
        level[going] += 1
        keep = shift[at] >= 0
        going, at = going[keep], shift[at[keep]]
    return level


def shift_map(columns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(shift (S,) int64, -1 for none; level (S,) int64) of a DFA given as (S, C) next states per byte class,
    -1 = dead. The shift is injective, has no cycle, and (*) holds for every state that has one."""
    num_states = columns.shape[0]
    shift = np.full(num_states, -1, dtype=np.int64)
    seeds = _seed_pairs(columns)
    if len(seeds):
        pairs = _closed_pairs(columns, seeds)
        firsts = np.unique(pairs[:, 0], return_index=True)[1]
        pairs = pairs[firsts]  # one target per state
        pairs = pairs[np.unique(pairs[:, 1], return_index=True)[1]]  # one source per target
        shift[pairs[:, 0]] = pairs[:, 1]
    while True:
        bad = _violations(columns, shift)
        if not len(bad):
            bad = _on_cycles(shift)
            if not len(bad):
                return shift, _levels(shift)
        shift[bad] = -1
