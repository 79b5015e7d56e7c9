"""Protocol -> engine, thinly: a validated OpenAI request goes through the input processor (dgemma/inputs), then to
the engine (an EngineClient) as one request whose outputs come back as a response or SSE chunks (chat.py,
completions.py, streaming.py). No model logic here; the engine does the work on its own thread.
"""

from __future__ import annotations

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request as HTTPRequest

from ..engine.client import EngineClient
from ..inputs import InputError, InputProcessor
from ..inputs.http import RequestInput, ServingOptions
from .limits import ServerLimits
from .metrics import Metrics
from .protocol import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList
from .streaming import APIError

__all__ = ["APIError", "Serving"]


class Serving:
    def __init__(self, engine: EngineClient, tokenizer, model_name: str, settled_prefix: bool = True,
                 limits: ServerLimits | None = None, images=None, allowed_media=None, max_images: int = 8,
                 compile_limits=None):
        self.engine = engine
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.limits = limits or ServerLimits()
        self.options = ServingOptions(settled_prefix=settled_prefix, max_messages=self.limits.max_messages,
                                      max_content_chars=self.limits.max_content_chars, images=images,
                                      allowed_media=allowed_media, max_images=max_images)
        self.inputs = InputProcessor(tokenizer, engine.generation, engine.vocab_size, engine.max_model_len,
                                     engine.canvas_length, compile_limits)
        self.metrics = Metrics(engine)

    def models(self) -> ModelList:
        return ModelList(data=[ModelCard(id=self.model_name, max_model_len=self.engine.max_model_len)])

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")

    def vocabulary(self):
        """The tokenizer as the constraint automata see it (built once; compiled constraints are cached on it)."""
        return self.inputs.vocabulary()

    def warm_json_object(self) -> bool:
        """Compile JSON-object mode before the first request asks for it: it takes seconds (most of it building
        the automaton), which would otherwise fall on that request. Returns whether it compiled; a tokenizer that
        cannot spell JSON (the Sudoku model's) simply has no JSON mode."""
        from ..control import Constraint, ConstraintError

        if self.tokenizer is None:
            return False
        try:
            Constraint.json_object(self.vocabulary(), limits=self.inputs.compile_limits)
        except ConstraintError:
            return False
        return True

    async def process(self, adapter, body) -> RequestInput:
        """The request's input (inputs/http.py's `adapter`), built off the event loop; a refusal is a 400."""
        from ..control.gate import CompileBusy

        try:
            return await run_in_threadpool(adapter, self.inputs, body, self.options)
        except InputError as e:
            raise APIError(400, str(e), param=e.param) from None
        except CompileBusy as e:  # too many constraint compiles at once (control/gate.py)
            raise APIError(429, str(e), type_="rate_limit_error", code="compile_busy",
                           headers={"Retry-After": str(e.retry_after)}) from None

    async def chat(self, body: ChatCompletionRequest, raw: HTTPRequest):
        from .chat import chat_completion

        self.check_model(body.model)
        _set_compile_client(raw)
        return await chat_completion(self, body, raw)

    async def completion(self, body: CompletionRequest, raw: HTTPRequest):
        from .completions import completion

        self.check_model(body.model)
        _set_compile_client(raw)
        return await completion(self, body, raw)


def _set_compile_client(raw: HTTPRequest) -> None:
    """Constraint compiles this request starts count against its client's address (control/gate.py)."""
    from ..control.gate import compile_client

    compile_client.set(raw.client.host if raw.client is not None else None)
