"""Regexes for JSON strings: any character, lengths, formats, and ECMA-262 patterns rewritten for JSON text.

Everything here is the regex of a string's body (between the quotes), in the syntax both Rust's regex (which
outlines-core compiles) and Python's `re` read. A body never holds a raw quote, backslash or control character;
an escape sequence counts as one character. Formats are written as narrow, valid forms (see FORMATS).
"""

from __future__ import annotations

import json
import re

try:
    import re._parser as _sre_parse  # Python >= 3.11
    from re import _constants as _c
except ImportError:  # Python 3.10
    import sre_constants as _c
    import sre_parse as _sre_parse

# one character of a JSON string: any character JSON writes plain, or a short escape. No \uXXXX: every character
# can be written plain, and the escape's 4 digits would multiply the states of every counted string
CHAR = r'([^"\\\x00-\x1F\x7F-\x9F]|\\["\\/bfnrt])'
_UNSAFE = [(0, 0x1F), (0x22, 0x22), (0x5C, 0x5C), (0x7F, 0x9F), (0xD800, 0xDFFF)]
_MAX_CODE = 0x10FFFF

_YEAR = "[1-9][0-9]{3}"
_LEAP = "([1-9][0-9](0[48]|[2468][048]|[13579][26])|([2468][048]|[13579][26])00)"
_DATE = (f"({_YEAR}-((0[13578]|1[02])-(0[1-9]|[12][0-9]|3[01])|(0[469]|11)-(0[1-9]|[12][0-9]|30)"
         f"|02-(0[1-9]|1[0-9]|2[0-8]))|{_LEAP}-02-29)")
_TIME = r"([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\.[0-9]{1,6})?(Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9])"
_LABEL = "[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?"
_DOMAIN = f"({_LABEL}\\.){{1,3}}(com|org|net|io|dev)"
_OCTET = "(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_HEX4 = "[0-9a-f]{1,4}"
# format -> (body regex, fewest characters, most characters or None); each a narrow form that every checker
# (jsonschema's, pydantic's, Python's own parsers) accepts
FORMATS = {
    "date": (_DATE, 10, 10),
    "time": (_TIME, 9, 21),
    "date-time": (f"{_DATE}T{_TIME}", 20, 32),
    "uuid": "[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}",
    "email": (f"[a-z0-9]{{1,20}}([._+-][a-z0-9]{{1,20}}){{0,2}}@{_DOMAIN}", 7, 62 + 71 + 3),
    "hostname": (_DOMAIN, 5, 71 + 3),
    "ipv4": (f"{_OCTET}(\\.{_OCTET}){{3}}", 7, 15),
    "ipv6": (f"{_HEX4}(:{_HEX4}){{7}}", 15, 39),
    "uri": (f"https?://{_DOMAIN}(/[a-zA-Z0-9._~-]{{1,16}}){{0,6}}", 12, 8 + 74 + 102),
    "duration": (r"P([0-9]{1,4}D|([0-9]{1,4}D)?T([0-9]{1,2}H)?([0-9]{1,2}M)?[0-9]{1,2}S)", 3, 20),
}
FORMATS["uuid"] = (FORMATS["uuid"], 36, 36)
# formats that validators check but that we do not write: refused, not ignored
CHECKED_FORMATS = {"idn-email", "idn-hostname", "uri-reference", "iri", "iri-reference", "uri-template",
                   "json-pointer", "relative-json-pointer", "regex", "color"}


def length_range(low: int, high: int | None) -> str:
    return f"{CHAR}{{{low},{'' if high is None else high}}}" if (low, high) != (0, None) else f"{CHAR}*"


def _escape_char(code: int) -> str:
    """A character as regex text, inside or outside a class (ASCII punctuation escaped)."""
    char = chr(code)
    return "\\" + char if char.isascii() and not char.isalnum() and char != " " else char


def _literal(code: int) -> str:
    """The regex for a pattern's literal character, as JSON writes it (escaped when JSON must)."""
    if code >= 0x20 and code not in (0x22, 0x5C) and not 0x7F <= code <= 0x9F:
        return _escape_char(code)
    if 0xD800 <= code <= 0xDFFF:
        raise ValueError("a lone surrogate")
    return "".join(_escape_char(ord(c)) for c in json.dumps(chr(code))[1:-1])


def _subtract(ranges: list[tuple[int, int]], cut: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out = []
    for lo, hi in ranges:
        pieces = [(lo, hi)]
        for c_lo, c_hi in cut:
            pieces = [p for a, b in pieces for p in ((a, min(b, c_lo - 1)), (max(a, c_hi + 1), b)) if p[0] <= p[1]]
        out.extend(pieces)
    return sorted(out)


def _complement(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    return _subtract([(0, _MAX_CODE)], ranges)


_CATEGORIES = {
    _c.CATEGORY_DIGIT: [(48, 57)], _c.CATEGORY_WORD: [(48, 57), (65, 90), (95, 95), (97, 122)],
    _c.CATEGORY_SPACE: [(32, 32)],  # the other spaces are control characters, which JSON escapes
}
_NOT_CATEGORIES = {_c.CATEGORY_NOT_DIGIT: [(48, 57)],
                   _c.CATEGORY_NOT_WORD: _CATEGORIES[_c.CATEGORY_WORD],
                   _c.CATEGORY_NOT_SPACE: [(9, 13), (32, 32)]}


def _class(items, negate: bool = False) -> str:
    """A character class (sre items) as a regex class of the characters JSON writes unescaped."""
    ranges = []
    for op, arg in items:
        if op == _c.NEGATE:
            negate = True
        elif op == _c.LITERAL:
            ranges.append((arg, arg))
        elif op == _c.RANGE:
            ranges.append(arg)
        elif op == _c.CATEGORY and arg in _CATEGORIES:
            ranges.extend(_CATEGORIES[arg])
        elif op == _c.CATEGORY and arg in _NOT_CATEGORIES:
            ranges.extend(_complement(_NOT_CATEGORIES[arg]))
        else:
            raise ValueError(f"character class item {str(op).lower()} {str(arg).lower()}")
    if negate:
        ranges = _complement(ranges)
    ranges = _subtract(ranges, _UNSAFE)
    if not ranges:
        raise ValueError("a character class that matches no character a JSON string holds unescaped")
    return "[" + "".join(_escape_char(a) if a == b else f"{_escape_char(a)}-{_escape_char(b)}"
                         for a, b in ranges) + "]"


def _sequence(items, max_repeat: int, repeat_cap: int) -> str:
    out = []
    for op, arg in items:
        if op == _c.LITERAL:
            out.append(_literal(arg))
        elif op == _c.NOT_LITERAL:
            out.append(_class([(_c.LITERAL, arg)], negate=True))
        elif op == _c.IN:
            out.append(_class(arg))
        elif op == _c.ANY:
            out.append(_class([(_c.LITERAL, 0x0A), (_c.LITERAL, 0x0D), (_c.LITERAL, 0x2028), (_c.LITERAL, 0x2029)],
                              negate=True))
        elif op in (_c.MAX_REPEAT, _c.MIN_REPEAT):
            low, high, sub = arg
            if low > max_repeat:
                raise ValueError(f"a repetition of at least {low}, more than the limit of {max_repeat}")
            high = None if high == _c.MAXREPEAT else min(high, max(low, repeat_cap))
            out.append(f"({_sequence(sub, max_repeat, repeat_cap)}){{{low},{'' if high is None else high}}}")
        elif op == _c.SUBPATTERN:
            if arg[1] or arg[2]:
                raise ValueError("inline flags")
            out.append(f"({_sequence(arg[-1], max_repeat, repeat_cap)})")
        elif op == _c.BRANCH:
            out.append("(" + "|".join(_sequence(b, max_repeat, repeat_cap) for b in arg[1]) + ")")
        elif op in (_c.ASSERT, _c.ASSERT_NOT):
            raise ValueError("a lookaround")
        elif op == _c.GROUPREF:
            raise ValueError("a backreference")
        else:
            raise ValueError(f"{str(op).lower()} {str(arg).lower()}")
    return "".join(out)


def pattern_body(pattern: str, max_repeat: int, repeat_cap: int) -> str:
    """The regex of string bodies that fully match `pattern` (a JSON schema pattern searches; a full match is a
    match, so this is a valid subset). ValueError, saying why, for what cannot be written."""
    if not isinstance(pattern, str):
        raise ValueError("a pattern must be a string")
    try:
        parsed = list(_sre_parse.parse(pattern))
    except (re.error, RecursionError, OverflowError) as err:
        raise ValueError(f"an invalid regular expression ({err})") from None
    anchors = (_c.AT_BEGINNING, _c.AT_BEGINNING_STRING, _c.AT_END, _c.AT_END_STRING)
    branches = parsed[0][1][1] if len(parsed) == 1 and parsed[0][0] == _c.BRANCH else [parsed]
    written = []
    for branch in branches:
        branch = list(branch)
        while branch and branch[0][0] == _c.AT and branch[0][1] in anchors[:2]:
            branch.pop(0)
        while branch and branch[-1][0] == _c.AT and branch[-1][1] in anchors[2:]:
            branch.pop()
        if any(op == _c.AT for op, _ in branch):
            raise ValueError("an anchor or word boundary inside the pattern")
        written.append(_sequence(branch, max_repeat, repeat_cap))
    return written[0] if len(written) == 1 else "(" + "|".join(written) + ")"
