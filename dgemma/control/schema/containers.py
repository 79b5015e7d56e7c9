"""Objects and arrays for writer.py.

Objects with `properties` or `required` are written with only those keys, required keys first (their order in
the schema), then each optional key at most once, or all in sorted order where the syntax wants it (a Gemma tool
call); additionalProperties then allows no more than it forbids.
Objects with neither have free keys (patternProperties' first pattern, or propertyNames) and values.
"""

from __future__ import annotations

import json
import re

from .base import VALIDATION, Empty, SchemaError
from .combine import merge
from .strings import pattern_body, pattern_search

OPENERS = 8  # an object with no required key starts with one of its first 8 optional keys


def sequence(w, item: str, low: int, high: int | None, brace: tuple[str, str] = (r"\[", r"\]")) -> str:
    """`[item, item, ...]` with low to high items (high None: no bound)."""
    ws, sep, (left, right) = w.ws, f"{w.ws},{w.ws}", brace
    if high == 0:
        return f"{left}{ws}{right}"
    more = "" if high is None else str(high - 1)
    if low == 0:
        return f"{left}{ws}({item}({sep}{item}){{0,{more}}})?{ws}{right}"
    return f"{left}{ws}{item}({sep}{item}){{{low - 1},{more}}}{ws}{right}"


def pairs(w, key: str, value: str, low: int, high: int | None) -> str:
    """`{key: value, ...}` with low to high pairs."""
    return sequence(w, f"{key}{w.ws}:{w.ws}{value}", low, high, (r"\{", r"\}"))


def chain(w, items: list[tuple[str, bool]], brace: tuple[str, str]) -> str:
    """The items (text, required) in order, comma-separated: each required one always, each other at most once."""
    ws, sep = w.ws, f"{w.ws},{w.ws}"
    first = next((i for i, (_, needed) in enumerate(items) if needed), None)
    if first is not None:  # optional items before the first required one end with a comma, later ones start with one
        body = "".join(f"({text}{sep})?" for text, _ in items[:first]) + items[first][0] + \
            "".join(f"{sep}{text}" if needed else f"({sep}{text})?" for text, needed in items[first + 1:])
    else:
        optional = [text for text, _ in items]
        # nothing yet: the first written item opens the list, the rest are comma-led; only the first OPENERS may
        # open it, which keeps the regex linear in the number of keys (later ones still follow). The items after
        # the openers are written once, after the alternation, not once per opener: the same language, and an 8x
        # smaller regex and DFA when they are many (Github_hard o67450: 38,490 DFA states and 15 s in
        # outlines-core, against 4,593 and 0.4 s; the minimal DFA is the same)
        openers, rest = optional[:OPENERS], optional[OPENERS:]
        options = [item + "".join(f"({sep}{o})?" for o in openers[i + 1:]) for i, item in enumerate(openers)]
        rest_tail = "".join(f"({sep}{o})?" for o in rest)
        body = "((" + "|".join(options) + ")" + rest_tail + ")?" if options else ""
    return f"{brace[0]}{ws}{body}{ws}{brace[1]}"


def _names_ok(w, names_schema, name: str, path: str) -> bool:
    """Whether property `name` meets propertyNames (enum/const/pattern/min/maxLength only)."""
    if names_schema in (None, True, {}):
        return True
    if names_schema is False:
        return False
    if not isinstance(names_schema, dict):
        raise SchemaError(f"{path}/propertyNames: must be a schema")
    try:
        names_schema = w.resolve(names_schema, f"{path}/propertyNames")[0]
    except Empty:
        return False
    known = {"enum", "const", "pattern", "minLength", "maxLength", "type"}
    extra = sorted(k for k in names_schema if k not in known and k in VALIDATION)
    if extra:
        raise SchemaError(f"{path}/propertyNames: unsupported '{extra[0]}' with listed properties")
    ok = names_schema.get("type", "string") in ("string", ["string"])
    ok &= "enum" not in names_schema or name in names_schema["enum"]
    ok &= "const" not in names_schema or name == names_schema["const"]
    ok &= names_schema.get("minLength", 0) <= len(name) <= names_schema.get("maxLength", len(name))
    try:
        ok &= "pattern" not in names_schema or re.search(names_schema["pattern"], name) is not None
    except re.error:
        raise SchemaError(f"{path}/propertyNames/pattern: invalid regular expression") from None
    return ok


def _value_schema(node: dict, name: str, path: str):
    """The schemas a listed property's value must meet: its own, each matching patternProperty's, or else
    additionalProperties."""
    props = node.get("properties", {})
    matched = []
    for pattern, sub in (node.get("patternProperties") or {}).items():
        try:
            if re.search(pattern, name):
                matched.append(sub)
        except re.error:
            raise SchemaError(f"{path}/patternProperties: invalid regular expression {pattern!r}") from None
    if name in props:
        matched.insert(0, props[name])
    elif not matched:
        matched.append(node.get("additionalProperties", True))
    return matched[0] if len(matched) == 1 else {"allOf": matched}


def listed_object(w, node: dict, path: str) -> str:
    props, required = node.get("properties", {}), node.get("required", [])
    if not isinstance(props, dict):
        raise SchemaError(f"{path}/properties: must be an object")
    if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
        raise SchemaError(f"{path}/required: must be a list of strings")
    required = list(dict.fromkeys(required))
    depends = dict(node.get("dependentRequired") or {})
    for key, value in (node.get("dependencies") or {}).items():
        if not isinstance(value, list):  # writer.dependent_conditions takes the schema form out first
            raise SchemaError(f"{path}/dependencies/{key}: must be a list or a schema")
        depends[key] = value
    names = list(dict.fromkeys(list(props) + required))
    kept = [n for n in names if _names_ok(w, node.get("propertyNames"), n, path)]
    if any(r not in kept for r in required):
        raise Empty
    # a key that is written brings the keys it depends on: make those required (narrower, still valid)
    changed = True
    while changed:
        changed = False
        for key, needs in depends.items():
            if key in kept and not all(isinstance(n, str) for n in needs):
                raise SchemaError(f"{path}/dependentRequired/{key}: must be a list of strings")
            if key in kept:
                for need in needs:
                    if need not in kept:
                        kept.append(need)
                    if need not in required:
                        required.append(need)
                        changed = True
    low = w.count(node, "minProperties", path, 0)
    high = w.count(node, "maxProperties", path)
    optional = [n for n in kept if n not in required]
    while len(required) < low and optional:
        required.append(optional.pop(0))
    if len(required) < low or (high is not None and len(required) > high):
        raise Empty
    if high is not None:
        optional = optional[:high - len(required)]
        optional = [n for n in optional if n not in depends]  # a dependency could push past maxProperties
    if w.limits.compact:
        optional = []
    written = []  # (name, its key and value, whether required)
    for name in required + optional:
        try:
            value = w.write(_value_schema(node, name, path), f"{path}/properties/{name}")
        except Empty:
            if name in required:
                raise
            continue
        written.append((name, f"{w.syntax.key(name)}{w.ws}:{w.ws}{value}", name in required))
    if w.syntax.sorted_keys:
        written.sort(key=lambda item: item[0])
    return chain(w, [(text, needed) for _, text, needed in written], (r"\{", r"\}"))


def obj(w, node: dict, path: str) -> str:
    if "properties" in node or "required" in node:
        return listed_object(w, node, path)
    low = w.count(node, "minProperties", path, 0)
    high = w.count(node, "maxProperties", path)
    if high is not None and low > high:
        raise Empty
    patterns = node.get("patternProperties") or {}
    if not isinstance(patterns, dict):
        raise SchemaError(f"{path}/patternProperties: must be an object")
    if patterns:
        first = next(iter(patterns))
        key_schema = None if "propertyNames" in node else {"type": "string", "pattern": first}
        try:
            key = w.syntax.string(pattern_body(first, w.limits.max_count, w.limits.length_cap, syntax=w.syntax))
            if "propertyNames" in node:
                key = _named_key(w, node["propertyNames"], first, path)
        except ValueError as err:
            raise SchemaError(f"{path}/patternProperties: unsupported pattern {first!r} ({err})") from None
        # a key matching the first pattern may match others too: its value meets them all
        value_schema = {"allOf": list(patterns.values())}
    else:
        extra = node.get("additionalProperties", True)
        if extra is False:
            value_schema = False
        else:
            value_schema = extra
        names = node.get("propertyNames")
        key, key_schema = w.syntax.free_key, {"type": "string"}
        if isinstance(names, dict) and names:  # a key is a string: the names schema ($ref and all) as a string
            try:
                key_schema = merge(names, {"type": "string"}, path)
                key = w.write(key_schema, f"{path}/propertyNames")
            except Empty:
                names = False
        if names is False:
            value_schema = False
    if low > 1 and key_schema is None:
        raise SchemaError(f"{path}: unsupported 'minProperties' {low} with 'propertyNames' and 'patternProperties'")
    if w.limits.compact and not low:
        return rf"\{{{w.ws}\}}"
    try:
        value = w.write(value_schema, f"{path}/additionalProperties")
    except Empty:
        if low:
            raise
        return rf"\{{{w.ws}\}}"
    cap = None if high is None else min(high, w.limits.items_cap)
    if low > 1:  # free keys may repeat, and a repeated key counts once: keys of distinct lengths instead
        return _distinct_keys(w, key_schema, value, low, low if cap is None else max(low, cap), path)
    return pairs(w, key, value, low, cap)


def _distinct_keys(w, key_schema: dict, value: str, low: int, count: int, path: str) -> str:
    """An object of free keys with at least `low` of them (minProperties above 1): up to `count` keys of distinct
    lengths, the shortest lengths `key_schema` can write, so no two are equal and each counts; the first `low`
    always. Narrower than the schema (one key a length), and exact about the count."""
    items = []
    for length in range(1, w.limits.length_cap + 1):
        if len(items) == count:
            break
        try:
            key = w.write(merge(key_schema, {"minLength": length, "maxLength": length}, path), f"{path}/propertyNames")
        except (Empty, SchemaError):
            continue
        items.append((f"{key}{w.ws}:{w.ws}{value}", len(items) < low))
    if len(items) < low:
        raise SchemaError(f"{path}: unsupported 'minProperties' {low}: fewer keys of distinct lengths can be written "
                          f"(at most {w.limits.length_cap} characters)")
    return chain(w, items, (r"\{", r"\}"))


def _named_key(w, names, first: str, path: str) -> str:
    """The key of an object with both propertyNames and patternProperties: a name as propertyNames writes it, when
    every such name is one the first pattern matches (byte_dfa.texts_within over the JSON texts), so that its value
    meets that pattern's schema; refused otherwise."""
    from ..byte_dfa import texts_within
    if not isinstance(names, dict):
        raise SchemaError(f"{path}/propertyNames: unsupported {names!r} with 'patternProperties'")
    key = w.write(merge(names, {"type": "string"}, path), f"{path}/propertyNames")
    if not texts_within(key, w.syntax.string(pattern_search(first, w.limits.max_count, w.limits.length_cap,
                                                            w.syntax))):
        raise SchemaError(f"{path}: unsupported 'propertyNames' with 'patternProperties' (a name it allows may match "
                          f"no pattern)")
    return key


def array(w, node: dict, path: str) -> str:
    low, high = w.count(node, "minItems", path, 0), w.count(node, "maxItems", path)
    if high is not None and low > high:
        raise Empty
    items = node.get("items", True)
    prefix = node.get("prefixItems")
    rest = items
    if isinstance(items, list):  # draft 4-2019: items as a list is a tuple
        prefix, rest = items, node.get("additionalItems", True)
    cap = None if high is None else max(low, min(high, w.limits.items_cap))
    if prefix:
        if not isinstance(prefix, list):
            raise SchemaError(f"{path}/prefixItems: must be a list")
        if node.get("uniqueItems") is True and (cap is None or cap > 1):
            raise SchemaError(f"{path}: unsupported 'uniqueItems' with a tuple")
        return _tuple(w, prefix, rest, low, cap, path)
    if node.get("uniqueItems") is True and (cap is None or cap > 1):
        return _unique(w, rest, low, cap, path)
    try:
        item = w.write(rest, f"{path}/items")
    except Empty:
        if low:
            raise
        return sequence(w, "", 0, 0)
    return sequence(w, item, low, cap)


def _tuple(w, prefix: list, rest, low: int, cap: int | None, path: str) -> str:
    written = []
    for i, sub in enumerate(prefix[:cap]):
        try:
            written.append(w.write(sub, f"{path}/prefixItems/{i}"))
        except Empty:
            break
    if len(written) < low and len(written) < len(prefix):
        raise Empty
    sep = f"{w.ws},{w.ws}"
    head = sep.join(written)
    more_high = None if cap is None else cap - len(written)
    if len(written) < len(prefix) or more_high == 0 or rest is False:
        if len(written) < low:
            raise Empty
        return rf"\[{w.ws}{head}{w.ws}\]"
    try:
        item = w.write(rest, f"{path}/items")
    except Empty:
        if len(written) < low:
            raise
        return rf"\[{w.ws}{head}{w.ws}\]"
    more_low = max(0, low - len(written))
    more = f"({sep}{item}){{{more_low},{'' if more_high is None else more_high}}}"
    return rf"\[{w.ws}{head}{more}{w.ws}\]" if written else sequence(w, item, low, cap)


def _unique(w, items, low: int, cap: int | None, path: str) -> str:
    """uniqueItems: items from a finite set of literals go in the set's order, each at most once; other items
    are written at most one to an array (any single item is unique)."""
    node, _ = w.resolve(items, path) if isinstance(items, dict) else ({}, [])
    values = None
    if "enum" in node or "const" in node:
        values = node["enum"] if "enum" in node else [node["const"]]
    elif node.get("type") == "boolean" and len(node) == 1:
        values = [False, True]
    if values is None:
        if low > 1:
            raise SchemaError(f"{path}: unsupported 'uniqueItems' with minItems {low} over items that are not "
                              f"a finite set of values")
        return array(w, {"items": items, "minItems": low, "maxItems": 1}, path)
    distinct = list(dict.fromkeys(json.dumps(v, sort_keys=True) for v in values))
    if low > 1 or (cap is not None and cap < len(distinct)):
        raise SchemaError(f"{path}: unsupported 'uniqueItems' with minItems above 1 or maxItems below the "
                          f"number of allowed values")
    written = [w.write({**node, "enum": [json.loads(v)]}, f"{path}/items") for v in distinct]
    if low == 1:
        options = [item + "".join(f"({w.ws},{w.ws}{o})?" for o in written[i + 1:]) for i, item in enumerate(written)]
        return rf"\[{w.ws}(" + "|".join(options) + rf"){w.ws}\]"
    return chain(w, [(item, False) for item in written], (r"\[", r"\]"))
