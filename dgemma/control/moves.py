"""A constraint's transitions as the canvas DP (dp.py) reads them: (state, next state) pairs with the class sets
that move along them, the forward pass's layout, and the token columns grouped by class. Built once per
constraint and kept with it (kept.py)."""

from __future__ import annotations

import numpy as np
import torch

from .constraint import INVALID, Constraint
from .kept import array_bytes
from .scratch import scratch


class Moves:
    """A constraint's transitions as (state, next state) pairs, each with the set of classes that moves along
    it; pairs sorted by next state, identical class sets stored once; and the forward layout (`Forward`). numpy
    arrays, kept with the constraint."""

    def __init__(self, constraint: Constraint):
        table = constraint.transitions.numpy()  # (S, K)
        num_states = table.shape[0]
        token_class = constraint.token_class.numpy()
        has_tokens = np.bincount(token_class, minlength=table.shape[1]) > 0
        src, cls = np.nonzero((table != INVALID) & has_tokens[None, :])
        dst = table[src, cls]
        order = np.argsort(dst, kind="stable")  # the edges come by source: now by (next state, source), one sort
        key = dst[order].astype(np.int64) * num_states + src[order]  # int64: pair keys pass 2**31
        edge_class = cls[order]  # grouped by pair, ascending within each
        first = np.flatnonzero(np.concatenate(([True], key[1:] != key[:-1])))[:len(key)]  # each pair's first edge
        pair_key, bounds = key[first], np.append(first, len(key))
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
        self.forward = Forward(self, constraint.done_state)
        # step 1 reads big classes (text inside a JSON string) from the row maxima, which also give the argmax;
        # the other columns are copied grouped by class (ids ascending within each) and reduced class by class
        class_order = np.argsort(token_class, kind="stable")
        class_bounds = np.searchsorted(token_class[class_order], np.arange(table.shape[1] + 1))  # (K+1,)
        sizes = np.diff(class_bounds)
        self.big_classes = np.flatnonzero(sizes * BIG_CLASS_SHARE >= len(token_class)).tolist()
        self.big_members = {k: class_order[class_bounds[k]:class_bounds[k + 1]] for k in self.big_classes}
        self.outside_big = {k: token_class != k for k in self.big_classes}  # (V,) bool each
        self.small_classes = np.flatnonzero((sizes > 0) & ~np.isin(np.arange(len(sizes)), self.big_classes))
        self.small_tokens = class_order[~np.isin(token_class[class_order], self.big_classes)]  # (Vs,) by class
        self.small_start = np.zeros(len(sizes) + 1, dtype=np.int64)  # (K+1,) each small class's first column
        self.small_start[self.small_classes + 1] = sizes[self.small_classes]
        self.small_start = np.cumsum(self.small_start)

    @property
    def nbytes(self) -> int:
        return array_bytes(vars(self), vars(self.forward))


BIG_CLASS_SHARE = 8  # a class with at least 1/8 of the vocabulary is read from the row maxima (step 1)


def _class_sets(edge_class: np.ndarray, bounds: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """The class set of each pair (edge_class[bounds[p]:bounds[p + 1]]), identical sets numbered once: (P,) set
    ids and, per set, its classes. A pair of one class (most of them) needs no Python loop."""
    counts = np.diff(bounds)
    pair_set = np.empty(len(counts), dtype=np.int64)
    single = counts == 1
    lone, pair_set[single] = np.unique(edge_class[bounds[:-1][single]], return_inverse=True)
    set_classes = [np.array([k]) for k in lone.tolist()]  # each set owns its classes (no view of a larger array)
    set_of: dict[bytes, int] = {}
    for p in np.flatnonzero(~single).tolist():
        classes = edge_class[bounds[p]:bounds[p + 1]]
        key = classes.tobytes()
        if key not in set_of:
            set_of[key] = len(set_classes)
            set_classes.append(classes.copy())  # a view keeps every edge's class alive (sp_338: 45 MB)
        pair_set[p] = set_of[key]
    return pair_set, set_classes


class Forward:
    """Step 3's layout: the states renumbered by how many pairs lead into them, so that the states of one
    group are contiguous, and each group's incoming pairs laid out (width, count), one column per state, padded
    with a pair from an extra state whose score is always -inf. A step then gathers every pair's source score
    and class-set value at once and takes each group's maximum down its columns; a group costs one call, a
    padded pair one element, so the groups' widths are chosen to minimise elements + GROUP_COST * groups."""

    def __init__(self, moves: Moves, done: int):
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
        self.pair_set, self.pair_dst = moves.pair_set, self.internal[moves.pair_dst]  # (P,) each, for _on_device
        self.num_states, self.done = num_states, done
        loop = np.flatnonzero((moves.pair_src == done) & (moves.pair_dst == done))
        self.done_loop = int(moves.pair_set[loop[0]]) if len(loop) else -1  # the class set of DONE -> DONE

    def run(self, set_value: np.ndarray, walk: list[int], done_from: int | None, threads: int = 1,
            on_device: tuple | None = None, reuse: bool = False) -> np.ndarray:
        """Step 3 for L lanes at once: score (C+1, S+1, L), the best score of reaching each (renumbered) state
        after each position, given each class set's value per position and lane set_value (C, Q, L). walk: the
        states (old numbering) at positions 0..n, [start] or a held prefix's forced states (dp._held_walk), each
        scored 0 there; the pass runs from position n. From position `done_from` on only DONE stays reachable,
        so past it the pass is DONE's own loop. Lanes share every gather's indices, so a second lane costs far
        less than a second pass. With `threads`, a position's groups are split into that many runs of about
        equal size (at least PART_ELEMENTS gathered elements each), one a thread: numpy lets go of the GIL. With
        `on_device` (`on(device)`), the pass runs on that device in torch (`_on_device`); the scores are the same,
        bit for bit. With `reuse`, the scores and buffers are this thread's scratch memory (scratch.py): valid
        until the next such pass."""
        canvas_length, _, lanes = set_value.shape
        if on_device is not None:
            return self._on_device(on_device, set_value, walk, done_from)
        shape = (canvas_length + 1, self.num_states + 1, lanes)
        score = scratch("forward scores", shape, set_value.dtype) if reuse else np.empty(shape, set_value.dtype)
        score.fill(-np.inf)
        parts = self._parts(min(threads, max(1, len(self.src) * lanes // PART_ELEMENTS)), set_value.dtype, lanes,
                            reuse)
        pool = _pool(len(parts) - 1)

        def position(c: int) -> None:
            others = [pool.submit(_pass, part, score[c], set_value[c], score[c + 1]) for part in parts[1:]]
            _pass(parts[0], score[c], set_value[c], score[c + 1])
            for other in others:
                other.result()

        self._positions(score, set_value, walk, done_from, position)
        return score

    def on(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        """The pairs' (source, class set, next state) on `device`, for `run`'s on_device (kept with the
        constraint: dp._paths)."""
        return tuple(torch.from_numpy(a).to(device) for a in (self.pair_src, self.pair_set, self.pair_dst))

    def _on_device(self, indices: tuple, set_value: np.ndarray, walk: list[int], done_from: int | None
                   ) -> np.ndarray:
        """Step 3 in torch on the device of `indices` (`on`), pair by pair: a position gathers each pair's source
        score and class-set value and scatters their sum into its next state with a maximum (max and + are exact,
        so the order of the scatter does not matter); a few kernels a position, and the scores come back to the
        host once."""
        src, sets, dst = indices
        device = src.device
        canvas_length, _, lanes = set_value.shape
        values = torch.from_numpy(set_value).to(device)
        score = torch.full((canvas_length + 1, self.num_states + 1, lanes), -torch.inf, dtype=values.dtype,
                           device=device)
        into = dst[:, None].expand(-1, lanes)

        def position(c: int) -> None:
            moves = score[c].index_select(0, src) + values[c].index_select(0, sets)  # (P, L)
            score[c + 1].scatter_reduce_(0, into, moves, "amax")

        self._positions(score, values, walk, done_from, position)
        return score.cpu().numpy()

    def _positions(self, score, set_value, walk: list[int], done_from: int | None, position) -> None:
        """The loop over positions that `run` and `_on_device` share (score and set_value: numpy arrays or
        tensors): the walk's states score 0, then each position is `position(c)`, or DONE's own loop past the
        budget, where only DONE stays."""
        canvas_length = set_value.shape[0]
        for c, state in enumerate(walk):
            score[c, self.internal[state]] = 0.0
        done = self.internal[self.done]
        only_done_from = done_only_from(canvas_length, done_from)  # rows from here: DONE only
        for c in range(len(walk) - 1, canvas_length):
            row = score[c + 1]
            if c >= only_done_from:
                if self.done_loop >= 0:
                    row[done] = score[c, done] + set_value[c, self.done_loop]
                continue
            position(c)
            if c + 1 >= only_done_from:  # past the budget: only DONE
                done_score = row[done] + 0
                row[:] = -np.inf
                row[done] = done_score

    def _parts(self, count: int, dtype, lanes: int, reuse: bool = False) -> list[tuple]:
        """The groups cut into `count` runs of about equal slots, each with its own buffers (with `reuse`, in
        scratch memory): (source states, class sets, gathered scores (slots, L), gathered values, [(block (width,
        count, L), first state, end state)])."""
        ends, total = np.cumsum([w * n for _, w, n, _ in self.groups]), len(self.src)
        cuts = [0] + [int(np.searchsorted(ends, total * k / count)) + 1 for k in range(1, count)] + [len(self.groups)]
        parts = []
        for lo, hi in zip(cuts[:-1], cuts[1:]):
            if lo >= hi:
                continue
            first, (last, w, n, _) = self.groups[lo][0], self.groups[hi - 1]
            shape = (last + w * n - first, lanes)
            into, value = (scratch(f"forward part {len(parts)} {name}", shape, dtype) if reuse
                           else np.empty(shape, dtype) for name in ("scores", "values"))
            blocks = [(into[slot - first:slot - first + width * num].reshape(width, num, lanes), state, state + num)
                      for slot, width, num, state in self.groups[lo:hi]]
            parts.append((self.src[first:last + w * n], self.set[first:last + w * n], into, value, blocks))
        return parts


def _pass(part: tuple, score: np.ndarray, set_value: np.ndarray, row: np.ndarray) -> None:
    """One position of Forward.run over one run of groups: gather each slot's source score and class-set value
    (mode "clip": every index is in range, and numpy writes into `out` unbuffered only then), add, and take each
    state's maximum down its column into `row`."""
    src, sets, into, value, blocks = part
    np.take(score, src, axis=0, out=into, mode="clip")
    into += np.take(set_value, sets, axis=0, out=value, mode="clip")
    for block, lo, hi in blocks:
        np.maximum.reduce(block, axis=0, out=row[lo:hi])


PART_ELEMENTS = 1 << 17  # the fewest gathered elements (slots x lanes) a thread takes in Forward.run
_POOL: dict = {"pool": None, "workers": 0}


def _pool(workers: int):
    """A thread pool of at least `workers` threads, kept between calls (None when none is needed). A larger one
    replaces it when asked for; the old one is left to finish what another caller gave it."""
    if workers <= 0:
        return None
    if _POOL["workers"] < workers:
        from concurrent.futures import ThreadPoolExecutor
        _POOL.update(pool=ThreadPoolExecutor(workers, thread_name_prefix="dgemma-dp"), workers=workers)
    return _POOL["pool"]


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


def done_only_from(canvas_length: int, done_from: int | None) -> int:
    """The first row of scores (the state after position row - 1) in which only DONE may stand: `done_from`
    (at least 1: the start state is given), or past the canvas when the budget does not end inside it."""
    return canvas_length + 1 if done_from is None else max(done_from, 1)


def tokens_to_done(constraint: Constraint) -> np.ndarray:
    """(S,) the fewest tokens from each state to DONE: the text completed, then its EOS (0 in DONE)."""
    steps = constraint.distance.numpy() + 1
    steps[constraint.done_state] = 0
    return steps


def moves_of(constraint: Constraint) -> Moves:
    return constraint.derived("moves", lambda: Moves(constraint))
