"""Negative lookaheads at the start of a pattern's alternative: `^(?!X)Y` matches Y's strings that X does not begin.

The writer writes Y's strings whose first character is none that a string of X can start with, in ECMA-262 or in
Python's re (charsets.py's superset): no such string begins with a match of X, so each matches the pattern. This is
exact when X's strings are single characters and narrower otherwise (`^(?!@@)[@a-z]+$` writes no string that
starts with "@"), and the empty string stays when Y allows it. A lookahead whose X can match the empty string
(nothing would be left) and every other lookaround are refused by strings.py, as before.

JSONSchemaStore writes reserved words this way (`^(?!@@)[\\w@]+$`, `^(?!org\\.bukkit\\.)...`).
"""

from __future__ import annotations

from .charsets import MAX_CODE, NEWLINES, class_ranges, complement, sre, subtract


def avoiding_lookaheads(branch: list) -> list:
    """`branch` (sre items of one alternative, its anchors taken off) with its leading negative lookaheads written
    as above: as it is when it starts with none. ValueError when a lookahead's X matches the empty string or no
    string of Y is left."""
    avoid, at_start = [], (sre.AT_BEGINNING, sre.AT_BEGINNING_STRING)
    while branch and ((branch[0][0] == sre.ASSERT_NOT and branch[0][1][0] == 1)  # direction 1: ahead
                      or (avoid and branch[0][0] == sre.AT and branch[0][1] in at_start)):  # `(?!x)^`: still 0
        if branch[0][0] == sre.ASSERT_NOT:
            starts, empty = _first_chars(list(branch[0][1][1]))
            if empty:
                raise ValueError("a lookahead that matches the empty string")
            avoid += starts
        branch = branch[1:]
    if not avoid:
        return branch
    alternatives = _starting_outside(branch, avoid)
    if _first_chars(branch)[1]:
        alternatives.append([])  # the empty string begins with nothing
    if not alternatives:
        raise ValueError("no string it matches avoids its lookahead")
    return [(sre.BRANCH, (None, alternatives))]


def _first_chars(items: list) -> tuple[list[tuple[int, int]], bool]:
    """(the characters a string the items match may start with, in either dialect; whether they match the empty
    string). Zero-width items (anchors, lookarounds) are passed over: that only adds characters."""
    chars = []
    for op, arg in items:
        if op == sre.LITERAL:
            return chars + [(arg, arg)], False
        if op == sre.NOT_LITERAL:
            return chars + complement([(arg, arg)]), False
        if op == sre.IN:
            return chars + class_ranges(arg, superset=True), False
        if op == sre.ANY:
            return chars + [(0, MAX_CODE)], False
        if op in (sre.MAX_REPEAT, sre.MIN_REPEAT):
            starts, empty = _first_chars(list(arg[2]))
            empty = empty or arg[0] == 0
        elif op == sre.SUBPATTERN and not (arg[1] or arg[2]):
            starts, empty = _first_chars(list(arg[-1]))
        elif op == sre.BRANCH:
            each = [_first_chars(list(b)) for b in arg[1]]
            starts, empty = [r for s, _ in each for r in s], any(e for _, e in each)
        elif op in (sre.AT, sre.ASSERT, sre.ASSERT_NOT):
            starts, empty = [], True
        else:  # flags, a backreference: may start anywhere, may be empty
            starts, empty = [(0, MAX_CODE)], True
        chars += starts
        if not empty:
            return chars, False
    return chars, True


def _starting_outside(items: list, avoid: list[tuple[int, int]]) -> list[list]:
    """Alternatives (sre item lists) for the items' non-empty strings whose first character is outside `avoid`, as
    the writer writes them (where an item may match the empty string, the strings that start at a later item
    count too)."""
    out = []
    for k, (op, arg) in enumerate(items):
        out += [head + list(items[k + 1:]) for head in _item_outside(op, arg, avoid)]
        if not _first_chars([(op, arg)])[1]:
            break
    return out


def _item_outside(op, arg, avoid: list[tuple[int, int]]) -> list[list]:
    if op in (sre.LITERAL, sre.NOT_LITERAL, sre.IN, sre.ANY):
        if op == sre.LITERAL:
            written = [(arg, arg)]
        elif op == sre.NOT_LITERAL:
            written = complement([(arg, arg)])
        elif op == sre.IN:
            written = class_ranges(arg)
        else:
            written = complement(NEWLINES)
        left = subtract(written, avoid)
        return [[(sre.IN, [(sre.RANGE, r) for r in left])]] if left else []
    if op in (sre.MAX_REPEAT, sre.MIN_REPEAT):
        low, high, sub = arg
        if high == 0:
            return []
        more = (op, (max(low - 1, 0), high if high == sre.MAXREPEAT else high - 1, sub))
        return [head + [more] for head in _starting_outside(list(sub), avoid)]  # the first repetition non-empty
    if op == sre.SUBPATTERN:
        if arg[1] or arg[2]:
            raise ValueError("inline flags")
        return _starting_outside(list(arg[-1]), avoid)
    if op == sre.BRANCH:
        return [alt for b in arg[1] for alt in _starting_outside(list(b), avoid)]
    return []  # zero-width (strings.py refuses it where it stands) or unknown: no string starts here
