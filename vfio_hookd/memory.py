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

:func:`trim` also runs ``gc.collect()`` first. What the cyclic collector finds per cycle was
measured with ``gc.DEBUG_SAVEALL`` (2,991 objects per prepare/release before, 21 after): json's
Python encoder, which ``json.dump`` and any ``indent`` use, builds nested closures that are
reference cycles. A record is saved about 50 times per cycle (and the simulated host's state
files, inside the benchmark's daemon, about 40 times); both are now written by the C encoder
(:meth:`vfio_hookd.record.RecordStore.save`). Collecting what is left when no
request is in flight keeps it from piling up into the next request's peak.

Two more causes, found with heaptrack (``heaptrack_print --diff`` of 450 against 50 cycles):

- a subscription to D-Bus signals per request (logind's, while waiting for the desktop to
  come back) left 64 bytes each in GObject-Introspection 1.74; logind's signals now come
  through one subscription per connection (:class:`vfio_hookd.gdbus.SignalWatch`);
- the destroy notify of an unsubscribed signal waited for ever on a main context nobody
  iterated any more (:func:`vfio_hookd.gdbus.iterate`).

What is left (``bench/daemon_memory.py``, 1000 cycles): cycles 10 to 1000 add about 60 KiB and
cycles 100 to 1000 about 20 KiB, with Python's live blocks flat. The first request adds about
0.4 MiB and the next few about 0.1 MiB more. That is one request's working set, not a leak:
``/proc/PID/smaps`` shows the first request taking a new pymalloc arena (1 MiB, of which it
touches about 220 KiB) and two thread stacks. pymalloc gives each of its ~40 size classes
pools of their own, so a burst of small objects needs fresh pools even while other classes
have free ones. It keeps those pages for the next request, which does not grow. Parsing a
built-in profile and domain XML before ``READY=1`` (:func:`vfio_hookd.daemon.rehearse`) moves
the parsers' share of this to the start. ``PYTHONMALLOC=malloc`` was worse: +940 KiB against
+604 KiB.
"""

from __future__ import annotations

import gc
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
    """Collect Python's cyclic garbage (``gc.collect()``), then ``malloc_trim(0)``: give the
    free pages of the malloc heap back to the kernel. About 10 ms for the daemon's 25,000
    objects and heap of a few MiB, run when no request is in flight. True when glibc is
    there to trim."""
    gc.collect()
    lib = _glibc()
    if not lib:
        return False
    lib.malloc_trim(0)
    return True
