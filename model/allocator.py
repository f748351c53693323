"""Keep freed memory inside the process so each frame's large tensors do not fault in again.

XMem allocates tens of large activation tensors per frame (80 MB each for 3 objects at 854x480).
glibc serves allocations above its mmap threshold (at most 32 MB by default) with fresh mmap
pages and returns them to the system when freed, so every frame pays one page fault per 4 KB
page again: about a fifth of the decoder's time with 3 objects on a 2-core machine. Raising the
mmap and trim thresholds makes glibc keep and reuse that memory; peak memory is unchanged, it is
just not handed back between frames. The flow engine's per-frame arrays (megabytes each) gain
the same way, most in threads other than the main one.

The network often runs outside the main thread (the CLI overlaps it with decoding and writing;
the backend runs jobs in worker threads), and glibc gives such threads arenas of their own whose
heaps (at most 64 MB) cannot keep these blocks. So all threads share the main arena too. glibc
fixes its arena limit when the second thread allocates, so entry points call this first thing,
before starting threads (measured: `xmem-label propagate` at +4 % time over the network alone
instead of +23 %).

This changes a process-wide setting, so it is an explicit call (the `xmem-label` and backend
entry points, the engines' loaders, benchmarks), never an import side effect.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1  # glibc mallopt parameters (malloc.h)
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8


def keep_freed_memory(threshold_bytes: int = 1 << 30) -> bool:
    """Ask glibc to serve allocations below `threshold_bytes` from its main heap, for every
    thread, and keep them.

    Returns False (and does nothing) where the C library is not glibc.
    """
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    libc = ctypes.CDLL(name)
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mmap_ok = mallopt(_M_MMAP_THRESHOLD, threshold_bytes)
    trim_ok = mallopt(_M_TRIM_THRESHOLD, threshold_bytes)
    arena_ok = mallopt(_M_ARENA_MAX, 1)
    return bool(mmap_ok and trim_ok and arena_ok)
