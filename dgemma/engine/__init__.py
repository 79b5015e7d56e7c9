"""Continuous-batching serving engine: requests, scheduler, model runner and the engine loop."""

from .engine import Completion, Engine
from .request import RequestError, RequestOutput, SamplingParams
from .scheduler import QueueFullError

__all__ = ["Completion", "Engine", "QueueFullError", "RequestError", "RequestOutput", "SamplingParams"]
