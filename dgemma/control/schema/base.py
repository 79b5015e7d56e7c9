"""What the schema writer's modules share: the keyword lists, the errors, the limits, JSON values compared."""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

from ...errors import DgemmaError

# validation keywords of drafts 4 to 2020-12: each is enforced or refused; every other keyword is an annotation
VALIDATION = frozenset({
    "type", "enum", "const", "multipleOf", "maximum", "exclusiveMaximum", "minimum", "exclusiveMinimum",
    "maxLength", "minLength", "pattern", "format", "items", "prefixItems", "additionalItems", "contains",
    "minContains", "maxContains", "maxItems", "minItems", "uniqueItems", "unevaluatedItems", "properties",
    "patternProperties", "additionalProperties", "unevaluatedProperties", "propertyNames", "required",
    "dependentRequired", "dependentSchemas", "dependencies", "maxProperties", "minProperties", "allOf", "anyOf",
    "oneOf", "not", "if", "then", "else", "$ref", "$dynamicRef", "$recursiveRef"})
REFUSED = ("contains", "minContains", "maxContains", "unevaluatedItems", "unevaluatedProperties", "not",
           "$dynamicRef", "$recursiveRef")  # then/else without if have no effect
TYPE_KEYWORDS = {
    "object": {"properties", "required", "additionalProperties", "patternProperties", "propertyNames",
               "minProperties", "maxProperties", "dependentRequired", "dependencies"},
    "array": {"items", "prefixItems", "additionalItems", "minItems", "maxItems", "uniqueItems"},
    "string": {"minLength", "maxLength", "pattern", "format"},
    "number": {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"},
}
TYPES = ("null", "boolean", "object", "array", "string", "number", "integer")


def json_types(value) -> set[str]:
    """The JSON Schema types a JSON value has (an integral number is both integer and number)."""
    if value is None:
        return {"null"}
    if isinstance(value, bool):
        return {"boolean"}
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
        return {"integer", "number"}
    if isinstance(value, float):
        return {"number"}
    return {"string" if isinstance(value, str) else "array" if isinstance(value, list) else "object"}


class SchemaError(DgemmaError, ValueError):
    """The schema is invalid or uses something we cannot enforce; the message names it and where."""


class RegexTooLongError(SchemaError):
    """The schema's regex would pass SchemaLimits.max_regex_chars."""


class Empty(Exception):
    """No value of this node can be written (false, an empty range, recursion past its bound)."""


@dataclass(frozen=True)
class SchemaLimits:
    """Bounds on writing a schema's regex. The compile limits (constraint.py) bound the rest.

    max_depth: how many times one $ref may be expanded inside itself (a recursive model nests this deep; past
        it, an optional property, an anyOf member or the items of an array that may be empty are left out).
    max_nesting: nested schemas on one path (a longer $ref chain or nesting is refused).
    max_count: the largest minLength/minItems/minProperties or pattern repetition we write; larger is refused.
    length_cap / items_cap: a maxLength / maxItems above these is written as the cap (shorter is still valid).
    free_depth: how deep a value with no schema ({} or additionalProperties true) may nest.
    max_regex_chars: the longest regex we hand to the compiler.
    max_work_chars: the characters written in all, each node's regex counted once per time it is written (a
        $ref graph inlined many times, or explored and then left out, costs this much before any regex passes
        max_regex_chars); past it the schema is treated as too long (the compact form is tried).
    max_nodes: the schema nodes written in all (a node left out counts too: unions whose members end in Empty can be
        explored exponentially often while writing almost nothing); past it, the same.
    compact: write objects with their required keys only (and free-key objects empty where they may be) and an
        anyOf / oneOf as its first member that can be written: a narrower form, still valid, that schema_to_regex
        tries when the full one passes max_regex_chars.
    """

    max_depth: int = 3
    max_nesting: int = 64
    max_count: int = 1024
    length_cap: int = 64
    items_cap: int = 16
    free_depth: int = 1
    max_regex_chars: int = 500_000
    max_work_chars: int = 32_000_000
    max_nodes: int = 20_000
    compact: bool = False


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
