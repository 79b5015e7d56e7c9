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
    """One engine request's outputs, delivered on the event loop. Aborts the request if dropped unfinished."""

    def __init__(self, engine: EngineClient, prompt: list[int], params: SamplingParams, request_id: str,
                 metrics: Metrics):
        loop = asyncio.get_running_loop()
        self.engine, self.request_id = engine, request_id
        self.queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self.finished = False
        self.last_check = time.monotonic()

        def sink(out: RequestOutput) -> None:  # engine thread
            if out.finished:
                metrics.observe(out.finish_reason, out.prompt_tokens, out.completion_tokens, out.denoising_steps,
                                out.ttft, out.latency)
            loop.call_soon_threadsafe(self.queue.put_nowait, out)

        try:
            engine.add_request(prompt, params, sink, request_id)
        except RequestError as e:
            raise APIError(400, str(e), param=e.param) from None
        except QueueFullError as e:
            raise APIError(429, str(e), "rate_limit_error", code="queue_full", headers={"Retry-After": "1"}) from None

    async def next(self, raw: HTTPRequest) -> RequestOutput | None:
        """The next output, or None (and the request aborted) once the client has gone away. The client is
        checked at least every half second: starlette does not cancel a handler whose client disconnects."""
        while True:
            try:
                out = await asyncio.wait_for(self.queue.get(), timeout=0.5)
            except asyncio.TimeoutError:
                out = None
            now = time.monotonic()
            if out is None or now - self.last_check > 0.5:
                self.last_check = now
                if await raw.is_disconnected():
                    self.abort()
                    return None
            if out is not None:
                # Outputs that queued up while the client was being served go out as one chunk: under load the
                # engine steps faster than per-step chunks can be sent.
                while not out.finished and not self.queue.empty():
                    out = out.merged(self.queue.get_nowait())
                self.finished = out.finished
                return out

    def abort(self) -> None:
        if not self.finished:
            self.engine.abort(self.request_id)
            self.finished = True

    async def collect(self, raw: HTTPRequest) -> tuple[str, RequestOutput]:
        """Gather a non-streamed request; the output returned carries all token ids and the usage."""
        texts, ids = [], []
        while True:
            out = await self.next(raw)
            if out is None:
                raise APIError(499, "the client closed the connection")
            texts.append(out.text)
            ids += out.token_ids
            if out.finished:
                break
        if out.finish_reason == "error":
            raise APIError(500, out.error or "internal error", "internal_error")
        out.token_ids = ids
        return "".join(texts), out


def sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, separators=(',', ':'))}\n\n"


def usage(out: RequestOutput) -> Usage:
    return Usage(prompt_tokens=out.prompt_tokens, completion_tokens=out.completion_tokens,
                 total_tokens=out.prompt_tokens + out.completion_tokens, denoising_steps=out.denoising_steps)


def chunk_base(request_id: str, obj: str, model: str) -> dict:
    """The fields every SSE chunk of one response carries."""
    return {"id": request_id, "object": obj, "created": int(time.time()), "model": model}


def stream_end(base: dict, body, out: RequestOutput) -> list[str]:
    """The last chunks of a finished stream: its usage (when the request asked for it, stream_options.include_usage,
    and did not fail), then [DONE]."""
    tail = []
    if out.finish_reason != "error" and (body.stream_options or StreamOptions()).include_usage:
        tail.append(sse(dict(base, choices=[], usage=usage(out).model_dump())))
    return tail + [sse("[DONE]")]
