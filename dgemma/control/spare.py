"""A compile child started ahead of time, so that a compile does not wait for Python and numpy to start.

The compile child (`_compile_worker.py`) spends 0.2 s (an idle machine) to 0.5 s (a loaded one) importing numpy
and outlines-core before it reads its request. `SpareChild.take()` hands out a child that was started earlier,
has done its imports and waits on stdin, and has the next one started; with none ready it starts one at once.
Each child still serves exactly one compile and is killed at its time limit, as before. Spares are started by
one long-lived thread because a child's parent-death signal follows the thread that started it, not the process:
a spare started by a request's thread would die with that thread. At most one spare waits (about 60 MB).
"""

from __future__ import annotations

import atexit
import os
import subprocess
import threading


class SpareChild:
    """Hands out started processes of `command` plus our pid as the last argument (stdin, stdout and stderr
    piped), one spare kept ready."""

    def __init__(self, command: list[str]):
        self._command = command
        self._ready: list[subprocess.Popen] = []
        self._lock = threading.Lock()
        self._wanted = threading.Event()
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()

    def _start(self) -> subprocess.Popen:
        return subprocess.Popen([*self._command, str(os.getpid())], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)

    def take(self) -> subprocess.Popen:
        """A started child for one compile: the spare if it is alive, else a new one."""
        with self._lock:
            if self._pid != os.getpid():  # a forked copy of us: the spare and the thread are the parent's
                self._ready, self._thread, self._pid = [], None, os.getpid()
            spare = self._ready.pop() if self._ready else None
            if self._thread is None:
                self._thread = threading.Thread(target=self._refill, name="dgemma-compile-spare", daemon=True)
                self._thread.start()
                atexit.register(self.close)
        self._wanted.set()
        if spare is not None and spare.poll() is None:
            return spare
        if spare is not None:
            spare.communicate()
        return self._start()

    def _refill(self) -> None:
        while True:
            self._wanted.wait()
            self._wanted.clear()
            with self._lock:
                if self._ready:
                    continue
            child = self._start()
            with self._lock:
                self._ready.append(child)

    def close(self) -> None:
        """Ends the waiting spare (at exit; a new one is started on the next take)."""
        with self._lock:
            ready, self._ready = self._ready, []
        for child in ready:
            child.kill()
            child.communicate()
