"""JSON schema -> a regular expression whose every match is valid against the schema.

We write the regex ourselves (writer.py, containers.py, numbers.py, strings.py), following the specification:
keywords that are not validation keywords (title, description, examples, id, x-*, readonly, links, discriminator,
nullable, ...) are annotations and are ignored; every validation keyword is enforced by construction, or the
schema is refused with a SchemaError that names it. What is enforced:
- types (a list or none: with no `type`, the types whose keywords appear); `enum`, `const` (filtered by their
  sibling keywords); `anyOf`; `allOf` and `$ref` beside other keywords (merged); `oneOf`: each member narrowed
  until no value written for it validates against another (exclusion.py: different types, disjoint enums,
  lengths or ranges, a tag, a key another member requires left out, a key it forbids required), the members
  that cannot be left out;
- integers in any range, exactly, and an integer `multipleOf` (up to 1,000 multiples; on an open side the 1,000
  next to the other bound, or around 0);
  bounded `number`s without an exponent;
- strings: `minLength`/`maxLength`, an ECMA-262 `pattern` (fully matched; no lookaround or backreference; with
  minLength/maxLength, its repetitions raised and cut until every string written has an allowed length), every
  format a validator checks, as a narrow valid form (strings.FORMATS: date, time, date-time as real calendar
  values, uuid, email, hostname, ipv4, ipv6, uri, duration, uri-reference, iri, json-pointer, regex, ...);
- arrays: `items`, `prefixItems`/tuple `items`, `additionalItems`, `minItems`/`maxItems`, `uniqueItems` (items
  from a finite set of values in that set's order; other items at most one per array);
- objects: `properties`, `required` (required keys first), optional keys in any combination, additionalProperties,
  patternProperties, propertyNames, min/maxProperties, dependentRequired and array-form dependencies (a key
  written brings what it depends on);
- recursion through `$ref` up to `SchemaLimits.max_depth` expansions of one reference.
`not` in the forms negation.py lists (not {}, a type, required keys, enum values) narrows the node.
Refused: other forms of not, if/then/else, contains, dependentSchemas, unevaluated*, $dynamicRef, remote $refs, a
multipleOf neither whole nor 1/k (0.01 or 0.5 write whole numbers), a format beside a pattern that no narrow form
of the format meets (strings.format_body), minima above `SchemaLimits.max_count`, and any combination we cannot
write exactly. A schema whose regex would pass `SchemaLimits.max_regex_chars` is written in a compact form
(required keys only, free objects empty, a union's first member), refused only when that is still too long. Where
we write less than the schema allows (a maxLength above `length_cap`, maxItems above `items_cap`, one optional item
of a uniqueItems array, only the number of an anyOf of a number and a free string, as pydantic writes `Decimal`),
every output is still valid.
"""

from __future__ import annotations

import dataclasses

from .base import RegexTooLongError, SchemaError, SchemaLimits
from .syntax import JSON, JsonSyntax
from .writer import Empty, Writer

__all__ = ["SchemaError", "SchemaLimits", "schema_to_regex"]


def schema_to_regex(schema, whitespace_pattern: str | None = None, limits: SchemaLimits = SchemaLimits(),
                    syntax: JsonSyntax = JSON, path: str = "#") -> str:
    """The regex for `schema` (a JSON schema as a dict); SchemaError if it is invalid or unsupported. When the
    regex would pass `limits.max_regex_chars`, the compact form is written instead (SchemaLimits.compact).
    whitespace_pattern: what may stand between tokens (None: one optional space; "": none). syntax: how values are
    spelled (syntax.py; JSON text by default). path: the schema's name in errors."""
    if not isinstance(schema, (dict, bool)):
        raise SchemaError(f"a JSON schema must be an object, got {type(schema).__name__}")
    try:
        regex = _write(schema, whitespace_pattern, limits, syntax, path)
    except RegexTooLongError:
        if limits.compact:
            raise
        regex = _write(schema, whitespace_pattern, dataclasses.replace(limits, compact=True), syntax, path)
    return regex


def _write(schema, whitespace_pattern: str | None, limits: SchemaLimits, syntax: JsonSyntax, path: str) -> str:
    whitespace = "[ ]?" if whitespace_pattern is None else f"({whitespace_pattern})" if whitespace_pattern else ""
    writer = Writer(schema if isinstance(schema, dict) else {}, limits, whitespace, syntax)
    try:
        regex = writer.write(schema, path)
    except Empty:
        raise SchemaError(f"{path}: no value satisfies the schema within the limits (a false schema, an empty "
                          f"range, or a recursive $ref that never ends within max_depth={limits.max_depth})"
                          ) from None
    except RecursionError:
        raise SchemaError(f"{path}: the schema nests too deeply") from None
    if len(regex) > limits.max_regex_chars:
        raise RegexTooLongError(f"{path}: the schema's regex passes the limit of {limits.max_regex_chars:,} characters")
    return regex
