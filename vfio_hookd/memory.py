"""Keeping the daemon's resident memory flat over many requests (issue 9: 1000 prepare/release
cycles grow VmRSS by less than 100 KiB; ``bench/daemon_memory.py``).

What grew, measured with tracemalloc snapshots, ``gc.get_objects()`` counts and
``/proc/PID/smaps`` diffs between cycles 1, 10, 100 and 300 of the benchmark: Python's live
objects were flat after the first cycles (+0.9 KB from cycle 100 to 300: PyGObject fills its
per-function caches on the first call of each Gio/GLib function, then stops), but glibc's
malloc kept more and more pages: every request runs in a thread of its own, glibc gives threads
their own arenas (up to 8 per CPU, ``mallopt(3)`` ``M_ARENA_MAX``), and each arena keeps the
freed chunks of its busiest moment; the growth only levels off once every arena has been the
busy one. Two glibc calls end that, through ``ctypes`` (no dependency):

- :func:`limit_arenas`: ``mallopt(M_ARENA_MAX, 1)`` before the first thread starts: one arena
  for every thread (the daemon serves a handful of requests at a time; contention is nil).
- :func:`trim`: ``malloc_trim(0)`` (``malloc_trim(3)``) once no request is in flight: the free
  pages of the heap go back to the kernel (``MADV_DONTNEED`` for whole free pages inside it,
  since glibc 2.8), so the next request starts from the same footprint.

On a C library without these (musl), both do nothing and say so by returning False.

What is left (measured): the growth that remains after the first cycles is in one of
pymalloc's 1 MiB arenas (``/proc/PID/smaps``), while Python's live blocks stay flat
(``sys.getallocatedblocks()``): pymalloc carves new 16 KiB pools from the untouched part of its
fullest arena before it reuses free pools of other arenas, so that arena's resident pages rise
towards its 1 MiB and stop there. ``malloc_trim`` cannot reach them, and ``PYTHONMALLOC=malloc``
made the growth larger (+764 KiB over cycles 10-100 against +460).
"""

from __future__ import annotations

import threading

#: ``M_ARENA_MAX`` of glibc's ``<malloc.h>``.
M_ARENA_MAX = -8

_lock = threading.Lock()
_libc = None   # None: not looked up yet; False: not glibc


def _glibc():
    global _libc
    with _lock:
        if _libc is None:
            try:
                import ctypes
                lib = ctypes.CDLL(None)   # the process's own symbols: its C library among them
                lib.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
                lib.malloc_trim.argtypes = (ctypes.c_size_t,)
                _libc = lib
            except (OSError, AttributeError, ImportError):
                _libc = False
        return _libc or None


def limit_arenas(count: int = 1) -> bool:
    """``mallopt(M_ARENA_MAX, count)``: at most ``count`` malloc arenas for all threads. Call it
    before threads are started (arenas made before stay). True when glibc took it."""
    lib = _glibc()
    return bool(lib and lib.mallopt(M_ARENA_MAX, count) == 1)


def trim() -> bool:
    """``malloc_trim(0)``: give the free pages of the malloc heap back to the kernel (about a
    millisecond for the daemon's heap of a few MiB). True when glibc is there to do it."""
    lib = _glibc()
    if not lib:
        return False
    lib.malloc_trim(0)
    return True
