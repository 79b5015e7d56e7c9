"""A regex's byte-level DFA from outlines-core, built so that it accepts every text of the regex and stays small
(`byte_dfa`); the compile child (_compile_worker.py) starts from it, and the schema writer asks it whether one
regex's texts are all another's (`texts_within`: a format's narrow form beside a pattern, schema/strings.py)."""

import re
from itertools import chain

import numpy as np
from outlines_core import Index, Vocabulary

from .regex_factor import factor_suffixes


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= 300 else text[:297] + "..."


def _byte_dfa(index: Index) -> tuple[np.ndarray, int, list[int]]:
    """outlines' index over single bytes -> (table (S, 256) int32, -1 = dead; initial row; final rows). States
    are numbered in the order of outlines' ids; the dicts are read with np.fromiter, not a loop per edge."""
    transitions = index.get_transitions()
    rows = list(transitions.values())
    count = sum(map(len, rows))
    keys = np.fromiter(transitions.keys(), dtype=np.int64, count=len(rows))
    src = np.repeat(keys, np.fromiter(map(len, rows), dtype=np.int64, count=len(rows)))
    byte = np.fromiter(chain.from_iterable(map(dict.keys, rows)), dtype=np.int64, count=count)
    dst = np.fromiter(chain.from_iterable(map(dict.values, rows)), dtype=np.int64, count=count)
    initial, finals = index.get_initial_state(), sorted(index.get_final_states())
    order = np.unique(np.concatenate([keys, [initial], finals]))
    missing = ~np.isin(dst, order)  # states with no way out are not keys
    if missing.any():
        order = np.union1d(order, dst[missing])
    table = np.full((len(order), 256), -1, dtype=np.int32)
    edge = byte < 256  # outlines adds EOS (id 256) self-loops on final states
    table[np.searchsorted(order, src[edge]), byte[edge]] = np.searchsorted(order, dst[edge])
    row_of = np.searchsorted(order, [initial, *finals])
    return table, int(row_of[0]), sorted(row_of[1:].tolist())


_BYTES = None  # outlines' Vocabulary of the 256 single bytes, built on first use


def _outlines_dfa(pattern: str) -> tuple[np.ndarray, int, list[int]]:
    """outlines' DFA of `pattern` (ValueError for a pattern outlines refuses)."""
    global _BYTES
    if _BYTES is None:
        _BYTES = Vocabulary(256, {bytes([b]): [b] for b in range(256)})
    try:
        index = Index(pattern, _BYTES)
    except BaseException as err:  # outlines raises ValueError, or pyo3's PanicException (a BaseException)
        if isinstance(err, (KeyboardInterrupt, SystemExit)):
            raise
        raise ValueError(f"invalid regular expression ({_one_line(err)})") from None
    return _byte_dfa(index)


def _balanced(regex: str) -> bool:
    """No `)` of `regex` closes a group that `regex` did not open, and no verbose flag (whose comments could hide
    one), as far as a scan that skips escapes and classes sees: then `(?:regex)` parses as `regex` does."""
    if _VERBOSE.search(regex):
        return False
    depth, i, in_class = 0, 0, False
    while i < len(regex):
        c = regex[i]
        if c == "\\":
            i += 1
        elif in_class:
            if c == "[":
                return False  # a nested class: not worth following
            in_class = c != "]"
        elif c == "[":
            in_class = True
            i += 1 + (regex[i + 1:i + 2] == "^")
            i += regex[i:i + 1] == "]"  # a first ']' is a member
            continue
        elif c in "()":
            depth += 1 if c == "(" else -1
            if depth < 0:
                return False
        i += 1
    return depth == 0 and not in_class


_VERBOSE = re.compile(r"\(\?[a-zA-Z-]*x")


def _framed(regex: str, marked: bool) -> tuple[np.ndarray, int, list[int]] | None:
    """outlines' DFA of `\\x00(?:regex)`, followed by `\\x01` when `marked`, with the frame taken off: the NUL's
    state dropped and, when marked, the states the end marker enters dropped and the states it leaves from made
    final. None when outlines refuses it or the frame does not come off cleanly (the marker must enter only final
    states that allow nothing more, and every final state only through it: then no text of the regex holds the
    byte 0x01)."""
    try:
        table, start, finals = _outlines_dfa(f"\\x00(?:{regex})" + ("\\x01" if marked else ""))
    except ValueError:
        return None
    initial = int(table[start, 0])
    if initial < 0 or start in finals or (table == start).any():
        return None
    drop = [start]
    if marked:
        marks = np.unique(table[:, 1][table[:, 1] >= 0])
        if set(marks.tolist()) != set(finals) or (table[marks] >= 0).any():
            return None
        finals = np.flatnonzero(table[:, 1] >= 0).tolist()
        table[:, 1] = -1
        drop.extend(marks.tolist())
    new_id = np.full(len(table) + 1, -1, dtype=np.int32)  # the last entry keeps -1 (dead) dead
    keep = np.setdiff1d(np.arange(len(table)), drop)
    new_id[keep] = np.arange(len(keep))
    return new_id[table[keep]], int(new_id[initial]), sorted(new_id[finals].tolist())


def byte_dfa(regex: str) -> tuple[np.ndarray, int, list[int]]:
    """Step 1: the regex's byte-level DFA from outlines (table (S, 256) int32, -1 = dead; initial; finals).
    ValueError for a regex outlines refuses.

    outlines builds regex-automata's dense DFA with both start kinds, so it also determinizes the unanchored search
    (any prefix, then the regex), which it never uses and which can grow exponentially: a string of up to 16
    characters alone took 6.5 s for 163 states, 20 characters 148 s. Written as `\\x00(?:regex)`, an unanchored
    match can start only at a NUL byte, so that part stays as small as the anchored one; the state after the NUL
    is the regex's own anchored start (the same ordered set of NFA states).

    With the byte 0x01 after it as an end marker, no match can end inside the text, so regex-automata's
    leftmost-first rule (a match drops the threads that rank below it) never cuts the language short: the DFA
    accepts every text of the regex (`a|ab` accepts `ab`, which outlines alone does not). That makes the order of
    alternatives irrelevant, so the regex is first written with common suffixes once (regex_factor.py), which
    shrinks what outlines builds (Snowplow sp_152: 119,310 states before minimizing, 37,581 after; the same
    11,463 minimal). A regex whose texts may hold 0x01 is built with the NUL alone, as written; one that the
    scan cannot vouch for, or whose framed forms fail, is built as is.
    """
    if _balanced(regex):
        for text, marked in ((factor_suffixes(regex), True), (regex, False)):
            framed = _framed(text, marked)
            if framed is not None:
                return framed
    return _outlines_dfa(regex)


def texts_within(inner: str, outer: str, max_pairs: int = 100_000) -> bool:
    """Whether every text of the regex `inner` is a text of `outer`, True only when sure: `inner`'s DFA must accept
    exactly its texts (the framed and marked build; False when that fails), while `outer`'s may accept fewer
    (byte_dfa's fallbacks), which can only make the answer False. A walk over the pairs of states the two DFAs
    reach on the same bytes: False as soon as `inner` can go on or end where `outer` cannot, or past max_pairs
    pairs. ValueError for a regex outlines refuses."""
    exact = _framed(factor_suffixes(inner), True) if _balanced(inner) else None
    if exact is None:
        return False
    (a, a_start, a_finals), (b, b_start, b_finals) = exact, byte_dfa(outer)
    a_final, b_final = np.zeros(len(a), bool), np.zeros(len(b) + 1, bool)  # b's last row: dead
    a_final[a_finals], b_final[b_finals] = True, True
    b = np.vstack([b, np.full((1, 256), len(b), dtype=b.dtype)])  # dead stays dead
    b[b < 0] = len(b) - 1
    live = _live(a, a_final)
    seen = {a_start * len(b) + b_start}
    frontier_a, frontier_b = np.array([a_start]), np.array([b_start])
    while len(frontier_a):
        if (a_final[frontier_a] & ~b_final[frontier_b]).any():
            return False
        next_a, next_b = a[frontier_a], b[frontier_b]  # (n, 256) each
        go = (next_a >= 0) & live[np.maximum(next_a, 0)]
        keys = np.unique(next_a[go].astype(np.int64) * len(b) + next_b[go])
        keys = keys[[k not in seen for k in keys.tolist()]]
        seen.update(keys.tolist())
        if len(seen) > max_pairs:
            return False
        frontier_a, frontier_b = keys // len(b), keys % len(b)
    return True


def _live(table: np.ndarray, final: np.ndarray) -> np.ndarray:
    """(S,) bool: the states from which some text reaches a final state."""
    live = final.copy()
    while True:
        grown = live | (live[np.maximum(table, 0)] & (table >= 0)).any(axis=1)
        if (grown == live).all():
            return live
        live = grown
