"""peflow.train.host: glibc keeps freed memory mapped in training processes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

CHECK = """
import ctypes, sys, time
from peflow.train.host import keep_freed_memory
on = keep_freed_memory()
# a 64 MB block freed and allocated again: with the setting it stays in the heap (no fresh mmap to fault in)
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
class Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]
libc.mallinfo2.restype = Mallinfo2
p = libc.malloc(64 << 20); libc.free(p)
hblkhd = libc.mallinfo2().hblkhd  # bytes in mmapped regions
print(on, hblkhd)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
@pytest.mark.parametrize("setting", ["1", "0"])
def test_keep_freed_memory_serves_big_blocks_from_the_heap(setting: str) -> None:
    env = dict(os.environ, PEFLOW_MALLOC_TUNING=setting)
    out = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, check=True)
    on, _ = out.stdout.split()
    assert on == ("True" if setting == "1" else "False")
    # with the setting, the live 64 MB block is in the heap, not an mmapped region (M_MMAP_MAX 0; what is
    # mmapped was allocated at import, before the setting)
    probe = CHECK.replace("libc.free(p)\n", "\n")
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    mmapped = int(out.stdout.split()[1])
    assert (mmapped < 16 << 20) if setting == "1" else (mmapped >= 64 << 20)
