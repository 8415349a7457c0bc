"""Process-level settings of a training process on a CPU host.

`keep_freed_memory`: glibc's malloc serves allocations above its mmap threshold
(up to 32 MB) with fresh `mmap`s and returns them to the kernel on free, so a
training step that frees and reallocates the same large tensors every step
(the dense gradient of a 49408-row token embedding, MLP activations) pays a
page fault per 4 KiB page, every step: profiled at 77 ms per step for one
50 MB gradient fill on 2 cores (bench/README.md). Serving everything from the
heap and never trimming it keeps those pages mapped: the allocator tuning that
PyTorch's CPU performance guide gets from jemalloc or tcmalloc, here with
glibc's own `mallopt`, so nothing is preloaded. The process keeps its peak
memory until it exits, which a training process does anyway.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# glibc <malloc.h>
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4
_done = False


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory mapped in this process (once; PEFLOW_MALLOC_TUNING=0 turns it off).

    Returns whether the settings are in effect (False off Linux/glibc or when turned off).
    """
    global _done
    if _done:
        return True
    if os.environ.get("PEFLOW_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = all(mallopt(param, value) == 1 for param, value in
             ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1), (_M_TOP_PAD, 64 << 20)))
    _done = ok
    return ok
