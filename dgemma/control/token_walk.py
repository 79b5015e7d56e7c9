"""Token transitions of a minimized byte DFA, in token classes: where each token leads from each state.

1. Bytes that no state tells apart form byte classes; tokens spelled alike in byte classes form one group.
2. The groups' spellings form a trie. A batch of states walks down it one level at a time, keeping only the
   (state, trie node) pairs still alive: from most states most tokens die within a byte or two (4-9% of the
   pairs live on JSONSchemaBench schemas), so the walk costs the live pairs, not states x trie nodes.
3. Counting chains (chains.py): a state q = shift(p) allows what p allows and a little more (one more character
   of a string with maxLength, say). Only the states that are no state's shift are walked in full; the others
   are derived, chain level by chain level, from the state below: a token alive from p ends at shift(its end from
   p) if every state it passed has a shift, else at its end from p; the walk from q goes on only where p's died
   (the frontier), which over a whole chain is about one walk of the trie. A string of up to 64 characters is
   about 640 states (positions, times the states inside a UTF-8 character or an escape) walked as about 10.
4. Groups that lead to the same state from every state share a class. After each batch the classes are refined
   by what the batch found: a random 64-bit signature per group (its class so far plus, per state found,
   weight(state) * (value + 1), the value packing the end state and the lowest chain level on the way), then an
   exact check that every group's findings are its class's first group's (the same count, each one found in the
   class's row). For a derived state only the frontier is new: groups alive from p in one class stay together.
Returns the allowed (state, class, next state) entries (a dense (S, K) table is mostly "not allowed": 2-3% of
it is set on the largest JSONSchemaBench tables), the number of classes and each group's class;
`token_automaton` puts it together.
"""

from __future__ import annotations


import numpy as np
from numpy.random import default_rng  # imported with the module: a spare child has it ready

from .chains import shift_map
from .dfa import byte_classes

_PAIRS_PER_CHUNK = 1 << 22  # (state, trie node) pairs a batch of states may reach at most: about 100 MiB
_NO_STATE_YET = 1 << 40  # the lowest chain level on a path that has passed no state yet


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
        self.columns = byte_table[:, first_byte]  # (S, B)
        self.dead, self.num_byte_classes = num_states, num_byte_classes
        self.step = np.vstack([np.where(self.columns < 0, num_states, self.columns),  # dead stays dead
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

    def walk(self, origin, node, at, low, level: np.ndarray, carry: np.ndarray):
        """From live pairs (origin state, trie node, the state there, the lowest chain level passed since the
        origin), down the trie. Returns what it found, (origin, group, end state, lowest level) for every group
        at or below the nodes, and where it died, (origin, child node, state at the child's parent, lowest level)
        for each child that dies from an origin with `carry` and a lowest level of at least 1: there the
        origin's shift goes on (step 3). With `low` None (no origin has a shift) levels are not followed and
        count as 0."""
        empty = (origin[:0], node[:0], at[:0], node[:0].astype(np.int64))
        found, dying = [empty], [empty]
        while len(node):
            group = self.group_at[node]
            ends = group >= 0
            found.append((origin[ends], group[ends], at[ends], None if low is None else low[ends]))
            count = self.num_children[node]
            first = self.first_child[node] - (np.cumsum(count) - count)
            child = np.repeat(first, count) + np.arange(int(count.sum()), dtype=np.int32)
            at = np.repeat(at, count)
            after = self.step[at * self.num_byte_classes + self.label[child]]
            origin = np.repeat(origin, count)
            live = after != self.dead
            if low is not None:
                low = np.repeat(low, count)
                dies = ~live & carry[origin] & (low >= 1)
                dying.append((origin[dies], child[dies], at[dies], low[dies]))
                low = np.minimum(low[live], level[after[live]])
            origin, node, at = origin[live], child[live], after[live]
        if low is None:
            found = [(o, g, a, np.zeros(len(o), dtype=np.int64)) for o, g, a, _ in found]
        return [np.concatenate(part) for part in zip(*found)], [np.concatenate(part) for part in zip(*dying)]

    def go_on(self, dying, shift: np.ndarray, level: np.ndarray, carry: np.ndarray):
        """Step 3: where the origins died, their shifts go on. Returns the live pairs to walk from (the shifted
        origin, the child, the state there, the lowest level) and the places the shifted origins die too."""
        origin, child, at, low = dying
        origin, at, low = shift[origin], shift[at], low - 1  # every state passed has a shift: low >= 1
        after = self.step[at * self.num_byte_classes + self.label[child]]
        live = after != self.dead
        dies = ~live & carry[origin] & (low >= 1)
        starts = (origin[live], child[live], after[live], np.minimum(low[live], level[after[live]]))
        return starts, (origin[dies], child[dies], at[dies], low[dies])


class _Classes:
    """Step 4: the classes of the groups, refined batch by batch, and what each batch found, by class."""

    def __init__(self, num_states: int, num_groups: int, bits: int):
        weights = default_rng(0).integers(1, 2**63 - 1, size=num_states + 1, dtype=np.int64)
        self.weights = weights.astype(np.uint64)
        self.group_class = np.zeros(num_groups, dtype=np.int64)
        self.bits = bits  # value = (end state + 1) << bits | lowest level
        self.value_type = np.int32 if (num_states + 1) << bits < 2**31 else np.int64
        self.done: list[tuple] = []  # per batch: its findings of first groups (origin, class then, value), classes then
        self.walked = 0  # how many batches of `done` are states walked in full (the rest: chain levels)

    def add(self, states: np.ndarray, origin, group, value) -> bool:
        """Refines by one batch's findings (origins among `states`, each found once per group); False if the
        exact check fails."""
        num_groups = len(self.group_class)
        signature = self.group_class.astype(np.uint64) * self.weights[-1]
        np.add.at(signature, group, self.weights[origin] * (value.astype(np.uint64) + np.uint64(1)))
        refined = np.unique(signature, return_inverse=True)[1].reshape(-1)
        first = np.zeros(refined.max() + 1, dtype=np.int64)
        first[refined[::-1]] = np.arange(num_groups)[::-1]  # the first group of each refined class
        row_of = np.zeros(int(states.max()) + 1, dtype=np.int64)
        row_of[states] = np.arange(len(states))
        row, column = row_of[origin], refined[group]
        rows = np.full((len(states), len(first)), -1, dtype=value.dtype)  # (batch, K), for the check only
        is_first = first[column] == group
        rows[row[is_first], column[is_first]] = value[is_first]
        live = np.bincount(group, minlength=num_groups)
        if not (np.array_equal(live, live[first][refined])
                and np.array_equal(self.group_class[first][refined], self.group_class)
                and np.array_equal(rows[row, column], value)):
            return False  # two groups shared a signature but not their findings: not expected of 64-bit sums
        self.done.append(((origin[is_first], column[is_first], value[is_first]), refined))
        self.group_class = refined
        return True

    def final_entries(self):
        """Per batch: its findings (origin, class, value) in the final classes (a class then stands for each
        final class it split into)."""
        first = np.zeros(self.group_class.max() + 1, dtype=np.int64)
        first[self.group_class[::-1]] = np.arange(len(self.group_class))[::-1]
        for (origin, column, value), then in self.done:
            parent = then[first]  # (K,) the class then of each final class
            order = np.argsort(parent, kind="stable")
            count = np.bincount(parent, minlength=int(then.max()) + 1)
            start = np.cumsum(count) - count
            repeat = count[column]
            entry = np.repeat(np.arange(len(column)), repeat)
            offset = np.arange(int(repeat.sum())) - np.repeat(np.cumsum(repeat) - repeat, repeat)
            yield origin[entry], order[start[column][entry] + offset], value[entry]


def _batches(pairs, limit: int):
    """Splits per-origin pairs (origin, ...) into batches of whole origins with at most about `limit` pairs."""
    origin = pairs[0]
    if len(origin) <= limit:
        if len(origin):
            yield pairs
        return
    order = np.argsort(origin, kind="stable")
    sorted_origin = origin[order]
    cuts = np.searchsorted(sorted_origin, sorted_origin[::limit][1:], side="left")
    for part in np.split(order, np.unique(cuts[cuts > 0])):
        yield tuple(a[part] for a in pairs)


def token_table(byte_table: np.ndarray, byte_class: np.ndarray, spellings: list[bytes]) -> tuple | None:
    """Steps 2-4: ((state, class, next state) int32 arrays, one entry per allowed (state, class), in no order;
    the number of classes K; (G,) the class of each group), or None if the exact check fails."""
    walk = _Walk(byte_table, byte_class, spellings)
    num_states = byte_table.shape[0]
    shift, level = shift_map(walk.columns)
    level = np.append(level, 0)  # the dead state's
    carry = shift >= 0
    classes = _Classes(num_states, len(spellings), int(level.max()).bit_length())
    is_shift = np.zeros(num_states, dtype=bool)
    is_shift[shift[carry]] = True
    base = np.flatnonzero(~is_shift).astype(np.int32)
    base = np.concatenate([base[~carry[base]], base[carry[base]]])  # batches without a chain need no levels
    dying, waves = [], []
    lo, chunk = 0, max(1, _PAIRS_PER_CHUNK // len(walk.label))
    while lo < len(base):  # the states walked in full
        states = base[lo:lo + chunk]
        low = np.full(len(states), _NO_STATE_YET, dtype=np.int64) if carry[states].any() else None
        found, died = walk.walk(states, np.zeros(len(states), dtype=np.int32), states, low, level, carry)
        if not _add(classes, states, found, level):
            return None
        dying.append(died)
        classes.walked += 1
        lo += len(states)
        chunk = max(1, min(4 * chunk, int(_PAIRS_PER_CHUNK * len(states) / max(1, 4 * len(found[0])))))
    parents = base[carry[base]]
    dying = [np.concatenate(part) for part in zip(*dying)]
    fan_out = 256  # pairs found per pair started, at first a guess, then the last batch's
    while len(parents):  # the derived states, one chain level at a time
        starts, inherited = walk.go_on(dying, shift, level, carry)
        died, batches = [inherited], len(classes.done)
        for batch in _batches(starts, _PAIRS_PER_CHUNK // fan_out):
            found, more = walk.walk(*batch, level, carry)
            if len(found[0]) and not _add(classes, np.unique(found[0]), found, level):
                return None
            died.append(more)
            fan_out = max(1, len(found[0]) // len(batch[0]))
        dying = [np.concatenate(part) for part in zip(*died)]
        waves.append(len(classes.done) - batches)  # the batches of this chain level
        parents = shift[parents][carry[shift[parents]]]
    return _assemble(classes, waves, shift), int(classes.group_class.max()) + 1, classes.group_class


def _add(classes: _Classes, states: np.ndarray, found, level: np.ndarray) -> bool:
    """Step 4 for one batch: each finding's value packs its end state and its lowest chain level, counted only
    as far as the origin's own level (the chain above the origin is all a level is used for)."""
    origin, group, end, low = found
    value = (end.astype(np.int64) + 1) << classes.bits | np.minimum(low, level[origin])
    value = value.astype(classes.value_type)
    return classes.add(states, origin, group, value)


def _concat(parts: list) -> tuple:
    parts = [p for p in parts if len(p[0])]
    if not parts:
        return tuple(np.zeros(0, dtype=np.int64) for _ in range(3))
    return tuple(np.concatenate([p[i] for p in parts]) for i in range(3))


def _assemble(classes: _Classes, waves: list, shift: np.ndarray) -> tuple:
    """The table's entries in the final classes, (state, class, next state): the walked states' findings, then
    each chain level from the one below (a token alive from p with lowest level >= 1 ends at the shift of its end
    from p, else at that end; the level drops by one) beside the frontier's own findings, which are for classes
    dead from p. No two classes end alike everywhere: two groups whose lowest levels differ from p (both at most
    p's level) end at different shifts of the same state from the chain above p."""
    bits, carry = classes.bits, shift >= 0
    batches = classes.final_entries()
    level = _concat([next(batches) for _ in range(classes.walked)])
    out = []
    for count in waves:
        out.append(level)
        origin, column, value = (a[carry[level[0]]] for a in level)  # the entries of this wave's parents
        end, low = (value >> bits) - 1, value & ((1 << bits) - 1)
        end = np.where(low >= 1, shift[end], end)
        derived = (shift[origin], column, ((end + 1) << bits) | np.maximum(low - 1, 0))
        level = _concat([derived, *(next(batches) for _ in range(count))])
    state, column, value = _concat(out + [level])
    return state.astype(np.int32), column.astype(np.int32), ((value >> bits) - 1).astype(np.int32)
