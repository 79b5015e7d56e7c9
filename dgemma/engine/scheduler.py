"""Admission and cache-row bookkeeping for continuous batching.

Each running request owns one row (its place in the batch and its block table in the paged KV cache) for its whole
life. A request waits in a FIFO queue for a free row and for the KV blocks it may need (the runner's `fits`,
checked up front, so nothing runs out of room midway), and gives both back the moment it finishes or is
cancelled (`on_release`).
The scheduler is shared between the HTTP threads (add, abort) and the engine thread, so it holds a lock.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Callable

from .. import budget
from .request import Request, RequestError, Status


class QueueFullError(RuntimeError):
    """The waiting queue is full; the server answers 429 with Retry-After."""


def canvases_for(prompt_len: int, max_tokens: int | None, canvas_length: int, max_model_len: int) -> int:
    """budget.canvases_for (the rule generate shares), as a RequestError (400) naming the field."""
    try:
        return budget.canvases_for(prompt_len, max_tokens, canvas_length, max_model_len)
    except budget.PromptError as e:
        raise RequestError(str(e), e.param) from None


class Scheduler:
    def __init__(self, max_num_seqs: int, max_waiting: int, on_release: Callable[[Request], None] | None = None):
        self.max_waiting = max_waiting
        self.on_release = on_release
        self.waiting: deque[Request] = deque()
        self.running: dict[int, Request] = {}  # row -> request
        self.free_rows = list(range(max_num_seqs - 1, -1, -1))
        self.aborted: set[str] = set()
        self.lock = threading.Lock()
        self.wakeup = threading.Condition(self.lock)

    def add(self, request: Request) -> None:
        with self.lock:
            # the bound is on requests waiting beyond the free rows: rows free up between engine steps, so a
            # request that arrives while one is free is queued for it, never refused
            if len(self.waiting) - len(self.free_rows) >= self.max_waiting:
                raise QueueFullError(f"the waiting queue is full ({self.max_waiting} requests beyond the free "
                                     "rows); retry later")
            self.waiting.append(request)
            self.wakeup.notify()

    def abort(self, request_id: str) -> None:
        with self.lock:
            self.aborted.add(request_id)
            self.wakeup.notify()

    def wait_for_work(self, timeout: float) -> None:
        with self.lock:
            if not self.waiting and not self.running and not self.aborted:
                self.wakeup.wait(timeout)

    def take_aborted(self) -> tuple[list[Request], list[Request]]:
        """Remove aborted requests -> (those that held a row, those still waiting)."""
        with self.lock:
            if not self.aborted:
                return [], []
            ids, self.aborted = self.aborted, set()
            running = [r for r in self.running.values() if r.request_id in ids]
            for r in running:
                self.release(r)
            waiting = [r for r in self.waiting if r.request_id in ids]
            self.waiting = deque(r for r in self.waiting if r.request_id not in ids)
            return running, waiting

    def admit(self, fits: Callable[[Request], bool]) -> Request | None:
        """Move the first waiting request onto a free row if it `fits` (its KV blocks), else None (FIFO: the
        others wait behind it). The caller binds its blocks before admitting the next, which `fits` then counts;
        its prompt is encoded a few chunks per engine step (runner.next_prefill)."""
        with self.lock:
            if not (self.waiting and self.free_rows and fits(self.waiting[0])):
                return None
            request = self.waiting.popleft()
            request.row = self.free_rows.pop()
            request.status = Status.DENOISING
            self.running[request.row] = request
            return request

    def release(self, request: Request) -> None:
        """Give a finished or cancelled request's row back (caller holds the lock or is the engine thread)."""
        if request.row is not None and self.running.get(request.row) is request:
            if self.on_release is not None:
                self.on_release(request)
            del self.running[request.row]
            self.free_rows.append(request.row)
        request.row = None
        request.status = Status.FINISHED

    def finish(self, request: Request) -> None:
        with self.lock:
            self.release(request)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)
