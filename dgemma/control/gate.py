"""How many constraints compile at once, and what a failed compile leaves behind.

A compile runs in a child process that may take `CompileLimits.max_memory_mb` and `timeout_s`, so a server that let
every request compile at once could be driven out of memory and out of worker threads. `CompileGate` bounds the
compiles running at once, in total and per client (`compile_client`, set by the server for each request). A compile
that cannot start within `wait_s` is refused with CompileBusy (the server answers 429). Requests for a constraint
that is already compiling wait for that compile instead of starting their own, without taking a slot. A compile
that fails leaves a `CompileFailure` in the constraint cache, so the same bad schema fails at once the next time.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Callable

from ..errors import DgemmaError

# who is asking for the compile (the server sets the client's address per request; None: this process itself)
compile_client: ContextVar[str | None] = ContextVar("dgemma_compile_client", default=None)


class CompileBusy(DgemmaError):
    """No compile slot opened in time; `retry_after` (seconds) is a hint for the client."""

    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(frozen=True)
class CompileFailure:
    """A compile that failed: what the constraint cache keeps for its key (counted at `nbytes` in its bound)."""

    message: str
    nbytes: int = 1024


@dataclass
class _Flight:
    done: threading.Event
    result: object = None


class CompileGate:
    """At most `max_total` compiles at once, `max_per_client` of them for one client; a compile waits at most
    `wait_s` seconds for a slot. Thread-safe. `compiles` counts the compiles started (cache misses that compiled)."""

    def __init__(self, max_total: int = 2, max_per_client: int = 1, wait_s: float = 5.0):
        self.configure(max_total, max_per_client, wait_s)
        self._cond = threading.Condition()
        self._running: Counter = Counter()  # client -> compiles running
        self._flights: dict = {}  # key -> _Flight of the compile running for it
        self.compiles = 0

    def configure(self, max_total: int, max_per_client: int, wait_s: float) -> None:
        if not (max_total >= 1 and max_per_client >= 1 and wait_s >= 0):
            raise ValueError(f"CompileGate needs max_total >= 1, max_per_client >= 1 and wait_s >= 0, got "
                             f"{max_total}, {max_per_client}, {wait_s}")
        self.max_total, self.max_per_client, self.wait_s = max_total, max_per_client, wait_s

    @property
    def running(self) -> int:
        return sum(self._running.values())

    def compiled(self, key, cache, build: Callable[[], object], description: str):
        """What `cache` holds for `key` (a constraint or a CompileFailure), compiling it with `build` under the
        gate when it is missing. A ConstraintError from `build` is kept in the cache as a CompileFailure."""
        from .constraint import ConstraintError

        client = compile_client.get()
        deadline = time.monotonic() + self.wait_s
        with self._cond:
            while True:
                held = cache.get(key)
                if held is not None:
                    return held
                flight = self._flights.get(key)
                if flight is not None:
                    break
                if self.running < self.max_total and self._running[client] < self.max_per_client:
                    flight = self._flights[key] = _Flight(threading.Event())
                    self._running[client] += 1
                    self.compiles += 1
                    return self._build(key, cache, build, client, flight, ConstraintError)
                left = deadline - time.monotonic()
                if left <= 0:
                    mine = self._running[client] >= self.max_per_client
                    raise CompileBusy(f"{description}: {'this client has' if mine else 'the server has'} "
                                      f"{self._running[client] if mine else self.running} constraint compiles running, "
                                      f"the most allowed at once; retry when they finish")
                self._cond.wait(left)
        flight.done.wait()  # bounded by that compile's own time limit
        if flight.result is None:
            raise ConstraintError(f"{description}: compiling failed")
        return flight.result

    def _build(self, key, cache, build, client, flight: _Flight, error_type):
        """Run `build` for `key` with its slot taken (called holding the lock; releases it while building)."""
        self._cond.release()
        try:
            try:
                flight.result = build()
            except error_type as e:  # counted with its key's text, which a huge schema makes large
                size = 1024 + len(str(e)) + sum(len(part) for part in key if isinstance(part, (str, bytes)))
                flight.result = CompileFailure(str(e), size)
            cache[key] = flight.result
            return flight.result
        finally:
            self._cond.acquire()
            self._running[client] -= 1
            if not self._running[client]:
                del self._running[client]
            del self._flights[key]
            flight.done.set()
            self._cond.notify_all()


COMPILES = CompileGate()  # the process's gate: every Constraint compile goes through it
