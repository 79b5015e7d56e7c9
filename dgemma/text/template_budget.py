"""The budget a chat template renders under: steps, time, value sizes and characters created.

The sandbox (template_sandbox.py) calls these guards from every operation a template can run; a render over its
budget raises TemplateOverLimit, which ChatTemplate turns into a one-line TokenizerError.
"""

from __future__ import annotations

import contextvars
import functools
import re
import time
from dataclasses import dataclass

from jinja2.utils import Namespace

MAX_TEMPLATE_OUTPUT = 1_000_000  # characters of rendered prompt
MAX_TEMPLATE_VALUE = 1_000_000  # characters any value a template builds takes as text (a list: all its items)
MAX_TEMPLATE_STEPS = 1_000_000  # loop iterations + calls per render
MAX_TEMPLATE_SECONDS = 5.0
# Characters a render may create in all (values it builds, text it writes into any buffer), as a multiple of its
# output limit; with every single value bounded too, this bounds the memory a render can take.
TEMPLATE_ALLOCATION_MULTIPLE = 32
MAX_JSON_INDENT = 16


@dataclass(frozen=True)
class TemplateLimits:
    output: int = MAX_TEMPLATE_OUTPUT
    value: int = MAX_TEMPLATE_VALUE
    steps: int = MAX_TEMPLATE_STEPS
    seconds: float = MAX_TEMPLATE_SECONDS

    @property
    def allocation(self) -> int:
        return TEMPLATE_ALLOCATION_MULTIPLE * self.output



class TemplateOverLimit(Exception):
    """Internal: a render that went over its budget; ChatTemplate turns it into a TokenizerError."""




class Budget:
    """What one render may still use: steps, wall time (checked at every step, so a render stops within one
    operation of its deadline; every operation is bounded by the value limit) and characters created."""

    def __init__(self, limits: TemplateLimits) -> None:
        self.limits = limits
        self.steps = 0
        self.created = 0
        self.deadline = time.monotonic() + limits.seconds

    def tick(self) -> None:
        self.steps += 1
        if self.steps > self.limits.steps:
            raise TemplateOverLimit(f"more than {self.limits.steps} steps")
        if time.monotonic() > self.deadline:
            raise TemplateOverLimit(f"more than {self.limits.seconds:g} s")

    def create(self, size: int) -> None:
        self.created += size
        if self.created > self.limits.allocation:
            raise TemplateOverLimit(f"more than {self.limits.allocation} characters created "
                                 f"({TEMPLATE_ALLOCATION_MULTIPLE} x the output limit)")


RENDER_BUDGET: contextvars.ContextVar[Budget | None] = contextvars.ContextVar("dgemma_template_budget", default=None)
DEFAULT_LIMITS = TemplateLimits()

# Width/precision fields in format strings can allocate gigabytes from a short literal ("%1000000000s").
HUGE_PERCENT_FIELD = re.compile(r"%[-#0 +]*(\d{7,}|\d*\.\d{7,})")  # "*" widths are checked as arguments
HUGE_BRACE_FIELD = re.compile(r"\{[^{}]*:[^{}]*\d{7,}[^{}]*\}")
_NUMBER = re.compile(r"\d+")


def current_limits() -> TemplateLimits:
    budget = RENDER_BUDGET.get()
    return budget.limits if budget is not None else DEFAULT_LIMITS


def tick() -> None:
    budget = RENDER_BUDGET.get()
    if budget is not None:
        budget.tick()


def size_of(value, stop: int) -> int:
    """Characters `value` takes as text, each reference counted (a list holding one string 1000 times is 1000
    times its length), plus 2 per item for quotes and separators; stops counting once past `stop`."""
    total, stack = 0, [value]
    while stack:
        v = stack.pop()
        if isinstance(v, (str, bytes)):
            total += len(v) + 2
        elif isinstance(v, dict):
            total += 2 * len(v) + 2
            stack += v.keys()
            stack += v.values()
        elif isinstance(v, (list, tuple)):
            total += 2 * len(v) + 2
            stack += v
        elif isinstance(v, Namespace):
            stack.append(v._Namespace__attrs)
        else:
            total += 8
        if total > stop:
            break
    return total


def check_value(value):
    """Refuse a value that takes more than the value limit as text (a literal list of big strings included)."""
    if isinstance(value, (str, bytes)):
        size = len(value)
    elif isinstance(value, (list, tuple, dict, Namespace)):
        size = size_of(value, current_limits().value)
    else:
        return value
    if size > current_limits().value:
        raise TemplateOverLimit(f"a value longer than {current_limits().value}")
    return value


def created(value):
    """A value an operation built: bounded, and counted against the render's allocation."""
    check_value(value)
    budget = RENDER_BUDGET.get()
    if budget is not None and isinstance(value, (str, bytes, list, tuple, dict)):
        budget.create(len(value) if isinstance(value, (str, bytes)) else size_of(value, budget.limits.value))
    return value


def check_output(value):
    """Every `{{ ... }}` and every piece of literal text, in any buffer (macro bodies, {% set %} and {% filter %}
    blocks included): text written counts as created, as the buffers it fills are joined later."""
    budget = RENDER_BUDGET.get()
    if budget is not None:
        budget.create(len(value) if isinstance(value, str) else size_of(value, budget.limits.value))
    return check_value(value)


def concat(*parts) -> str:
    """`a ~ b ~ c`, sized before it is joined."""
    tick()
    limit = current_limits().value
    if sum(len(p) if isinstance(p, str) else size_of(p, limit) for p in parts) > limit:
        raise TemplateOverLimit(f"a value longer than {limit}")
    return created("".join(map(str, parts)))


def check_params(params) -> None:
    for p in params:
        if isinstance(p, int) and abs(p) > current_limits().value:
            shown = p if p.bit_length() < 64 else "a huge number"
            raise TemplateOverLimit(f"the argument {shown} (larger than {current_limits().value})")


def _text(value) -> str:
    return value if isinstance(value, str) else str(value)


def _longest(values) -> int:
    return max((len(v) if isinstance(v, str) else size_of(v, current_limits().value) for v in values), default=0)


def format_bound(template: str, args) -> int:
    """`template` % args or template.format(*args): each field writes at most the longest argument or its width."""
    fields = template.count("{") + template.count("%")
    widths = max((int(n) for n in _NUMBER.findall(template) if len(n) < 8), default=0)
    return len(template) + fields * max(_longest(args), widths)


def _json_bound(value, indent) -> int:
    """json.dumps(value, indent=indent): each item on its own line, indented by its depth."""
    if indent is None:
        return 0
    width = len(indent) if isinstance(indent, str) else int(indent)
    if width > MAX_JSON_INDENT:
        raise TemplateOverLimit(f"a JSON indent over {MAX_JSON_INDENT}")
    stop, total, stack = current_limits().value, 0, [(value, 1)]
    while stack and total <= stop:
        v, depth = stack.pop()
        total += (len(v) if isinstance(v, str) else 8) + 2 + width * depth
        if isinstance(v, dict):
            stack += [(x, depth + 1) for x in v.values()]
            total += size_of(list(v.keys()), stop)
        elif isinstance(v, (list, tuple)):
            stack += [(x, depth + 1) for x in v]
    return total


def _amplified(name: str, base, args: list, kwargs: dict) -> int:
    """An upper bound on what the call `name` (a str method on `base`, or a filter of `base`) writes, for those
    whose output can be much longer than their inputs; 0 for all others (their output is checked afterwards)."""
    if name == "replace" and len(args) >= 2:
        text, old, new = _text(base), _text(args[0]), _text(args[1])
        count = args[2] if len(args) > 2 else kwargs.get("count", -1)
        n = text.count(old) if old else len(text) + 1
        if isinstance(count, int) and count >= 0:
            n = min(n, count)
        return len(text) + n * max(0, len(new) - len(old))
    if name == "join" and args:  # str.join(items): base is the separator
        sep, items = (base, args[0]) if isinstance(base, str) else (_text(args[0]), base)
        items = list(items)
        return size_of(items, current_limits().value) + len(sep) * len(items)
    if name == "join":  # the join filter with the default separator
        return size_of(list(base), current_limits().value)
    if name in ("format", "format_map") and isinstance(base, str):
        values = list(args) + list(kwargs.values())
        if name == "format_map" and args and isinstance(args[0], dict):
            values = list(args[0].values())
        return format_bound(base, values)
    if name == "expandtabs" and isinstance(base, str):
        tab = args[0] if args else kwargs.get("tabsize", 8)
        return len(base) + base.count("\t") * (tab if isinstance(tab, int) else 0)
    if name == "translate" and isinstance(base, str) and args:
        table = args[0]
        values = table.values() if isinstance(table, dict) else table if isinstance(table, (list, tuple)) else ()
        return len(base) * max([1] + [len(v) for v in values if isinstance(v, str)])
    if name == "indent":
        text = _text(base)
        width = args[0] if args else kwargs.get("width", 4)
        width = len(width) if isinstance(width, str) else width if isinstance(width, int) else 0
        return len(text) + (text.count("\n") + 1) * width
    if name == "wordwrap":
        text = _text(base)
        wrap = args[2] if len(args) > 2 else kwargs.get("wrapstring") or "\n"
        return len(text) * (1 + len(_text(wrap)))
    if name in ("tojson", "pprint"):
        return _json_bound(base, (args[0] if args else kwargs.get("indent")) if name == "tojson" else 1)
    return 0


def check_amplified(name: str, base, args: list, kwargs: dict) -> None:
    bound = _amplified(name, base, args, kwargs)
    if bound > current_limits().value:
        raise TemplateOverLimit(f"a value longer than {current_limits().value} (from {name})")


def guard_iter(iterable):
    for item in iterable:
        tick()
        yield item


def guard_filter(func, name: str):
    # Arguments up to and including the filtered value; a context/environment argument comes before it.
    n_leading = 2 if getattr(func, "jinja_pass_arg", None) is not None else 1

    @functools.wraps(func)
    def guarded(*args, **kwargs):
        tick()
        check_params(list(args[n_leading:]) + list(kwargs.values()))
        value = args[n_leading - 1] if len(args) >= n_leading else None
        if name == "format" and isinstance(value, str) and HUGE_PERCENT_FIELD.search(value):
            raise TemplateOverLimit("a format string with a huge width")
        if name == "sum" and not isinstance(kwargs.get("start", args[n_leading + 1] if len(args) > n_leading + 1
                                                       else 0), (int, float)):
            raise TemplateOverLimit("sum over sequences (its time grows with the square of their length)")
        if name in ("join", "tojson", "pprint") and not isinstance(value, (str, list, tuple, dict)):
            value = list(value) if value is not None and hasattr(value, "__iter__") else value
            args = args[:n_leading - 1] + (value,) + args[n_leading:]
        check_amplified(name, value, list(args[n_leading:]), kwargs)
        return created(func(*args, **kwargs))

    return guarded
