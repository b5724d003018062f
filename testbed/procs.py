"""Stopping the test bed's child processes: the one place for "SIGTERM, then SIGKILL after a
deadline, reap".

Every process the test bed starts (the daemon, ``dbus-daemon`` and the simulated systemd, its
unit processes, the private libvirtd and virtlogd, the demo's helpers, the kernel tests' QEMU)
is stopped through :func:`stop`, by its PID, never by name. The waits are on a pidfd
(``pidfd_open(2)``): no polling, no sleeping.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess

#: The default deadline (s) between the polite signal and SIGKILL.
STOP_TIMEOUT_S = 10.0


def wait_exit(pid: int, timeout_s: float) -> bool:
    """Wait until process ``pid`` has exited (a zombie counts: it ran to its end), without
    reaping it; True if it did within ``timeout_s`` (s). A PID that no longer exists counts as
    exited."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        ready, _, _ = select.select([pidfd], [], [], max(0.0, timeout_s))
        return bool(ready)
    finally:
        os.close(pidfd)


def stop(proc: subprocess.Popen | int | None, timeout_s: float = STOP_TIMEOUT_S,
         sig: int | None = signal.SIGTERM) -> int | None:
    """Stop child ``proc`` by its PID and reap it.

    1. send ``sig`` (default SIGTERM; ``None``: send nothing, only give it ``timeout_s`` to end
       on its own, e.g. a QEMU guest that powers itself off);
    2. wait up to ``timeout_s`` (s) for it to exit;
    3. then SIGKILL;
    4. reap it (``waitpid``).

    :param proc: a :class:`subprocess.Popen`, or the PID (int) of a child of this process
        started otherwise (``os.posix_spawn``); None does nothing.
    :returns: its exit status as :attr:`subprocess.Popen.returncode` gives it (negative: killed
        by that signal, ``-signal.SIGKILL`` when step 3 was needed); None for ``proc`` None,
        or a PID that is not (or no longer) our child.
    """
    if proc is None:
        return None
    if isinstance(proc, subprocess.Popen):
        if proc.poll() is not None:
            return proc.returncode
        if sig is not None:
            _send(proc.pid, sig)
        if not wait_exit(proc.pid, timeout_s):
            _send(proc.pid, signal.SIGKILL)
        return proc.wait()
    pid = int(proc)
    if sig is not None:
        _send(pid, sig)
    if not wait_exit(pid, timeout_s):
        _send(pid, signal.SIGKILL)
    try:
        _, status = os.waitpid(pid, 0)
    except ChildProcessError:
        return None
    return os.waitstatus_to_exitcode(status)


def _send(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass   # already gone (a zombie still takes signals; only a reaped PID raises)
