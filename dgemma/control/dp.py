"""The most probable canvas a constraint allows: DINGO-style dynamic programming (Suresh et al. 2025, 2505.23061).

A denoising step gives, for one canvas, log-probabilities (C, V) that are independent across positions. Among
all token sequences of length C that the automaton accepts from `start_state` (every token allowed where it
stands), `best_valid_tokens` returns the one with the largest sum of log-probabilities.

Convention at the end of the canvas: the state after the last position must still be completable within
`tokens_after` more tokens (`min_tokens_to_accept <= tokens_after`; None: any live state will do, 0: the canvas
must end complete). EOS may stand only where the text is complete; after it every position is EOS or pad
(the automaton's DONE state), and those positions score their own EOS/pad log-probabilities.

Exact, with no top-k cut: tokens that behave alike in every state share a class (constraint.py), so the best
token of a class at a position stands for the whole class. The cost is one pass over (C, V) for the class
maxima (step 1) plus a loop over positions whose size is the number of (state, next state) pairs, not V.

1. best[c, k]: the largest log-prob at position c among the tokens of class k.
2. pair[c, p]: the best class move for each (state, next state) pair p: max over classes leading along p.
3. Forward: score[c + 1, t] = max over pairs p = (s, t) of score[c, s] + pair[c, p]; score[0] is 0 at the start.
4. End: the best state that meets the budget rule above.
5. Backward: at each position, the first pair into the current state that attains its score, then the first
   class along that pair that attains the pair's value.
6. Tokens: at each position, the first token of the chosen class with the class's best log-prob.

Log-probs of -inf (masked or pinned-away tokens) count as a finite floor (-1e30), so when the automaton admits
any sequence one is returned, taking the fewest such tokens (next to 1e30 the finite log-probs barely count).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .constraint import INVALID, Constraint, ConstraintError

FLOOR = -1e30  # stands for -inf log-probs: finite so that a valid sequence is always found
BIG_CLASS_SHARE = 8  # a class with at least 1/8 of the vocabulary is read from the row maxima (step 1)
RESCAN_ROWS = 8  # rows masked and rescanned at a time in step 1
PREFER_PENALTY = 1e-3  # solve(prefer=): a token other than the preferred one counts at this share of its probability


@dataclass(frozen=True)
class ValidTokens:
    """tokens (C,) long; states (C,) long, the automaton state after each position (states[-1] carries into
    the next canvas); log_prob, the sum of the chosen tokens' log-probs (with -inf counted as FLOOR)."""

    tokens: torch.Tensor
    states: torch.Tensor
    log_prob: float


class _Moves:
    """A constraint's transitions as (state, next state) pairs, each with the set of classes that moves along
    it; pairs sorted by next state, identical class sets stored once; and the forward layout (`_Forward`). numpy
    arrays, cached on the constraint."""

    def __init__(self, constraint: Constraint):
        table = constraint.transitions.numpy()  # (S, K)
        num_states = table.shape[0]
        token_class = constraint.token_class.numpy()
        has_tokens = np.bincount(token_class, minlength=table.shape[1]) > 0
        src, cls = np.nonzero((table != INVALID) & has_tokens[None, :])
        dst = table[src, cls]
        pair_key, edge_pair = np.unique(dst * num_states + src, return_inverse=True)  # (P,), (E,)
        order = np.argsort(edge_pair.reshape(-1), kind="stable")
        edge_class, edge_pair = cls[order], edge_pair.reshape(-1)[order]  # grouped by pair
        bounds = np.searchsorted(edge_pair, np.arange(len(pair_key) + 1))
        self.pair_set, self.set_classes = _class_sets(edge_class, bounds)  # (P,) class set of each pair; per set,
        # its classes (sorted)
        self.set_members = np.concatenate(self.set_classes)  # (E',) classes of all sets, set after set
        self.set_start = np.cumsum([0] + [len(c) for c in self.set_classes[:-1]])  # (Q,)
        self.pair_src = pair_key % num_states  # (P,) sorted by pair_dst
        self.pair_dst = pair_key // num_states  # (P,)
        self.dst_with_pairs, self.dst_pairs_start = np.unique(self.pair_dst, return_index=True)
        self.dst_pairs_end = np.append(self.dst_pairs_start[1:], len(pair_key))
        self.slot_of_dst = np.full(num_states, -1)
        self.slot_of_dst[self.dst_with_pairs] = np.arange(len(self.dst_with_pairs))
        self.num_states = num_states
        self.forward = _Forward(self)
        class_order = np.argsort(token_class, kind="stable")
        class_bounds = np.searchsorted(token_class[class_order], np.arange(table.shape[1] + 1))
        self.class_tokens = [torch.from_numpy(class_order[a:b]) for a, b in zip(class_bounds[:-1], class_bounds[1:])]
        # step 1 reads big classes (text inside a JSON string) from the row maxima, which also give the
        # argmax; the remaining columns are gathered, sorted by class, and reduced class by class
        sizes = np.diff(class_bounds)
        self.big_classes = np.flatnonzero(sizes * BIG_CLASS_SHARE >= len(token_class)).tolist()
        self.outside_big = [torch.from_numpy(token_class != k) for k in self.big_classes]  # (V,) bool each
        small = np.flatnonzero((sizes > 0) & ~np.isin(np.arange(len(sizes)), self.big_classes))  # (Ks,) classes
        self.small_classes = torch.from_numpy(small)
        self.small_tokens = torch.from_numpy(np.concatenate([class_order[class_bounds[k]:class_bounds[k + 1]]
                                                             for k in small] or [np.zeros(0, np.int64)]))  # (Vs,)
        self.small_starts = np.cumsum(np.concatenate([[0], sizes[small][:-1]])).astype(np.int64)  # (Ks,)


def _class_sets(edge_class: np.ndarray, bounds: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """The class set of each pair (edge_class[bounds[p]:bounds[p + 1]]), identical sets numbered once: (P,) set
    ids and, per set, its classes. A pair of one class (most of them) needs no Python loop."""
    counts = np.diff(bounds)
    pair_set = np.empty(len(counts), dtype=np.int64)
    single = counts == 1
    lone, pair_set[single] = np.unique(edge_class[bounds[:-1][single]], return_inverse=True)
    set_classes = [lone[i:i + 1] for i in range(len(lone))]
    set_of: dict[bytes, int] = {}
    for p in np.flatnonzero(~single).tolist():
        classes = edge_class[bounds[p]:bounds[p + 1]]
        key = classes.tobytes()
        if key not in set_of:
            set_of[key] = len(set_classes)
            set_classes.append(classes)
        pair_set[p] = set_of[key]
    return pair_set, set_classes


class _Forward:
    """Step 3's layout: the states renumbered by how many pairs lead into them, so that the states of one
    group are contiguous, and each group's incoming pairs laid out (width, count), one column per state, padded
    with a pair from an extra state whose score is always -inf. A step then gathers every pair's source score
    and class-set value at once and takes each group's maximum down its columns; a group costs one call, a
    padded pair one element, so the groups' widths are chosen to minimise elements + GROUP_COST * groups."""

    def __init__(self, moves: _Moves):
        num_states = moves.num_states
        degree = np.bincount(moves.pair_dst, minlength=num_states)  # (S,) pairs into each state
        degrees, counts = np.unique(degree[degree > 0], return_counts=True)
        width_of = np.zeros(degree.max(initial=0) + 1, dtype=np.int64)  # in-degree -> its group's padded width
        for lo, hi in _group_widths(degrees, counts):
            width_of[degrees[lo]:degrees[hi - 1] + 1] = degrees[hi - 1]
        width = width_of[degree]  # (S,) 0 for states no pair leads into
        self.order = np.argsort(width, kind="stable")  # (S,) new state -> old
        self.internal = np.append(np.argsort(self.order), num_states)  # (S + 1,) old -> new; S stays the padding
        self.src = np.full(int(width.sum()), num_states, dtype=np.int64)  # (P',) new source state of each slot
        self.set = np.zeros(len(self.src), dtype=np.int64)  # (P',) class set of each slot (any, for padding)
        self.groups = []  # (first slot, width, count, first new state) per group
        rank = np.arange(len(moves.pair_dst)) - moves.dst_pairs_start[moves.slot_of_dst[moves.pair_dst]]
        dst_new = self.internal[moves.pair_dst]  # (P,)
        slot, first = 0, int((width == 0).sum())
        for w in np.unique(width[width > 0]).tolist():
            count = int((width == w).sum())
            mine = (dst_new >= first) & (dst_new < first + count)  # (P,) the pairs into this group
            at = slot + rank[mine] * count + dst_new[mine] - first  # row = rank among the state's pairs
            self.src[at] = self.internal[moves.pair_src[mine]]
            self.set[at] = moves.pair_set[mine]
            self.groups.append((slot, w, count, first))
            slot, first = slot + w * count, first + count
        self.pair_src = self.internal[moves.pair_src]  # (P,) new source state of each pair (step 5)


GROUP_COST = 1024  # a group's reduction call, in gathered elements


def _group_widths(degrees: np.ndarray, counts: np.ndarray) -> list[tuple[int, int]]:
    """Split the sorted distinct in-degrees (`counts` states each) into groups [lo, hi), each padded to its
    largest, minimising padded pairs + GROUP_COST per group (a shortest path over the distinct degrees)."""
    states = np.concatenate([[0], np.cumsum(counts)])
    cost, cut = np.zeros(len(degrees) + 1), np.zeros(len(degrees) + 1, dtype=np.int64)
    for hi in range(1, len(degrees) + 1):
        c = cost[:hi] + degrees[hi - 1] * (states[hi] - states[:hi]) + GROUP_COST
        cut[hi] = int(c.argmin())
        cost[hi] = c[cut[hi]]
    groups, hi = [], len(degrees)
    while hi > 0:
        groups.append((int(cut[hi]), hi))
        hi = int(cut[hi])
    return groups[::-1]


def _moves(constraint: Constraint) -> _Moves:
    moves = getattr(constraint, "_dp_moves", None)
    if moves is None:
        moves = constraint._dp_moves = _Moves(constraint)
    return moves


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


@dataclass
class ClassScores:
    """Step 1 for one canvas: the best log-prob of each token class at each position, which several solves
    (different start states, held or preferred tokens) can share. best (C, K) float64 numpy, floored."""

    constraint: Constraint
    log_probs: torch.Tensor  # (C, V) as given (probabilities when `probs`)
    probs: bool
    best: np.ndarray
    best_torch: torch.Tensor  # (C, K) before flooring (for -inf rows of big classes)
    big_argmax: dict
    # the last solve's (start, done_from, steered class scores, forward scores): the next solve on these scores
    # (a sampler's draws preferred) starts its forward pass at the first row whose steered scores differ
    forward: tuple | None = None


def class_scores(log_probs: torch.Tensor, constraint: Constraint, probs: bool = False) -> ClassScores:
    if log_probs.dtype not in (torch.float32, torch.float64):
        log_probs = log_probs.float()  # half-precision scatter/max are slow or missing on the CPU
    canvas_length, vocab_size = log_probs.shape
    if vocab_size != constraint.vocab_size:
        raise ValueError(f"log_probs has {vocab_size} columns but the constraint's vocabulary has "
                         f"{constraint.vocab_size}")
    moves = _moves(constraint)
    num_classes = constraint.num_classes

    # 1. best log-prob per (position, class); the argmax too for big classes
    best = torch.full((canvas_length, num_classes), float("-inf"), dtype=log_probs.dtype)
    if len(moves.small_starts):
        small = log_probs.index_select(1, moves.small_tokens).numpy()  # (C, Vs) sorted by class
        best[:, moves.small_classes] = torch.from_numpy(np.maximum.reduceat(small, moves.small_starts, axis=1))
    big_argmax = {}
    if moves.big_classes:
        row_max, row_argmax = log_probs.max(1)  # (C,), (C,): the first maximum of each row
    for cls, outside in zip(moves.big_classes, moves.outside_big):
        # where the row's first maximum lies in the class it is the class's; mask and rescan the other rows, or,
        # when that reads more (a second big class, whose rows' maxima lie elsewhere), read the class's columns
        rows = outside[row_argmax].nonzero().squeeze(1)
        members = moves.class_tokens[cls]
        if len(rows) * vocab_size > canvas_length * len(members):
            value, at = log_probs.index_select(1, members).max(1)  # members ascend: the first maximum
            index = members[at]
        else:
            value, index = row_max.clone(), row_argmax.clone()
            for chunk in rows.split(RESCAN_ROWS):  # a few rows at a time: the copy stays in cache
                value[chunk], index[chunk] = log_probs[chunk].masked_fill_(outside, float("-inf")).max(1)
        best[:, cls], big_argmax[cls] = value, index
    if probs:  # given probabilities: the log is monotonic, so maxima and argmaxima are the same; log only (C, K)
        best = best.log()
    best_np = best.double().clamp(min=FLOOR).numpy()  # (C, K); classes without tokens have no edges
    return ClassScores(constraint, log_probs, probs, best_np, best, big_argmax)


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
    constraint, log_probs, best_np = scores.constraint, scores.log_probs, scores.best
    canvas_length = best_np.shape[0]
    start = constraint.initial_state if start_state is None else int(start_state)
    if not 0 <= start < constraint.num_states:
        raise ValueError(f"start_state {start} is not a state of the constraint (0..{constraint.num_states - 1})")
    moves = _moves(constraint)
    best_np, fixed = _steered(best_np, constraint, hard, prefer)

    # 2. best class move per (position, class set): a pair's value is its set's
    set_value = np.ascontiguousarray(np.maximum.reduceat(best_np[:, moves.set_members], moves.set_start, axis=1))
    # (C, Q)

    # 3. forward over positions: gather each pair's source score and value, then each state's maximum (_Forward)
    fwd = moves.forward
    score = np.full((canvas_length + 1, moves.num_states + 1), -np.inf)  # (C+1, S+1), states renumbered
    score[0, fwd.internal[start]] = 0.0
    first = _reusable_rows(scores.forward, start, done_from, best_np)
    if first:
        score[:first + 1] = scores.forward[3][:first + 1]
    scores.forward = (start, done_from, best_np, score)
    into, value = np.empty(len(fwd.src)), np.empty(len(fwd.src))  # (P',)
    done = fwd.internal[constraint.done_state]
    for c in range(first, canvas_length):
        np.take(score[c], fwd.src, out=into)
        into += np.take(set_value[c], fwd.set, out=value)
        row = score[c + 1]
        for slot, width, count, first in fwd.groups:
            np.maximum.reduce(into[slot:slot + width * count].reshape(width, count), axis=0,
                              out=row[first:first + count])
        if done_from is not None and c + 1 >= done_from:  # past the budget: only DONE
            done_score = row[done]
            row[:] = -np.inf
            row[done] = done_score

    # 4. the best end state from which the rest of the output fits
    end_ok = score[canvas_length, fwd.internal[:-1]] > -np.inf  # (S,) old numbering from here on
    if end_states is not None:
        end_ok &= end_states
    if not end_ok.any():
        fits = "" if end_states is None else " and ends where the rest of the output fits (its budget, later pins)"
        fits += "" if done_from is None else f" with EOS within its first {done_from}"
        raise ConstraintError(f"{constraint.description}: no sequence of {canvas_length} tokens from state {start} "
                              f"is allowed{fits}")
    state = int(np.where(end_ok, score[canvas_length, fwd.internal[:-1]], -np.inf).argmax())

    # 5. backward: recover the pair, then the class, at each position
    states = np.empty(canvas_length, dtype=np.int64)
    classes = np.empty(canvas_length, dtype=np.int64)
    for c in range(canvas_length - 1, -1, -1):
        states[c] = state
        slot = moves.slot_of_dst[state]
        lo, hi = moves.dst_pairs_start[slot], moves.dst_pairs_end[slot]
        values = set_value[c, moves.pair_set[lo:hi]]
        hit = score[c, fwd.pair_src[lo:hi]] + values == score[c + 1, fwd.internal[state]]
        pair = lo + int(hit.argmax())
        candidates = moves.set_classes[moves.pair_set[pair]]
        classes[c] = candidates[(best_np[c, candidates] == values[pair - lo]).argmax()]
        state = int(moves.pair_src[pair])

    # 6. at each position, the first token of the chosen class with the class's best log-prob (a steered
    # position whose chosen class holds its token: that token)
    tokens = torch.empty(canvas_length, dtype=torch.long)
    for cls in np.unique(classes).tolist():
        positions = torch.from_numpy(np.flatnonzero(classes == cls))
        members = moves.class_tokens[cls]
        if cls in scores.big_argmax:
            # a row of -inf has its argmax outside the class; any member is as good
            found = scores.big_argmax[cls][positions]
            tokens[positions] = torch.where(scores.best_torch[positions, cls] > float("-inf"), found, members[0])
        else:
            tokens[positions] = members[log_probs[positions[:, None], members[None, :]].argmax(1)]
    for c, token in fixed.items():
        if int(constraint.token_class[token]) == classes[c]:
            tokens[c] = token
    chosen = log_probs.gather(1, tokens[:, None]).double()
    log_prob = float((chosen.log() if scores.probs else chosen).clamp(min=FLOOR).sum())
    return ValidTokens(tokens, torch.from_numpy(states), log_prob)


def _reusable_rows(last: tuple | None, start: int, done_from: int | None, best_np: np.ndarray) -> int:
    """How many forward rows of the last solve on the same class scores this one shares: up to the first position
    whose steered class scores differ (bit for bit), given the same start and done_from; 0 otherwise."""
    if last is None or last[0] != start or last[1] != done_from:
        return 0
    differs = (last[2].view(np.int64) != best_np.view(np.int64)).any(axis=1)  # (C,)
    return int(differs.argmax()) if differs.any() else len(differs)


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
    (with `eos`, `tokens_to_done`), the budget rule of `best_valid_tokens`'s tokens_after. Backward from the last pin: a pinned position moves along its
    token's class only, any other position along every move the constraint allows; O(pairs) per position."""
    moves = _moves(constraint)
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


def tokens_to_done(constraint: Constraint) -> np.ndarray:
    """(S,) the fewest tokens from each state to DONE: the text completed, then its EOS (0 in DONE)."""
    steps = constraint.distance.numpy() + 1
    steps[constraint.done_state] = 0
    return steps


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
    moves = _moves(constraint)
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

    def read(self, probs: torch.Tensor) -> ClassScores:
        return class_scores(probs.float().cpu(), self.constraint, probs=True)  # `probs` is read, never written

    def best(self, read: ClassScores, held: torch.Tensor | None) -> torch.Tensor:
        best = solve(read, self.start_state, hard=held, end_states=self.end_states, done_from=self.done_from)
        self.end_state = int(best.states[-1])
        return best.tokens

    def nearest(self, read: ClassScores, held: torch.Tensor | None, prefer: torch.Tensor) -> torch.Tensor:
        return solve(read, self.start_state, hard=held, prefer=prefer, end_states=self.end_states,
                     done_from=self.done_from).tokens


def canvas_constraints(start: dict) -> dict:
    """What control.pins.canvas_start gives, as step.CanvasState.start takes it: each constrained row's automaton,
    the state its canvas starts in and how it must end (`canvas_rule`) become one CanvasDP."""
    rows = zip(start.pop("constraints"), start.pop("constraint_start"), start.pop("end_rules"))
    return dict(start, constraints=[None if c is None else CanvasDP(c, s, *rule) for c, s, rule in rows])
