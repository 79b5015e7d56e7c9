"""Every bound the server puts on requests and connections (the flags of `dgemma serve`); standard library only,
so the CLI can show the defaults without importing the server."""

from __future__ import annotations

from dataclasses import dataclass, fields

from ..errors import DgemmaError


class LimitError(DgemmaError, ValueError):
    """A server limit that is not a positive number."""


# flag of `dgemma serve` -> what it bounds, for constraint compiles (response_format, structured_outputs, forced
# tool calls); the values are CompileSettings' fields
COMPILE_FLAGS = {
    "max_compiles": "constraint compiles running at once, all clients together",
    "max_compiles_per_client": "constraint compiles running at once for one client address",
    "compile_wait": "seconds a compile waits for a free slot, then the request gets 429 (0: no wait)",
    "compile_timeout": "seconds one constraint may take to compile, then the request gets 400",
    "compile_memory_mb": "MiB of address space one compile may take, then the request gets 400",
    "compile_max_states": "states of one constraint's automaton; past it a schema is written again with half the "
                          "length and item caps (twice at most), then the request gets 400",
    "compile_max_table_mb": "MiB of one constraint's token table (states x token classes x 4 bytes); past it as "
                            "--compile-max-states",
}


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


@dataclass(frozen=True)
class CompileSettings:
    """The server's bounds on constraint compiles: the first three configure control/gate.py's CompileGate, the
    last four are control/constraint.py's CompileLimits. The defaults are theirs, written here so that --help
    imports no torch (tests/test_server_limits.py checks that they agree)."""

    max_compiles: int = 2
    max_compiles_per_client: int = 1
    compile_wait: float = 5.0
    compile_timeout: float = 60.0
    compile_memory_mb: int = 8192
    compile_max_states: int = 100_000
    compile_max_table_mb: int = 512

    def __post_init__(self) -> None:
        for f in fields(self):
            value, whole = getattr(self, f.name), f.type in (int, "int")
            number = not isinstance(value, bool) and isinstance(value, int if whole else (int, float))
            if not number or value != value or value == float("inf") or \
                    not (value > 0 or (f.name == "compile_wait" and value == 0)):
                need = ("a finite number, 0 or more" if f.name == "compile_wait" else
                        "a positive whole number" if whole else "a finite positive number")
                raise LimitError(f"--{f.name.replace('_', '-')} must be {need}, got {value!r}")

    def gate(self) -> dict:
        """CompileGate.configure's arguments."""
        return {"max_total": self.max_compiles, "max_per_client": self.max_compiles_per_client,
                "wait_s": self.compile_wait}

    def limits(self):
        """The CompileLimits every request's constraint compiles under."""
        from ..control import CompileLimits

        return CompileLimits(max_states=self.compile_max_states, timeout_s=self.compile_timeout,
                             max_memory_mb=self.compile_memory_mb, max_table_mb=self.compile_max_table_mb)
