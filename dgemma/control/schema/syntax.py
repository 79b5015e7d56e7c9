"""How the schema writer spells values: JSON text (`JSON`, what response_format returns), or the arguments of a
Gemma tool call (tool_grammar.GEMMA), where keys are bare, strings are raw text between marks and keys come in
sorted order. The writer decides what values to write; a Syntax says how each is spelled as regex text.

A string's body holds only characters the syntax writes plain, or (JSON only) its short escapes; an escape counts
as one character. Regex text is in the syntax both Rust's regex (which outlines-core compiles) and Python's `re`
read.
"""

from __future__ import annotations

import copy
import json

from .charsets import complement


def escaped(char: str) -> str:
    """A character as regex text that Python's re and outlines-core's Rust regex both read as itself, inside or
    outside a class: ASCII punctuation escaped, except < and > (to Rust's regex \\< and \\> are word boundaries),
    control characters as \\uXXXX."""
    if ord(char) < 0x20 or 0x7F <= ord(char) <= 0x9F:
        return f"\\u{ord(char):04x}"
    return "\\" + char if char.isascii() and not char.isalnum() and char not in " <>" else char


def escaped_text(text: str) -> str:
    """`text` as regex text that matches exactly it (each character `escaped`)."""
    return "".join(escaped(c) for c in text)


def class_text(ranges: list[tuple[int, int]]) -> str:
    """A regex class of the code point ranges (sorted, inclusive), each end `escaped`."""
    return "[" + "".join(escaped(chr(a)) if a == b else f"{escaped(chr(a))}-{escaped(chr(b))}"
                         for a, b in ranges) + "]"


class JsonSyntax:
    """JSON text, compact (the writer adds its whitespace between tokens)."""

    quote = '"'
    # one character of a string: any character JSON writes plain, or a short escape. No \uXXXX: every character
    # can be written plain, and the escape's 4 digits would multiply the states of every counted string
    char = r'([^"\\\x00-\x1F\x7F-\x9F]|\\["\\/bfnrt])'
    unsafe = ((0, 0x1F), (0x22, 0x22), (0x5C, 0x5C), (0x7F, 0x9F), (0xD800, 0xDFFF))  # never written plain
    unwritable = ()  # code point ranges no string can hold (JSON escapes what it does not write plain)
    sorted_keys = False  # listed keys: required ones first, in the schema's order
    free_key = f'"{char}*"'  # the key of an object with no listed properties

    def text(self, value) -> str:
        """A value's text."""
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"))

    def writable(self, value) -> bool:
        """Whether `value` can be spelled: no string in it (keys included) holds a character this syntax cannot
        write."""
        if isinstance(value, str):
            return not any(lo <= ord(c) <= hi for c in value for lo, hi in self.unwritable)
        if isinstance(value, list):
            return all(self.writable(v) for v in value)
        if isinstance(value, dict):
            return all(self.writable(k) and self.writable(v) for k, v in value.items())
        return True

    def literal(self, value) -> str:
        """The regex that matches exactly `value`'s text."""
        return escaped_text(self.text(value))

    def key(self, name: str) -> str:
        """The regex of a listed key."""
        return self.literal(name)

    def string(self, body: str) -> str:
        """A string of body regex `body`."""
        return f"{self.quote}{body}{self.quote}"

    def character(self, code: int) -> str:
        """The regex of a string's one character `code`, as this syntax writes it; ValueError where it cannot be
        written."""
        if 0xD800 <= code <= 0xDFFF:
            raise ValueError("a lone surrogate")
        if not any(lo <= code <= hi for lo, hi in self.unsafe):
            return escaped(chr(code))
        return escaped_text(json.dumps(chr(code))[1:-1])

    def only(self, allowed: list[tuple[int, int]]) -> "JsonSyntax":
        """This syntax with a string's classes (any character, a pattern's classes) cut to `allowed` (code point
        ranges, plain in this syntax); literal characters stay as written (strings.format_body, writing a pattern
        within a format's wide form)."""
        cut = copy.copy(self)
        cut.unsafe = (*self.unsafe, *complement(sorted(allowed)))
        cut.char = class_text(sorted(allowed))
        return cut


JSON = JsonSyntax()
