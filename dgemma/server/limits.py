"""Every bound the server puts on requests and connections (the flags of `dgemma serve`); standard library only,
so the CLI can show the defaults without importing the server."""

from __future__ import annotations

from dataclasses import dataclass, fields

from ..errors import DgemmaError


class LimitError(DgemmaError, ValueError):
    """A server limit that is not a positive number."""


# flag of `dgemma serve` -> what it bounds, for --help and the docs
FLAGS = {
    "max_request_bytes": "request body bytes; a larger body is answered 413 before it is read",
    "max_messages": "messages in one chat request, checked before the template renders",
    "max_content_chars": "characters of text in one chat request's messages, all summed, checked before rendering",
    "header_timeout": "seconds a connection may take to send complete request headers (from connecting, or from "
                      "its last response)",
    "body_timeout": "seconds a request body may stall between two pieces (then 408)",
    "keep_alive_timeout": "seconds an idle keep-alive connection stays open",
    "max_connections": "open connections plus requests in flight; beyond it new requests get 503",
    "max_header_bytes": "bytes of request line and headers (then 431)",
}


@dataclass(frozen=True)
class ServerLimits:
    max_request_bytes: int = 4 * 2**20  # a body larger than this is refused with 413 before it is read
    max_messages: int = 1024  # messages per chat request, checked before the template renders
    max_content_chars: int = 1_000_000  # characters of text in a chat's messages, all summed
    header_timeout: float = 10.0  # seconds from connecting (or the last response) to complete request headers
    body_timeout: float = 30.0  # seconds a request body may stall between two pieces
    keep_alive_timeout: float = 5.0  # seconds an idle keep-alive connection stays open
    max_connections: int = 512  # open connections and requests in flight; beyond it, 503
    max_header_bytes: int = 16384  # request line and headers

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or value != value:
                raise LimitError(f"--{f.name.replace('_', '-')} must be a positive number, got {value!r}")
