"""Constraining a reply to be a Gemma 4 tool call (the format: tools.py).

Constraining (tool_choice "required" or a named function):
1. Each function's `parameters` schema is written by the schema writer (schema/), the same one response_format
   uses, with everything it enforces and refuses, in the Gemma argument syntax (`GemmaSyntax`): keys bare and in
   sorted order, as the template writes history; strings raw between `<|"|>` marks; no whitespace.
2. The markers are special tokens, which a constraint never allows as text. `tool_vocabulary` gives each marker
   token a private-use character as its spelling and takes every token whose bytes hold 0xEE (the lead byte of
   U+E000..U+EFFF, private use only) out of the text, so only the marker token itself can spell a marker.
3. The regex compiles into an ordinary Constraint over that vocabulary, in the compiling child like a JSON
   schema (Constraint.from_tool_call); every accepted reply parses with `split_tool_calls` into calls whose
   arguments are valid against their schema.
"""

from __future__ import annotations

import json
import re

from .schema import SchemaError, SchemaLimits, schema_to_regex
from .schema.syntax import JsonSyntax, escaped, escaped_text
from .tools import CALL_CLOSE, CALL_OPEN, QUOTE, SENTINEL

_SENTINEL_LEAD_BYTE = 0xEE  # of U+E000..U+EFFF, the sentinels' private-use block
_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")  # a key the Gemma syntax writes bare


def gemma_text(value, quote: str = QUOTE) -> str:
    """`value` written in the Gemma argument syntax (keys sorted, bare where they are words), strings between
    `quote` marks."""
    if isinstance(value, str):
        return quote + value + quote
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k if _KEY.fullmatch(k) else quote + k + quote}:{gemma_text(v, quote)}"
                              for k, v in sorted(value.items())) + "}"
    if isinstance(value, list):
        return "[" + ",".join(gemma_text(v, quote) for v in value) + "]"
    return json.dumps(value)


class GemmaSyntax(JsonSyntax):
    """A tool call's arguments in the Gemma syntax, marks as their sentinels: a string is raw text (any character
    but the sentinels' private-use block and the control characters other than tab, newline and return) between
    quote marks, a key is bare when it is a word (quoted otherwise, which the parser reads too), keys come sorted,
    numbers, true, false and null as in JSON."""

    quote = SENTINEL[QUOTE]
    # no control characters but tab, newline and return: NUL and 0x01 frame the byte DFA's build (byte_dfa.py), and
    # a text that may hold them is built the slow way (Github_medium o60099: 54 s instead of 1 s)
    char = "[^\\x00-\\x08\\x0B\\x0C\\x0E-\\x1F\ue000-\uefff]"
    unwritable = ((0x00, 0x08), (0x0B, 0x0C), (0x0E, 0x1F), (0xE000, 0xEFFF))  # those controls; a sentinel ends it
    unsafe = (*unwritable, (0xD800, 0xDFFF))
    sorted_keys = True
    free_key = "[A-Za-z_][A-Za-z0-9_]*"

    def text(self, value) -> str:
        return gemma_text(value, SENTINEL[QUOTE])

    def key(self, name: str) -> str:
        return escaped_text(name) if _KEY.fullmatch(name) else self.literal(name)

    def character(self, code: int) -> str:
        if 0xD800 <= code <= 0xDFFF or any(lo <= code <= hi for lo, hi in self.unwritable):
            raise ValueError(f"a character (U+{code:04X}) a tool call's string cannot hold")
        return escaped(chr(code))


GEMMA = GemmaSyntax()


def arguments_regex(parameters: dict | None, path: str = "parameters", limits: SchemaLimits = SchemaLimits()) -> str:
    """Regex (markers as sentinels) for a function's arguments `{...}` valid against its `parameters` schema."""
    if not parameters:
        return r"\{\}"
    if not isinstance(parameters, dict):
        raise SchemaError(f"{path}: must be a JSON schema object")
    if parameters.get("type", "object") != "object":
        raise SchemaError(f"{path}: a function's parameters must be a schema of type object")
    return schema_to_regex({**parameters, "type": "object"}, "", limits, GEMMA, path)


def call_regex(functions: list[dict], repeat: bool = False, limits: SchemaLimits = SchemaLimits()) -> str:
    """Regex for one call to any of `functions` ({"name", "parameters"}), or one or more calls when `repeat`."""
    options = []
    for i, f in enumerate(functions):
        args = arguments_regex(f.get("parameters"), f"tools[{i}].function.parameters", limits)
        options.append(f"call:{escaped_text(f['name'])}{args}")
    one = escaped_text(SENTINEL[CALL_OPEN]) + "(" + "|".join(options) + ")" + escaped_text(SENTINEL[CALL_CLOSE])
    return f"({one})+" if repeat else one


def tool_vocabulary(base, marker_ids: dict[str, int]):
    """`base` (a ConstraintVocabulary) with each marker token spelling its sentinel and no other token spelling a
    sentinel's lead byte. Built once per base vocabulary (kept in its cache), so compiled tool constraints are
    cached too."""
    from .vocabulary import ConstraintVocabulary
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
