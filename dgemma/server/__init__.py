"""OpenAI-compatible HTTP server over the engine: protocol (pydantic), serving (protocol -> engine), app (FastAPI),
serve_cli (`dgemma serve`).

The names below load on first use, so `dgemma generate` (which registers the serve subcommand) never imports
FastAPI."""

__all__ = ["ServerThread", "Serving", "build_app"]


def __getattr__(name: str):
    if name in ("ServerThread", "build_app"):
        from . import app

        return getattr(app, name)
    if name == "Serving":
        from .serving import Serving

        return Serving
    raise AttributeError(name)
