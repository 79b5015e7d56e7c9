"""Memory the canvas DP reuses from one step to the next for its largest temporaries.

A fresh array of tens of MB is slow to fill the first time its pages are touched, and a denoising step frees
and allocates enough between two DP calls that the allocator often hands back new pages. Under the `small` preset
at a 32k vocabulary (Snowplow sp_80), the first read of a run's canvas (a (256, 32000) copy) took 65-104 ms and
every later one 13 ms; into memory kept from the previous call, 13 ms from the first.

A buffer is kept per thread and per name, grown to the largest size asked for, up to MAX_KEPT bytes (larger ones
are made fresh each time). What `scratch` returns is valid until the next call for the same name in the same
thread: callers use it only within one solve (dp.CanvasDP.read, dp._answers).
"""

from __future__ import annotations

import threading

import numpy as np

MAX_KEPT = 128 * 2**20  # bytes: a larger buffer is not kept (a 262k vocabulary's read on a CPU: 256 MiB)
_LOCAL = threading.local()


def scratch(name: str, shape: tuple, dtype) -> np.ndarray:
    """An array of `shape` and `dtype`, contents undefined, in this thread's memory for `name`."""
    dtype = np.dtype(dtype)
    size = int(np.prod(shape)) * dtype.itemsize
    if size > MAX_KEPT:
        return np.empty(shape, dtype)
    kept = _LOCAL.__dict__.setdefault("buffers", {})
    buffer = kept.get(name)
    if buffer is None or len(buffer) < size:
        buffer = kept[name] = np.empty(size, dtype=np.uint8)
    return buffer[:size].view(dtype).reshape(shape)
