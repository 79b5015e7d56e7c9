"""Token transitions of a minimized byte DFA, in token classes: where each token leads from each state.

1. Bytes that no state tells apart form byte classes; tokens spelled alike in byte classes form one group.
2. The groups' spellings form a trie. A chunk of states walks down it one level at a time, keeping only the
   (state, trie node) pairs still alive: from most states most tokens die within a byte or two (4-9% of the
   pairs live on JSONSchemaBench schemas), so the walk costs the live pairs, not states x trie nodes.
3. Groups that lead to the same state from every state share a class. After each chunk the classes are refined
   by its live pairs: a random 64-bit signature per group (its class so far plus, per live state,
   weight(state) * (next state + 1)), then an exact check that every group's live pairs are its class's first
   group's (the same count, and each pair found in the class's row).
Returns the (S, K) next-state table (-1: not allowed) and each group's class; `token_automaton` puts it together.
"""

from __future__ import annotations

import numpy as np
from numpy.random import default_rng  # imported with the module: a spare child has it ready

from .dfa import byte_classes

_PAIRS_PER_CHUNK = 1 << 22  # (state, trie node) pairs a chunk of states may reach at most: about 100 MiB


def _trie(flat: np.ndarray, offsets: np.ndarray, lengths: np.ndarray, alphabet: int):
    """Trie of spellings given as one array of symbols with offsets and lengths, built level by level (a node
    is its parent's id times `alphabet` plus a symbol, made unique, so a node's children are consecutive ids).
    Returns parent (N,), label (N,), level_start (depth + 2 offsets; root 0 alone at level 0) and
    node_of_spelling."""
    node = np.zeros(len(lengths), dtype=np.int64)
    parent, label, level_start = [np.zeros(1, dtype=np.int64)], [np.zeros(1, dtype=np.int64)], [0, 1]
    for depth in range(int(lengths.max())):
        active = np.flatnonzero(lengths > depth)
        keys, inverse = np.unique(node[active] * alphabet + flat[offsets[active] + depth], return_inverse=True)
        node[active] = level_start[-1] + inverse.reshape(-1)
        parent.append(keys // alphabet)
        label.append(keys % alphabet)
        level_start.append(level_start[-1] + len(keys))
    return np.concatenate(parent), np.concatenate(label), level_start, node


def token_groups(byte_table: np.ndarray, token_bytes) -> tuple[np.ndarray, np.ndarray, list[bytes]]:
    """Step 1: (byte class of each byte (256,), group of each token id (V,) or -1 for no text, the groups'
    spellings in byte classes)."""
    byte_class = byte_classes(byte_table)
    spell = bytes(int(c) for c in byte_class)
    token_group = np.full(len(token_bytes), -1, dtype=np.int64)
    group_of: dict[bytes, int] = {}
    for token_id, text in enumerate(token_bytes):
        if text:
            token_group[token_id] = group_of.setdefault(text.translate(spell), len(group_of))
    return byte_class, token_group, list(group_of)


class _Walk:
    """Step 2 over one DFA: the trie, its children ranges and the byte-class step table."""

    def __init__(self, byte_table: np.ndarray, byte_class: np.ndarray, spellings: list[bytes]):
        num_states, num_byte_classes = byte_table.shape[0], int(byte_class.max()) + 1
        first_byte = np.zeros(num_byte_classes, dtype=np.int64)
        first_byte[byte_class[::-1]] = np.arange(256)[::-1]
        columns = byte_table[:, first_byte]  # (S, B)
        self.dead, self.num_byte_classes = num_states, num_byte_classes
        self.step = np.vstack([np.where(columns < 0, num_states, columns),  # ((S + 1) * B,): dead stays dead
                               np.full((1, num_byte_classes), num_states)]).astype(np.int32).reshape(-1)
        lengths = np.fromiter((len(t) for t in spellings), dtype=np.int64, count=len(spellings))
        offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        flat = np.frombuffer(b"".join(spellings), dtype=np.uint8).astype(np.int64)
        parent, label, _, node_of_group = _trie(flat, offsets, lengths, num_byte_classes)
        nodes = np.arange(len(parent))
        self.label = label.astype(np.int32)
        self.first_child = (np.searchsorted(parent[1:], nodes, side="left") + 1).astype(np.int32)
        self.num_children = (np.searchsorted(parent[1:], nodes, side="right") + 1 - self.first_child).astype(np.int32)
        self.group_at = np.full(len(parent), -1, dtype=np.int32)
        self.group_at[node_of_group] = np.arange(len(spellings))

    def live_pairs(self, states: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(origin state, group, next state) for every group that stays alive from a state of `states`."""
        origin, node, at = states, np.zeros(len(states), dtype=np.int32), states
        found = []
        while len(node):
            count = self.num_children[node]
            base = self.first_child[node] - (np.cumsum(count) - count)
            child = np.repeat(base, count) + np.arange(int(count.sum()), dtype=np.int32)
            after = self.step[np.repeat(at * self.num_byte_classes, count) + self.label[child]]
            live = after != self.dead
            origin, node, at = np.repeat(origin, count)[live], child[live], after[live]
            group = self.group_at[node]
            ends = group >= 0
            found.append((origin[ends], group[ends], at[ends]))
        return tuple(np.concatenate([f[i] for f in found]) for i in range(3))


def token_table(byte_table: np.ndarray, byte_class: np.ndarray, spellings: list[bytes]
                ) -> tuple[np.ndarray, np.ndarray] | None:
    """Steps 2-3: ((S, K) int32 next state per class, -1 = not allowed; (G,) the class of each group), or None
    if the exact check fails."""
    walk = _Walk(byte_table, byte_class, spellings)
    num_states, num_groups = byte_table.shape[0], len(spellings)
    weights = default_rng(0).integers(1, 2**63 - 1, size=num_states + 1, dtype=np.int64)
    weights = weights.astype(np.uint64)
    group_class = np.zeros(num_groups, dtype=np.int64)
    done: list[tuple[np.ndarray, np.ndarray]] = []  # per chunk: (rows (chunk, K then), group_class then)
    lo, chunk = 0, max(1, _PAIRS_PER_CHUNK // len(walk.label))
    while lo < num_states:
        states = np.arange(lo, min(lo + chunk, num_states), dtype=np.int32)
        origin, group, after = walk.live_pairs(states)
        signature = group_class.astype(np.uint64) * weights[-1]
        np.add.at(signature, group, weights[origin] * (after.astype(np.uint64) + np.uint64(1)))
        _, refined = np.unique(signature, return_inverse=True)
        refined = refined.reshape(-1)
        first = np.zeros(refined.max() + 1, dtype=np.int64)
        first[refined[::-1]] = np.arange(num_groups)[::-1]  # the first group of each refined class
        rows = np.full((len(states), len(first)), -1, dtype=np.int32)  # (chunk, K)
        is_first = first[refined[group]] == group
        rows[origin[is_first] - lo, refined[group[is_first]]] = after[is_first]
        live = np.bincount(group, minlength=num_groups)
        if not (np.array_equal(live, live[first][refined]) and np.array_equal(group_class[first][refined],
                                                                              group_class)
                and np.array_equal(rows[origin - lo, refined[group]], after)):
            return None  # two groups shared a signature but not their transitions: not expected of 64-bit sums
        done.append((rows, refined))
        group_class = refined
        lo += len(states)
        chunk = max(1, min(4 * chunk, int(_PAIRS_PER_CHUNK * len(states) / max(1, 4 * len(origin)))))
    first = np.zeros(group_class.max() + 1, dtype=np.int64)
    first[group_class[::-1]] = np.arange(num_groups)[::-1]
    table = np.vstack([rows[:, then[first]] for rows, then in done])
    return table, group_class
