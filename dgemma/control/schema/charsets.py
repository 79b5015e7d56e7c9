"""Characters as code point ranges, for the pattern writers (strings.py, lookahead.py): what a regex class takes in
ECMA-262 and in Python's re (which validators such as jsonschema use), where the two dialects differ on \\d, \\w
and \\s: what both take (to write) or what either takes (to stay clear of)."""

from __future__ import annotations

try:
    import re._parser as sre_parse  # Python >= 3.11
    from re import _constants as sre
except ImportError:  # Python 3.10
    import sre_constants as sre
    import sre_parse

MAX_CODE = 0x10FFFF
NEWLINES = [(0x0A, 0x0A), (0x0D, 0x0D), (0x2028, 0x2029)]  # what `.` takes in neither dialect


def subtract(ranges: list[tuple[int, int]], cut: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The code points of `ranges` outside `cut` (each a list of inclusive (first, last) ranges), sorted."""
    out = []
    for lo, hi in ranges:
        pieces = [(lo, hi)]
        for c_lo, c_hi in cut:
            pieces = [p for a, b in pieces for p in ((a, min(b, c_lo - 1)), (max(a, c_hi + 1), b)) if p[0] <= p[1]]
        out.extend(pieces)
    return sorted(out)


def complement(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    return subtract([(0, MAX_CODE)], ranges)


CATEGORIES = {
    sre.CATEGORY_DIGIT: [(48, 57)], sre.CATEGORY_WORD: [(48, 57), (65, 90), (95, 95), (97, 122)],
    sre.CATEGORY_SPACE: [(32, 32)],  # the other spaces are control characters, which JSON escapes
}
# \S and \W are written as characters outside \s and \w both in ECMA-262 and in Python's re (which validators such
# as jsonschema use): no whitespace of either (ECMA adds U+FEFF, Python U+001C-U+001F and U+0085), and for \W only
# ASCII, since Python's \w takes the letters and digits of every script; likewise \D
SPACES = [(9, 13), (0x1C, 0x20), (0x85, 0x85), (0xA0, 0xA0), (0x1680, 0x1680), (0x2000, 0x200A), (0x2028, 0x2029),
          (0x202F, 0x202F), (0x205F, 0x205F), (0x3000, 0x3000), (0xFEFF, 0xFEFF)]
NOT_CATEGORIES = {sre.CATEGORY_NOT_DIGIT: [(48, 57), (0x80, MAX_CODE)],
                  sre.CATEGORY_NOT_WORD: CATEGORIES[sre.CATEGORY_WORD] + [(0x80, MAX_CODE)],
                  sre.CATEGORY_NOT_SPACE: SPACES}


BOTH_SPACES = [(9, 13), (32, 32), (0xA0, 0xA0), (0x1680, 0x1680), (0x2000, 0x200A), (0x2028, 0x2029),
               (0x202F, 0x202F), (0x205F, 0x205F), (0x3000, 0x3000)]  # spaces to ECMA-262 and to Python alike
# inside a negated class an item must take away every character either dialect puts in it
WIDE = {sre.CATEGORY_DIGIT: [(48, 57), (0x80, MAX_CODE)],
        sre.CATEGORY_WORD: CATEGORIES[sre.CATEGORY_WORD] + [(0x80, MAX_CODE)],
        sre.CATEGORY_SPACE: SPACES,
        sre.CATEGORY_NOT_DIGIT: complement([(48, 57)]),
        sre.CATEGORY_NOT_WORD: complement(CATEGORIES[sre.CATEGORY_WORD]),
        sre.CATEGORY_NOT_SPACE: complement(BOTH_SPACES)}


def items_ranges(items, wide: bool) -> list[tuple[int, int]]:
    """A class's items (negation aside) as code point ranges; its categories as what either dialect takes (wide)
    or as what both take."""
    ranges = []
    for op, arg in items:
        if op == sre.NEGATE:
            continue
        if op == sre.LITERAL:
            ranges.append((arg, arg))
        elif op == sre.RANGE:
            ranges.append(arg)
        elif op == sre.CATEGORY and wide and arg in WIDE:
            ranges.extend(WIDE[arg])
        elif op == sre.CATEGORY and arg in CATEGORIES:
            ranges.extend(CATEGORIES[arg])
        elif op == sre.CATEGORY and arg in NOT_CATEGORIES:
            ranges.extend(complement(NOT_CATEGORIES[arg]))
        else:
            raise ValueError(f"character class item {str(op).lower()} {str(arg).lower()}")
    return ranges


def class_ranges(items, negate: bool = False, superset: bool = False) -> list[tuple[int, int]]:
    """The characters a class (sre items) takes in ECMA-262 and in Python's re alike (narrow items in a class,
    wide ones in a negated class), or, with `superset`, in either."""
    negate = negate or any(op == sre.NEGATE for op, _ in items)
    if negate:
        return complement(items_ranges(items, wide=not superset))
    return items_ranges(items, wide=superset)
