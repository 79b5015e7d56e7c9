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
from datetime import datetime

import jinja2
import jinja2.ext
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace

from .errors import DgemmaError

MAX_TEMPLATE_OUTPUT = 1_000_000  # characters of rendered prompt
MAX_TEMPLATE_VALUE = 1_000_000  # length of any string/list a template builds
MAX_TEMPLATE_STEPS = 1_000_000  # loop iterations + calls per render
MAX_TEMPLATE_SECONDS = 5.0

# Gemma 4 chat format, used when the checkpoint ships no template. Assistant turns in history keep only the answer:
# a thought channel is cut off, as the model never sees its own old reasoning.
GEMMA4_CHAT_TEMPLATE = """\
{%- macro render_content(content) -%}
{%- if content is string -%}{{ content }}
{%- elif content is iterable and content is not mapping -%}
{%- for part in content -%}
{%- if part is string -%}{{ part }}
{%- elif part is mapping and part.get('type') == 'text' -%}{{ part.get('text', '') }}
{%- endif -%}
{%- endfor -%}
{%- elif content is not none -%}{{ raise_exception('message content must be a string or a list of parts') }}
{%- endif -%}
{%- endmacro -%}
{{- bos_token -}}
{%- set loop_messages = messages -%}
{%- if messages and messages[0].get('role') in ['system', 'developer'] -%}
{{- '<|turn>system\\n' -}}{%- if enable_thinking -%}{{- '<|think|>' -}}{%- endif -%}
{{- render_content(messages[0].get('content')) -}}{{- '<turn|>\\n' -}}
{%- set loop_messages = messages[1:] -%}
{%- elif enable_thinking -%}
{{- '<|turn>system\\n<|think|><turn|>\\n' -}}
{%- endif -%}
{%- for message in loop_messages -%}
{%- set role = message.get('role') -%}
{%- if role == 'user' -%}
{{- '<|turn>user\\n' ~ render_content(message.get('content')) ~ '<turn|>\\n' -}}
{%- elif role in ['assistant', 'model'] -%}
{%- set text = render_content(message.get('content')) -%}
{{- '<|turn>model\\n' ~ text.split('<channel|>')[-1] ~ '<turn|>\\n' -}}
{%- else -%}
{{- raise_exception('unsupported message role ' ~ role ~ ' (expected a first system message, then user/assistant)') -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|turn>model\\n' -}}{%- endif -%}
"""


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
    """Steps and wall time one render may use."""

    def __init__(self) -> None:
        self.steps = 0
        self.deadline = time.monotonic() + MAX_TEMPLATE_SECONDS

    def tick(self) -> None:
        self.steps += 1
        if self.steps > MAX_TEMPLATE_STEPS:
            raise _TemplateLimit(f"more than {MAX_TEMPLATE_STEPS} steps")
        if self.steps % 1024 == 0 and time.monotonic() > self.deadline:
            raise _TemplateLimit(f"more than {MAX_TEMPLATE_SECONDS} s")


_budget: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar("dgemma_template_budget", default=None)

# Width/precision fields in format strings can allocate gigabytes from a short literal ("%1000000000s").
_HUGE_PERCENT_FIELD = re.compile(r"%[-#0 +]*(\d{7,}|\d*\.\d{7,})")  # "*" widths are checked as arguments
_HUGE_BRACE_FIELD = re.compile(r"\{[^{}]*:[^{}]*\d{7,}[^{}]*\}")


def _tick() -> None:
    budget = _budget.get()
    if budget is not None:
        budget.tick()


def _check_value(value):
    if isinstance(value, (str, list, tuple, dict)) and len(value) > MAX_TEMPLATE_VALUE:
        raise _TemplateLimit(f"a value longer than {MAX_TEMPLATE_VALUE}")
    return value


def _check_params(params) -> None:
    for p in params:
        if isinstance(p, int) and abs(p) > MAX_TEMPLATE_VALUE:
            shown = p if p.bit_length() < 64 else "a huge number"
            raise _TemplateLimit(f"the argument {shown} (larger than {MAX_TEMPLATE_VALUE})")


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
        return _check_value(func(*args, **kwargs))

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


class _ChatTemplateEnvironment(ImmutableSandboxedEnvironment):
    """The HF chat-template environment plus a budget: every call, filter and loop iteration ticks it, and the
    operators and assignments that can grow a value are size-checked."""

    intercepted_binops = frozenset({"*", "**", "%"})

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
                            _dgemma_iter=_guard_iter, _dgemma_value=_check_value)

    def _parse(self, source, name, filename) -> nodes.Template:
        """Route every loop iterable and every assigned value through the guards."""
        tree = super()._parse(source, name, filename)
        for node in tree.find_all(nodes.For):
            node.iter = nodes.Call(nodes.Name("_dgemma_iter", "load"), [node.iter], [], None, None,
                                   lineno=node.lineno)
        for node in tree.find_all(nodes.Assign):
            node.node = nodes.Call(nodes.Name("_dgemma_value", "load"), [node.node], [], None, None,
                                   lineno=node.lineno)
        for node in tree.find_all(nodes.AssignBlock):
            node.filter = nodes.Filter(node.filter, "_dgemma_value", [], [], None, None, lineno=node.lineno)
        return tree

    def unsafe_undefined(self, obj, attribute):
        """Fail at once on a forbidden attribute (jinja would return an Undefined that prints as "")."""
        raise jinja2.exceptions.SecurityError(f"access to attribute {attribute!r} of a {type(obj).__name__} is unsafe")

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja's signature)
        _tick()
        _check_params(list(args) + list(kwargs.values()))
        owner = getattr(getattr(__obj, "__wrapped__", __obj), "__self__", None)  # the sandbox wraps str.format
        if isinstance(owner, str) and getattr(__obj, "__name__", "") in ("format", "format_map"):
            if _HUGE_BRACE_FIELD.search(owner):
                raise _TemplateLimit("a format string with a huge width")
        return _check_value(super().call(__context, __obj, *args, **kwargs))

    def call_binop(self, context, operator, left, right):
        _tick()
        if operator == "**" and isinstance(right, (int, float)) and isinstance(left, (int, float)):
            if abs(right) > 4096 or (isinstance(left, int) and left.bit_length() * abs(right) > 1_000_000):
                raise _TemplateLimit(f"a power over 1000000 bits ({left!s:.20} ** {right!s:.20})")
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > MAX_TEMPLATE_VALUE:
                    raise _TemplateLimit(f"a value longer than {MAX_TEMPLATE_VALUE}")
            if isinstance(left, int) and isinstance(right, int) and left.bit_length() + right.bit_length() > 65536:
                raise _TemplateLimit("an integer product over 65536 bits")
        if operator == "%" and isinstance(left, str):
            _check_params(right if isinstance(right, tuple) else (right,))
            if _HUGE_PERCENT_FIELD.search(left):
                raise _TemplateLimit("a format string with a huge width")
        return _check_value(super().call_binop(context, operator, left, right))


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

    def __init__(self, template: str, source: str) -> None:
        self.text = template
        self.source = source
        if ChatTemplate._env is None:
            ChatTemplate._env = _ChatTemplateEnvironment()
        try:
            self._template = ChatTemplate._env.from_string(template)
        except jinja2.TemplateError as err:
            raise TokenizerError(f"{source}: chat template does not compile: {_one_line(err)}") from None
        except Exception as err:  # noqa: BLE001 (a template must never crash the loader)
            raise TokenizerError(f"{source}: chat template does not compile: {_one_line(err)}") from None

    def render(self, **context) -> str:
        token = _budget.set(_Budget())
        try:
            parts, size = [], 0
            for chunk in self._template.generate(**context):
                size += len(chunk)
                if size > MAX_TEMPLATE_OUTPUT:
                    raise _TemplateLimit(f"more than {MAX_TEMPLATE_OUTPUT} characters of output")
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


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------------------
