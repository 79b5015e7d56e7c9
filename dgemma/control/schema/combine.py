"""allOf, and what means allOf: two nodes merged into one (`merge`), if/then/else as the anyOf it means
(`conditional`), dependentSchemas as conditions on a key's presence (`dependent_conditions`)."""

from __future__ import annotations

from .base import VALIDATION, Empty, SchemaError, canonical


def schema_dependencies(node: dict) -> bool:
    deps = node.get("dependencies")
    return "dependentSchemas" in node or (isinstance(deps, dict) and any(not isinstance(v, list) for v in deps.values()))


def dependent_conditions(node: dict, path: str) -> dict:
    """dependentSchemas (and schema-valued dependencies) as what they mean: if the key is present, the schema
    holds; an allOf of if {required: [key]} then schema."""
    schemas = dict(node.get("dependentSchemas") or {})
    listed = {}
    for key, value in (node.get("dependencies") or {}).items():
        (listed if isinstance(value, list) else schemas)[key] = value
    if not isinstance(schemas, dict):
        raise SchemaError(f"{path}/dependentSchemas: must be an object")
    out = {k: v for k, v in node.items() if k not in ("dependentSchemas", "dependencies")}
    if listed:
        out["dependencies"] = listed
    conditions = [{"if": {"required": [key]}, "then": sub} for key, sub in schemas.items()]
    return {**out, "allOf": list(out.get("allOf", [])) + conditions}


def conditional(node: dict, path: str) -> dict:
    """if/then/else as the anyOf it means: (if and then) or (not if, and else); each branch is written in the forms
    the writer can (`not` in negation.py's), and a branch it cannot write is left out like any anyOf member."""
    rest = {k: v for k, v in node.items() if k not in ("if", "then", "else")}
    condition, then, otherwise = node["if"], node.get("then", True), node.get("else", True)
    branches = [{"allOf": [condition, then]}, {"allOf": [{"not": condition}, otherwise]}]
    return merge(rest, {"anyOf": branches}, path)


def merge(a: dict, b: dict, path: str) -> dict:
    """Both schemas at once (allOf), as one node; SchemaError for keywords we cannot combine."""
    out = dict(a)
    for key, value in b.items():
        if key not in VALIDATION:
            out.setdefault(key, value)
            continue
        if key not in out:
            out[key] = value
            continue
        old = out[key]
        if old == value:
            continue
        if key == "properties" and isinstance(old, dict) and isinstance(value, dict):
            out[key] = {**old, **{n: ({"allOf": [old[n], s]} if n in old else s) for n, s in value.items()}}
        elif key == "required" and isinstance(old, list) and isinstance(value, list):
            out[key] = list(dict.fromkeys(old + value))
        elif key == "type":
            mine, theirs = (set(v) if isinstance(v, list) else {v} for v in (old, value))
            # an integer is a number: integer and number meet in integer (and only where each side has one)
            numeric = {"integer", "number"}
            integral = ("integer" in mine and theirs & numeric) or ("integer" in theirs and mine & numeric)
            both = (mine & theirs) | ({"integer"} if integral else set())
            if not both:
                raise Empty
            out[key] = sorted(both)
        elif key == "enum" and isinstance(old, list) and isinstance(value, list):
            out[key] = [v for v in old if v in value]
        elif key in ("minimum", "minLength", "minItems", "minProperties") and not isinstance(value, bool):
            out[key] = max(old, value)
        elif key in ("maximum", "maxLength", "maxItems", "maxProperties") and not isinstance(value, bool):
            out[key] = min(old, value)
        elif key == "allOf" and isinstance(old, list) and isinstance(value, list):
            out[key] = old + value
        elif key in ("anyOf", "oneOf") and isinstance(old, list):
            # A and (x1 or x2 ...) is (A and x1) or (A and x2) ...; for oneOf too: exactly one xi and A holds
            out[key] = [{key: value} if m is True else {"allOf": [m, {key: value}]} for m in old if m is not False]
        elif key in ("items", "additionalProperties", "propertyNames", "additionalItems"):
            out[key] = {"allOf": [old, value]}
        elif key == "uniqueItems":
            out[key] = bool(old or value)
        elif key == "not":  # not A and not B: not (A or B)
            out[key] = {"anyOf": [old, value]}
        elif key == "const":
            if canonical(old) != canonical(value):
                raise Empty
        else:
            raise SchemaError(f"{path}: unsupported combination of two different '{key}' (in allOf or beside $ref)")
    for mine, theirs in ((a, b), (b, a)):  # a property one side lists must meet the other's additionalProperties
        extra = theirs.get("additionalProperties", True)
        if extra is not True and isinstance(mine.get("properties"), dict):
            listed = theirs.get("properties", {}) if isinstance(theirs.get("properties"), dict) else {}
            if theirs.get("patternProperties"):
                raise SchemaError(f"{path}: unsupported combination of 'patternProperties' with properties")
            props = out["properties"]
            for name in mine["properties"]:
                if name not in listed:
                    props[name] = {"allOf": [props[name], extra]}
    return out
