"""glibc's allocator told to keep freed memory in the process, for the command.

glibc serves an allocation of more than its mmap threshold (at most 32 MiB) with
fresh pages from the kernel and returns them when it is freed, so the next array
of that size faults each of its pages in again. A constraint layer's training step
at 6.6e4 DOFs (batch 8) makes and frees arrays of 4-34 MiB dozens of times: with
glibc keeping freed memory its step took 265 ms against 320 (the unconstrained
model's 112-123 either way; BENCHMARKS.md, "One training step alone"). The cost:
the process's memory no longer shrinks after a peak. PyTorch's CPU tuning guides
suggest jemalloc or tcmalloc for the same reason; this needs neither.

Only the ``fenop`` command and the benchmarks call :func:`keep_freed_memory`: a
library should not change its process's allocator on import.
"""

from __future__ import annotations

import ctypes

# mallopt's parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def keep_freed_memory() -> bool:
    """Have glibc serve every allocation from its heap and never trim it; whether it
    took effect (``False`` off glibc, e.g. macOS or musl, where nothing changes)."""
    try:
        # the process's own symbols, libc's among them: find_library("c") would run
        # ldconfig in a subprocess on every start of the command
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # no mallopt: not glibc
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
