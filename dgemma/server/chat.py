"""POST /v1/chat/completions: messages in; content, reasoning (the thought channel) and tool calls out, whole or
as SSE chunks."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

from starlette.requests import Request as HTTPRequest

from ..inputs.http import chat_input, choice_params
from .logprobs import LogprobWriter
from .protocol import ChatChoice, ChatCompletionRequest, ChatCompletionResponse, ChatMessageOut, error_body
from .streaming import APIError, RequestStream, chunk_base, sse, stream_end, usage


async def chat_completion(serving, body: ChatCompletionRequest, raw: HTTPRequest):
    from ..control.tools import split_tool_calls
    from ..text.thinking import split_thinking

    given = await serving.process(chat_input, body)
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    try:
        stream = RequestStream(serving.engine, given.prompt, choice_params(given.params, body.n), request_id,
                               serving.metrics)
    except APIError as e:
        if e.param == "prompt":
            e.param = "messages"
        raise
    parse_calls = given.tools is not None and given.tools.parse
    if body.stream:
        return _chunks(serving, stream, body, raw, parse_calls)
    choices, outs = [], []
    writer = LogprobWriter(serving.tokenizer, bool(body.return_tokens_as_token_ids))
    for index, (text, out) in enumerate(await stream.collect(raw)):
        reasoning, content = split_thinking(text)
        calls, finish_reason = [], out.finish_reason
        if parse_calls:
            content, calls = split_tool_calls(content)
            if calls:
                content = content if content.strip() else None
                finish_reason = "tool_calls" if finish_reason == "stop" else finish_reason
        message = ChatMessageOut(content=content, reasoning_content=reasoning, reasoning=reasoning,
                                 tool_calls=[c.openai() for c in calls])
        logprobs = None if out.logprobs is None else writer.chat(out.token_ids, out.logprobs)
        choices.append(ChatChoice(index=index, message=message, logprobs=logprobs, finish_reason=finish_reason))
        outs.append(out)
    return ChatCompletionResponse(id=request_id, model=serving.model_name, usage=usage(outs), choices=choices)


class _ChoiceState:
    """One streamed choice's parsers (thought channel, tool calls) and the tool calls it has sent."""

    def __init__(self, parse_calls: bool):
        from ..control.tools import ToolCallStreamParser
        from ..text.thinking import ThinkingStreamParser

        self.parser = ThinkingStreamParser()
        self.calls_parser = ToolCallStreamParser() if parse_calls else None
        self.calls_sent = 0
        self.last = None  # its last output


async def _chunks(serving, stream: RequestStream, body: ChatCompletionRequest, raw: HTTPRequest,
                  parse_calls: bool) -> AsyncIterator[str]:
    base = chunk_base(stream.request_id, "chat.completion.chunk", serving.model_name)
    states = [_ChoiceState(parse_calls) for _ in range(body.n)]
    writer = LogprobWriter(serving.tokenizer, bool(body.return_tokens_as_token_ids))

    def chunk(index: int, delta: dict, finish_reason: str | None = None, logprobs: dict | None = None) -> str:
        return sse(dict(base, choices=[{"index": index, "delta": delta, "logprobs": logprobs,
                                        "finish_reason": finish_reason}]))

    try:
        for index in range(body.n):
            yield chunk(index, {"role": "assistant", "content": ""})
        while True:
            ready = await stream.next(raw)
            if ready is None:
                return
            for index, out in ready:
                state = states[index]
                state.last = out
                if out.finish_reason == "error":
                    yield sse(error_body(out.error or "internal error", "internal_error"))
                    stream.abort()
                    yield sse("[DONE]")
                    return
                # an output's tokens' log-probabilities ride on its first chunk (a chunk of their own if it has none)
                logprobs = None
                if out.logprobs is not None and out.token_ids:
                    logprobs = writer.chat(out.token_ids, out.logprobs)
                for delta, finish_reason in _deltas(out, state) or [({}, None)] * (logprobs is not None):
                    yield chunk(index, delta, finish_reason, logprobs)
                    logprobs = None
            if stream.done:
                for tail in stream_end(base, body, [s.last for s in states]):
                    yield tail
                return
    finally:
        stream.abort()


def _deltas(out, state: _ChoiceState) -> list[tuple[dict, str | None]]:
    """An output's deltas for its choice (draft, reasoning, content, each tool call once it closes: its name, then
    its arguments), then its finish when it finished."""
    reasoning, content, calls = _split(out, state.parser, state.calls_parser)
    deltas = []
    if out.draft is not None:
        deltas.append(({"draft": out.draft}, None))
    if reasoning:
        deltas.append(({"reasoning_content": reasoning, "reasoning": reasoning}, None))
    if content:
        deltas.append(({"content": content}, None))
    for call in calls:
        head = call.openai(state.calls_sent)
        arguments = head["function"].pop("arguments")
        deltas.append(({"tool_calls": [dict(head, function=dict(head["function"], arguments=""))]}, None))
        deltas.append(({"tool_calls": [{"index": state.calls_sent, "function": {"arguments": arguments}}]}, None))
        state.calls_sent += 1
    if out.finished:
        finish_reason = out.finish_reason
        if state.calls_sent and finish_reason == "stop":
            finish_reason = "tool_calls"
        deltas.append(({}, finish_reason))
    return deltas


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
