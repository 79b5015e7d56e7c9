"""OpenAI-compatible HTTP server over the engine: protocol (pydantic), serving (protocol -> engine), app (FastAPI)."""

from .app import ServerThread, add_serve_parser, build_app
from .serving import Serving

__all__ = ["ServerThread", "Serving", "add_serve_parser", "build_app"]
