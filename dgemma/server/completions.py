"""POST /v1/completions: a prompt (text or token ids) in, text and token ids out (n choices), whole or as SSE
chunks."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

from starlette.requests import Request as HTTPRequest

from ..inputs.http import choice_params, completion_input
from .logprobs import LogprobWriter
from .protocol import CompletionChoice, CompletionRequest, CompletionResponse, error_body
from .streaming import RequestStream, chunk_base, sse, stream_end, usage


async def completion(serving, body: CompletionRequest, raw: HTTPRequest):
    given = await serving.process(completion_input, body)
    request_id = f"cmpl-{uuid.uuid4().hex}"
    stream = RequestStream(serving.engine, given.prompt, choice_params(given.params, body.n), request_id,
                           serving.metrics)
    if body.stream:
        return _chunks(serving, stream, body, raw)
    choices, outs = [], []
    writer = LogprobWriter(serving.tokenizer, bool(body.return_tokens_as_token_ids))
    for index, (text, out) in enumerate(await stream.collect(raw)):
        if serving.tokenizer is None:
            text = _ids_text(serving, out.token_ids, 0)
        logprobs = None if out.logprobs is None else writer.completion(out.token_ids, out.logprobs, 0)
        choices.append(CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=out.finish_reason,
                                        token_ids=out.token_ids))
        outs.append(out)
    return CompletionResponse(id=request_id, model=serving.model_name, choices=choices, usage=usage(outs))


async def _chunks(serving, stream: RequestStream, body: CompletionRequest, raw: HTTPRequest) -> AsyncIterator[str]:
    base = chunk_base(stream.request_id, "text_completion", serving.model_name)
    sent = [0] * body.n  # token ids sent per choice
    offsets = [0] * body.n  # characters of token text sent per choice (completion logprobs' text_offset)
    writer = LogprobWriter(serving.tokenizer, bool(body.return_tokens_as_token_ids))
    last = [None] * body.n
    try:
        while True:
            ready = await stream.next(raw)
            if ready is None:
                return
            for index, out in ready:
                last[index] = out
                text = out.text
                if serving.tokenizer is None:
                    text = _ids_text(serving, out.token_ids, sent[index])
                sent[index] += len(out.token_ids)
                if out.finish_reason == "error":
                    yield sse(error_body(out.error or "internal error", "internal_error"))
                    stream.abort()
                    yield sse("[DONE]")
                    return
                if text or out.token_ids or out.finished or out.draft is not None:
                    logprobs = None
                    if out.logprobs is not None:
                        logprobs = writer.completion(out.token_ids, out.logprobs, offsets[index])
                        offsets[index] += sum(len(t) for t in logprobs["tokens"])
                    choice = {"index": index, "text": text, "logprobs": logprobs, "token_ids": out.token_ids,
                              "finish_reason": out.finish_reason if out.finished else None}
                    if out.draft is not None:
                        choice["draft"] = out.draft
                    yield sse(dict(base, choices=[choice]))
            if stream.done:
                for tail in stream_end(base, body, last):
                    yield tail
                return
    finally:
        stream.abort()


def _ids_text(serving, ids: list[int], offset: int) -> str:
    """Without a tokenizer the text is the token ids, space-separated (EOS left out, as text would)."""
    eos = set(serving.engine.generation.eos_token_id)
    words = [str(t) for t in ids if t not in eos]
    return "".join((" " if offset + i else "") + w for i, w in enumerate(words))
