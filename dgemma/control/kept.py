"""What is made from a constraint once and kept with it, counted in its size.

The canvas DP lays a constraint's pairs out on first use (moves.Moves, bounded.Layout), a thought's automaton is
built from an answer's (thought.py), and a GPU reads copies of its tables. These live as long as the constraint,
so the constraint cache, which bounds its entries' bytes, must count them: for Snowplow sp_338 at a 32k vocabulary
the DP's layout takes 44 MiB beside 209 MiB of tables, and a thought's automaton doubles both. `Kept.derived` builds
such a thing once, adds its bytes to the constraint's `nbytes`, and tells whoever watches the constraint (the
cache holding it, or the constraint it was made from) that it grew.
"""

from __future__ import annotations

import threading
from typing import Callable

import numpy as np
import torch


class Kept:
    """Mixed into Constraint: `derived` things kept with it and its watchers. Subclasses call `_keep()` in their
    __init__ and add `kept_bytes` to their own `nbytes`."""

    def _keep(self) -> None:
        self._derived: dict = {}
        self.kept_bytes = 0  # bytes of what `derived` has built and kept
        self._watchers: list[Callable[[int], None]] = []  # each told of growth in bytes (negative: shrinking)
        self._derived_lock = threading.RLock()  # a build may ask for another derived thing (Layout reads Moves)

    def derived(self, key, build: Callable[[], object]):
        """What `build()` makes, built once for `key` and kept; its `nbytes` (held_bytes) is added to this one's.
        A derived object that keeps things of its own (a Kept) passes its growth on to this one."""
        value = self._derived.get(key)
        if value is not None:
            return value
        with self._derived_lock:
            value = self._derived.get(key)
            if value is None:
                value = build()
                if isinstance(value, Kept):
                    value.watch(self._grow)
                self._derived[key] = value
                self._grow(held_bytes(value))
        return value

    def forget(self, key) -> None:
        """Drop what `derived` kept for `key` (it is built again when next asked for)."""
        with self._derived_lock:
            value = self._derived.pop(key, None)
            if value is not None:
                if isinstance(value, Kept):
                    value.unwatch(self._grow)
                self._grow(-held_bytes(value))

    def watch(self, watcher: Callable[[int], None]) -> None:
        self._watchers.append(watcher)

    def unwatch(self, watcher: Callable[[int], None]) -> None:
        if watcher in self._watchers:
            self._watchers.remove(watcher)

    def _grow(self, nbytes: int) -> None:
        with self._derived_lock:
            self.kept_bytes += nbytes
            watchers = list(self._watchers)
        for watcher in watchers:
            watcher(nbytes)


def held_bytes(value) -> int:
    """Bytes that `value` holds: its `nbytes` where it says (a Constraint, Moves, Layout, an array or tensor), else
    the arrays and tensors in it (lists, tuples and dicts of them)."""
    if isinstance(value, (np.ndarray, torch.Tensor)) or hasattr(type(value), "nbytes"):
        return int(value.nbytes)
    return array_bytes(value)


def array_bytes(*values) -> int:
    """Bytes of the numpy arrays and torch tensors in `values` and in the lists, tuples and dicts among them (an
    object's `vars()` is a dict); each buffer counted once, a view as its base."""
    seen: set = set()
    total = 0
    stack = list(values)
    while stack:
        value = stack.pop()
        if isinstance(value, np.ndarray):
            while isinstance(value.base, np.ndarray):
                value = value.base
            key, size = ("numpy", id(value)), value.nbytes
        elif isinstance(value, torch.Tensor):
            storage = value.untyped_storage()
            key, size = (value.device, storage.data_ptr()), storage.nbytes()
        else:
            if isinstance(value, (list, tuple)):
                stack.extend(value)
            elif isinstance(value, dict):
                stack.extend(value.values())
            continue
        if key not in seen:
            seen.add(key)
            total += size
    return total
