"""One way in: the input processor that the CLI and the server share (processor.py), with an adapter for each
(args.py: command-line flags; http.py: OpenAI request bodies)."""

from .processor import InputError, InputProcessor, SteeringPlan

__all__ = ["InputError", "InputProcessor", "SteeringPlan"]
