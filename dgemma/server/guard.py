"""The server's limits and the guard in front of the app, so hostile or slow clients cannot stall or misuse it.

`Guard` is the ASGI middleware that, before the app sees a request:
  0. refuses headers over `max_header_bytes` (431);
  1. refuses a Host header that names a host it was not told to serve (DNS rebinding);
  2. refuses a cross-origin browser request when no API key is set (a page cannot POST text/plain to it);
  3. refuses a body over `max_request_bytes` (413), by Content-Length or while reading a chunked body;
  4. reads the body with an idle timeout (408), then hands it to the app.
`uvicorn_config` applies the connection limits, and closes connections that send no complete request headers
within `header_timeout` (uvicorn's own keep-alive timer starts only after a first response).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
from urllib.parse import urlsplit

from uvicorn.protocols.http.h11_impl import H11Protocol

from .limits import ServerLimits
from .protocol import error_body


LOOPBACK_NAMES = ("localhost",)


def host_name(host_header: str) -> str:
    """'example.com:8000' -> 'example.com', '[::1]:8000' -> '::1' (lower case)."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class Guard:
    """ASGI middleware: steps 1-4 of the module docstring, each answered as an OpenAI-style error."""

    def __init__(self, app, limits: ServerLimits, allowed_hosts: list[str] | None = None,
                 refuse_cross_origin: bool = True):
        self.app, self.limits = app, limits
        self.allowed_hosts = {host_name(h) for h in (allowed_hosts or [])}
        self.refuse_cross_origin = refuse_cross_origin

    def host_allowed(self, host: str | None) -> bool:
        """An IP literal or localhost cannot be rebound to another address; any other name must be allowed."""
        if host is None or "*" in self.allowed_hosts:
            return True
        name = host_name(host)
        return is_ip(name) or name in LOOPBACK_NAMES or name in self.allowed_hosts

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        # h11 bounds only headers still arriving; complete ones are measured here
        if sum(len(k) + len(v) + 4 for k, v in scope["headers"]) > self.limits.max_header_bytes:
            return await _reply(send, 431, f"the request headers are more than {self.limits.max_header_bytes} bytes "
                                           "(--max-header-bytes)", "headers_too_large")
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        # 1.
        host = headers.get("host")
        if not self.host_allowed(host):
            return await _reply(send, 421, f"this server does not serve the host {host_name(host)!r} (a guard "
                                           "against DNS rebinding); allow it with --allowed-hosts", "invalid_host")
        # 2.
        if self.refuse_cross_origin and scope["method"] not in ("GET", "HEAD", "OPTIONS"):
            origin = headers.get("origin")
            cross = headers.get("sec-fetch-site") in ("cross-site", "same-site")
            if origin is not None and (origin == "null" or urlsplit(origin).netloc.lower() != (host or "").lower()):
                cross = True
            if cross:
                return await _reply(send, 403, "cross-origin requests are refused while no API key is set (start "
                                               "the server with an API key to serve browsers)", "cross_origin")
        # 3.
        limit = self.limits.max_request_bytes
        length = headers.get("content-length")
        if length is not None and (not length.strip().isdigit() or int(length) > limit):
            return await _reply(send, 413, f"the request body is {length} bytes, more than the server's limit of "
                                           f"{limit} bytes (--max-request-bytes)", "request_too_large")
        if scope["method"] in ("GET", "HEAD", "OPTIONS") and length is None and \
                "chunked" not in headers.get("transfer-encoding", ""):
            return await self.app(scope, receive, send)
        # 4.
        chunks, size = [], 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), self.limits.body_timeout)
            except asyncio.TimeoutError:
                return await _reply(send, 408, f"the request body stalled for more than {self.limits.body_timeout:g} "
                                               "s", "request_timeout")
            if message["type"] != "http.request":  # the client went away
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                return await _reply(send, 413, f"the request body is more than the server's limit of {limit} bytes "
                                               "(--max-request-bytes)", "request_too_large")
            if not message.get("more_body", False):
                break
        body, delivered = b"".join(chunks), False

        async def replay():
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: the disconnect message, when it comes

        return await self.app(scope, replay, send)


async def _reply(send, status: int, message: str, code: str) -> None:
    body = json.dumps(error_body(message, "invalid_request_error", None, code)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


def _protocol(header_timeout: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol plus a header timeout: a connection that has not sent complete request headers
    `header_timeout` seconds after it opened (or after its last response) is closed."""

    class H11WithHeaderTimeout(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()

        def connection_lost(self, exc) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            self._header_timer = self.loop.call_later(header_timeout, self._timed_out)

        def _timed_out(self) -> None:
            self._header_timer = None
            if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
                self.transport.close()

    return H11WithHeaderTimeout


def uvicorn_config(app, host: str, port: int, limits: ServerLimits, **kwargs):
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, http=_protocol(limits.header_timeout),
                          timeout_keep_alive=limits.keep_alive_timeout, limit_concurrency=limits.max_connections,
                          h11_max_incomplete_event_size=limits.max_header_bytes, **kwargs)
