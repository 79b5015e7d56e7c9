"""Chat templates from checkpoints, rendered in a jinja2 sandbox.

Templates are untrusted code: they render in an immutable sandbox with a budget on steps, time, value sizes and
output size, and every failure is a one-line TokenizerError.
"""

from __future__ import annotations

import contextvars
import functools
import json
import re
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace
from jinja2.visitor import NodeTransformer

from ..errors import DgemmaError
from ..package_data import TEMPLATE_DIR

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


# Gemma 4 chat format (templates/gemma4.jinja), used when the checkpoint ships no template; it renders what the
# released template renders, text turns and tool use alike. Text is trimmed. Assistant turns in history keep only
# the answer: each thought channel (`<|channel>...<channel|>`) is cut out, as the model never sees its own old
# reasoning. With thinking off, the generation prompt opens and closes an empty thought channel, so the model
# answers at once.
# Tools (written as the release writes them, in its own argument syntax: bare keys, strings between `<|"|>` marks):
# - each function is declared in the system turn: `<|tool>declaration:NAME{description:...,parameters:{...}}<tool|>`;
# - an assistant's tool_calls are `<|tool_call>call:NAME{key:value,...}<tool_call|>` (keys sorted); with no result
#   after them the turn ends in `<|tool_response>`, where the model stops to wait for one;
# - the role "tool" messages right after it follow in the same turn: `<|tool_response>response:NAME{value:...}
#   <tool_response|>` (NAME from the matching tool_call_id); without content after them the turn stays open and
#   the generation prompt is empty, so the model goes on in the turn it started. An assistant message after tool
#   messages continues that turn too.
# Unlike the release, which drops it silently, a tool message with no tool call before it is refused; a null
# argument is written `null` (published copies of the release differ: some write `null`, some Python's `None`).
# An image part ({"type": "image"}) renders as <|image|>, as in the release; dgemma expands it (images.py).
GEMMA4_CHAT_TEMPLATE = (TEMPLATE_DIR / "gemma4.jinja").read_text(encoding="utf-8")


class TokenizerError(DgemmaError, ValueError):
    """A tokenizer file or chat template dgemma cannot use. The message is one line naming the file."""


def _one_line(err: BaseException, with_type: bool = True) -> str:
    text = " ".join(str(err).split())
    if not with_type:
        return text
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


# ---------------------------------------------------------------------------------------------------------------
# Sandbox for untrusted chat templates
# ---------------------------------------------------------------------------------------------------------------

class _TemplateLimit(Exception):
    """A render that went over its budget; turned into a TokenizerError by the caller."""


class _TemplateRaised(jinja2.TemplateError):
    """The template called raise_exception(message)."""


class _Budget:
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
            raise _TemplateLimit(f"more than {self.limits.steps} steps")
        if time.monotonic() > self.deadline:
            raise _TemplateLimit(f"more than {self.limits.seconds:g} s")

    def create(self, size: int) -> None:
        self.created += size
        if self.created > self.limits.allocation:
            raise _TemplateLimit(f"more than {self.limits.allocation} characters created "
                                 f"({TEMPLATE_ALLOCATION_MULTIPLE} x the output limit)")


_budget: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar("dgemma_template_budget", default=None)
_DEFAULT_LIMITS = TemplateLimits()

# Width/precision fields in format strings can allocate gigabytes from a short literal ("%1000000000s").
_HUGE_PERCENT_FIELD = re.compile(r"%[-#0 +]*(\d{7,}|\d*\.\d{7,})")  # "*" widths are checked as arguments
_HUGE_BRACE_FIELD = re.compile(r"\{[^{}]*:[^{}]*\d{7,}[^{}]*\}")
_NUMBER = re.compile(r"\d+")


def _limits() -> TemplateLimits:
    budget = _budget.get()
    return budget.limits if budget is not None else _DEFAULT_LIMITS


def _tick() -> None:
    budget = _budget.get()
    if budget is not None:
        budget.tick()


def _size(value, stop: int) -> int:
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


def _check_value(value):
    """Refuse a value that takes more than the value limit as text (a literal list of big strings included)."""
    if isinstance(value, (str, bytes)):
        size = len(value)
    elif isinstance(value, (list, tuple, dict, Namespace)):
        size = _size(value, _limits().value)
    else:
        return value
    if size > _limits().value:
        raise _TemplateLimit(f"a value longer than {_limits().value}")
    return value


def _created(value):
    """A value an operation built: bounded, and counted against the render's allocation."""
    _check_value(value)
    budget = _budget.get()
    if budget is not None and isinstance(value, (str, bytes, list, tuple, dict)):
        budget.create(len(value) if isinstance(value, (str, bytes)) else _size(value, budget.limits.value))
    return value


def _check_output(value):
    """Every `{{ ... }}` and every piece of literal text, in any buffer (macro bodies, {% set %} and {% filter %}
    blocks included): text written counts as created, as the buffers it fills are joined later."""
    budget = _budget.get()
    if budget is not None:
        budget.create(len(value) if isinstance(value, str) else _size(value, budget.limits.value))
    return _check_value(value)


def _concat(*parts) -> str:
    """`a ~ b ~ c`, sized before it is joined."""
    _tick()
    if sum(len(p) if isinstance(p, str) else _size(p, _limits().value) for p in parts) > _limits().value:
        raise _TemplateLimit(f"a value longer than {_limits().value}")
    return _created("".join(map(str, parts)))


def _check_params(params) -> None:
    for p in params:
        if isinstance(p, int) and abs(p) > _limits().value:
            shown = p if p.bit_length() < 64 else "a huge number"
            raise _TemplateLimit(f"the argument {shown} (larger than {_limits().value})")


def _text(value) -> str:
    return value if isinstance(value, str) else str(value)


def _longest(values) -> int:
    return max((len(v) if isinstance(v, str) else _size(v, _limits().value) for v in values), default=0)


def _format_bound(template: str, args) -> int:
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
        raise _TemplateLimit(f"a JSON indent over {MAX_JSON_INDENT}")
    stop, total, stack = _limits().value, 0, [(value, 1)]
    while stack and total <= stop:
        v, depth = stack.pop()
        total += (len(v) if isinstance(v, str) else 8) + 2 + width * depth
        if isinstance(v, dict):
            stack += [(x, depth + 1) for x in v.values()]
            total += _size(list(v.keys()), stop)
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
        return _size(items, _limits().value) + len(sep) * len(items)
    if name == "join":  # the join filter with the default separator
        return _size(list(base), _limits().value)
    if name in ("format", "format_map") and isinstance(base, str):
        values = list(args) + list(kwargs.values())
        if name == "format_map" and args and isinstance(args[0], dict):
            values = list(args[0].values())
        return _format_bound(base, values)
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


def _check_amplified(name: str, base, args: list, kwargs: dict) -> None:
    bound = _amplified(name, base, args, kwargs)
    if bound > _limits().value:
        raise _TemplateLimit(f"a value longer than {_limits().value} (from {name})")


def _guard_iter(iterable):
    for item in iterable:
        _tick()
        yield item


def _guard_filter(func, name: str):
    # Arguments up to and including the filtered value; a context/environment argument comes before it.
    n_leading = 2 if getattr(func, "jinja_pass_arg", None) is not None else 1

    @functools.wraps(func)
    def guarded(*args, **kwargs):
        _tick()
        _check_params(list(args[n_leading:]) + list(kwargs.values()))
        value = args[n_leading - 1] if len(args) >= n_leading else None
        if name == "format" and isinstance(value, str) and _HUGE_PERCENT_FIELD.search(value):
            raise _TemplateLimit("a format string with a huge width")
        if name == "sum" and not isinstance(kwargs.get("start", args[n_leading + 1] if len(args) > n_leading + 1
                                                       else 0), (int, float)):
            raise _TemplateLimit("sum over sequences (its time grows with the square of their length)")
        if name in ("join", "tojson", "pprint") and not isinstance(value, (str, list, tuple, dict)):
            value = list(value) if value is not None and hasattr(value, "__iter__") else value
            args = args[:n_leading - 1] + (value,) + args[n_leading:]
        _check_amplified(name, value, list(args[n_leading:]), kwargs)
        return _created(func(*args, **kwargs))

    return guarded


class _TemplateNamespace(Namespace):
    """`namespace()` that refuses dunder/private names and oversized values."""

    def __init__(*args, **kwargs) -> None:  # same signature trick as jinja's Namespace
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name, value in attrs.items():
            _TemplateNamespace._check(name, value)
        Namespace.__init__(self, attrs)

    def __setitem__(self, name, value) -> None:
        _TemplateNamespace._check(name, value)
        Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name, value) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} starts with an underscore")
        _check_value(value)


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`, HF's marker of assistant text for training masks: renders the body."""

    tags = {"generation"}

    def parse(self, parser):
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


class _Guards(NodeTransformer):
    """Routes what a template builds through the guards: literal text and `{{ }}` (into any buffer), `~`, list,
    tuple and dict literals, loop iterables and assigned values."""

    @staticmethod
    def _call(name: str, args: list, lineno: int) -> nodes.Call:
        return nodes.Call(nodes.Name(name, "load", lineno=lineno), args, [], None, None, lineno=lineno)

    def visit_Output(self, node: nodes.Output) -> nodes.Output:
        self.generic_visit(node)
        node.nodes = [self._call("_dgemma_output", [child], node.lineno) for child in node.nodes]
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Call:
        self.generic_visit(node)
        return self._call("_dgemma_concat", node.nodes, node.lineno)

    def _literal(self, node):
        self.generic_visit(node)
        if getattr(node, "ctx", "load") != "load":
            return node
        return self._call("_dgemma_value", [node], node.lineno)

    visit_List = visit_Tuple = visit_Dict = _literal

    def visit_For(self, node: nodes.For) -> nodes.For:
        self.generic_visit(node)
        node.iter = self._call("_dgemma_iter", [node.iter], node.lineno)
        return node

    def visit_Assign(self, node: nodes.Assign) -> nodes.Assign:
        self.generic_visit(node)
        node.node = self._call("_dgemma_value", [node.node], node.lineno)
        return node

    def visit_AssignBlock(self, node: nodes.AssignBlock) -> nodes.AssignBlock:
        self.generic_visit(node)
        node.filter = nodes.Filter(node.filter, "_dgemma_value", [], [], None, None, lineno=node.lineno)
        return node


class _ChatTemplateEnvironment(ImmutableSandboxedEnvironment):
    """The HF chat-template environment plus a budget: every call, filter and loop iteration ticks it; what can
    grow a value is sized before it runs (repetition, formatting, joins, replacements, ...) and every value built
    is sized after; all text written, in any buffer, counts against the render's allocation."""

    intercepted_binops = frozenset({"*", "**", "%", "+"})

    def __init__(self) -> None:
        super().__init__(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols", _GenerationTag])

        def raise_exception(message):
            raise _TemplateRaised(str(message))

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        self.filters["tojson"] = tojson
        self.filters = {name: _guard_filter(f, name) for name, f in self.filters.items()}
        self.filters["_dgemma_value"] = _check_value
        self.globals.pop("lipsum", None)
        self.globals.update(raise_exception=raise_exception, namespace=_TemplateNamespace, dict=_plain_dict,
                            strftime_now=lambda fmt: datetime.now().strftime(fmt),
                            _dgemma_iter=_guard_iter, _dgemma_value=_check_value, _dgemma_output=_check_output,
                            _dgemma_concat=_concat)

    def _parse(self, source, name, filename) -> nodes.Template:
        return _Guards().visit(super()._parse(source, name, filename))

    def unsafe_undefined(self, obj, attribute):
        """Fail at once on a forbidden attribute (jinja would return an Undefined that prints as "")."""
        raise jinja2.exceptions.SecurityError(f"access to attribute {attribute!r} of a {type(obj).__name__} is unsafe")

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja's signature)
        _tick()
        _check_params(list(args) + list(kwargs.values()))
        inner = getattr(__obj, "__wrapped__", __obj)  # the sandbox wraps str.format
        owner, name = getattr(inner, "__self__", None), getattr(inner, "__name__", "")
        if isinstance(owner, str):
            if name in ("format", "format_map") and _HUGE_BRACE_FIELD.search(owner):
                raise _TemplateLimit("a format string with a huge width")
            if name == "join" and args and not isinstance(args[0], (list, tuple)):
                args = (list(args[0]),) + args[1:]
            _check_amplified(name, owner, list(args), kwargs)
        return _created(super().call(__context, __obj, *args, **kwargs))

    def call_binop(self, context, operator, left, right):
        _tick()
        limit = _limits().value
        if operator == "**" and isinstance(right, (int, float)) and isinstance(left, (int, float)):
            if abs(right) > 4096 or (isinstance(left, int) and left.bit_length() * abs(right) > 1_000_000):
                raise _TemplateLimit(f"a power over 1000000 bits ({left!s:.20} ** {right!s:.20})")
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, bytes, list, tuple)) and isinstance(n, int) and \
                        (len(seq) if isinstance(seq, (str, bytes)) else _size(seq, limit)) * n > limit:
                    raise _TemplateLimit(f"a value longer than {limit}")
            if isinstance(left, int) and isinstance(right, int) and left.bit_length() + right.bit_length() > 65536:
                raise _TemplateLimit("an integer product over 65536 bits")
        if operator == "+" and isinstance(left, (str, bytes, list, tuple)) and \
                _size(left, limit) + _size(right, limit) > limit + 4:
            raise _TemplateLimit(f"a value longer than {limit}")
        if operator == "%" and isinstance(left, str):
            _check_params(right if isinstance(right, tuple) else (right,))
            if _HUGE_PERCENT_FIELD.search(left):
                raise _TemplateLimit("a format string with a huge width")
            values = list(right) if isinstance(right, tuple) else list(right.values()) if isinstance(right, dict) \
                else [right]
            if _format_bound(left, values) > limit:
                raise _TemplateLimit(f"a value longer than {limit} (from %)")
        return _created(super().call_binop(context, operator, left, right))


def _plain_dict(*args, **kwargs):
    return dict(*args, **kwargs)


def _plain(value, depth: int = 0):
    """Rebuild template inputs out of plain JSON types, so the sandbox never sees a rich object's methods."""
    if depth > 64:
        raise TokenizerError("chat template input is nested more than 64 levels deep")
    if value is None or type(value) in (str, int, float, bool):
        return value
    for base in (bool, str, int, float):  # subclasses (enums, ...) become the base value
        if isinstance(value, base):
            return base.__str__(value) if base is str else base(value)
    if isinstance(value, dict):
        return {str(k): _plain(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, depth + 1) for v in value]
    return f"<{type(value).__name__}>"


class ChatTemplate:
    """One compiled, sandboxed chat template. `source` names where it came from, for error messages."""

    _env = None

    def __init__(self, template: str, source: str, limits: TemplateLimits | None = None) -> None:
        self.text = template
        self.source = source
        self.limits = limits or _DEFAULT_LIMITS
        if ChatTemplate._env is None:
            ChatTemplate._env = _ChatTemplateEnvironment()
        try:
            self._template = ChatTemplate._env.from_string(template)
        except jinja2.TemplateError as err:
            raise TokenizerError(f"{source}: chat template does not compile: {_one_line(err)}") from None
        except Exception as err:  # noqa: BLE001 (a template must never crash the loader)
            raise TokenizerError(f"{source}: chat template does not compile: {_one_line(err)}") from None

    def render(self, **context) -> str:
        token = _budget.set(_Budget(self.limits))
        try:
            parts, size = [], 0
            for chunk in self._template.generate(**context):
                size += len(chunk)
                if size > self.limits.output:
                    raise _TemplateLimit(f"more than {self.limits.output} characters of output")
                parts.append(chunk)
            return "".join(parts)
        except _TemplateLimit as err:
            raise TokenizerError(f"{self.source}: chat template went over a limit: {err}") from None
        except _TemplateRaised as err:
            raise TokenizerError(f"{self.source}: chat template refused: {_one_line(err, False)}") from None
        except jinja2.exceptions.SecurityError as err:
            raise TokenizerError(f"{self.source}: chat template blocked by the sandbox: {_one_line(err)}") from None
        except jinja2.TemplateError as err:
            raise TokenizerError(f"{self.source}: chat template failed: {_one_line(err)}") from None
        except Exception as err:  # noqa: BLE001 (OverflowError, RecursionError, TypeError, ... from the template)
            raise TokenizerError(f"{self.source}: chat template failed: {_one_line(err)}") from None
        finally:
            _budget.reset(token)

