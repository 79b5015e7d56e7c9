"""POST /v1/chat/completions: messages in; content, reasoning (the thought channel) and tool calls out, whole or
as SSE chunks."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

from starlette.requests import Request as HTTPRequest

from ..inputs.http import chat_input
from .protocol import ChatChoice, ChatCompletionRequest, ChatCompletionResponse, ChatMessageOut, error_body
from .streaming import APIError, RequestStream, chunk_base, sse, stream_end, usage


async def chat_completion(serving, body: ChatCompletionRequest, raw: HTTPRequest):
    from ..control.tools import ToolCallStreamParser, split_tool_calls
    from ..tokenizer import ThinkingStreamParser, split_thinking

    given = await serving.process(chat_input, body)
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    try:
        stream = RequestStream(serving.engine, given.prompt, given.params, request_id, serving.metrics)
    except APIError as e:
        if e.param == "prompt":
            e.param = "messages"
        raise
    calls_parser = ToolCallStreamParser() if given.tools is not None and given.tools.parse else None
    if body.stream:
        return _chunks(serving, stream, body, raw, ThinkingStreamParser(), calls_parser)
    text, out = await stream.collect(raw)
    reasoning, content = split_thinking(text)
    calls, finish_reason = [], out.finish_reason
    if calls_parser is not None:
        content, calls = split_tool_calls(content)
        if calls:
            content = content if content.strip() else None
            finish_reason = "tool_calls" if finish_reason == "stop" else finish_reason
    message = ChatMessageOut(content=content, reasoning_content=reasoning, reasoning=reasoning,
                             tool_calls=[c.openai() for c in calls])
    return ChatCompletionResponse(id=request_id, model=serving.model_name, usage=usage(out),
                                  choices=[ChatChoice(message=message, finish_reason=finish_reason)])


async def _chunks(serving, stream: RequestStream, body: ChatCompletionRequest, raw: HTTPRequest, parser,
                  calls_parser=None) -> AsyncIterator[str]:
    base = chunk_base(stream.request_id, "chat.completion.chunk", serving.model_name)

    def chunk(delta: dict, finish_reason: str | None = None) -> str:
        return sse(dict(base, choices=[{"index": 0, "delta": delta, "logprobs": None,
                                        "finish_reason": finish_reason}]))

    calls_sent = 0
    try:
        yield chunk({"role": "assistant", "content": ""})
        while True:
            out = await stream.next(raw)
            if out is None:
                return
            reasoning, content, calls = _split(out, parser, calls_parser)
            if out.draft is not None:
                yield chunk({"draft": out.draft})
            if reasoning:
                yield chunk({"reasoning_content": reasoning, "reasoning": reasoning})
            if content:
                yield chunk({"content": content})
            for call in calls:  # a call goes out once it closes: its name, then its arguments
                head = call.openai(calls_sent)
                arguments = head["function"].pop("arguments")
                yield chunk({"tool_calls": [dict(head, function=dict(head["function"], arguments=""))]})
                yield chunk({"tool_calls": [{"index": calls_sent, "function": {"arguments": arguments}}]})
                calls_sent += 1
            if out.finished:
                if out.finish_reason == "error":
                    yield sse(error_body(out.error or "internal error", "internal_error"))
                else:
                    finish_reason = out.finish_reason
                    if calls_sent and finish_reason == "stop":
                        finish_reason = "tool_calls"
                    yield chunk({}, finish_reason)
                for tail in stream_end(base, body, out):
                    yield tail
                return
    finally:
        stream.abort()


def _split(out, parser, calls_parser) -> tuple[str, str, list]:
    """An output's new text as reasoning, content and the tool calls that closed in it (all, once it finished)."""
    reasoning, content = parser.feed(out.text)
    if out.finished:
        tail_reasoning, tail_content = parser.flush()
        reasoning, content = reasoning + tail_reasoning, content + tail_content
    calls = []
    if calls_parser is not None:
        content, calls = calls_parser.feed(content)
        if out.finished:
            tail_content, more = calls_parser.flush()
            content, calls = content + tail_content, calls + more
    return reasoning, content, calls
