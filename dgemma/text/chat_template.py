"""Chat templates from checkpoints, rendered in a jinja2 sandbox.

Templates are untrusted code: they render in an immutable sandbox (template_sandbox.py) with a budget on steps,
time, value sizes and output size (template_budget.py), and every failure is a one-line TokenizerError.
"""

from __future__ import annotations

import jinja2

from ..errors import DgemmaError, one_line
from ..package_data import TEMPLATE_DIR
from .template_budget import DEFAULT_LIMITS, RENDER_BUDGET, Budget, TemplateLimits, TemplateOverLimit
from .template_sandbox import ChatTemplateEnvironment, TemplateRaised

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



def plain_value(value, depth: int = 0):
    """Rebuild template inputs out of plain JSON types, so the sandbox never sees a rich object's methods."""
    if depth > 64:
        raise TokenizerError("chat template input is nested more than 64 levels deep")
    if value is None or type(value) in (str, int, float, bool):
        return value
    for base in (bool, str, int, float):  # subclasses (enums, ...) become the base value
        if isinstance(value, base):
            return base.__str__(value) if base is str else base(value)
    if isinstance(value, dict):
        return {str(k): plain_value(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_value(v, depth + 1) for v in value]
    return f"<{type(value).__name__}>"


class ChatTemplate:
    """One compiled, sandboxed chat template. `source` names where it came from, for error messages."""

    _env = None

    def __init__(self, template: str, source: str, limits: TemplateLimits | None = None) -> None:
        self.text = template
        self.source = source
        self.limits = limits or DEFAULT_LIMITS
        if ChatTemplate._env is None:
            ChatTemplate._env = ChatTemplateEnvironment()
        try:
            self._template = ChatTemplate._env.from_string(template)
        except jinja2.TemplateError as err:
            raise TokenizerError(f"{source}: chat template does not compile: {one_line(err)}") from None
        except Exception as err:  # noqa: BLE001 (a template must never crash the loader)
            raise TokenizerError(f"{source}: chat template does not compile: {one_line(err)}") from None

    def render(self, **context) -> str:
        token = RENDER_BUDGET.set(Budget(self.limits))
        try:
            parts, size = [], 0
            for chunk in self._template.generate(**context):
                size += len(chunk)
                if size > self.limits.output:
                    raise TemplateOverLimit(f"more than {self.limits.output} characters of output")
                parts.append(chunk)
            return "".join(parts)
        except TemplateOverLimit as err:
            raise TokenizerError(f"{self.source}: chat template went over a limit: {err}") from None
        except TemplateRaised as err:
            raise TokenizerError(f"{self.source}: chat template refused: {one_line(err, False)}") from None
        except jinja2.exceptions.SecurityError as err:
            raise TokenizerError(f"{self.source}: chat template blocked by the sandbox: {one_line(err)}") from None
        except jinja2.TemplateError as err:
            raise TokenizerError(f"{self.source}: chat template failed: {one_line(err)}") from None
        except Exception as err:  # noqa: BLE001 (OverflowError, RecursionError, TypeError, ... from the template)
            raise TokenizerError(f"{self.source}: chat template failed: {one_line(err)}") from None
        finally:
            RENDER_BUDGET.reset(token)

