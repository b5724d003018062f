"""Run a call that the kernel may block, with a deadline: the one place for it.

A sysfs write can block in the kernel for good (unbinding an NVIDIA GPU someone holds,
FIELD-NOTES §2); Python cannot interrupt it. The call runs in a daemon thread and is abandoned
at its deadline: the caller gets :class:`TimeoutError` and carries on (the thread stays stuck
in the kernel until the kernel lets go).
"""

from __future__ import annotations

import threading
from typing import Callable, TypeVar

T = TypeVar("T")


def run_with_deadline(fn: Callable[[], T], timeout_s: float, what: str) -> T:
    """Call ``fn()`` in a helper thread and return its result if it finishes within
    ``timeout_s`` (s); its exception, if any, is raised here unchanged.

    :param what: names the thread (``ps -L``, tracebacks) and the timeout message.
    :raises TimeoutError: ``fn`` did not return in time (it keeps running, abandoned).
    """
    result: list = []

    def run() -> None:
        try:
            result.append((True, fn()))
        except BaseException as exc:  # handed to the caller's thread
            result.append((False, exc))

    worker = threading.Thread(target=run, name=what[:60], daemon=True)
    worker.start()
    worker.join(timeout_s)
    if not result:
        raise TimeoutError(f"{what} did not return within {timeout_s:g} s")
    ok, value = result[0]
    if not ok:
        raise value
    return value
