"""Templates: literal text pinned in place, holes of a given number of tokens for the model to fill.

`"Name: {{8}}, age: {{2}}."` pins the tokens of "Name: ", ", age: " and "." and leaves holes of 8 and 2 tokens
between them, then pins EOS after the last literal. Every literal is tokenized on its own (without special
tokens), so token boundaries fall at the holes. The whole template is the output: canvas after canvas, each
canvas sees the literals that fall in it, on both sides of its holes.
"""

from __future__ import annotations

import re
from typing import Callable

from .pins import Steering, SteeringError

HOLE = re.compile(r"\{\{\s*(-?\d+)\s*\}\}")
MAX_HOLE = 65536


def parse_template(template: str, encode: Callable[[str], list[int]], eos_id: int) -> tuple[Steering, list[int]]:
    """-> the steering that pins the literal text and EOS, and the output position where each hole starts."""
    if not isinstance(template, str) or not HOLE.search(template):
        raise SteeringError("template needs at least one hole such as {{8}} (a hole of 8 tokens)", "template")
    pinned: dict[int, int] = {}
    holes: list[int] = []
    pos = 0
    last = 0
    for m in HOLE.finditer(template):
        pos = _pin_literal(template[last:m.start()], encode, pinned, pos)
        n = int(m.group(1))
        if not 1 <= n <= MAX_HOLE:
            raise SteeringError(f"template hole {m.group(0)} must be 1 to {MAX_HOLE} tokens", "template")
        holes.append(pos)
        pos += n
        last = m.end()
    pos = _pin_literal(template[last:], encode, pinned, pos)
    pinned[pos] = eos_id
    return Steering(pinned=pinned, pins_from="template"), holes


def template_length(steering: Steering) -> int:
    """Output tokens a template takes, its EOS included."""
    return max(steering.pinned) + 1


def _pin_literal(text: str, encode, pinned: dict[int, int], pos: int) -> int:
    for t in encode(text) if text else []:
        pinned[pos] = t
        pos += 1
    return pos
