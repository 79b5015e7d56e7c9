"""Protocol -> engine: turn validated OpenAI requests into prompts and SamplingParams, and engine outputs into
responses and SSE chunks. No model logic here; the engine does the work on its own thread.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request as HTTPRequest

from ..control.pins import DEFAULT_PREDICTION_STRENGTH, Steering, SteeringError
from ..control.template import parse_template, template_length
from ..engine import Engine, QueueFullError, RequestError, RequestOutput, SamplingParams
from ..images import ImageError
from .limits import ServerLimits
from .media import MediaError, take_images
from .metrics import Metrics
from .tools import ToolRequestError, template_messages, tool_request
from .protocol import (ChatChoice, ChatCompletionRequest, ChatCompletionResponse, ChatMessageOut, CompletionChoice,
                       CompletionRequest, CompletionResponse, ModelCard, ModelList, StreamOptions, Usage, error_body)


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

    def __init__(self, engine: Engine, prompt: list[int], params: SamplingParams, request_id: str, metrics: Metrics):
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


def sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, separators=(',', ':'))}\n\n"


class Serving:
    def __init__(self, engine: Engine, tokenizer, model_name: str, settled_prefix: bool = True,
                 limits: ServerLimits | None = None, images=None, allowed_media=None, max_images: int = 8):
        self.images = images  # images.ImageSupport, or None: the model takes no images
        self.allowed_media = allowed_media  # --allowed-local-media: the one directory image paths may name
        self.max_images = max_images
        self.engine = engine
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.settled_prefix = settled_prefix
        self._vocabulary = None  # the constraint automata's view of the tokenizer, built on first use
        self._vocabulary_lock = threading.Lock()
        self.limits = limits or ServerLimits()
        self.metrics = Metrics(engine)

    @property
    def max_text_bytes(self) -> int:
        """The longest text (UTF-8 bytes) that can fit in the context: a token covers at most max_token_bytes bytes,
        so longer text is refused before it is encoded (encoding megabytes takes seconds)."""
        return self.engine.max_model_len * self.tokenizer.max_token_bytes

    def encode(self, text: str, param: str, add_special_tokens: bool = False, plain: bool = False) -> list[int]:
        """Token ids of request text, refused (400 naming `param`) when it is too long for the context. Runs on
        the threadpool. plain: special-token text in it is plain text (text from users, e.g. a prediction)."""
        size = len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))
        if size > self.max_text_bytes:
            raise APIError(400, f"{param}: {size} bytes of text cannot fit in the context of "
                                f"{self.engine.max_model_len} tokens (at most {self.max_text_bytes} bytes)",
                           param=param)
        if plain:
            return self.tokenizer.encode_plain(text)
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def models(self) -> ModelList:
        return ModelList(data=[ModelCard(id=self.model_name, max_model_len=self.engine.max_model_len)])

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")

    def steering(self, body, suffix: list[int] | None = None, pins: Steering | None = None) -> Steering | None:
        """The canvas-steering fields (pinned, seed_tokens, strength, prediction, suffix) as one Steering. `pins`
        (a template's) stands in for the pinned field: its pins, named by its pins_from."""
        seed = body.seed_tokens
        if body.prediction is not None:
            if seed is not None:
                raise APIError(400, "give prediction or seed_tokens, not both", param="prediction")
            content = body.prediction.content
            if not isinstance(content, str):  # content parts: their text, in order
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
            if self.tokenizer is None:
                raise APIError(400, "this model has no tokenizer, so a text prediction cannot be used; send "
                                    "seed_tokens", param="prediction")
            seed = self.encode(content, "prediction", plain=True) or None
        pinned, pins_from = None, "pinned"
        if pins is not None:
            pinned, pins_from = dict(pins.pinned), pins.pins_from
        elif body.pinned is not None:
            try:
                pinned = {int(k): v for k, v in body.pinned.items()}
            except ValueError:
                raise APIError(400, "pinned maps output positions (integers, as JSON object keys) to token ids",
                               param="pinned") from None
        if seed is None and body.strength is not None:
            raise APIError(400, "strength needs a prediction or seed_tokens", param="strength")
        if pinned is None and seed is None and suffix is None:
            return None
        strength = body.strength
        if strength is None:
            strength = DEFAULT_PREDICTION_STRENGTH if seed is not None else 1.0
        return Steering(pinned=pinned or {}, seed_tokens=seed, strength=strength, suffix=suffix, pins_from=pins_from)

    def template(self, body, suffix: list[int] | None) -> Steering:
        """`template` as pins: its literal text in place, its holes left to the model (control/template.py)."""
        if suffix is not None or body.pinned is not None:
            raise APIError(400, "template cannot be combined with suffix or pinned", param="template")
        if self.tokenizer is None:
            raise APIError(400, "this model has no tokenizer, so a text template cannot be used", param="template")
        try:
            return parse_template(body.template, lambda text: self.encode(text, "template"),
                                  self.engine.generation.eos_token_id[0])[0]
        except SteeringError as e:
            raise APIError(400, str(e), param="template") from None

    def constraint(self, body, max_tokens: int | None):
        """The automaton for response_format / structured_outputs, or None. Compiling takes time (seconds for a
        free-form JSON object on a large vocabulary), so it runs off the event loop; results are cached."""
        from ..control import Constraint, ConstraintError

        fmt, so = body.response_format, body.structured_outputs
        asked = []
        if fmt is not None and fmt.type != "text":
            asked.append(("response_format", fmt))
        if so is not None:
            asked.append(("structured_outputs", so))
        if not asked:
            return None
        if len(asked) > 1:
            raise APIError(400, "give response_format or structured_outputs, not both", param="structured_outputs")
        param, spec = asked[0]
        if self.tokenizer is None:
            raise APIError(400, "this model has no tokenizer, so it cannot constrain text", param=param)
        vocab = self.vocabulary()
        try:
            if param == "response_format":
                if spec.type == "json_object":
                    return Constraint.json_object(vocab, max_tokens=max_tokens)
                if spec.json_schema is None or spec.json_schema.schema_ is None:
                    raise APIError(400, "response_format json_schema needs json_schema.schema", param=param)
                return Constraint.from_json_schema(spec.json_schema.schema_, vocab, max_tokens=max_tokens)
            given = [k for k in ("json_", "regex", "choice") if getattr(spec, k) is not None]
            if len(given) != 1:
                raise APIError(400, "structured_outputs takes exactly one of json, regex and choice", param=param)
            if spec.json_ is not None:
                return Constraint.from_json_schema(spec.json_, vocab, max_tokens=max_tokens)
            if spec.regex is not None:
                return Constraint.from_regex(spec.regex, vocab, max_tokens=max_tokens)
            return Constraint.from_choice(spec.choice, vocab, max_tokens=max_tokens)
        except ConstraintError as e:
            raise APIError(400, str(e), param=param) from None

    def vocabulary(self):
        """The tokenizer as the constraint automata see it (built once; compiled constraints are cached on it)."""
        from ..control import ConstraintVocabulary

        with self._vocabulary_lock:
            if self._vocabulary is None:
                gen = self.engine.generation
                self._vocabulary = ConstraintVocabulary.from_tokenizer(
                    self.tokenizer.backend, gen.eos_token_id, [gen.pad_token_id],
                    self.engine.model.config.vocab_size)
            return self._vocabulary

    def warm_json_object(self) -> bool:
        """Compile JSON-object mode before the first request asks for it: it takes seconds (most of it building
        the automaton), which would otherwise fall on that request. Returns whether it compiled; a tokenizer that
        cannot spell JSON (the Sudoku model's) simply has no JSON mode."""
        from ..control import Constraint, ConstraintError

        if self.tokenizer is None:
            return False
        try:
            Constraint.json_object(self.vocabulary())
        except ConstraintError:
            return False
        return True

    async def steer(self, body, max_tokens: int | None, suffix: list[int] | None = None,
                    constraint=None, pins: Steering | None = None) -> Steering | None:
        """Steering from the steering fields (`pins`: a template's, in place of pinned) and the constraint fields
        (or `constraint`, built by the caller: a forced tool call's), off the event loop."""
        steering = await run_in_threadpool(self.steering, body, suffix, pins)
        if constraint is None:
            constraint = await run_in_threadpool(self.constraint, body, max_tokens)
        if constraint is None:
            return steering
        if steering is None:
            return Steering(constraint=constraint)
        steering.constraint = constraint  # pins, a seed or a suffix under the constraint (checked by the engine)
        return steering

    def params(self, body, max_tokens: int | None, skip_special_tokens: bool,
               steering: Steering | None = None) -> SamplingParams:
        options = body.stream_options or StreamOptions()
        try:
            return SamplingParams(
                max_tokens=max_tokens, stop=body.stop_list(), seed=body.seed,
                temperature=1.0 if body.temperature is None else body.temperature,
                max_denoising_steps=body.max_denoising_steps, entropy_bound=body.entropy_bound, t_min=body.t_min,
                t_max=body.t_max, pin_prefix=self.settled_prefix if body.settled_prefix is None else body.settled_prefix,
                include_drafts=body.stream and options.include_drafts, skip_special_tokens=skip_special_tokens,
                steering=steering)
        except RequestError as e:
            raise APIError(400, str(e), param=e.param) from None

    def usage(self, out: RequestOutput) -> Usage:
        return Usage(prompt_tokens=out.prompt_tokens, completion_tokens=out.completion_tokens,
                     total_tokens=out.prompt_tokens + out.completion_tokens, denoising_steps=out.denoising_steps)

    # -- /v1/chat/completions ----------------------------------------------------------------------------------
    async def chat(self, body: ChatCompletionRequest, raw: HTTPRequest):
        self.check_model(body.model)
        if self.tokenizer is None:
            raise APIError(400, "this model has no tokenizer, so it cannot render chats; use /v1/completions with "
                                "a prompt of token ids", param="messages")
        from ..control.tools import ToolCallStreamParser, split_tool_calls
        from ..tokenizer import TextTooLongError, ThinkingStreamParser, TokenizerError, split_thinking

        if len(body.messages) > self.limits.max_messages:
            raise APIError(400, f"messages: {len(body.messages)} messages, more than this server's limit of "
                                f"{self.limits.max_messages} (--max-messages)", param="messages")
        kwargs = dict(body.chat_template_kwargs or {})
        thinking = bool(kwargs.pop("enable_thinking", False))
        try:
            tools = tool_request(body)
        except ToolRequestError as e:
            raise APIError(400, str(e), param=e.param) from None
        if tools is not None:
            kwargs["tools"] = tools.tools

        pictures: list = []

        def render() -> list[int]:  # off the event loop: templates and long prompts take time
            messages = [m.model_dump(exclude_none=True) for m in body.messages]
            if _has_images(messages):
                if self.images is None:
                    raise APIError(400, "messages: this model cannot take images (it has no vision tower, or the "
                                        "server runs with --no-vision)", param="messages")
                try:
                    messages, found = take_images(messages, self.allowed_media, self.max_images)
                except (MediaError, ImageError) as e:
                    raise APIError(400, str(e), param="messages") from None
                pictures.extend(found)
            messages = template_messages(messages)
            chars = _text_chars(messages) + _text_chars(kwargs)
            if chars > self.limits.max_content_chars:
                raise APIError(400, f"messages: {chars} characters of text, more than this server's limit of "
                                    f"{self.limits.max_content_chars} (--max-content-chars)", param="messages")
            # message text is encoded as plain text: only the template writes control tokens
            return self.tokenizer.encode_chat(messages, add_generation_prompt=True, enable_thinking=thinking,
                                              max_bytes=self.max_text_bytes, **kwargs)

        try:
            prompt = await run_in_threadpool(render)
        except TextTooLongError as e:
            raise APIError(400, f"messages: {e}", param="messages") from None
        except (TokenizerError, TypeError) as e:
            raise APIError(400, f"cannot render the chat template: {e}", param="messages") from None
        images = None
        if pictures:
            try:
                prompt, patches = await run_in_threadpool(self.images.prepare, prompt, pictures)
            except ImageError as e:
                raise APIError(400, f"messages: {e}", param="messages") from None
            images = self.images.prompt_images([patches])
        # the thought channel markers are special tokens: keep them in the text and split on them
        max_tokens = body.max_completion_tokens or body.max_tokens
        forced = tools is not None and tools.forced is not None
        if forced and (body.structured_outputs is not None or (body.response_format is not None
                                                               and body.response_format.type != "text")):
            # refused before the other constraint compiles (seconds for a JSON object)
            raise APIError(400, f"tool_choice {tools.choice!r} constrains the reply to a tool call; it cannot be "
                                f"combined with response_format or structured_outputs", param="tool_choice")
        # a forced call's grammar is the constraint; pins or a prediction steer the call (checked by the engine)
        forced_call = await run_in_threadpool(self.tool_constraint, body, tools, max_tokens) if forced else None
        steering = await self.steer(body, max_tokens, constraint=forced_call)
        params = self.params(body, max_tokens, skip_special_tokens=False, steering=steering)
        params.images = images
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        try:
            stream = RequestStream(self.engine, prompt, params, request_id, self.metrics)
        except APIError as e:
            if e.param == "prompt":
                e.param = "messages"
            raise
        calls_parser = ToolCallStreamParser() if tools is not None and tools.parse else None
        if body.stream:
            return self._chat_chunks(stream, body, raw, ThinkingStreamParser(), calls_parser)
        text, out = await self._collect(stream, raw)
        reasoning, content = split_thinking(text)
        calls, finish_reason = [], out.finish_reason
        if calls_parser is not None:
            content, calls = split_tool_calls(content)
            if calls:
                content = content if content.strip() else None
                finish_reason = "tool_calls" if finish_reason == "stop" else finish_reason
        message = ChatMessageOut(content=content, reasoning_content=reasoning, reasoning=reasoning,
                                 tool_calls=[c.openai() for c in calls])
        return ChatCompletionResponse(id=request_id, model=self.model_name, usage=self.usage(out),
                                      choices=[ChatChoice(message=message, finish_reason=finish_reason)])

    def tool_constraint(self, body, tools, max_tokens: int | None):
        """The automaton for a forced tool call (tool_choice "required" or a named function): the Gemma call syntax
        with arguments valid against the function's parameters (control/tools.py). Runs on the threadpool."""
        from ..control import Constraint, ConstraintError
        from ..control.schema import SchemaError
        from ..control.tools import MARKERS, call_regex, tool_vocabulary

        marker_ids = {m: self.tokenizer.token_id(m) for m in MARKERS}
        missing = [m for m, i in marker_ids.items() if i is None]
        if missing:
            raise APIError(400, f"tool_choice {tools.choice!r} constrains the reply to a tool call, but this model's "
                                f"tokenizer has no {missing[0]} token", param="tool_choice")
        try:
            repeat = tools.choice == "required" and body.parallel_tool_calls is not False
            regex = call_regex(tools.forced, repeat=repeat)
        except SchemaError as e:
            raise APIError(400, f"tools: {e}", param="tools") from None
        try:
            return Constraint.from_regex(regex, tool_vocabulary(self.vocabulary(), marker_ids), max_tokens=max_tokens,
                                         description=f"tool call ({tools.name or tools.choice})")
        except ConstraintError as e:
            raise APIError(400, str(e), param="tool_choice") from None

    async def _chat_chunks(self, stream: RequestStream, body: ChatCompletionRequest, raw: HTTPRequest, parser,
                           calls_parser=None) -> AsyncIterator[str]:
        base = {"id": stream.request_id, "object": "chat.completion.chunk", "created": _now(), "model": self.model_name}

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
                reasoning, content = parser.feed(out.text)
                if out.finished:
                    tail_reasoning, tail_content = parser.flush()
                    reasoning, content = reasoning + tail_reasoning, content + tail_content
                calls = []
                if calls_parser is not None:  # a call goes out once it closes: its name, then its arguments
                    content, calls = calls_parser.feed(content)
                    if out.finished:
                        tail_content, more = calls_parser.flush()
                        content, calls = content + tail_content, calls + more
                if out.draft is not None:
                    yield chunk({"draft": out.draft})
                if reasoning:
                    yield chunk({"reasoning_content": reasoning, "reasoning": reasoning})
                if content:
                    yield chunk({"content": content})
                for call in calls:
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
                        if (body.stream_options or StreamOptions()).include_usage:
                            yield sse(dict(base, choices=[], usage=self.usage(out).model_dump()))
                    yield sse("[DONE]")
                    return
        finally:
            stream.abort()

    # -- /v1/completions ---------------------------------------------------------------------------------------
    async def completion(self, body: CompletionRequest, raw: HTTPRequest):
        self.check_model(body.model)
        if isinstance(body.prompt, str):
            if self.tokenizer is None:
                raise APIError(400, "this model has no tokenizer: send the prompt as a list of token ids",
                               param="prompt")
            prompt = await run_in_threadpool(self.encode, body.prompt, "prompt", add_special_tokens=True)
        else:
            prompt = list(body.prompt)
        suffix = None
        if body.suffix is not None:
            if self.tokenizer is None:
                raise APIError(400, "this model has no tokenizer, so a text suffix cannot be used", param="suffix")
            suffix = await run_in_threadpool(self.encode, body.suffix, "suffix")
        max_tokens = body.max_tokens
        if body.template is not None:
            templated = await run_in_threadpool(self.template, body, suffix)
            max_tokens = max_tokens or template_length(templated)
            steering = await self.steer(body, max_tokens, pins=templated)
        else:
            steering = await self.steer(body, max_tokens, suffix)
        params = self.params(body, max_tokens, skip_special_tokens=True, steering=steering)
        request_id = f"cmpl-{uuid.uuid4().hex}"
        stream = RequestStream(self.engine, prompt, params, request_id, self.metrics)
        if body.stream:
            return self._completion_chunks(stream, body, raw)
        text, out = await self._collect(stream, raw)
        ids = out.token_ids
        if self.tokenizer is None:
            text = self._ids_text(ids, 0, out.finish_reason)
        choice = CompletionChoice(text=text, finish_reason=out.finish_reason, token_ids=ids)
        return CompletionResponse(id=request_id, model=self.model_name, choices=[choice], usage=self.usage(out))

    async def _completion_chunks(self, stream: RequestStream, body: CompletionRequest, raw: HTTPRequest) -> AsyncIterator[str]:
        base = {"id": stream.request_id, "object": "text_completion", "created": _now(), "model": self.model_name}
        sent = 0
        try:
            while True:
                out = await stream.next(raw)
                if out is None:
                    return
                text = out.text
                if self.tokenizer is None:
                    text = self._ids_text(out.token_ids, sent, out.finish_reason)
                sent += len(out.token_ids)
                if text or out.token_ids or out.finished or out.draft is not None:
                    choice = {"index": 0, "text": text, "logprobs": None, "token_ids": out.token_ids,
                              "finish_reason": out.finish_reason if out.finished else None}
                    if out.draft is not None:
                        choice["draft"] = out.draft
                    if out.finish_reason == "error":
                        yield sse(error_body(out.error or "internal error", "internal_error"))
                    else:
                        yield sse(dict(base, choices=[choice]))
                if out.finished:
                    if out.finish_reason != "error" and (body.stream_options or StreamOptions()).include_usage:
                        yield sse(dict(base, choices=[], usage=self.usage(out).model_dump()))
                    yield sse("[DONE]")
                    return
        finally:
            stream.abort()

    def _ids_text(self, ids: list[int], offset: int, finish_reason: str | None) -> str:
        """Without a tokenizer the text is the token ids, space-separated (EOS left out, as text would)."""
        eos = set(self.engine.generation.eos_token_id)
        words = [str(t) for t in ids if t not in eos]
        return "".join((" " if offset + i else "") + w for i, w in enumerate(words))

    async def _collect(self, stream: RequestStream, raw: HTTPRequest) -> tuple[str, RequestOutput]:
        """Gather a non-streamed request; the output returned carries all token ids and the usage."""
        texts, ids = [], []
        while True:
            out = await stream.next(raw)
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


def _text_chars(value, depth: int = 0) -> int:
    """Characters in all the strings of plain JSON data (deeper than 64 levels counts as too much)."""
    if isinstance(value, str):
        return len(value)
    if depth > 64:
        return 1 << 62
    if isinstance(value, dict):
        return sum(len(str(k)) + _text_chars(v, depth + 1) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return sum(_text_chars(v, depth + 1) for v in value)
    return 0


def _now() -> int:
    return int(time.time())


def _has_images(messages: list[dict]) -> bool:
    return any(isinstance(part, dict) and part.get("type") == "image_url"
               for m in messages if isinstance(m.get("content"), list) for part in m["content"])
