"""JSON schema -> regular expression, for the subset whose every match is valid against the schema.

outlines-core writes the regex (`build_regex_from_schema`), but it reads a schema loosely: it dispatches on the
first keyword it knows and silently drops the rest (`minimum`, `required` without `properties`, a second
`allOf` member), and some of its string formats admit text that is not valid JSON. So we walk the schema
first and accept only what it enforces, naming the first keyword it would drop:

- any value: `{}`; `type` (a name or a list of names): null, boolean, integer, number, string, array, object;
- string: `minLength`/`maxLength`, or a `pattern` (fully matched; only characters JSON needs no escape for),
  or a `format` of date-time, date or uuid;
- array: `items`, `minItems`, `maxItems`, or `prefixItems` (exactly that many items);
- object: `properties` + `required` (keys emitted in the schema's order; no other keys), or free-form with
  `additionalProperties`, `minProperties`, `maxProperties`;
- `enum`, `const`, `anyOf`, `allOf` with one member, `oneOf` whose members exclude each other by a tag (each
  requires one property with a const of its own: a discriminated union), local non-recursive `$ref` (`#/$defs/...`).
Annotations (`title`, `description`, `default`, `examples`, ...) are dropped before outlines sees the schema.
"""

from __future__ import annotations

import json
import re

try:
    import re._parser as _sre_parse  # Python >= 3.11
    from re._constants import (ANY, BRANCH, CATEGORY, CATEGORY_DIGIT, CATEGORY_WORD, IN, LITERAL, MAX_REPEAT,
                               MIN_REPEAT, NEGATE, RANGE, SUBPATTERN)
except ImportError:  # Python 3.10
    import sre_parse as _sre_parse
    from sre_constants import (ANY, BRANCH, CATEGORY, CATEGORY_DIGIT, CATEGORY_WORD, IN, LITERAL, MAX_REPEAT,
                               MIN_REPEAT, NEGATE, RANGE, SUBPATTERN)

from outlines_core.json_schema import build_regex_from_schema

ANNOTATIONS = frozenset({"title", "description", "default", "examples", "$comment", "$schema", "deprecated",
                         "readOnly", "writeOnly"})
_DEFINITIONS = ("$defs", "definitions")
_KEYWORDS_BY_TYPE = {
    "null": set(),
    "boolean": set(),
    "integer": {"minDigits", "maxDigits"},  # outlines' own digit-count keywords
    "number": {"minDigitsInteger", "maxDigitsInteger", "minDigitsFraction", "maxDigitsFraction",
               "minDigitsExponent", "maxDigitsExponent"},
    "string": {"minLength", "maxLength", "pattern", "format"},
    "array": {"items", "minItems", "maxItems"},
    "object": {"additionalProperties", "minProperties", "maxProperties"},
}
SAFE_FORMATS = ("date-time", "date", "uuid")  # outlines' time, uri and email regexes admit invalid JSON
_REGEX_META = set("\\.+*?()|[]{}^$")


from .base import SchemaError  # noqa: E402  (one error class for both writers)


def schema_to_regex(schema: dict, whitespace_pattern: str | None = None) -> str:
    """The regex for `schema` (a JSON schema as a dict); SchemaError if it is invalid or unsupported."""
    if not isinstance(schema, dict):
        raise SchemaError(f"a JSON schema must be an object, got {type(schema).__name__}")
    cleaned = SubsetWalker(schema).clean(schema, "#", ())
    try:
        return build_regex_from_schema(json.dumps(cleaned), whitespace_pattern)
    except BaseException as err:  # pyo3 panics are BaseException
        if isinstance(err, (KeyboardInterrupt, SystemExit)):
            raise
        raise SchemaError(f"invalid JSON schema ({' '.join(str(err).split())[:200]})") from None


def _union_tag(members: list[dict]) -> str | None:
    """The property every member (a cleaned object schema) requires with a single constant value, a different one
    in each member; None if there is none."""
    def constants(member: dict) -> dict[str, str]:
        props, required = member.get("properties"), member.get("required", [])
        if not isinstance(props, dict):
            return {}
        out = {}
        for name in required:
            sub = props.get(name, {})
            if "const" in sub:
                out[name] = json.dumps(sub["const"], sort_keys=True)
            elif isinstance(sub.get("enum"), list) and len(sub["enum"]) == 1:
                out[name] = json.dumps(sub["enum"][0], sort_keys=True)
        return out

    tagged = [constants(m) for m in members]
    for name in sorted(set.intersection(*(set(t) for t in tagged))):
        values = [t[name] for t in tagged]
        if len(set(values)) == len(values):
            return name
    return None


def _json_plain(text: str) -> bool:
    """True when `text` needs no escaping inside a JSON string."""
    return json.dumps(text, ensure_ascii=False)[1:-1] == text


class SubsetWalker:
    def __init__(self, root: dict):
        self.root = root

    def clean(self, node, path: str, refs: tuple) -> dict:
        """`node` without annotations, after checking that outlines enforces every keyword left."""
        if node is True:
            return {}
        if not isinstance(node, dict):
            raise SchemaError(f"{path}: a schema must be an object or true, got {json.dumps(node)[:60]}")
        # $ref targets are inlined (see _ref), so definitions and ids are not needed past this point
        out = {k: v for k, v in node.items() if k not in ANNOTATIONS and k not in _DEFINITIONS and k != "$id"}
        keys = set(out)
        if not keys:
            return out
        if "properties" in keys:
            return self._properties(out, keys, path, refs)
        for combinator in ("allOf", "anyOf"):
            if combinator in keys:
                return self._combinator(out, keys, combinator, path, refs)
        if "oneOf" in keys:
            return self._one_of(out, keys, path, refs)
        if "prefixItems" in keys:
            self._only(keys, {"prefixItems", "type", "items"}, path)
            self._type_is(out, "array", path)
            items = out["prefixItems"]
            if not isinstance(items, list) or not items:
                raise SchemaError(f"{path}/prefixItems: must be a non-empty list")
            out["prefixItems"] = [self.clean(s, f"{path}/prefixItems/{i}", refs) for i, s in enumerate(items)]
            return out
        for literal in ("enum", "const"):
            if literal in keys:
                return self._literal(out, keys, literal, path)
        if "$ref" in keys:
            return self._ref(out, keys, path, refs)
        if "type" in keys:
            return self._typed(out, keys, path, refs)
        raise SchemaError(f"{path}: unsupported JSON schema feature '{sorted(keys)[0]}'")

    def _only(self, keys: set, allowed: set, path: str) -> None:
        extra = sorted(keys - allowed)
        if extra:
            raise SchemaError(f"{path}: unsupported JSON schema feature '{extra[0]}' here")

    def _type_is(self, node: dict, name: str, path: str) -> None:
        if "type" in node and node["type"] != name:
            raise SchemaError(f"{path}: type {json.dumps(node['type'])} conflicts with the keywords of a {name}")

    def _properties(self, node: dict, keys: set, path: str, refs: tuple) -> dict:
        self._only(keys, {"properties", "required", "type", "additionalProperties"}, path)
        self._type_is(node, "object", path)
        properties = node["properties"]
        if not isinstance(properties, dict):
            raise SchemaError(f"{path}/properties: must be an object")
        required = node.get("required", [])
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            raise SchemaError(f"{path}/required: must be a list of strings")
        missing = [r for r in required if r not in properties]
        if missing:
            raise SchemaError(f"{path}: required property {missing[0]!r} is not in properties")
        cleaned = {}
        for name, sub in properties.items():
            if not _json_plain(name):
                raise SchemaError(f"{path}/properties: unsupported property name {name!r} (needs JSON escaping)")
            cleaned[name] = self.clean(sub, f"{path}/properties/{name}", refs)
        node["properties"] = cleaned
        node.pop("additionalProperties", None)  # only the listed keys are emitted, which any value allows
        return node

    def _combinator(self, node: dict, keys: set, combinator: str, path: str, refs: tuple) -> dict:
        self._only(keys, {combinator}, path)
        members = node[combinator]
        if not isinstance(members, list) or not members:
            raise SchemaError(f"{path}/{combinator}: must be a non-empty list")
        if combinator == "allOf" and len(members) > 1:
            raise SchemaError(f"{path}: unsupported JSON schema feature 'allOf' with more than one schema")
        node[combinator] = [self.clean(s, f"{path}/{combinator}/{i}", refs) for i, s in enumerate(members)]
        return node

    def _one_of(self, node: dict, keys: set, path: str, refs: tuple) -> dict:
        """oneOf as anyOf (which outlines enforces) when no value can match two members: a tagged union, every
        member an object that requires one property with a constant of its own (as pydantic writes a discriminated
        union, with an OpenAPI `discriminator` naming that property). Any other oneOf is refused, since anyOf would
        also admit a value that matches two members."""
        self._only(keys, {"oneOf", "discriminator"}, path)
        members = node["oneOf"]
        if not isinstance(members, list) or not members:
            raise SchemaError(f"{path}/oneOf: must be a non-empty list")
        cleaned = [self.clean(s, f"{path}/oneOf/{i}", refs) for i, s in enumerate(members)]
        if len(cleaned) > 1 and _union_tag(cleaned) is None:
            raise SchemaError(f"{path}: unsupported JSON schema feature 'oneOf' whose members may overlap (anyOf is "
                              f"supported, and oneOf when every member is an object requiring one property with a "
                              f"const of its own)")
        return {"anyOf": cleaned}

    def _literal(self, node: dict, keys: set, literal: str, path: str) -> dict:
        self._only(keys, {literal, "type"}, path)
        values = node[literal] if literal == "enum" else [node[literal]]
        if literal == "enum" and (not isinstance(values, list) or not values):
            raise SchemaError(f"{path}/enum: must be a non-empty list")
        for value in values:
            _check_literal(value, f"{path}/{literal}")
        node.pop("type", None)
        return node

    def _ref(self, node: dict, keys: set, path: str, refs: tuple) -> dict:
        self._only(keys, {"$ref"}, path)
        ref = node["$ref"]
        if not isinstance(ref, str) or not ref.startswith("#"):
            raise SchemaError(f"{path}: unsupported $ref {ref!r} (only local references like #/$defs/Name)")
        if ref in refs:
            raise SchemaError(f"{path}: unsupported recursive $ref {ref!r}")
        target = self.root
        for part in ref[1:].split("/"):
            if not part:
                continue
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(target, dict) or part not in target:
                raise SchemaError(f"{path}: $ref {ref!r} points nowhere")
            target = target[part]
        if target is self.root:
            raise SchemaError(f"{path}: unsupported recursive $ref {ref!r}")
        # inline the target: outlines would resolve it against the uncleaned schema
        return self.clean(target, ref, refs + (ref,))

    def _typed(self, node: dict, keys: set, path: str, refs: tuple) -> dict:
        names = node["type"] if isinstance(node["type"], list) else [node["type"]]
        if not names or not all(isinstance(n, str) for n in names):
            raise SchemaError(f"{path}/type: must be a type name or a non-empty list of them")
        unknown = [n for n in names if n not in _KEYWORDS_BY_TYPE]
        if unknown:
            raise SchemaError(f"{path}/type: unknown type {unknown[0]!r}")
        self._only(keys, {"type"}.union(*(_KEYWORDS_BY_TYPE[n] for n in names)), path)
        if "string" in names:
            _check_string(node, path)
        for key in ("minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties"):
            if key in node and not (isinstance(node[key], int) and not isinstance(node[key], bool) and node[key] >= 0):
                raise SchemaError(f"{path}/{key}: must be a non-negative integer")
        for low, high in (("minLength", "maxLength"), ("minItems", "maxItems"), ("minProperties", "maxProperties")):
            if node.get(low, 0) > node.get(high, float("inf")):
                raise SchemaError(f"{path}: {low} {node[low]} is more than {high} {node[high]}")
        if "items" in node:
            node["items"] = self.clean(node["items"], f"{path}/items", refs)
        if "additionalProperties" in node:
            extra = node["additionalProperties"]
            if extra is False:  # no keys at all
                del node["additionalProperties"]
                node["maxProperties"] = 0
            elif extra is not True:
                node["additionalProperties"] = self.clean(extra, f"{path}/additionalProperties", refs)
        return node


def _check_literal(value, path: str) -> None:
    """outlines writes object keys of enum/const values into the regex unescaped."""
    if isinstance(value, dict):
        for key, sub in value.items():
            if not _json_plain(key) or _REGEX_META & set(key):
                raise SchemaError(f"{path}: unsupported object key {key!r} in a literal")
            _check_literal(sub, path)
    elif isinstance(value, list):
        for sub in value:
            _check_literal(sub, path)


def _check_string(node: dict, path: str) -> None:
    kinds = [k for k in ("pattern", "format") if k in node]
    if "minLength" in node or "maxLength" in node:
        kinds.insert(0, "minLength/maxLength")
    if len(kinds) > 1:
        raise SchemaError(f"{path}: unsupported combination of string keywords {' and '.join(kinds)}")
    if "format" in node and node["format"] not in SAFE_FORMATS:
        raise SchemaError(f"{path}: unsupported string format {node['format']!r} (supported: "
                          f"{', '.join(SAFE_FORMATS)})")
    if "pattern" in node:
        pattern = node["pattern"]
        if not isinstance(pattern, str):
            raise SchemaError(f"{path}/pattern: must be a string")
        # JSON schema patterns search; a full match is stricter, so dropping the anchors stays valid
        inner = pattern[1:] if pattern.startswith("^") else pattern
        inner = inner[:-1] if inner.endswith("$") and not inner.endswith("\\$") else inner
        _check_pattern_json_safe(inner, path)
        node["pattern"] = f"^{inner}$"


def _check_pattern_json_safe(pattern: str, path: str) -> None:
    """Reject a pattern that could match a character JSON must escape (quote, backslash, controls)."""
    try:
        parsed = _sre_parse.parse(pattern)
    except re.error as err:
        raise SchemaError(f"{path}/pattern: invalid regular expression ({err})") from None

    def unsafe(code: int) -> bool:
        return code in (0x22, 0x5C) or code < 0x20 or 0x7F <= code <= 0x9F

    def walk(items) -> None:
        for op, arg in items:
            if op == LITERAL:
                if unsafe(arg):
                    raise SchemaError(f"{path}/pattern: matches {chr(arg)!r}, which JSON strings must escape")
            elif op == IN:
                for in_op, in_arg in arg:
                    if in_op == NEGATE:
                        raise SchemaError(f"{path}/pattern: unsupported negated class (it may match characters "
                                          f"JSON strings must escape)")
                    if in_op == LITERAL and unsafe(in_arg):
                        raise SchemaError(f"{path}/pattern: matches {chr(in_arg)!r}, which JSON strings must escape")
                    if in_op == RANGE and any(unsafe(c) for c in (*range(in_arg[0], min(in_arg[1], 0xA0) + 1),)):
                        raise SchemaError(f"{path}/pattern: range {chr(in_arg[0])!r}-{chr(in_arg[1])!r} includes "
                                          f"characters JSON strings must escape")
                    if in_op == CATEGORY and in_arg not in (CATEGORY_DIGIT, CATEGORY_WORD):
                        raise SchemaError(f"{path}/pattern: unsupported character class {str(in_arg).lower()}")
            elif op == ANY:
                raise SchemaError(f"{path}/pattern: unsupported '.' (it may match characters JSON strings must "
                                  f"escape)")
            elif op in (MAX_REPEAT, MIN_REPEAT):
                walk(arg[2])
            elif op == SUBPATTERN:
                walk(arg[-1])
            elif op == BRANCH:
                for branch in arg[1]:
                    walk(branch)
            else:
                raise SchemaError(f"{path}/pattern: unsupported regex construct {str(op).lower()}")

    walk(parsed)
