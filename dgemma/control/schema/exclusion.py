"""When no value written for one schema validates against another, and how to narrow a oneOf member until so.

`oneOf` is valid when exactly one member matches. The writer keeps the members whose written values no other
member accepts (`excludes`), after narrowing each where a small change makes it so (`narrowed`): an object member
leaves out a key another member requires, or requires a key another member forbids or fixes to other values.
Every narrowing only takes values away, so what is written still validates against the member itself.
"""

from __future__ import annotations

import math
import re

from .base import VALIDATION, Empty, SchemaError, canonical, finite_values, json_types
from .combine import merge
from .numbers import bounds
from .strings import FORMATS, literal_strings

DEPTH = 3  # how deep excludes compares the values of a key both members require


def absent(sub) -> bool:
    """Whether a property schema admits no value (false, or an allOf with false: how narrowing drops a key)."""
    return sub is False or (isinstance(sub, dict) and isinstance(sub.get("allOf"), list) and False in sub["allOf"])


def _values(w, sub) -> list | None:
    """The finite values a property schema allows ($ref and allOf merged), or None."""
    if not isinstance(sub, dict):
        return None
    try:
        return finite_values(w.resolve(sub, "")[0])
    except (Empty, SchemaError):
        return None


def _constant(w, sub):
    """The canonical key of the one value a property allows, or None."""
    values = _values(w, sub)
    return canonical(values[0]) if values is not None and len(values) == 1 else None


def _emitted(w, a: dict) -> set[str]:
    """The JSON types of the values written for `a` (integer and number both named when either is)."""
    values = finite_values(a)
    if values is not None:
        kinds = set().union(*(json_types(v) for v in values))
    else:
        kinds = set(w.types(a, ""))
    if kinds & {"integer", "number"}:
        kinds |= {"integer", "number"}
    return kinds


def _span(node: dict, low_key: str, high_key: str) -> tuple[int, float]:
    low, high = node.get(low_key, 0), node.get(high_key, math.inf)
    ok = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high))
    return (low, high) if ok else (0, math.inf)


def _disjoint_counts(a: dict, b: dict, low_key: str, high_key: str) -> bool:
    (a_low, a_high), (b_low, b_high) = _span(a, low_key, high_key), _span(b, low_key, high_key)
    return a_high < b_low or b_high < a_low


def _disjoint_numbers(a: dict, b: dict) -> bool:
    def error(message):
        return SchemaError(message)
    a_low, a_low_ex, a_high, a_high_ex = bounds(a, error)
    b_low, b_low_ex, b_high, b_high_ex = bounds(b, error)
    below = a_high is not None and b_low is not None and (a_high < b_low or (a_high == b_low and (a_high_ex or b_low_ex)))
    above = b_high is not None and a_low is not None and (b_high < a_low or (b_high == a_low and (b_high_ex or a_low_ex)))
    return below or above


def _listed(a: dict) -> set[str]:
    """The keys an object written for `a` may hold (listed properties that admit a value, and required keys)."""
    props = a.get("properties", {}) if isinstance(a.get("properties"), dict) else {}
    return {n for n, sub in props.items() if not absent(sub)} | set(a.get("required", []))


def _forbids(b: dict, name: str) -> bool:
    props = b.get("properties", {}) if isinstance(b.get("properties"), dict) else {}
    if name in props:
        return absent(props[name])
    return b.get("additionalProperties") is False and not b.get("patternProperties")


def excludes(w, a: dict, b: dict, depth: int = DEPTH) -> bool:
    """True when no value written for `a` validates against `b` (both resolved nodes)."""
    for key in ("anyOf", "oneOf"):
        if key in a:  # what a writes is what its members write, each with a's other keywords
            members = _members(w, a, key, written=True) if depth > 0 else None
            return members is not None and all(excludes(w, m, b, depth - 1) for m in members)
    if _plain_excludes(w, a, b, depth):
        return True
    for key in ("anyOf", "oneOf"):
        if key in b and depth > 0:  # b refuses what none of its members accepts
            members = _members(w, b, key, written=False)
            return members is not None and all(excludes(w, a, m, depth - 1) for m in members)
    return False


def _members(w, node: dict, key: str, written: bool) -> list[dict] | None:
    """The members of node's anyOf/oneOf, each merged with node's other keywords and resolved; None when one cannot
    be read. written: for the side whose values are written, where a member we cannot write writes nothing and
    is skipped; on the accepting side such a member might still accept, so it gives None."""
    members = node[key]
    if not isinstance(members, list):
        return None
    rest = {k: v for k, v in node.items() if k != key}
    out = []
    for member in members:
        if member is False:
            continue
        try:
            merged = merge(rest, {} if member is True else member, "")
        except Empty:  # the member and the rest meet in no value: it neither writes nor accepts anything
            continue
        except SchemaError:
            return None
        try:
            out.append(w.resolve(merged, "")[0])
        except Empty:
            if not written:
                return None
        except SchemaError:
            return None
    return out


def _plain_excludes(w, a: dict, b: dict, depth: int) -> bool:
    """excludes, for an `a` with no anyOf/oneOf, from b's own keywords."""
    mine, theirs = finite_values(a), finite_values(b)
    if mine is not None and theirs is not None:
        return not {canonical(v) for v in mine} & {canonical(v) for v in theirs}
    emitted = _emitted(w, a)
    if theirs is not None and not emitted & _emitted(w, b):  # b's values are of types a never writes
        return True
    allowed = b.get("type")
    if isinstance(allowed, (str, list)) and "anyOf" not in b and "oneOf" not in b:
        allowed = set(allowed if isinstance(allowed, list) else [allowed])
        if "number" in allowed:
            allowed.add("integer")
        if not emitted & allowed:
            return True
    negated = b.get("not")
    if isinstance(negated, dict) and set(negated) & VALIDATION == {"type"}:  # b refuses those types
        refused = negated["type"] if isinstance(negated["type"], list) else [negated["type"]]
        refused = {t for t in refused if isinstance(t, str)}
        if "number" in refused:
            refused.add("integer")
        if set(w.types(a, "") if mine is None else emitted) <= refused:
            return True
    if mine is not None:
        return emitted == {"string"} and _disjoint_strings(a, b)
    if emitted == {"string"}:
        return _disjoint_counts(a, b, "minLength", "maxLength") or _disjoint_strings(a, b)
    if emitted == {"integer", "number"}:
        return _disjoint_numbers(a, b)
    if emitted == {"array"}:
        return _disjoint_counts(a, b, "minItems", "maxItems") or (
            _span(a, "minItems", "maxItems")[0] >= 1 and _items_apart(w, a, b, depth))
    if emitted != {"object"}:
        return False
    low, high = _property_counts(a)
    b_low, b_high = _span(b, "minProperties", "maxProperties")
    if high < max(b_low, len(_names(b.get("required")))) or low > b_high:  # b wants more or fewer keys
        return True
    return ("properties" in a or "required" in a) and _objects_apart(w, a, b, depth)


def _disjoint_strings(a: dict, b: dict) -> bool:
    """The strings a writes (its enum, or the strings its pattern of literals fully matches, as pattern_body writes
    them) are none of those b's pattern of literals accepts: `^ALIAS$` and `^STRING$` (the tags of tree-sitter's
    grammar schema), or `APPROVER` and `SIGNER`, which search. For a pattern of literals a search with Python's re
    (which takes `$` before a final newline too) accepts whatever ECMA-262's accepts."""
    if not isinstance(b.get("pattern"), str) or literal_strings(b["pattern"], anchored=False) is None:
        return False
    written = finite_values(a)
    if written is None and isinstance(a.get("pattern"), str) and a.get("format") not in FORMATS:
        written = literal_strings(a["pattern"], anchored=False)
    return written is not None and not any(isinstance(v, str) and re.search(b["pattern"], v) for v in written)


def _items_apart(w, a: dict, b: dict, depth: int) -> bool:
    """No item a writes validates against b's `items` (one schema for every item on both sides): then b refuses every
    array a writes that holds an item (GeoJSON's coordinates: an array of numbers or an array of arrays)."""
    mine, theirs = a.get("items"), b.get("items")
    if depth <= 0 or not isinstance(mine, dict) or not isinstance(theirs, dict) or "prefixItems" in a or (
            "prefixItems" in b):
        return False
    return _values_apart(w, mine, theirs, depth - 1)


def _names(required) -> set[str]:
    return {r for r in required if isinstance(r, str)} if isinstance(required, list) else set()


def _property_counts(a: dict) -> tuple[int, float]:
    """The fewest and the most distinct keys of an object written for `a`: with listed properties only those
    (containers.py), at least the required ones; free keys may repeat, so only one of them counts for sure."""
    low, high = _span(a, "minProperties", "maxProperties")
    if "properties" in a or "required" in a:
        return max(low, len(_names(a.get("required")))), min(high, len(_listed(a)))
    return min(low, 1), high


def _objects_apart(w, a: dict, b: dict, depth: int) -> bool:
    """For objects `a` writes (listed keys only): b requires a key a never writes, forbids one a always writes,
    or refuses the value a always writes under a key."""
    if any(r not in _listed(a) for r in b.get("required", [])):
        return True
    a_props = a.get("properties", {}) if isinstance(a.get("properties"), dict) else {}
    b_props = b.get("properties", {}) if isinstance(b.get("properties"), dict) else {}
    for name in a.get("required", []):
        if _forbids(b, name):
            return True
        mine, values = _constant(w, a_props.get(name)), _values(w, b_props.get(name))
        if mine is not None and values is not None and mine not in {canonical(v) for v in values}:
            return True
        if depth > 0 and name in a_props and name in b_props and _values_apart(w, a_props[name], b_props[name],
                                                                                depth - 1):
            return True
    return False


def _values_apart(w, mine, theirs, depth: int) -> bool:
    if not isinstance(mine, dict) or not isinstance(theirs, dict):
        return False
    try:
        return excludes(w, w.resolve(mine, "")[0], w.resolve(theirs, "")[0], depth)
    except (Empty, SchemaError):
        return False


def narrowed(w, member, a: dict, others: list[dict], raw: list[dict]):
    """`member` (as the schema gives it, `a` resolved) narrowed so that no value written for it validates against
    any of `others` (resolved members; `raw`, the same members as the schema gives them): by leaving out or
    requiring keys where that suffices, else by adding `not` that member, which is exact where the writer can write
    it (negation.py's forms; writing the member fails otherwise, and it is left out)."""
    dropped, required, negated, nonempty = {}, [], [], False
    for b, b_raw in zip(others, raw):
        if excludes(w, a, b):
            continue
        step = _step(w, a, b)
        if step is None:
            negated.append(b_raw)
            continue
        kind, name = step
        if kind == "nonempty":
            nonempty = True
            a = {**a, "minItems": max(1, _span(a, "minItems", "maxItems")[0])}
        elif kind == "drop":
            dropped[name] = False
            a = {**a, "properties": {**a.get("properties", {}), name: False}}
        else:
            required.append(name)
            a = {**a, "required": list(a.get("required", [])) + [name]}
        if not excludes(w, a, b):
            negated.append(b_raw)
    if not dropped and not required and not negated and not nonempty:
        return member
    extra = {"properties": dropped} if dropped else {}
    if nonempty:
        extra["minItems"] = 1
    if required:
        extra["required"] = required
    if negated:
        extra["not"] = negated[0] if len(negated) == 1 else {"anyOf": negated}
    return {"allOf": [member, extra]}


def _step(w, a: dict, b: dict) -> tuple[str, str] | None:
    """One key to leave out of `a` (one that b requires) or to require in it (one that b forbids or fixes to other
    values) so that b refuses every object written for `a`, or, for arrays whose items b's `items` refuses, at least
    one item ("nonempty"); None if there is none."""
    if _emitted(w, a) == {"array"}:
        apart = _span(a, "minItems", "maxItems")[0] < 1 and _items_apart(w, a, b, DEPTH)
        return ("nonempty", "") if apart else None
    if _emitted(w, a) != {"object"} or not ("properties" in a or "required" in a) or "anyOf" in a or "oneOf" in a:
        return None
    props = a.get("properties", {}) if isinstance(a.get("properties"), dict) else {}
    if not isinstance(props, dict):
        return None
    required = set(a.get("required", []))
    for name in b.get("required", []):
        if isinstance(name, str) and name not in required:
            return "drop", name
    b_props = b.get("properties", {}) if isinstance(b.get("properties"), dict) else {}
    for name, sub in props.items():
        if name in required or absent(sub):
            continue
        mine, values = _constant(w, sub), _values(w, b_props.get(name))
        if _forbids(b, name) or (mine is not None and values is not None and mine not in {canonical(v) for v in values}):
            return "require", name
    return None
