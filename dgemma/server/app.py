"""The FastAPI app, the `dgemma serve` command and a helper that runs a server on a background thread.

Endpoints: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /openapi.json and GET /metrics
(Prometheus; these five behind the API key when one is set, /metrics unless public_metrics), GET /health, and the playground: GET / and
GET /static/NAME, the page's files (open to all: the page asks for the key and sends it on the API calls it makes).
Every error is answered in OpenAI's format. The Guard (guard.py) checks the Host, the origin and the body size before the app sees a request.
"""

from __future__ import annotations

import hmac
import logging
import threading
import time
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .guard import Guard, uvicorn_config
from ..package_data import STATIC_DIR
from .protocol import ChatCompletionRequest, CompletionRequest, error_body
from .serving import APIError, Serving

log = logging.getLogger("dgemma.server")

MEDIA_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
               ".css": "text/css; charset=utf-8"}
# The page loads nothing from elsewhere and talks only to this server; a CSP makes the browser hold it to that.
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' "
                                           "data:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
                                           "frame-ancestors 'none'",
                "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}


def playground_files() -> dict[str, tuple[bytes, str]]:
    """The playground's files, name -> (bytes, media type), read once: the routes serve only these names."""
    return {p.name: (p.read_bytes(), MEDIA_TYPES[p.suffix]) for p in sorted(STATIC_DIR.iterdir())
            if p.suffix in MEDIA_TYPES}


def build_app(serving: Serving, api_key: str | None = None, allowed_hosts: list[str] | None = None,
              public_metrics: bool = False) -> FastAPI:
    """The app over a started engine (the caller owns the engine's lifetime). Its limits are serving.limits.
    allowed_hosts: host names besides IP addresses and localhost that clients may use ("*": any)."""
    app = FastAPI(title="dgemma", docs_url=None, redoc_url=None, openapi_url=None)  # its schema: behind the key
    app.state.limits = serving.limits
    app.add_middleware(Guard, limits=serving.limits, allowed_hosts=allowed_hosts, refuse_cross_origin=not api_key)

    def check_key(request: Request) -> None:
        if not api_key:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        # the scheme is case-insensitive (RFC 9110); the key is compared in constant time
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), api_key.encode()):
            raise APIError(401, "missing or wrong API key (send Authorization: Bearer KEY)",
                           code="invalid_api_key")

    def respond(result) -> Response:
        if isinstance(result, BaseModel):
            return JSONResponse(result.model_dump())
        return StreamingResponse(result, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    add_error_handlers(app)

    async def parse(model: type[BaseModel], raw: Request):
        # parsed here rather than by FastAPI so a body sent without Content-Type: application/json (curl -d) works;
        # on the threadpool, as a body of megabytes takes a while
        body = await raw.body()
        try:
            return await run_in_threadpool(model.model_validate_json, body)
        except ValidationError as e:
            raise RequestValidationError(e.errors()) from None

    @app.post("/v1/chat/completions", dependencies=[Depends(check_key)])
    async def chat_completions(raw: Request):
        return respond(await serving.chat(await parse(ChatCompletionRequest, raw), raw))

    @app.post("/v1/completions", dependencies=[Depends(check_key)])
    async def completions(raw: Request):
        return respond(await serving.completion(await parse(CompletionRequest, raw), raw))

    @app.get("/v1/models", dependencies=[Depends(check_key)])
    async def models():
        return respond(serving.models())

    @app.get("/openapi.json", dependencies=[Depends(check_key)], include_in_schema=False)
    async def openapi():
        return JSONResponse(app.openapi())

    @app.get("/health")
    async def health():
        return {"status": "ok", "running": serving.engine.num_running, "waiting": serving.engine.num_waiting}

    files = playground_files()

    def page_file(name: str) -> Response:
        if name not in files:
            raise APIError(404, f"no such file: {name}", code="not_found")
        content, media_type = files[name]
        return Response(content, media_type=media_type, headers=PAGE_HEADERS)

    @app.get("/", include_in_schema=False)
    async def playground():
        return page_file("index.html")

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str):
        return page_file(name)

    @app.get("/metrics", dependencies=[] if public_metrics else [Depends(check_key)])
    async def metrics():
        return Response(serving.metrics.render(), media_type="text/plain; version=0.0.4")

    return app


def add_error_handlers(app: FastAPI) -> None:
    """Every error answered in OpenAI's format: APIError as raised, a validation error as a 400 naming the field,
    starlette's (404, 405) with their headers, anything else a 500 whose traceback goes to the log."""

    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        if first.get("type") == "json_invalid":
            return JSONResponse(error_body(f"the body is not valid JSON: {first.get('ctx', {}).get('error', '')}",
                                           "invalid_request_error"), status_code=400)
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        # drop pydantic's union-branch names ("str", "list[int]") so the param is the field path
        param = ".".join(x for x in loc if not any(c in x for c in "[]") and x not in ("str", "int", "float", "bool"))
        message = f"{param or 'body'}: {first.get('msg', 'invalid value')}"
        return JSONResponse(error_body(message, "invalid_request_error", param or None), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException):
        return JSONResponse(error_body(str(e.detail), "invalid_request_error"), status_code=e.status_code,
                            headers=e.headers)  # 405 keeps its Allow header

    @app.exception_handler(Exception)
    async def internal_error(_: Request, e: Exception):
        log.exception("unhandled error")
        return JSONResponse(error_body(f"internal error: {type(e).__name__}", "internal_error"), status_code=500)


class ServerThread:
    """uvicorn on a background thread (tests, benchmarks). port=0 picks a free port; `url` is known once started."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0):
        import uvicorn

        self.server = uvicorn.Server(uvicorn_config(app, host, port, app.state.limits, log_level="warning",
                                                    timeout_graceful_shutdown=1))
        self.thread = threading.Thread(target=self.server.run, name="dgemma-http", daemon=True)
        self.url = ""

    def start(self, timeout: float = 30.0) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the HTTP server did not start")
            time.sleep(0.02)
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        self.url = f"http://{host}:{port}"
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
