"""A JSON schema node -> the regex of JSON texts valid against it (see the package docstring for what is taken).

`Writer.write` handles one node: $ref and allOf are merged into it, anyOf/oneOf are written member by member,
enum/const become literals, and each allowed type is written by `typed` (objects and arrays in containers.py).
A node that admits nothing we can write raises `Empty`; a caller that can do without it (an optional property,
an anyOf member, the items of an array that may be empty) leaves it out, which is how recursion ends at
`SchemaLimits.max_depth`.
"""

from __future__ import annotations

import collections
import json
import math
import re

from . import containers, exclusion, negation
from .combine import conditional, dependent_conditions, merge, schema_dependencies
from .base import REFUSED, TYPE_KEYWORDS, TYPES, VALIDATION, Empty, RegexTooLongError, SchemaError, SchemaLimits
from .numbers import NUMBER, integer_regex, number_regex
from .strings import FORMATS, format_body, length_range, pattern_body
from .syntax import JSON, JsonSyntax

_DATA = ("enum", "const", "default", "examples", "example")  # keywords whose values are JSON data, not schemas


class Writer:
    def __init__(self, root: dict, limits: SchemaLimits, whitespace: str, syntax: JsonSyntax = JSON):
        self.root, self.limits, self.ws, self.syntax = root, limits, whitespace, syntax
        self.active = collections.Counter()  # $refs being expanded on the current path
        self.nesting = 0
        self.work = 0  # characters written so far, every node counted (SchemaLimits.max_work_chars)
        self.nodes = 0  # nodes written so far (SchemaLimits.max_nodes)
        self._anchors: dict | None = None  # plain-name fragment -> subschema (`anchors`)

    # ---- entry

    def write(self, node, path: str) -> str:
        if node is True or node == {}:
            return self.any_value(self.limits.free_depth)
        if node is False:
            raise Empty
        if not isinstance(node, dict):
            raise SchemaError(f"{path}: a schema must be an object or a boolean, got {json.dumps(node)[:60]}")
        self.nodes += 1
        if self.nodes > self.limits.max_nodes:
            raise RegexTooLongError(f"{path}: writing the schema's regex passes the limit of "
                                    f"{self.limits.max_nodes:,} nodes written in all")
        self.nesting += 1
        if self.nesting > self.limits.max_nesting:
            raise SchemaError(f"{path}: the schema nests deeper than {self.limits.max_nesting} levels")
        try:
            node, used = self.resolve(node, path)
            self.active.update(used)
            try:
                regex = self.node(node, path)
            finally:
                self.active.subtract(used)
            if len(regex) > self.limits.max_regex_chars:  # checked as we go: $ref DAGs grow exponentially
                raise RegexTooLongError(f"{path}: the schema's regex passes the limit of "
                                        f"{self.limits.max_regex_chars:,} characters")
            self.work += len(regex)
            if self.work > self.limits.max_work_chars:
                raise RegexTooLongError(f"{path}: writing the schema's regex passes the limit of "
                                        f"{self.limits.max_work_chars:,} characters written in all")
            return regex
        finally:
            self.nesting -= 1

    def resolve(self, node: dict, path: str) -> tuple[dict, list[str]]:
        """`node` with its $ref and allOf merged in; the refs expanded (each counts toward max_depth)."""
        used = []
        while "$ref" in node or "allOf" in node or "if" in node or schema_dependencies(node):
            if schema_dependencies(node):
                node = dependent_conditions(node, path)
            elif "if" in node and "$ref" not in node and "allOf" not in node:
                node = conditional(node, path)
            elif "$ref" in node:
                ref = node["$ref"]
                if self.active[ref] + used.count(ref) >= self.limits.max_depth:
                    raise Empty
                used.append(ref)
                rest = {k: v for k, v in node.items() if k != "$ref"}
                node = merge(self.target(ref, path), rest, path)
            else:
                members = node["allOf"]
                if not isinstance(members, list) or not members:
                    raise SchemaError(f"{path}/allOf: must be a non-empty list")
                node = {k: v for k, v in node.items() if k != "allOf"}
                for member in members:
                    if member is False:
                        raise Empty
                    if member is not True and not isinstance(member, dict):
                        raise SchemaError(f"{path}/allOf: members must be schemas")
                    if member is not True:
                        member, more = self.resolve(member, path)
                        used.extend(more)
                        node = merge(node, member, path)
            if len(used) > self.limits.max_nesting:
                raise SchemaError(f"{path}: $ref chain longer than {self.limits.max_nesting}")
        return node, used

    def target(self, ref, path: str) -> dict:
        if not isinstance(ref, str) or not ref.startswith("#"):
            raise SchemaError(f"{path}: unsupported $ref {ref!r} (only local references like #/$defs/Name)")
        if ref != "#" and not ref.startswith("#/"):  # a plain name: `$anchor`, or `$id`/draft 4's `id` "#name"
            target = self.anchors().get(ref[1:])
            if target is None:
                raise SchemaError(f"{path}: $ref {ref!r} points nowhere")
        else:
            target = self.root
            for part in ref[1:].split("/"):
                if part:
                    part = part.replace("~1", "/").replace("~0", "~")
                    if isinstance(target, list) and part.isdigit() and int(part) < len(target):
                        target = target[int(part)]
                    elif isinstance(target, dict) and part in target:
                        target = target[part]
                    else:
                        raise SchemaError(f"{path}: $ref {ref!r} points nowhere")
        if target is True:
            return {}
        if target is False:
            raise Empty
        if not isinstance(target, dict):
            raise SchemaError(f"{path}: $ref {ref!r} is not a schema")
        return target

    def anchors(self) -> dict:
        """Plain-name fragments -> the subschemas that declare them (`"$anchor": "name"`, `"$id": "#name"`, draft
        4's `"id": "#name"`), found once over the whole schema (iteratively: it may nest deeply)."""
        if self._anchors is None:
            self._anchors, stack = {}, [self.root]
            while stack:
                node = stack.pop()
                if isinstance(node, dict):
                    for key in ("$anchor", "$id", "id"):
                        name = node.get(key)
                        if isinstance(name, str) and (key == "$anchor" or name.startswith("#")):
                            self._anchors.setdefault(name.removeprefix("#") if key != "$anchor" else name, node)
                    stack.extend(v for k, v in node.items() if k not in _DATA)
                elif isinstance(node, list):
                    stack.extend(node)
        return self._anchors

    # ---- one node

    def node(self, node: dict, path: str) -> str:
        if "not" in node:  # written again: the narrowed node may bring an allOf to merge
            return self.write(negation.without_not(self, node, path), path)
        refused = [k for k in REFUSED if k in node]
        if refused:
            raise SchemaError(f"{path}: unsupported JSON schema feature '{refused[0]}'")
        for combinator in ("anyOf", "oneOf"):
            if combinator in node:
                return self.union(node, combinator, path)
        if "enum" in node or "const" in node:
            return self.literals(node, path)
        alternatives = [self.typed(node, kind, path) for kind in self.types(node, path)]
        alternatives = [a for a in alternatives if a is not None]
        if not alternatives:
            raise Empty
        return alternatives[0] if len(alternatives) == 1 else "(" + "|".join(alternatives) + ")"

    def types(self, node: dict, path: str) -> list[str]:
        kinds = node.get("type")
        if kinds is None:  # no type: the types whose keywords appear (narrower than any type, so still valid)
            kinds = [k for k, words in TYPE_KEYWORDS.items() if words & set(node)]
            return kinds or list(TYPES)
        kinds = kinds if isinstance(kinds, list) else [kinds]
        if not kinds or not all(isinstance(k, str) for k in kinds):
            raise SchemaError(f"{path}/type: must be a type name or a non-empty list of them")
        unknown = [k for k in kinds if k not in TYPES]
        if unknown:
            raise SchemaError(f"{path}/type: unknown type {unknown[0]!r}")
        if "integer" in kinds and "number" in kinds:
            kinds = [k for k in kinds if k != "integer"]
        return list(dict.fromkeys(kinds))

    def typed(self, node: dict, kind: str, path: str) -> str | None:
        if kind == "null":
            return "null"
        if kind == "boolean":
            return "(true|false)"
        if kind in ("integer", "number"):
            regex = (integer_regex if kind == "integer" else number_regex)(node, lambda m: SchemaError(f"{path}: {m}"))
            return regex
        if kind == "string":
            return self.string(node, path)
        if kind == "array":
            return containers.array(self, node, path)
        return containers.obj(self, node, path)

    def count(self, node: dict, key: str, path: str, default=None):
        value = node.get(key, default)
        if value is default:
            return value
        if isinstance(value, float) and value == int(value):
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise SchemaError(f"{path}/{key}: must be a non-negative integer")
        if key.startswith("min") and value > self.limits.max_count:
            raise SchemaError(f"{path}: unsupported '{key}' {value}, more than the limit of {self.limits.max_count}")
        return value

    def string(self, node: dict, path: str) -> str | None:
        low, high = self.count(node, "minLength", path, 0), self.count(node, "maxLength", path)
        if high is not None and low > high:
            return None
        fmt = node.get("format")
        body = None
        if fmt in FORMATS:
            try:
                body = format_body(fmt, low, high, node.get("pattern"), self.limits.max_count, self.limits.length_cap,
                                   self.syntax)
            except ValueError as err:
                keywords = "'format' and 'pattern'" if "pattern" in node else f"format '{fmt}' with minLength/maxLength"
                raise SchemaError(f"{path}: unsupported combination of {keywords} ({err})") from None
        elif "pattern" in node:
            cap = None if high is None else min(high, max(low, self.limits.length_cap))
            try:
                body = pattern_body(node["pattern"], self.limits.max_count, self.limits.length_cap, low, cap,
                                    self.syntax)
            except ValueError as err:
                raise SchemaError(f"{path}/pattern: unsupported pattern ({err})") from None
        if body is None:
            cap = None if high is None else min(high, max(low, self.limits.length_cap))
            body = length_range(low, cap, self.syntax)
        return self.syntax.string(body)

    # ---- combinators and literals

    def union(self, node: dict, combinator: str, path: str) -> str:
        """anyOf: every member we can write (a member left out only narrows it). oneOf: the same, when no value
        written for one member can match another (see exclusion.narrowed), so exactly one matches."""
        members = node[combinator]
        if not isinstance(members, list) or not members:
            raise SchemaError(f"{path}/{combinator}: must be a non-empty list")
        rest = {k: v for k, v in node.items() if k != combinator}
        if not all(isinstance(m, (dict, bool)) for m in members):
            raise SchemaError(f"{path}/{combinator}: members must be schemas")
        raw, merged = [], []
        for m in (m for m in members if m is not False):
            try:  # a member its siblings leave no value to (type string beside type number) matches nothing
                merged.append(merge(rest, {} if m is True else m, path))
                raw.append({} if m is True else m)
            except Empty:
                continue
        if combinator == "anyOf":
            merged = prefer_number(merged)
        resolved = [self.resolve(m, path)[0] for m in merged] if combinator == "oneOf" else []
        if combinator == "oneOf":
            merged = [exclusion.narrowed(self, m, self.as_written(a, path), resolved[:i] + resolved[i + 1:],
                                         raw[:i] + raw[i + 1:]) for i, (m, a) in enumerate(zip(merged, resolved))]
        written, errors = [], []
        for i, member in enumerate(merged):
            if written and self.limits.compact:
                break
            try:
                written.append(self.write(member, f"{path}/{combinator}/{i}"))
            except Empty:
                pass
            except SchemaError as err:
                errors.append(err)
        if not written:
            if errors and combinator == "oneOf":
                other = next((j for j in range(1, len(resolved)) if not exclusion.excludes(self, resolved[0],
                                                                                           resolved[j])), None)
                if other is not None:
                    raise SchemaError(f"{path}: unsupported JSON schema feature 'oneOf' whose members may overlap "
                                      f"({path}/oneOf/0 and /{other}) and cannot be written apart ({errors[0]})")
            if errors:
                raise errors[0]
            raise Empty
        return "(" + "|".join(written) + ")"

    def as_written(self, node: dict, path: str) -> dict:
        """A resolved node with its `not` applied, as `node()` writes it (for comparing what is written); the node
        itself where the `not` cannot be applied here (writing it will say why)."""
        try:
            return negation.without_not(self, node, path) if "not" in node else node
        except (Empty, SchemaError):
            return node

    def literals(self, node: dict, path: str) -> str:
        values = node["enum"] if "enum" in node else [node["const"]]
        if "enum" in node and "const" in node:
            values = [v for v in values if v == node["const"]]
        if not isinstance(values, list):
            raise SchemaError(f"{path}/enum: must be a list")
        if not values:  # an empty enum (the specification allows it) takes no value, like a false schema
            raise Empty
        rest = {k: v for k, v in node.items() if k not in ("enum", "const") and k in VALIDATION}
        check = re.compile(self.node(rest, path)) if rest else None
        kept = [self.syntax.literal(v) for v in values
                if self.syntax.writable(v) and (check is None or check.fullmatch(self.syntax.text(v)))]
        if not kept:
            raise Empty
        return "(" + "|".join(dict.fromkeys(kept)) + ")"

    # ---- values with no schema

    def any_value(self, depth: int) -> str:
        leaf = f"(null|true|false|{NUMBER}|{self.syntax.string(self.syntax.char + '*')})"
        if depth <= 0:
            return leaf
        return f"({leaf}|{self.any_array(depth)}|{self.any_object(depth)})"

    def any_array(self, depth: int) -> str:
        return containers.sequence(self, self.any_value(depth - 1), 0, None)

    def any_object(self, depth: int) -> str:
        return containers.pairs(self, self.syntax.free_key, self.any_value(depth - 1), 0, None)


DECIMAL_CAP = 10**15  # the magnitude a Decimal is written within, on the sides the schema leaves open


def prefer_number(members: list) -> list:
    """anyOf members, less a free string (`{"type": "string"}` and nothing else to check) beside a number member.
    That pair is how pydantic writes `Decimal` (validation mode): the field's bounds go on the number member only and
    the string member has no pattern, yet pydantic reads a string as a decimal and checks it against the bounds, so
    most strings the schema allows are values pydantic refuses. Writing the number alone is still valid (anyOf may
    write fewer members). pydantic reads a JSON number for a Decimal as a float and refuses one that overflows to
    infinity (1e999), so the number is written within +-DECIMAL_CAP where the schema sets no bound: without an
    exponent and with at most 16 integer digits."""
    free_string = [m for m in members if m.get("type") == "string" and not (set(m) & VALIDATION) - {"type"}]
    if not free_string or not any(m.get("type") == "number" for m in members):
        return members
    return [_capped(m) if m.get("type") == "number" else m for m in members if not any(m is f for f in free_string)]


def _capped(number: dict) -> dict:
    """A number member with +-DECIMAL_CAP (or beyond the bound it has) on the sides it leaves open."""
    def bound(*keys):
        values = [number[k] for k in keys if isinstance(number.get(k), (int, float)) and
                  not isinstance(number.get(k), bool) and math.isfinite(number[k])]
        return values[0] if values else None

    low, high = bound("minimum", "exclusiveMinimum"), bound("maximum", "exclusiveMaximum")
    capped = dict(number)
    if high is None:
        capped["maximum"] = DECIMAL_CAP + max(0, math.ceil(low)) if low is not None else DECIMAL_CAP
    if low is None:
        capped["minimum"] = -DECIMAL_CAP + min(0, math.floor(high)) if high is not None else -DECIMAL_CAP
    return capped
