"""Tool calls in the Gemma 4 format: parse them out of model text, and constrain a reply to be one.

The format (what the released chat template writes and the model is trained to write):
    <|tool_call>call:NAME{key:value,...}<tool_call|>
Keys are bare; a string value is raw text between `<|"|>` marks (no escapes); objects are `{k:v,...}`, arrays
`[v,...]`, and numbers, true, false and null are bare. The model's turn then ends in `<|tool_response>`.

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
import uuid
from dataclasses import dataclass

from outlines_core.json_schema import build_regex_from_schema

from ..errors import DgemmaError
from .constraint import escape_literal
from .schema import SchemaError, _Walker
from .vocabulary import ConstraintVocabulary

CALL_OPEN, CALL_CLOSE, QUOTE = "<|tool_call>", "<tool_call|>", '<|"|>'
RESPONSE_OPEN = "<|tool_response>"
MARKERS = (CALL_OPEN, CALL_CLOSE, QUOTE)
# Each marker's spelling inside a tool-call automaton: private-use characters no ordinary token can spell there.
SENTINEL = {CALL_OPEN: "\ue010", CALL_CLOSE: "\ue011", QUOTE: "\ue012"}
_SENTINEL_LEAD_BYTE = 0xEE
_NOT_SENTINEL = "[^\ue000-\uefff]"
_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")
NESTING = 2  # levels of free-form objects/arrays, as outlines' JSON-object mode


class ToolCallError(DgemmaError, ValueError):
    """Text that is not a well-formed Gemma tool call."""


@dataclass
class ToolCall:
    name: str
    arguments: dict
    id: str = ""

    def __post_init__(self):
        self.id = self.id or f"call_{uuid.uuid4().hex[:24]}"

    def openai(self, index: int | None = None) -> dict:
        out = {"id": self.id, "type": "function",
               "function": {"name": self.name, "arguments": json.dumps(self.arguments, ensure_ascii=False)}}
        return out if index is None else {"index": index, **out}


# ---------------------------------------------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------------------------------------------

class _Reader:
    """Recursive descent over the Gemma value syntax."""

    def __init__(self, text: str):
        self.text, self.at = text, 0

    def fail(self, what: str):
        raise ToolCallError(f"{what} at character {self.at} of {self.text[:80]!r}")

    def skip_space(self) -> None:
        while self.at < len(self.text) and self.text[self.at] in " \n\t\r":
            self.at += 1

    def expect(self, literal: str) -> None:
        self.skip_space()
        if not self.text.startswith(literal, self.at):
            self.fail(f"expected {literal!r}")
        self.at += len(literal)

    def peek(self, literal: str) -> bool:
        self.skip_space()
        return self.text.startswith(literal, self.at)

    def value(self):
        self.skip_space()
        if self.peek(QUOTE):
            return self.string()
        if self.peek("{"):
            return self.mapping()
        if self.peek("["):
            self.at += 1
            items = []
            if not self.peek("]"):
                items.append(self.value())
                while self.peek(","):
                    self.at += 1
                    items.append(self.value())
            self.expect("]")
            return items
        return self.bare()

    def string(self) -> str:
        self.expect(QUOTE)
        end = self.text.find(QUOTE, self.at)
        if end < 0:
            self.fail("unclosed string")
        out, self.at = self.text[self.at:end], end + len(QUOTE)
        return out

    def key(self) -> str:
        self.skip_space()
        if self.peek(QUOTE):
            return self.string()
        end = self.text.find(":", self.at)
        if end < 0:
            self.fail("expected a key")
        key, self.at = self.text[self.at:end].strip(), end
        if not key:
            self.fail("empty key")
        return key

    def mapping(self) -> dict:
        self.expect("{")
        out = {}
        if not self.peek("}"):
            while True:
                key = self.key()
                self.expect(":")
                out[key] = self.value()
                if not self.peek(","):
                    break
                self.at += 1
        self.expect("}")
        return out

    def bare(self):
        match = re.compile(r"[^,\]}\s]+").match(self.text, self.at)
        if not match:
            self.fail("expected a value")
        self.at = match.end()
        word = match.group(0)
        if word in ("true", "false", "null"):
            return json.loads(word)
        if word == "None":  # the template writes Python's None for a null in some releases
            return None
        try:
            number = json.loads(word)
        except ValueError:
            self.fail(f"unknown value {word!r}")
        if not isinstance(number, (int, float)):
            self.fail(f"unknown value {word!r}")
        return number


def parse_call(body: str) -> ToolCall:
    """`call:NAME{...}` (the text between the call markers) -> ToolCall; ToolCallError if malformed."""
    reader = _Reader(body)
    reader.expect("call:")
    brace = body.find("{", reader.at)
    if brace < 0:
        reader.fail("expected '{' after the function name")
    name = body[reader.at:brace].strip()
    if not name:
        reader.fail("empty function name")
    reader.at = brace
    arguments = reader.mapping()
    reader.skip_space()
    if reader.at != len(body):
        reader.fail("text after the arguments")
    return ToolCall(name, arguments)


def split_tool_calls(text: str) -> tuple[str, list[ToolCall]]:
    """(content, calls) of a reply's content text: every well-formed `<|tool_call>...<tool_call|>` becomes a call
    and leaves the content; a malformed or unclosed one stays in the content as text. `<|tool_response>` ends
    the reply (the model waits there for results)."""
    parser = ToolCallStreamParser()
    content, calls = parser.feed(text)
    tail, more = parser.flush()
    return content + tail, calls + more


class ToolCallStreamParser:
    """Splits streamed content text into content deltas and whole tool calls. Text that could still be (the start
    of) a call is held back until the call closes or cannot be one."""

    def __init__(self) -> None:
        self._pending = ""
        self._done = False
        self.count = 0  # calls returned so far

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        self._pending += text
        return self._scan(final=False)

    def flush(self) -> tuple[str, list[ToolCall]]:
        return self._scan(final=True)

    def _scan(self, final: bool) -> tuple[str, list[ToolCall]]:
        content, calls, buf = [], [], self._pending
        while buf and not self._done:
            opens = [i for i in (buf.find(CALL_OPEN), buf.find(RESPONSE_OPEN)) if i >= 0]
            start = min(opens) if opens else -1
            if start < 0:
                hold = 0 if final else _partial_suffix(buf, (CALL_OPEN, RESPONSE_OPEN))
                content.append(buf[:len(buf) - hold])
                buf = buf[len(buf) - hold:]
                break
            content.append(buf[:start])
            buf = buf[start:]
            if buf.startswith(RESPONSE_OPEN):
                self._done, buf = True, ""
                break
            end = buf.find(CALL_CLOSE)
            if end < 0:
                if final:
                    content.append(buf)
                    buf = ""
                break
            body = buf[len(CALL_OPEN):end]
            try:
                calls.append(parse_call(body))
            except ToolCallError:
                content.append(buf[:end + len(CALL_CLOSE)])
            buf = buf[end + len(CALL_CLOSE):]
        self._pending = "" if self._done else buf
        self.count += len(calls)
        return "".join(content), calls


def _partial_suffix(text: str, markers) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of one of `markers`."""
    best = 0
    for marker in markers:
        for n in range(min(len(marker) - 1, len(text)), best, -1):
            if marker.startswith(text[-n:]):
                best = n
                break
    return best


# ---------------------------------------------------------------------------------------------------------------
# Constraining
# ---------------------------------------------------------------------------------------------------------------

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
            low, high = node.get("minItems", 0), node.get("maxItems")
            if high == 0:
                return r"\[\]"
            rest_high = "" if high is None else str(high - 1)
            if low == 0:
                return rf"\[({item}(,{item}){{0,{rest_high}}})?\]"
            return rf"\[{item}(,{item}){{{low - 1},{rest_high}}}\]"
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
    cleaned = _Walker(parameters).clean(parameters, path, ())
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
