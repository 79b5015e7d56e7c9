"""Between a handler and the engine: an engine request's outputs on the event loop (RequestStream), SSE framing,
gathering a non-streamed reply, and the error type every handler answers in OpenAI's format."""

from __future__ import annotations

import asyncio
import json
import time

from starlette.requests import Request as HTTPRequest

from ..engine import QueueFullError, RequestError, RequestOutput, SamplingParams
from ..engine.client import EngineClient
from .metrics import Metrics
from .protocol import StreamOptions, Usage, error_body


class APIError(Exception):
    """An error answered in OpenAI's format: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


class RequestStream:
    """A response's engine requests, one per choice (`params`, in choice order), and their outputs delivered on the
    event loop as (choice index, output). Aborts every unfinished request if dropped."""

    def __init__(self, engine: EngineClient, prompt: list[int], params: list[SamplingParams], request_id: str,
                 metrics: Metrics):
        loop = asyncio.get_running_loop()
        self.engine, self.request_id = engine, request_id
        # one choice keeps the response's id as its engine request's id; several are told apart by a suffix
        self.ids = [request_id] if len(params) == 1 else [f"{request_id}-{i}" for i in range(len(params))]
        self.queue: asyncio.Queue[tuple[int, RequestOutput]] = asyncio.Queue()
        self.finished: set[int] = set()
        self.last_check = time.monotonic()

        def sink_of(index: int):
            def sink(out: RequestOutput) -> None:  # engine thread
                if out.finished:
                    metrics.observe(out.finish_reason, out.prompt_tokens, out.completion_tokens,
                                    out.denoising_steps, out.ttft, out.latency)
                loop.call_soon_threadsafe(self.queue.put_nowait, (index, out))
            return sink

        added = 0
        try:
            for index, (engine_id, choice_params) in enumerate(zip(self.ids, params)):
                engine.add_request(prompt, choice_params, sink_of(index), engine_id)
                added += 1
        except (RequestError, QueueFullError) as e:
            for engine_id in self.ids[:added]:  # all the choices or none
                engine.abort(engine_id)
            self.finished = set(range(len(self.ids)))
            if isinstance(e, RequestError):
                raise APIError(400, str(e), param=e.param) from None
            raise APIError(429, str(e), "rate_limit_error", code="queue_full", headers={"Retry-After": "1"}) from None

    @property
    def done(self) -> bool:
        return len(self.finished) == len(self.ids)

    async def next(self, raw: HTTPRequest) -> list[tuple[int, RequestOutput]] | None:
        """The outputs ready now (at least one), or None (and every request aborted) once the client has gone away.
        The client is checked at least every half second: starlette does not cancel a handler whose client
        disconnects."""
        while True:
            try:
                item = await asyncio.wait_for(self.queue.get(), timeout=0.5)
            except asyncio.TimeoutError:
                item = None
            now = time.monotonic()
            if item is None or now - self.last_check > 0.5:
                self.last_check = now
                if await raw.is_disconnected():
                    self.abort()
                    return None
            if item is not None:
                # Outputs that queued up while the client was being served go out together, a choice's run of
                # outputs as one: under load the engine steps faster than per-step chunks can be sent.
                ready = [item]
                while not self.queue.empty():
                    index, out = self.queue.get_nowait()
                    last_index, last = ready[-1]
                    if index == last_index and not last.finished:
                        ready[-1] = (index, last.merged(out))
                    else:
                        ready.append((index, out))
                self.finished |= {index for index, out in ready if out.finished}
                return ready

    def abort(self) -> None:
        for index, engine_id in enumerate(self.ids):
            if index not in self.finished:
                self.engine.abort(engine_id)
                self.finished.add(index)

    async def collect(self, raw: HTTPRequest) -> list[tuple[str, RequestOutput]]:
        """Gather a non-streamed response: per choice, its text and its last output, which carries all its token
        ids (and their log-probabilities) and its usage."""
        texts: list[list[str]] = [[] for _ in self.ids]
        ids: list[list[int]] = [[] for _ in self.ids]
        logprobs: list[list | None] = [None] * len(self.ids)
        last: list[RequestOutput | None] = [None] * len(self.ids)
        try:
            while not all(out is not None and out.finished for out in last):
                ready = await self.next(raw)
                if ready is None:
                    raise APIError(499, "the client closed the connection")
                for index, out in ready:
                    texts[index].append(out.text)
                    ids[index] += out.token_ids
                    if out.logprobs is not None:
                        logprobs[index] = (logprobs[index] or []) + out.logprobs
                    last[index] = out
                    if out.finish_reason == "error":
                        raise APIError(500, out.error or "internal error", "internal_error")
        finally:
            self.abort()
        for out, choice_ids, choice_logprobs in zip(last, ids, logprobs):
            out.token_ids, out.logprobs = choice_ids, choice_logprobs
        return [("".join(t), out) for t, out in zip(texts, last)]


def sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, separators=(',', ':'))}\n\n"


def usage(outs: list[RequestOutput]) -> Usage:
    """A response's usage from its choices' last outputs: the prompt once (the choices share it), the completion
    tokens and denoising steps of all the choices."""
    prompt = outs[0].prompt_tokens
    completion = sum(out.completion_tokens for out in outs)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                 denoising_steps=sum(out.denoising_steps for out in outs))


def chunk_base(request_id: str, obj: str, model: str) -> dict:
    """The fields every SSE chunk of one response carries."""
    return {"id": request_id, "object": obj, "created": int(time.time()), "model": model}


def stream_end(base: dict, body, outs: list[RequestOutput]) -> list[str]:
    """The last chunks of a finished stream: its usage (when the request asked for it, stream_options.include_usage,
    and no choice failed), then [DONE]. `outs`: each choice's last output."""
    tail = []
    failed = any(out.finish_reason == "error" for out in outs)
    if not failed and (body.stream_options or StreamOptions()).include_usage:
        tail.append(sse(dict(base, choices=[], usage=usage(outs).model_dump())))
    return tail + [sse("[DONE]")]
