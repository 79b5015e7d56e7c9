"""Tool calls in the Gemma 4 format: parse them out of model text, and constrain a reply to be one.

The format (what the released chat template writes and the model is trained to write):
    <|tool_call>call:NAME{key:value,...}<tool_call|>
Keys are bare; a string value is raw text between `<|"|>` marks (no escapes); objects are `{k:v,...}`, arrays
`[v,...]`, and numbers, true, false and null are bare. The model's turn then ends in `<|tool_response>`.

Constraining a reply to be one is control/tool_grammar.py.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass


from ..errors import DgemmaError

CALL_OPEN, CALL_CLOSE, QUOTE = "<|tool_call>", "<tool_call|>", '<|"|>'
RESPONSE_OPEN = "<|tool_response>"
MARKERS = (CALL_OPEN, CALL_CLOSE, QUOTE)
# Each marker's spelling inside a tool-call automaton: private-use characters no ordinary token can spell there.
SENTINEL = {CALL_OPEN: "\ue010", CALL_CLOSE: "\ue011", QUOTE: "\ue012"}
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
