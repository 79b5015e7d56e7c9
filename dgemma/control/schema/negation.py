"""`not`, in the forms a regex can honour: the node is narrowed so that nothing written validates against the
negated schema, or refused.

- `not: {}` / `not: true` (every value matches it): no value can be written (a property so marked is left out);
- `not: false`: no constraint;
- `not: {"type": T}`: the node's types less T (less `integer` too when T holds `number`);
- `not: {"required": [k, ...]}`: an object (only objects can fail `required`) that never writes the last of those
  keys the node does not itself require;
- `not: {"enum": [...]}` / `not: {"const": v}`: on a node with finite values, those values less the negated ones;
  otherwise each type of the node less the negated values of that type: a string not among them (a pattern that
  spells the strings that differ from each; with a checked format, its written form when none of them takes it;
  with a pattern anchored at its start that may write some of them, its strings that start unlike them),
  integers in the gaps between them, the other boolean;
- `not: {"pattern": "^C+$"}` (one class repeated, anchored at both ends; or `C*`): strings holding a character C
  does not take (or empty, for `+`), on a string node with no pattern or format of its own;
- `not: {"pattern": "[^C]"}` (one class): strings holding none of its characters, likewise;
- `not: {"pattern": "^X"}` (one alternative, anchored at its start): strings whose first character no match of X
  starts with, as a negative lookahead before the node's own pattern (lookahead.py; a pattern takes every value
  that is not a string, so only strings are left);
- `not: {"anyOf": [A, B, ...]}` (how two `not`s merge): not A, then not B, ... in these same forms;
- `not` with keywords that hold apart (`{"type": "object", "required": [k]}`): (not type) or (not required), each
  in these same forms, as an anyOf;
- `not: {"properties": {k: S, ...}}`: an object holding one of those keys with a value that fails its S (an anyOf
  over the keys, each written with `not: S` on the key's value, in these same forms).
Any other form is refused by name.
"""

from __future__ import annotations

import re

from .base import VALIDATION, Empty, SchemaError, canonical, finite_values, json_types
from .combine import merge
from .charsets import NEWLINES, class_ranges, complement, sre, sre_parse, subtract
from .strings import FORMATS, ungrouped


# keywords that are read together (one qualifies another); any other validation keyword holds on its own
GROUPS = [{"properties", "patternProperties", "additionalProperties"}, {"items", "prefixItems", "additionalItems"},
          {"minimum", "exclusiveMinimum"}, {"maximum", "exclusiveMaximum"}, {"enum", "const"},
          {"contains", "minContains", "maxContains"}, {"if", "then", "else"}]


def without_not(w, node: dict, path: str) -> dict:
    """`node` less its `not`, narrowed so that nothing written validates against the negated schema."""
    negated = node["not"]
    rest = {k: v for k, v in node.items() if k != "not"}
    if negated is False:
        return rest
    if negated is True or (isinstance(negated, dict) and not set(negated) & VALIDATION):
        raise Empty
    if not isinstance(negated, dict):
        raise SchemaError(f"{path}/not: must be a schema")
    if set(negated) & {"$ref", "allOf", "if", "dependentSchemas"}:
        try:
            negated = w.resolve(negated, path)[0]
        except Empty:  # past the recursion bound we cannot say what the negated schema accepts
            raise SchemaError(f"{path}: unsupported JSON schema feature 'not' (with a recursive $ref)") from None
    order = [k for k in negated if k in VALIDATION]  # the schema's order, not a set's: the same regex every run
    words = set(order)
    groups = [g for g in (GROUPS + [{w_} for w_ in order if not any(w_ in g for g in GROUPS)]) if g & words]
    if len(groups) > 1:  # keywords hold together: not (A and B) is (not A) or (not B)
        either = [{"not": {k: negated[k] for k in order if k in g}} for g in groups]
        return {**rest, "allOf": list(rest.get("allOf", [])) + [{"anyOf": either}]}
    if words == {"type"}:
        return _other_types(w, rest, negated["type"], path)
    if words == {"required"} and isinstance(negated["required"], list):
        return _lacking(w, rest, negated["required"], path)
    if words <= {"enum", "const"}:
        return _other_values(w, rest, negated, path)
    if words == {"anyOf"} and isinstance(negated["anyOf"], list) and negated["anyOf"]:
        for member in negated["anyOf"]:
            rest = without_not(w, {**rest, "not": member}, path)
        return rest
    if words == {"properties"} and isinstance(negated["properties"], dict):
        return _failing_property(w, rest, negated["properties"], path)
    if words == {"pattern"} and isinstance(negated["pattern"], str):
        only = _only_class(negated["pattern"])
        if only is not None:
            return _not_only(w, rest, *only, path)
        if negated["pattern"].startswith("^"):
            return _not_starting(w, rest, negated["pattern"], path)
        banned = _one_class(negated["pattern"])
        if banned is not None:
            return _without_characters(w, rest, banned, path)
    raise SchemaError(f"{path}: unsupported JSON schema feature 'not' (with {', '.join(sorted(words))})")


def _other_types(w, rest: dict, excluded, path: str) -> dict:
    excluded = set(excluded if isinstance(excluded, list) else [excluded])
    if "number" in excluded:
        excluded.add("integer")
    kinds = [k for k in w.types(rest, path) if k not in excluded]
    if "integer" in excluded and "number" in kinds:  # a number written may be integral
        raise SchemaError(f"{path}: unsupported JSON schema feature 'not' (integer excluded from number)")
    if not kinds:
        raise Empty
    return {**rest, "type": kinds}


def _lacking(w, rest: dict, keys: list, path: str) -> dict:
    if "object" not in w.types(rest, path):
        raise Empty
    required = rest.get("required", [])
    free = [k for k in keys if k not in required]
    if not free:
        raise Empty
    properties = dict(rest.get("properties") or {})
    properties[free[-1]] = False
    return {**rest, "type": "object", "properties": properties}


def _other_values(w, rest: dict, negated: dict, path: str) -> dict:
    banned = negated.get("enum", [])
    if not isinstance(banned, list):
        raise SchemaError(f"{path}/not/enum: must be a list")
    banned = banned + ([negated["const"]] if "const" in negated else [])
    values = finite_values(rest)
    if values is None:
        return _each_type_less(w, rest, banned, path)
    banned_keys = {canonical(v) for v in banned}
    kept = [v for v in values if canonical(v) not in banned_keys]
    if not kept:
        raise Empty
    out = {k: v for k, v in rest.items() if k not in ("enum", "const")}
    return {**out, "enum": kept}


def _each_type_less(w, rest: dict, banned: list, path: str) -> dict:
    """A node without finite values, less `banned`: an anyOf over its types, each less the banned values it holds."""
    members = []
    for kind in w.types(rest, path):
        mine = [v for v in banned if kind in json_types(v)]
        node = {**rest, "type": kind}
        if not mine:
            members.append(node)
        elif kind == "boolean":
            members += [{**node, "enum": [b]} for b in (False, True) if b not in mine]
        elif kind == "integer":
            members += _gaps(node, sorted({int(v) for v in mine}), path)
        elif kind == "string" and ("pattern" in rest or rest.get("format") in FORMATS):
            written = w.string(node, path)  # the string's regex, as the writer writes it (None: no string)
            if written is not None and any(_text(w, v) is None or re.fullmatch(written, _text(w, v)) for v in mine):
                node = _starting_unlike(w, node, mine, path)
            members.append(node)  # no string written for it is one of them
        elif kind == "string" and "pattern" not in rest:  # a format no validator checks is an annotation
            low, high = w.count(rest, "minLength", path, 0), w.count(rest, "maxLength", path)
            lengths = {"minLength", "maxLength"}
            members.append({**{k: v for k, v in node.items() if k not in lengths},  # the pattern holds them
                            "pattern": "^" + _differing(mine, low, high) + "$"})
        elif kind != "null":
            raise SchemaError(f"{path}: unsupported JSON schema feature 'not' (with enum or const, on a {kind}"
                              f"{' with a pattern' if kind == 'string' else ''})")
    if not members:
        raise Empty
    return members[0] if len(members) == 1 else {"anyOf": members}


def _text(w, value: str) -> str | None:
    """The one text of string `value` that a pattern's or a format's regex can write (strings.pattern_body writes a
    character plain, or in JSON escaped as json.dumps escapes it; formats are plain ASCII), or None for a value with
    a character it may write otherwise (C1 controls, lone surrogates)."""
    if any(0x7F <= ord(c) <= 0x9F or 0xD800 <= ord(c) <= 0xDFFF for c in value):
        return None
    return w.syntax.text(value)


def _starting_unlike(w, node: dict, words: list[str], path: str) -> dict:
    """A string node whose own pattern (anchored at its start, no format) may write some of `words`: its strings
    whose first character none of the words starts with (`_not_starting`'s lookahead), a narrower set that holds
    none of them; refused when that cannot be written (an empty word, a format)."""
    refusal = SchemaError(f"{path}: unsupported JSON schema feature 'not' (with enum or const, on a string with a "
                          f"pattern or format that the values may take)")
    if "" in words or node.get("format") in FORMATS or any(_text(w, v) is None for v in words):
        raise refusal
    try:
        return _not_starting(w, node, "^(" + "|".join("".join(map(_literal, v)) for v in words) + ")", path)
    except SchemaError:
        raise refusal from None


ANY_TEXT = r"[\s\S]*"  # a pattern's tail that takes any string


def _not_starting(w, rest: dict, pattern: str, path: str) -> dict:
    """`not: {"pattern": "^X"}` (anchored at the start): strings only (a pattern takes every value that is not a
    string), those that do not begin with a match of X, written as a negative lookahead before the node's own
    pattern (lookahead.py: strings whose first character no match of X starts with)."""
    try:
        parsed = list(sre_parse.parse(pattern))
    except (re.error, RecursionError, OverflowError):
        parsed = []
    if not parsed or parsed[0] != (sre.AT, sre.AT_BEGINNING) or any(op == sre.BRANCH for op, _ in parsed):
        raise SchemaError(f"{path}: unsupported JSON schema feature 'not' (with a pattern that is not one "
                          "alternative anchored at its start)")
    if "string" not in w.types(rest, path):
        raise Empty
    own = rest.get("pattern", "^" + ANY_TEXT)
    if rest.get("format") in FORMATS or not isinstance(own, str) or not own.startswith("^"):
        raise SchemaError(f"{path}: unsupported JSON schema feature 'not' (with pattern, on a string with a format "
                          "or a pattern not anchored at its start)")
    body, end = (own[1:-1], "$") if own.endswith("$") and not own.endswith("\\$") else (own[1:], "")
    return {**rest, "type": "string", "pattern": f"^(?!{pattern[1:]})(?:{body}){end}"}  # an anchor inside: refused


def _items(pattern: str) -> list | None:
    """The pattern's sre items without the plain groups around them, or None for a pattern that does not parse or
    ignores case."""
    try:
        tree = sre_parse.parse(pattern)
    except (re.error, RecursionError, OverflowError):
        return None
    return None if tree.state.flags & re.IGNORECASE else ungrouped(tree)


def _one_class(pattern: str) -> list | None:
    """The class (sre items) of a pattern that is one character class, literal or negated literal (in a group or
    not, unanchored, no flags): `[^a-z0-9 -]`, `(\\$)`; else None."""
    items = _items(pattern)
    if items is None or len(items) != 1:
        return None
    op, arg = items[0]
    if op == sre.LITERAL:
        return [(sre.LITERAL, arg)]
    if op == sre.NOT_LITERAL:
        return [(sre.NEGATE, None), (sre.LITERAL, arg)]
    return list(arg) if op == sre.IN else None


def _only_class(pattern: str) -> tuple[list, int] | None:
    """(the class, its fewest repeats 0 or 1) of a pattern that is one class repeated, anchored at both ends
    (`^[.,*\\s-]+$`: strings of those characters only); else None."""
    items = _items(pattern)
    if items is None or len(items) != 3 or items[0] != (sre.AT, sre.AT_BEGINNING) or \
            items[2] != (sre.AT, sre.AT_END) or items[1][0] != sre.MAX_REPEAT:
        return None
    low, high, inner = items[1][1]
    inner = ungrouped(inner)
    if low > 1 or high != sre.MAXREPEAT or len(inner) != 1 or inner[0][0] not in (sre.IN, sre.LITERAL):
        return None
    op, arg = inner[0]
    return (list(arg) if op == sre.IN else [(sre.LITERAL, arg)]), low


def _not_only(w, rest: dict, items: list, low: int, path: str) -> dict:
    """`not: {"pattern": "^C+$"}` (or `C*`): strings only, each holding a character C takes in neither ECMA-262 nor
    Python's re, other than a newline (Python's `$` matches before a final one), or empty where C+ wants one."""
    chars = _outside(w, rest, items, "one repeated class", path, NEWLINES)
    if not chars and low == 0:
        raise Empty
    holding = f"{ANY_TEXT}[{chars}]{ANY_TEXT}" if chars else "(?!)"
    return {**rest, "type": "string", "pattern": f"^({holding})?$" if low == 1 else f"^{holding}$"}


def _without_characters(w, rest: dict, banned: list, path: str) -> dict:
    """`not: {"pattern": C}` for C one character class: strings only (a pattern takes every value that is not a
    string), holding no character C takes in either ECMA-262 or Python's re, as a pattern of the others."""
    chars = _outside(w, rest, banned, "one character class", path)
    return {**rest, "type": "string", "pattern": f"^[{chars}]*$" if chars else "^$"}


def _outside(w, rest: dict, items: list, form: str, path: str, also: list = ()) -> str:
    """What `_not_only` and `_without_characters` share: Empty unless the node may be a string, refused when it has
    a pattern or format of its own (`form` names the negated pattern's), else the body of an ECMA-262 class of the
    characters the class (sre items) takes in neither ECMA-262 nor Python's re, less `also` (code point ranges);
    "" when there is none."""
    if "string" not in w.types(rest, path):
        raise Empty
    if "pattern" in rest or rest.get("format") in FORMATS:
        raise SchemaError(f"{path}: unsupported JSON schema feature 'not' (with a pattern of {form}, on a string "
                          "with a pattern or format)")
    try:
        ranges = subtract(complement(class_ranges(items, superset=True)), list(also))
    except ValueError as err:
        raise SchemaError(f"{path}/not/pattern: unsupported pattern ({err})") from None
    return "".join(f"\\U{a:08x}" + ("" if a == b else f"-\\U{b:08x}") for a, b in ranges)


def _gaps(node: dict, points: list[int], path: str) -> list[dict]:
    """The node's integers between the points (sorted, distinct), a member a gap."""
    members = []
    for low, high in zip([None] + [p + 1 for p in points], [p - 1 for p in points] + [None]):
        bound = {**({} if low is None else {"minimum": low}), **({} if high is None else {"maximum": high})}
        try:
            members.append(merge(node, bound, path))
        except Empty:
            pass
    return members


_SPECIAL = set("\\^$.|?*+()[]{}/-")


def _literal(char: str) -> str:
    """`char` as an ECMA-262 pattern reads it literally, in or out of a class."""
    return "\\" + char if char in _SPECIAL else char


def _differing(words: list[str], low: int, high: int | None) -> str:
    """An ECMA-262 pattern body (without anchors) for the strings of low to high characters (high None: no bound)
    that are none of `words`: down their trie, a string ends where no word does, or leaves the trie by a character
    no word has there (then anything may follow), or goes on into a child."""
    trie: dict = {}
    for word in words:
        node = trie
        for char in word:
            node = node.setdefault(char, {})
        node[""] = {}  # a word ends here

    def body(node: dict, depth: int) -> str | None:  # None: no string goes on from here
        options = [] if "" in node or depth < low else [""]
        if high is None or depth < high:
            chars = sorted(c for c in node if c)
            tail = f"[\\s\\S]{{{max(low - depth - 1, 0)},{'' if high is None else high - depth - 1}}}"
            options.append(f"[^{''.join(map(_literal, chars))}]{tail}" if chars else f"[\\s\\S]{tail}")
            for c in chars:
                rest = body(node[c], depth + 1)
                if rest is not None:
                    options.append(_literal(c) + rest)
        return "(?:" + "|".join(options) + ")" if options else None

    pattern = body(trie, 0)
    if pattern is None:
        raise Empty
    return pattern


def _failing_property(w, rest: dict, properties: dict, path: str) -> dict:
    """Only an object can fail `properties`, by holding a key whose value fails that key's schema."""
    if "object" not in w.types(rest, path):
        raise Empty
    members = []
    for name, sub in properties.items():
        if sub is False:
            members.append({"required": [name]})
        elif isinstance(sub, dict) and set(sub) & VALIDATION:
            members.append({"required": [name], "properties": {name: {"not": sub}}})
    if not members:  # every value of every key matches: nothing fails it
        raise Empty
    return {**rest, "type": "object", "allOf": list(rest.get("allOf", [])) + [{"anyOf": members}]}
