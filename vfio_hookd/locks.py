"""One state machine at a time per VM and per device: in-process locks plus ``flock(2)`` on
``<run>/locks/<key>``, so a CLI run without the daemon cannot race the daemon."""

from __future__ import annotations

import fcntl
import os
import threading
from contextlib import ExitStack, contextmanager

from . import errors
from .errors import HookdError


class Locks:
    """Named locks, e.g. ``"vm/win11"`` and ``"dev/0000:01:00.0"``.

    :param lockdir: directory of the lock files (created 0700).
    :param timeout_s: how long (s) :meth:`held` waits for another thread of this process.
    """

    def __init__(self, lockdir: str, timeout_s: float):
        self.lockdir = lockdir
        self.timeout_s = timeout_s
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    @contextmanager
    def held(self, keys: list[str]):
        """Hold the in-process lock and the ``flock`` of every key (sorted: no deadlock).

        :raises HookdError: ``TIMEOUT`` when another request of this process keeps a key
            longer than ``timeout_s``; ``DEVICE_CLAIMED`` when another process holds its flock.
        """
        with ExitStack() as stack:
            os.makedirs(self.lockdir, mode=0o700, exist_ok=True)
            for key in sorted(set(keys)):
                with self._guard:
                    lock = self._locks.setdefault(key, threading.Lock())
                if not lock.acquire(timeout=self.timeout_s):
                    raise HookdError(errors.TIMEOUT, f"{key} stayed busy with another request "
                                                     f"for {self.timeout_s:g} s")
                stack.callback(lock.release)
                f = stack.enter_context(open(os.path.join(self.lockdir,
                                                          key.replace("/", "_")), "a"))
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise HookdError(errors.DEVICE_CLAIMED,
                                     f"{key} is being worked on by another vfio-hookd process "
                                     f"(the daemon?); retry when it has finished") from None
            yield
