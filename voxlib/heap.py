"""glibc heap settings that vox's CPU speed depends on; each is a no-op where libc lacks the call.

Two behaviours of glibc's allocator cost real time here: large freed blocks go back to the kernel
and fault in again, zeroed, on the next use (training), and a forked worker that reuses free pages
of its parent's heap copies each of them on first write (feature-cache workers).
"""
from __future__ import annotations

import ctypes
import functools

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


@functools.lru_cache(maxsize=None)
def _libc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def keep_freed_memory(keep: bool) -> None:
    """Keep freed blocks in glibc's heap during CPU training, or restore the defaults and trim.

    glibc hands every block of 32 MB or more (activations, gradients, RMSprop temporaries) back to
    the kernel when freed and faults it in again, zeroed, on the next step: ~500k page faults and
    ~20 % of a seed-width step. Without mmap'd blocks and heap trimming the pages are reused; the
    process keeps its peak footprint until the run ends.
    """
    libc = _libc()
    if libc is None:
        return
    if keep:
        libc.mallopt(_M_MMAP_MAX, 0)
        libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
    else:
        libc.mallopt(_M_MMAP_MAX, 65536)
        libc.mallopt(_M_TRIM_THRESHOLD, 128 * 1024)
        libc.malloc_trim(0)


def trim_before_fork() -> None:
    """Give the heap's free pages back to the kernel before forking workers.

    A forked worker's allocations reuse the free chunks of the heap it inherited, and each such page
    is copied on its first write. After the bench had run librosa in the parent, that made the
    feature-cache workers ~1.5x slower (children's CPU time 1.9 s against 1.2 s for 960 clips).
    """
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
