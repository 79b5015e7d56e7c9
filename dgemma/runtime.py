"""Process-wide settings for the CLI and the server (not applied on import: a library should not change its
host's allocator)."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc mallopt parameters (malloc.h)


def tune_malloc() -> bool:
    """Keep freed memory in the heap for reuse instead of returning it to the OS at once.

    A denoising step allocates several (canvas x vocabulary) fp32 tensors (33 MB each for a 256-token canvas and
    a 32k vocabulary). glibc serves blocks that large with fresh mmap()s, so every step pays page faults and the
    kernel's zeroing for each of them again; on the 2-core benchmark machine that was about a tenth of a step.
    With mmap off and a high trim threshold they come from the heap and are reused. The price: the process keeps
    its peak heap (up to 2 GiB free) rather than shrinking after it. glibc on Linux only; DGEMMA_MALLOC_TUNING=0
    turns it off. Returns whether it was applied."""
    if os.environ.get("DGEMMA_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


def release_free_memory() -> bool:
    """Hand the heap's free pages back to the OS (glibc's malloc_trim), e.g. after a model was built in fp32 and
    then quantized, so that the weights it no longer holds stop counting in the process's memory. Returns whether
    anything was released."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return False
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return bool(trim(0))


_INITIALISERS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "xavier_uniform_",
                 "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_")


@contextlib.contextmanager
def skip_weight_init():
    """torch.nn.init's in-place initialisers do nothing inside this block: for a model that is built only to be
    filled from a file (transformers' no_init_weights does the same).

    Why it matters: on the meta device an initialiser reaches torch's Python reference ops, and the first of them
    imports torch._dynamo, about 1.5 s on a small CPU, for values that are never used. The initialisers are
    module attributes, so this is process-wide while it lasts: use it where no other thread builds a model."""
    import torch.nn.init as init

    saved = {name: getattr(init, name) for name in _INITIALISERS}

    def keep(tensor, *args, **kwargs):
        return tensor

    for name in saved:
        setattr(init, name, keep)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(init, name, fn)
