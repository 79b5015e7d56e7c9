"""EngineClient: what the HTTP server needs of an engine, and all it may use. The real Engine (engine.py) and the
tests' scripted engine both implement it; the server never reaches past it into the model."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from ..config import GenerationConfig
from .request import SamplingParams, Sink


@runtime_checkable
class EngineClient(Protocol):
    generation: GenerationConfig  # the checkpoint's generation config (EOS, pad, the sampler's defaults)
    max_model_len: int  # prompt + output tokens one request may hold

    @property
    def vocab_size(self) -> int:
        """The model's vocabulary size (token ids are in [0, vocab_size))."""

    @property
    def canvas_length(self) -> int:
        """Tokens in one canvas (the block the model denoises at once)."""

    @property
    def num_running(self) -> int:
        """Requests holding a cache row."""

    @property
    def num_waiting(self) -> int:
        """Requests in the waiting queue."""

    @property
    def num_steps(self) -> int:
        """Batched denoising steps run so far."""

    def add_request(self, prompt: list[int], params: SamplingParams, sink: Sink, request_id: str | None = None):
        """Validate and queue a request (thread-safe); its outputs go to `sink`, called from the engine's thread.
        Raises RequestError (a 400) or QueueFullError (a 429)."""

    def abort(self, request_id: str) -> None:
        """Cancel a request (thread-safe); its sink gets a last output with finish_reason "abort"."""
