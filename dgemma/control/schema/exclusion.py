"""When no value written for one schema validates against another, and how to narrow a oneOf member until so.

`oneOf` is valid when exactly one member matches. The writer keeps the members whose written values no other
member accepts (`excludes`), after narrowing each where a small change makes it so (`narrowed`): an object member
leaves out a key another member requires, or requires a key another member forbids or fixes to other values.
Every narrowing only takes values away, so what is written still validates against the member itself.
"""

from __future__ import annotations

import math
from fractions import Fraction

from .base import Empty, SchemaError
from .numbers import bounds

DEPTH = 3  # how deep excludes compares the values of a key both members require


def canonical(value):
    """A key equal for JSON values that JSON Schema calls equal (1 and 1.0 alike, true and 1 not)."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return type(value).__name__, value
    if isinstance(value, (int, float)):
        return "number", Fraction(value) if math.isfinite(value) else value
    if isinstance(value, list):
        return "array", tuple(canonical(v) for v in value)
    return "object", tuple(sorted((k, canonical(v)) for k, v in value.items()))


def finite_values(node) -> list | None:
    """The finite values a node allows (its enum or const), or None."""
    if not isinstance(node, dict):
        return None
    if "const" in node:
        return [node["const"]]
    return node["enum"] if isinstance(node.get("enum"), list) else None


def absent(sub) -> bool:
    """Whether a property schema admits no value (false, or an allOf with false: how narrowing drops a key)."""
    return sub is False or (isinstance(sub, dict) and isinstance(sub.get("allOf"), list) and False in sub["allOf"])


def _json_types(value) -> set[str]:
    if value is None:
        return {"null"}
    if isinstance(value, bool):
        return {"boolean"}
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
        return {"integer", "number"}
    if isinstance(value, float):
        return {"number"}
    return {"string" if isinstance(value, str) else "array" if isinstance(value, list) else "object"}


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
        kinds = set().union(*(_json_types(v) for v in values))
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
    if "anyOf" in a or "oneOf" in a:
        return False
    mine, theirs = finite_values(a), finite_values(b)
    if mine is not None and theirs is not None:
        return not {canonical(v) for v in mine} & {canonical(v) for v in theirs}
    emitted = _emitted(w, a)
    allowed = b.get("type")
    if isinstance(allowed, (str, list)) and "anyOf" not in b and "oneOf" not in b:
        allowed = set(allowed if isinstance(allowed, list) else [allowed])
        if "number" in allowed:
            allowed.add("integer")
        if not emitted & allowed:
            return True
    if mine is not None:
        return False
    if emitted == {"string"}:
        return _disjoint_counts(a, b, "minLength", "maxLength")
    if emitted == {"integer", "number"}:
        return _disjoint_numbers(a, b)
    if emitted == {"array"}:
        return _disjoint_counts(a, b, "minItems", "maxItems")
    if emitted != {"object"} or not ("properties" in a or "required" in a):
        return False
    return _objects_apart(w, a, b, depth)


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


def narrowed(w, member, a: dict, others: list[dict]):
    """`member` (as the schema gives it, `a` resolved), narrowed so that no value written for it validates against
    any of `others` (resolved members), or None when leaving out or requiring keys cannot make it so."""
    dropped, required = {}, []
    for b in others:
        if excludes(w, a, b):
            continue
        step = _step(w, a, b)
        if step is None:
            return None
        kind, name = step
        if kind == "drop":
            dropped[name] = False
            a = {**a, "properties": {**a.get("properties", {}), name: False}}
        else:
            required.append(name)
            a = {**a, "required": list(a.get("required", [])) + [name]}
        if not excludes(w, a, b):
            return None
    if not dropped and not required:
        return member
    extra = {"properties": dropped} if dropped else {}
    if required:
        extra["required"] = required
    return {"allOf": [member, extra]}


def _step(w, a: dict, b: dict) -> tuple[str, str] | None:
    """One key to leave out of `a` (one that b requires) or to require in it (one that b forbids or fixes to other
    values) so that b refuses every object written for `a`; None if there is none."""
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
