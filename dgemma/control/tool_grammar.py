"""Constraining a reply to be a Gemma 4 tool call (the format: tools.py).

Constraining (tool_choice "required" or a named function):
1. The function's `parameters` schema is checked by schema.py's walker (the same subset, refs inlined), then
   written as a regex over the Gemma syntax (`arguments_regex`): keys in sorted order, as the template writes
   history, required keys always and optional ones optionally; leaf regexes for numbers and string formats come
   from outlines-core's JSON-schema writer.
2. The markers are special tokens, which a constraint never allows as text. `tool_vocabulary` gives each marker
   token a private-use character as its spelling and takes every token whose bytes hold 0xEE (the lead byte of
   U+E000..U+EFFF, private use only) out of the text, so only the marker token itself can spell a marker.
3. The regex compiles into an ordinary Constraint over that vocabulary; every accepted reply parses with
   `split_tool_calls` into calls whose arguments are valid against their schema.
"""

from __future__ import annotations

import json
import re

from outlines_core.json_schema import build_regex_from_schema

from .constraint import escape_literal
from .schema import SchemaError
from .schema.containers import sequence
from .schema.subset import SubsetWalker
from .tools import CALL_CLOSE, CALL_OPEN, NESTING, QUOTE, SENTINEL
from .vocabulary import ConstraintVocabulary

_SENTINEL_LEAD_BYTE = 0xEE  # of U+E000..U+EFFF, the sentinels' private-use block
_NOT_SENTINEL = "[^\ue000-\uefff]"
_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")  # a key the Gemma syntax writes bare


def gemma_text(value, quote: str = QUOTE) -> str:
    """`value` written in the Gemma argument syntax (keys sorted and bare), strings between `quote` marks."""
    if isinstance(value, str):
        return quote + value + quote
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{gemma_text(v, quote)}" for k, v in sorted(value.items())) + "}"
    if isinstance(value, list):
        return "[" + ",".join(gemma_text(v, quote) for v in value) + "]"
    return json.dumps(value)


def _leaf(node: dict) -> str:
    """outlines' regex for a number/integer node (it has no quotes to strip)."""
    return build_regex_from_schema(json.dumps(node))


class _Writer:
    """A cleaned JSON schema (schema.py's walker output) -> regex over the Gemma syntax, strings in sentinels."""

    q = escape_literal(SENTINEL[QUOTE])
    ws = ""  # the Gemma syntax writes no whitespace (containers.sequence reads it)

    def write(self, node, path: str) -> str:
        if node is True or node == {}:
            return self.any_value(NESTING)
        if "properties" in node:
            return self.properties(node, path)
        for combinator in ("anyOf", "allOf"):
            if combinator in node:
                return "(" + "|".join(self.write(m, f"{path}/{combinator}/{i}")
                                      for i, m in enumerate(node[combinator])) + ")"
        if "prefixItems" in node:
            return r"\[" + ",".join(self.write(m, f"{path}/prefixItems/{i}")
                                    for i, m in enumerate(node["prefixItems"])) + r"\]"
        for literal in ("enum", "const"):
            if literal in node:
                values = node[literal] if literal == "enum" else [node[literal]]
                return "(" + "|".join(escape_literal(gemma_text(v, SENTINEL[QUOTE])) for v in values) + ")"
        kinds = node["type"] if isinstance(node["type"], list) else [node["type"]]
        return "(" + "|".join(self.typed(node, kind, path) for kind in kinds) + ")"

    def typed(self, node: dict, kind: str, path: str) -> str:
        if kind == "null":
            return "null"
        if kind == "boolean":
            return "(true|false)"
        if kind in ("integer", "number"):
            keep = {k: v for k, v in node.items() if k != "type" and k.startswith(("min", "max"))}
            return _leaf({"type": kind, **keep})
        if kind == "string":
            return self.string(node, path)
        if kind == "array":
            item = self.write(node.get("items", {}), f"{path}/items")
            return sequence(self, item, node.get("minItems", 0), node.get("maxItems"))
        if kind == "object":
            if node.get("maxProperties") == 0:  # the walker's form of additionalProperties false
                return r"\{\}"
            extra = sorted(k for k in node if k not in ("type", "additionalProperties")) + \
                (["additionalProperties"] if node.get("additionalProperties", True) is not True else [])
            if extra:
                raise SchemaError(f"{path}: unsupported JSON schema feature '{extra[0]}' in tool arguments "
                                  f"(a free-form object takes none)")
            return self.any_object(NESTING)
        raise SchemaError(f"{path}/type: unknown type {kind!r}")

    def string(self, node: dict, path: str) -> str:
        if "pattern" in node:
            inner = node["pattern"][1:-1]  # the walker anchored it: ^...$
        elif "format" in node:
            inner = build_regex_from_schema(json.dumps({"type": "string", "format": node["format"]}))[1:-1]
        else:
            low, high = node.get("minLength", 0), node.get("maxLength")
            inner = f"{_NOT_SENTINEL}{{{low},{'' if high is None else high}}}"
        return f"{self.q}({inner}){self.q}"

    def properties(self, node: dict, path: str) -> str:
        required = set(node.get("required", []))
        items = []
        for key in sorted(node["properties"]):
            if not _KEY.fullmatch(key):
                raise SchemaError(f"{path}/properties: unsupported argument name {key!r} (the Gemma call syntax "
                                  f"writes keys bare: letters, digits, _ . -)")
            items.append((escape_literal(key) + ":" + self.write(node["properties"][key], f"{path}/properties/{key}"),
                          key in required))
        # after(i): the items from i on, something already written (each one comma-led)
        after = [""] * (len(items) + 1)
        for i in range(len(items) - 1, -1, -1):
            text, needed = items[i]
            after[i] = (f",{text}" if needed else f"(,{text})?") + after[i + 1]
        # first(i): the items from i on, nothing written yet
        first = ""
        for i in range(len(items) - 1, -1, -1):
            text, needed = items[i]
            first = f"{text}{after[i + 1]}" if needed else f"({text}{after[i + 1]}|{first})" if first else \
                f"({text})?"
        return r"\{" + first + r"\}"

    def any_value(self, depth: int) -> str:
        leaf = f"({self.q}{_NOT_SENTINEL}*{self.q}|{_leaf({'type': 'number'})}|true|false|null)"
        if depth == 0:
            return leaf
        return f"({leaf}|{self.any_array(depth)}|{self.any_object(depth)})"

    def any_array(self, depth: int) -> str:
        inner = self.any_value(depth - 1)
        return rf"\[({inner}(,{inner})*)?\]"

    def any_object(self, depth: int) -> str:
        pair = f"[A-Za-z_][A-Za-z0-9_]*:{self.any_value(depth - 1)}"
        return rf"\{{({pair}(,{pair})*)?\}}"


def arguments_regex(parameters: dict | None, path: str = "parameters") -> str:
    """Regex (markers as sentinels) for a function's arguments `{...}` valid against its `parameters` schema."""
    if not parameters:
        return r"\{\}"
    if not isinstance(parameters, dict):
        raise SchemaError(f"{path}: must be a JSON schema object")
    if parameters.get("type", "object") != "object":
        raise SchemaError(f"{path}: a function's parameters must be a schema of type object")
    cleaned = SubsetWalker(parameters).clean(parameters, path, ())
    if "properties" in cleaned:
        return _Writer().properties(cleaned, path)
    return _Writer().typed(cleaned, "object", path)


def call_regex(functions: list[dict], repeat: bool = False) -> str:
    """Regex for one call to any of `functions` ({"name", "parameters"}), or one or more calls when `repeat`."""
    options = []
    for i, f in enumerate(functions):
        args = arguments_regex(f.get("parameters"), f"tools[{i}].function.parameters")
        options.append(f"call:{escape_literal(f['name'])}{args}")
    one = escape_literal(SENTINEL[CALL_OPEN]) + "(" + "|".join(options) + ")" + escape_literal(SENTINEL[CALL_CLOSE])
    return f"({one})+" if repeat else one


def tool_vocabulary(base: ConstraintVocabulary, marker_ids: dict[str, int]) -> ConstraintVocabulary:
    """`base` with each marker token spelling its sentinel and no other token spelling a sentinel's lead byte.
    Built once per base vocabulary (kept in its cache), so compiled tool constraints are cached too."""
    key = ("tool-markers", tuple(sorted(marker_ids.items())))
    cached = base.cache.get(key)
    if cached is not None:
        return cached
    spelled = [None if t is not None and _SENTINEL_LEAD_BYTE in t else t for t in base.token_bytes]
    for marker, token_id in marker_ids.items():
        spelled[token_id] = SENTINEL[marker].encode("utf-8")
    vocabulary = ConstraintVocabulary(tuple(spelled), base.eos_token_ids, base.pad_token_ids)
    base.cache[key] = vocabulary
    return vocabulary
