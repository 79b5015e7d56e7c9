"""The jinja2 sandbox chat templates render in: HF's chat-template environment with every operation guarded by
the render's budget (template_budget.py)."""

from __future__ import annotations

import json
from datetime import datetime

import jinja2
import jinja2.ext
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace
from jinja2.visitor import NodeTransformer

from .template_budget import (HUGE_BRACE_FIELD, HUGE_PERCENT_FIELD, TemplateOverLimit, check_amplified, check_output,
                              check_params, check_value, concat, created, current_limits, format_bound, guard_filter,
                              guard_iter, size_of, tick)

class TemplateRaised(jinja2.TemplateError):
    """Internal: ChatTemplate turns it into a TokenizerError. The template called raise_exception(message)."""



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
        check_value(value)


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


class ChatTemplateEnvironment(ImmutableSandboxedEnvironment):
    """The HF chat-template environment plus a budget: every call, filter and loop iteration ticks it; what can
    grow a value is sized before it runs (repetition, formatting, joins, replacements, ...) and every value built
    is sized after; all text written, in any buffer, counts against the render's allocation."""

    intercepted_binops = frozenset({"*", "**", "%", "+"})

    def __init__(self) -> None:
        super().__init__(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols", _GenerationTag])

        def raise_exception(message):
            raise TemplateRaised(str(message))

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        self.filters["tojson"] = tojson
        self.filters = {name: guard_filter(f, name) for name, f in self.filters.items()}
        self.filters["_dgemma_value"] = check_value
        self.globals.pop("lipsum", None)
        self.globals.update(raise_exception=raise_exception, namespace=_TemplateNamespace, dict=_plain_dict,
                            strftime_now=lambda fmt: datetime.now().strftime(fmt),
                            _dgemma_iter=guard_iter, _dgemma_value=check_value, _dgemma_output=check_output,
                            _dgemma_concat=concat)

    def _parse(self, source, name, filename) -> nodes.Template:
        return _Guards().visit(super()._parse(source, name, filename))

    def unsafe_undefined(self, obj, attribute):
        """Fail at once on a forbidden attribute (jinja would return an Undefined that prints as "")."""
        raise jinja2.exceptions.SecurityError(f"access to attribute {attribute!r} of a {type(obj).__name__} is unsafe")

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja's signature)
        tick()
        check_params(list(args) + list(kwargs.values()))
        inner = getattr(__obj, "__wrapped__", __obj)  # the sandbox wraps str.format
        owner, name = getattr(inner, "__self__", None), getattr(inner, "__name__", "")
        if isinstance(owner, str):
            if name in ("format", "format_map") and HUGE_BRACE_FIELD.search(owner):
                raise TemplateOverLimit("a format string with a huge width")
            if name == "join" and args and not isinstance(args[0], (list, tuple)):
                args = (list(args[0]),) + args[1:]
            check_amplified(name, owner, list(args), kwargs)
        return created(super().call(__context, __obj, *args, **kwargs))

    def call_binop(self, context, operator, left, right):
        tick()
        limit = current_limits().value
        if operator == "**" and isinstance(right, (int, float)) and isinstance(left, (int, float)):
            if abs(right) > 4096 or (isinstance(left, int) and left.bit_length() * abs(right) > 1_000_000):
                raise TemplateOverLimit(f"a power over 1000000 bits ({left!s:.20} ** {right!s:.20})")
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, bytes, list, tuple)) and isinstance(n, int) and \
                        (len(seq) if isinstance(seq, (str, bytes)) else size_of(seq, limit)) * n > limit:
                    raise TemplateOverLimit(f"a value longer than {limit}")
            if isinstance(left, int) and isinstance(right, int) and left.bit_length() + right.bit_length() > 65536:
                raise TemplateOverLimit("an integer product over 65536 bits")
        if operator == "+" and isinstance(left, (str, bytes, list, tuple)) and \
                size_of(left, limit) + size_of(right, limit) > limit + 4:
            raise TemplateOverLimit(f"a value longer than {limit}")
        if operator == "%" and isinstance(left, str):
            check_params(right if isinstance(right, tuple) else (right,))
            if HUGE_PERCENT_FIELD.search(left):
                raise TemplateOverLimit("a format string with a huge width")
            values = list(right) if isinstance(right, tuple) else list(right.values()) if isinstance(right, dict) \
                else [right]
            if format_bound(left, values) > limit:
                raise TemplateOverLimit(f"a value longer than {limit} (from %)")
        return created(super().call_binop(context, operator, left, right))


def _plain_dict(*args, **kwargs):
    return dict(*args, **kwargs)

