"""keep_freed_memory: large arrays come from glibc's heap, not from fresh mappings."""

import ctypes
import subprocess
import sys

import pytest

_CHECK = """
import ctypes, torch
from fenop._allocator import keep_freed_memory

class Info(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd",
        "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info

def mapped():
    x = torch.empty(2**23, dtype=torch.float64)  # 64 MiB, alive while measured
    return libc.mallinfo2().hblkhd  # bytes in mmap-ed blocks

before = mapped()
kept = keep_freed_memory()
print(kept, before >= 2**26, mapped() < 2**26)
"""


def _glibc_with_mallinfo2() -> bool:
    try:
        return hasattr(ctypes.CDLL(None), "mallinfo2")
    except OSError:
        return False


@pytest.mark.skipif(not _glibc_with_mallinfo2(), reason="glibc >= 2.33 only")
def test_large_arrays_come_from_the_heap_once_freed_memory_is_kept():
    # in a process of its own: the setting holds for the rest of a process
    done = subprocess.run(
        [sys.executable, "-c", _CHECK], capture_output=True, text=True, check=True
    )
    assert done.stdout.split() == ["True", "True", "True"]
