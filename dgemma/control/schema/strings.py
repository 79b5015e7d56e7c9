"""Regexes for strings: any character, lengths, formats, and ECMA-262 patterns rewritten for the text a syntax writes.

Everything here is the regex of a string's body (between the quotes), in the syntax both Rust's regex (which
outlines-core compiles) and Python's `re` read. A body holds only the characters its syntax (syntax.py) writes
plain, and in JSON the short escapes, each counted as one character. Formats are written as narrow, valid forms (see
FORMATS), plain ASCII in every syntax.
"""

from __future__ import annotations

import functools
import re

from .charsets import MAX_CODE, NEWLINES, class_ranges, sre, sre_parse, subtract
from .lookahead import avoiding_lookaheads
from .syntax import JSON, JsonSyntax, class_text

_YEAR = "[1-9][0-9]{3}"
_LEAP = "([1-9][0-9](0[48]|[2468][048]|[13579][26])|([2468][048]|[13579][26])00)"
_DATE = (f"({_YEAR}-((0[13578]|1[02])-(0[1-9]|[12][0-9]|3[01])|(0[469]|11)-(0[1-9]|[12][0-9]|30)"
         f"|02-(0[1-9]|1[0-9]|2[0-8]))|{_LEAP}-02-29)")
_HMS = "([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9]"
_OFFSET = "[+-]([01][0-9]|2[0-3]):[0-5][0-9]"
_TIME = f"{_HMS}(\\.[0-9]{{1,6}})?(Z|{_OFFSET})"
_LABEL = "[a-z0-9]{1,10}(-[a-z0-9]{1,11})?"  # no "--" (IDNA reserves it at positions 3-4: xn--)
_DOMAIN = f"({_LABEL}\\.){{1,3}}(com|org|net|io|dev)"
_LOCAL = "[a-z0-9]{1,20}"
_EMAIL = f"{_LOCAL}([._+-]{_LOCAL}){{0,2}}@{_DOMAIN}"
_PATH = "(/[a-zA-Z0-9._~-]{1,16}){0,6}"
_SOME_PATH = "(/[a-zA-Z0-9._~-]{1,16}){1,6}"
_OCTET = "(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_HEX4 = "[0-9a-f]{1,4}"
# format -> its narrow forms (body regexes), each accepted by every checker (jsonschema's, pydantic's, Python's own
# parsers; of pydantic's URL types, HttpUrl takes only the http(s) forms, which come first); the writer takes the
# first whose lengths fit the node's minLength/maxLength and whose every string its `pattern` matches (format_body)
FORMATS = {
    "date": [_DATE],
    "time": [_TIME, f"{_HMS}Z", f"{_HMS}{_OFFSET}"],
    "date-time": [f"{_DATE}T{_TIME}", f"{_DATE}T{_HMS}Z", f"{_DATE}T{_HMS}{_OFFSET}"],
    "uuid": ["[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"],
    "email": [_EMAIL, f"{_LOCAL}([._-]{_LOCAL}){{0,2}}@{_DOMAIN}", f"{_LOCAL}@{_DOMAIN}"],
    "hostname": [_DOMAIN],
    "ipv4": [f"{_OCTET}(\\.{_OCTET}){{3}}"],
    "ipv6": [f"{_HEX4}(:{_HEX4}){{7}}"],
    "uri": [f"https?://{_DOMAIN}{_PATH}", f"https?://{_DOMAIN}", f"https?://{_DOMAIN}{_SOME_PATH}",
            *(f"{scheme}://{_DOMAIN}{_PATH}" for scheme in ("https", "http", "ftp", "wss", "ws")),
            f"file://{_SOME_PATH}", f"mailto:{_EMAIL}"],
    "duration": [r"P([0-9]{1,4}D|([0-9]{1,4}D)?T([0-9]{1,2}H)?([0-9]{1,2}M)?[0-9]{1,2}S)"],
}
# formats whose narrow forms are another's: a URI is also a URI reference, an IRI (reference) and a URI template
# without variables; an ASCII email or hostname is also an internationalized one
FORMATS.update({name: FORMATS["uri"] for name in ("uri-reference", "iri", "iri-reference", "uri-template")})
FORMATS.update({"idn-email": FORMATS["email"], "idn-hostname": FORMATS["hostname"]})
_POINTER = "(/[a-z0-9]{1,16}){0,6}"
FORMATS.update({
    "json-pointer": [_POINTER],
    "relative-json-pointer": [f"[0-9]{_POINTER}"],  # one digit: jsonschema 4.26 refuses some longer
    # letters and digits: a regex that matches itself, in every dialect; or those between slashes
    "regex": ["[a-zA-Z0-9]{0,32}", "/[a-zA-Z0-9]{1,30}/"],
    "color": ["#[0-9a-f]{6}"],  # draft 3's CSS 2.1 color, as #rrggbb
    "host-name": FORMATS["hostname"], "ip-address": FORMATS["ipv4"],  # draft 3's names
})
# pydantic's own formats, which JSON Schema validators take as annotations and pydantic checks: an IPv4 address is
# also a valid IPvAny address, interface and network (a /32); a UUID of version n has n and the RFC 4122 variant in
# place; base64 is written as the encoding of ASCII text (Base64Str decodes it to a str), whole 4-character groups
_UUID_V = "[0-9a-f]{{8}}-[0-9a-f]{{4}}-{}[0-9a-f]{{3}}-[89ab][0-9a-f]{{3}}-[0-9a-f]{{12}}"
PYDANTIC_FORMATS = {
    **{name: FORMATS["ipv4"] for name in ("ipvanyaddress", "ipvanyinterface", "ipvanynetwork", "ipv4network",
                                          "ipv4interface")},
    **{name: FORMATS["ipv6"] for name in ("ipv6network", "ipv6interface")},
    **{f"uuid{n}": [_UUID_V.format(n)] for n in range(1, 9)},
    "base64": ["([A-Za-f][0-3A-HQ-Xg-nw-z][014589ABEFIJMNQRUVYZcdghklopstwx][A-Za-z0-9+/]){0,16}"],
}
FORMATS.update(PYDANTIC_FORMATS)
# format -> a wide form, every string of which its checkers accept: a pattern whose every string is of it is written
# as the pattern (a URI of one host: http://edamontology.org/operation_[0-9]{4}). A URI of RFC 3986's generic syntax
# with a registered host name, an optional port, a path and a query of unreserved characters
_WIDE_URI = r"(https?|ftp|wss?)://[a-zA-Z0-9._~-]+(:[0-9]{1,5})?(/[a-zA-Z0-9._~-]*)*(\?[a-zA-Z0-9._~=&-]*)?"
_ALNUM = [(0x30, 0x39), (0x41, 0x5A), (0x61, 0x7A)]
# ... with, beside each wide form, the characters a pattern's classes are cut to before it is checked to lie within
# the form (`.*` in a URI pattern is written as characters of a path). A regex of letters, digits and ` _,:.-` (no
# other metacharacter) is valid in every dialect
WIDE_FORMATS = {name: (_WIDE_URI, _ALNUM + [(ord(c), ord(c)) for c in "._~-/"])
                for name in ("uri", "uri-reference", "iri", "iri-reference", "uri-template")}
WIDE_FORMATS["regex"] = ("[a-zA-Z0-9 _,:.-]*", _ALNUM + [(ord(c), ord(c)) for c in " _,:.-"])
# every format a validator checks (jsonschema with its format-nongpl extras, drafts 3 to 2020-12) and pydantic's
# are written; any other format is an annotation


def length_range(low: int, high: int | None, syntax: JsonSyntax = JSON) -> str:
    char = syntax.char
    return f"{char}{{{low},{'' if high is None else high}}}" if (low, high) != (0, None) else f"{char}*"


def _class(items, syntax: JsonSyntax, negate: bool = False) -> str:
    """A character class (sre items) as a regex class of the characters the syntax writes plain, that ECMA-262 and
    Python's re both read as in the class."""
    ranges = subtract(class_ranges(items, negate), list(syntax.unsafe))
    if not ranges:
        raise ValueError("a character class that matches no character a string holds unescaped")
    return class_text(ranges)


Fit = tuple  # (floor, cap | None): every repetition of a pattern raised to at least floor and cut to at most cap


def _repeat(low: int, high: int, max_repeat: int, repeat_cap: int, fit: Fit | None) -> tuple[int, int | None]:
    """A repetition's written bounds (None: unbounded): raised and cut by `fit` (a pattern under minLength /
    maxLength), a bounded one cut to repeat_cap (or its low)."""
    high = None if high == sre.MAXREPEAT else high
    if fit is not None:
        floor, cap = fit
        low = max(low, floor) if high is None else min(max(low, floor), high)
        if cap is not None:
            high = max(low, cap) if high is None else min(high, max(low, cap))
    if low > max_repeat:
        raise ValueError(f"a repetition of at least {low}, more than the limit of {max_repeat}")
    return low, None if high is None else min(high, max(low, repeat_cap))


def _lengths(items, max_repeat: int, repeat_cap: int, fit: Fit | None) -> tuple[int, float]:
    """The fewest and most characters of a string the sequence matches, as _sequence writes it under `fit`."""
    low, high = 0, 0
    for op, arg in items:
        if op in (sre.LITERAL, sre.NOT_LITERAL, sre.IN, sre.ANY):
            low, high = low + 1, high + 1
        elif op in (sre.MAX_REPEAT, sre.MIN_REPEAT):
            r_low, r_high = _repeat(arg[0], arg[1], max_repeat, repeat_cap, fit)
            m, n = _lengths(arg[2], max_repeat, repeat_cap, fit)
            low += r_low * m
            high += 0 if n == 0 else float("inf") if r_high is None else r_high * n
        elif op == sre.SUBPATTERN:
            m, n = _lengths(arg[-1], max_repeat, repeat_cap, fit)
            low, high = low + m, high + n
        elif op == sre.BRANCH:
            spans = [_lengths(b, max_repeat, repeat_cap, fit) for b in arg[1]]
            low, high = low + min(m for m, _ in spans), high + max(n for _, n in spans)
    return low, high


def _fit(branch, low: int, high: int | None, max_repeat: int, repeat_cap: int) -> Fit | None:
    """The mildest fit under which every string the branch matches has low to high characters: the lowest floor
    that brings its shortest to `low`, then the highest cap that keeps its longest within `high`. None: none does."""
    def shortest(floor: int) -> int:
        return _lengths(branch, max_repeat, repeat_cap, (floor, None))[0]

    def longest(floor: int, cap: int) -> float:
        return _lengths(branch, max_repeat, repeat_cap, (floor, cap))[1]

    top = min(low, max_repeat)
    if shortest(top) < low:
        return None
    a, b = 0, top  # the lowest floor whose shortest reaches low lies in [a, b]
    while a < b:
        mid = (a + b) // 2
        a, b = (a, mid) if shortest(mid) >= low else (mid + 1, b)
    if high is None:
        return a, None
    if longest(a, a) > high:
        return None
    lo, hi = a, high  # the highest cap whose longest stays within high lies in [lo, hi]
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if longest(a, mid) <= high else (lo, mid - 1)
    return a, lo


def _sequence(items, syntax: JsonSyntax, max_repeat: int, repeat_cap: int, fit: Fit | None = None) -> str:
    out = []
    for op, arg in items:
        if op == sre.LITERAL:
            out.append(syntax.character(arg))
        elif op == sre.NOT_LITERAL:
            out.append(_class([(sre.LITERAL, arg)], syntax, negate=True))
        elif op == sre.IN:
            out.append(_class(arg, syntax))
        elif op == sre.ANY:
            out.append(_class([(sre.RANGE, r) for r in NEWLINES], syntax, negate=True))
        elif op in (sre.MAX_REPEAT, sre.MIN_REPEAT):
            low, high = _repeat(arg[0], arg[1], max_repeat, repeat_cap, fit)
            inner = _sequence(arg[2], syntax, max_repeat, repeat_cap, fit)
            out.append(f"({inner}){{{low},{'' if high is None else high}}}")
        elif op == sre.SUBPATTERN:
            if arg[1] or arg[2]:
                raise ValueError("inline flags")
            out.append(f"({_sequence(arg[-1], syntax, max_repeat, repeat_cap, fit)})")
        elif op == sre.BRANCH:  # an alternative that cannot be written is left out (`($|/)` writes `/`): a subset
            written = _written(arg[1], lambda b: _sequence(b, syntax, max_repeat, repeat_cap, fit))
            out.append("(" + "|".join(written) + ")")
        elif op in (sre.ASSERT, sre.ASSERT_NOT):
            raise ValueError("a lookaround")
        elif op == sre.GROUPREF:
            raise ValueError("a backreference")
        else:
            raise ValueError(f"{str(op).lower()} {str(arg).lower()}")
    return "".join(out)


_ANCHORS = (sre.AT_BEGINNING, sre.AT_BEGINNING_STRING, sre.AT_END, sre.AT_END_STRING)


def _written(alternatives, write) -> list:
    """`write(alternative)` for each, leaving out those it raises ValueError for (a subset of the alternation) and
    those it gives None for; the first error when it raised for every one."""
    written, errors = [], []
    for alternative in alternatives:
        try:
            text = write(alternative)
        except ValueError as err:
            errors.append(err)
            continue
        if text is not None:
            written.append(text)
    if errors and not written:
        raise errors[0]
    return written


def ungrouped(items) -> list:
    """Items without the plain groups (no flags) around all of them: ((a|b)) -> a|b."""
    items = list(items)
    while len(items) == 1 and items[0][0] == sre.SUBPATTERN and not (items[0][1][1] or items[0][1][2]):
        items = list(items[0][1][-1])
    return items


def _alternatives(items, start: bool = False) -> list[tuple[list, bool, bool]]:
    """The pattern's top-level alternatives, each without its anchors, and whether it was anchored at its start and
    at its end: a group around a whole alternative is opened ((^...$)), an alternation left after the anchors
    is split (`re` writes `^$|^a+$` as ^ then $ | a+$), and so is a last alternation whose alternatives hold
    anchors, after what comes before it (`re` writes `^01$|^07$` as ^0 then (1$|7$): ^01$ | ^07$)."""
    items = ungrouped(items)
    while items and items[0][0] == sre.AT and items[0][1] in _ANCHORS[:2]:
        items.pop(0)
        start = True
    last = items[-1] if items else (None, None)
    if last[0] == sre.SUBPATTERN and not (last[1][1] or last[1][2]) and len(last[1][-1]) == 1:
        last = list(last[1][-1])[0]
    if last[0] == sre.BRANCH and (len(items) == 1 or any(op == sre.AT for b in last[1][1] for op, _ in b)):
        return [alt for branch in last[1][1] for alt in _alternatives(items[:-1] + list(branch), start)]
    end = False
    while items and items[-1][0] == sre.AT and items[-1][1] in _ANCHORS[2:]:
        items.pop()
        end = True
    return [(items, start, end)]


def _parsed(pattern: str):
    """The pattern's sre tree; ValueError for a pattern that is not a string or not a regular expression."""
    if not isinstance(pattern, str):
        raise ValueError("a pattern must be a string")
    try:
        return sre_parse.parse(pattern)
    except (re.error, RecursionError, OverflowError) as err:
        raise ValueError(f"an invalid regular expression ({err})") from None


def _branches(tree, drop: bool = True) -> list[tuple[list, bool, bool]]:
    """`_alternatives` of a parsed pattern, each with a negative lookahead at its start rewritten (lookahead.py);
    with `drop`, an alternative that cannot be written is left out (a subset). ValueError for what cannot be
    written (with `drop`: when no alternative can)."""
    def checked(alternative: tuple) -> tuple:
        branch, start, end = alternative
        if branch and branch[0][0] == sre.ASSERT_NOT and tree.state.flags & re.IGNORECASE:
            raise ValueError("a lookaround under the i flag")
        branch = avoiding_lookaheads(branch)  # lookahead.py: a negative lookahead at the start
        if any(op == sre.AT for op, _ in branch):
            raise ValueError("an anchor or word boundary inside the pattern")
        return branch, start, end

    alternatives = _alternatives(list(tree))
    return _written(alternatives, checked) if drop else [checked(a) for a in alternatives]


def pattern_body(pattern: str, max_repeat: int, repeat_cap: int, low: int = 0, high: int | None = None,
                 syntax: JsonSyntax = JSON) -> str:
    """The regex of string bodies that fully match `pattern` (a JSON schema pattern searches; a full match is a
    match, so this is a valid subset) and have `low` to `high` characters (minLength / maxLength): each top-level
    alternative's repetitions are raised and cut uniformly until every string it matches has such a length
    (_fit), and an alternative that cannot is left out; negative lookaheads at an alternative's start are written
    as lookahead.py says. ValueError, saying why, for what cannot be written."""
    def write(alternative: tuple) -> str | None:  # None: no string of it has such a length
        branch = alternative[0]
        if (low, high) == (0, None):
            return _sequence(branch, syntax, max_repeat, repeat_cap)
        fit = _fit(branch, low, high, max_repeat, repeat_cap)
        return None if fit is None else _sequence(branch, syntax, max_repeat, repeat_cap, fit)

    written = _written(_branches(_parsed(pattern)), write)
    if not written:
        raise ValueError(f"no string it matches is written with {low} to {'any' if high is None else high} "
                         "characters (minLength/maxLength)")
    return written[0] if len(written) == 1 else "(" + "|".join(written) + ")"


def pattern_search(pattern: str, max_repeat: int, repeat_cap: int, syntax: JsonSyntax = JSON) -> str:
    """The regex of string bodies in which `pattern` finds a match, as a JSON schema pattern searches: each
    alternative as pattern_body writes it, with any text before it unless anchored at the start and after it unless
    anchored at the end (a subset where repetitions are cut). ValueError as for pattern_body."""
    def write(alternative: tuple) -> str:
        branch, start, end = alternative
        anything = f"{syntax.char}*"
        return ("" if start else anything) + _sequence(branch, syntax, max_repeat, repeat_cap) + \
            ("" if end else anything)

    return "(" + "|".join(_written(_branches(_parsed(pattern)), write)) + ")"


def format_body(fmt: str, low: int, high: int | None, pattern: str | None, max_repeat: int, repeat_cap: int,
                syntax: JsonSyntax = JSON) -> str:
    """The first of format `fmt`'s narrow forms (FORMATS) whose every string has `low` to `high` characters and,
    when a `pattern` sits beside the format, is one the pattern matches (byte_dfa.texts_within: the form's texts
    within the pattern's search, pattern_search); else the pattern's own body when its every string is of the
    format's wide form (WIDE_FORMATS). ValueError, saying why, when neither is."""
    from ..byte_dfa import texts_within
    search = None if pattern is None else pattern_search(pattern, max_repeat, repeat_cap, syntax)
    fits = [form for form in FORMATS[fmt] if _span(form)[0] >= low and (high is None or _span(form)[1] <= high)]
    for form in fits:
        if search is None or texts_within(form, search):
            return form
    if pattern is not None and fmt in WIDE_FORMATS:
        wide, characters = WIDE_FORMATS[fmt]
        try:
            body = pattern_body(pattern, max_repeat, repeat_cap, low, high, syntax.only(characters))
        except ValueError:
            body = None
        if body is not None and texts_within(body, wide):
            return body
    if not fits:
        raise ValueError(f"no narrow form of format {fmt!r} that dgemma writes has {low} to "
                         f"{'any' if high is None else high} characters (minLength/maxLength)")
    raise ValueError(f"the pattern does not match every string of any narrow form of format {fmt!r} that dgemma "
                     "writes, nor are the pattern's strings all of the format")


@functools.lru_cache(maxsize=None)
def _span(form: str) -> tuple[int, float]:
    """The fewest and most characters of a narrow form's strings (ASCII: one character a byte)."""
    return _lengths(sre_parse.parse(form), MAX_CODE, MAX_CODE, None)


def literal_strings(pattern, limit: int = 256, anchored: bool = True) -> list[str] | None:
    """The strings a pattern of literals and alternatives anchored at both ends fully matches (`^(PREC|PREC_LEFT)$`),
    at most `limit` of them; None for any other pattern. Python's `$` also matches before a final newline, so a
    string the pattern accepts is one of these, or one of these and a newline. Without `anchored`, a pattern of
    literals need not be anchored (`APPROVER`): the strings that match it in full, which is what pattern_body
    writes for it."""
    def expand(items) -> list[str] | None:
        out = [""]
        for op, arg in items:
            if op == sre.LITERAL:
                tails = [chr(arg)]
            elif op == sre.IN and all(o == sre.LITERAL for o, _ in arg):
                tails = [chr(a) for _, a in arg]
            elif op == sre.SUBPATTERN and not (arg[1] or arg[2]):
                tails = expand(arg[-1])
            elif op == sre.BRANCH:
                tails = [t for branch in arg[1] for t in (expand(branch) or [None])]
                tails = None if None in tails else tails
            else:
                return None
            if tails is None or len(out) * len(tails) > limit:
                return None
            out = [head + tail for head in out for tail in tails]
        return out

    try:
        tree = _parsed(pattern)
        if tree.state.flags & re.IGNORECASE:
            return None
        branches = _branches(tree, drop=False)
    except ValueError:
        return None
    strings: list[str] = []
    for branch, start, end in branches:
        texts = expand(branch) if (start and end) or not anchored else None
        if texts is None or len(strings) + len(texts) > limit:
            return None
        strings += texts
    return strings
