"""`tools` and `tool_choice` on /v1/chat/completions: what a request asks for, and the history the template sees.

tool_choice (default "auto" when tools are given, as OpenAI and vLLM do):
- "none": the tools are rendered into the prompt (the model knows them, vLLM's default) and the reply is not
  parsed for calls: it is all content.
- "auto": the reply is parsed; each well-formed `<|tool_call>...<tool_call|>` becomes a tool_call, the rest
  stays content.
- "required": the reply is constrained to one or more calls of the given functions, arguments valid against
  each one's parameters schema (control/tools.py).
- {"type": "function", "function": {"name": N}}: the reply is constrained to exactly one call of N.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from ..errors import DgemmaError


class ToolRequestError(DgemmaError, ValueError):
    """A bad tools/tool_choice field; `param` names it."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class ToolRequest:
    tools: list[dict]  # as the chat template reads them: [{"type": "function", "function": {...}}]
    choice: str  # "none", "auto", "required" or "named"
    name: str | None = None  # the named function

    @property
    def parse(self) -> bool:
        return self.choice != "none"

    @property
    def forced(self) -> list[dict] | None:
        """The functions ({"name", "parameters"}) the reply must call, or None when it need not call any."""
        functions = [t["function"] for t in self.tools]
        if self.choice == "required":
            return functions
        if self.choice == "named":
            return [f for f in functions if f["name"] == self.name]
        return None


def tool_request(body) -> ToolRequest | None:
    """The request's tools and tool_choice, checked; None when it has no tools. ToolRequestError names the field."""
    choice = body.tool_choice
    if not body.tools:
        if choice is not None and choice != "none":
            raise ToolRequestError("tool_choice needs tools: this request lists none", "tool_choice")
        return None
    tools = [t.model_dump(exclude_none=True) for t in body.tools]
    names = [t["function"]["name"] for t in tools]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise ToolRequestError(f"tools[{i}].function.name: {name!r} is declared twice", f"tools[{i}].function.name")
        check_parameters(tools[i]["function"].get("parameters"), f"tools[{i}].function.parameters")
    if choice is None or isinstance(choice, str):
        return ToolRequest(tools, choice or "auto")
    if choice.function.name not in names:
        raise ToolRequestError(f"tool_choice names the function {choice.function.name!r}, which is not in tools "
                               f"({', '.join(names)})", "tool_choice")
    return ToolRequest(tools, "named", choice.function.name)


def check_parameters(parameters, path: str) -> None:
    """A function's parameters must be a JSON schema of an object: the shape the template renders and clients
    fill. (A forced call checks the whole schema when it compiles.)"""
    if parameters is None:
        return
    if parameters.get("type", "object") != "object":
        raise ToolRequestError(f"{path}: type must be \"object\", got {json.dumps(parameters['type'])[:40]}", path)
    properties = parameters.get("properties", {})
    if not isinstance(properties, dict) or not all(isinstance(v, dict) for v in properties.values()):
        raise ToolRequestError(f"{path}.properties: must map each argument name to a schema object", path)
    required = parameters.get("required", [])
    if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
        raise ToolRequestError(f"{path}.required: must be a list of argument names", path)
    missing = [r for r in required if r not in properties]
    if missing:
        raise ToolRequestError(f"{path}.required: {missing[0]!r} is not in properties", path)


def template_messages(messages: list[dict]) -> list[dict]:
    """Messages as the template reads them: a tool call's `arguments`, which OpenAI clients send as JSON text, become
    the object it holds (as vLLM does), so the template writes them in the Gemma call syntax."""
    out = []
    for message in messages:
        calls = message.get("tool_calls")
        if isinstance(calls, list):
            message = dict(message, tool_calls=[_with_argument_object(c) for c in calls])
        out.append(message)
    return out


def _with_argument_object(call):
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("arguments"), str):
        return call
    try:
        arguments = json.loads(function["arguments"])
    except ValueError:
        return call
    if not isinstance(arguments, dict):
        return call
    return dict(call, function=dict(function, arguments=arguments))
