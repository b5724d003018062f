"""Children that do not outlive their parent: ``PR_SET_PDEATHSIG`` (``prctl(2)``) for
``subprocess.Popen(preexec_fn=...)``.

The simulation's helper processes (private ``dbus-daemon``, simulated systemd, private
libvirtd/virtlogd, the kernel tests' QEMU) run in their own session, so a Ctrl-C at the terminal
is their parent's to handle; without a parent-death signal they would keep running when that
parent is SIGKILLed (a killed pytest, a CI timeout).

Caveats, from ``prctl(2)``: the signal is sent when the *thread* that forked the child exits,
not the whole process, so spawn from a thread that lives as long as the child should (the
main thread, or the thread that also waits for the child). It is cleared for set-user-ID
executables. The helper closes the race where the parent dies between ``fork`` and ``prctl``
by checking the parent PID afterwards.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
from typing import Callable

_PR_SET_PDEATHSIG = 1

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def parent_death_signal(sig: int = signal.SIGKILL) -> Callable[[], None]:
    """A ``preexec_fn`` for :class:`subprocess.Popen` (or a step of one) that makes the child
    receive ``sig`` when its parent (the calling thread, see the module docstring) dies.

    Call it in the parent, right before ``Popen``: it records this process's PID so that the
    child can tell that its parent already died before ``prctl`` took effect (then the child
    sends ``sig`` to itself at once).

    :param sig: the signal (``signal.SIGKILL`` default; ``signal.SIGTERM`` for a child that
        must clean up after itself, e.g. the simulated systemd ending its unit processes).
    :returns: a function of no arguments, run in the child between ``fork`` and ``exec``.
        It raises :class:`OSError` there when ``prctl`` fails, which ``Popen`` reports as a
        :class:`subprocess.SubprocessError` in the parent.
    """
    parent = os.getpid()
    signum = int(sig)

    def preexec() -> None:
        if _libc.prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"prctl(PR_SET_PDEATHSIG): {os.strerror(err)}")
        if os.getppid() != parent:   # the parent died before prctl: no signal would come
            os.kill(os.getpid(), signum)

    return preexec
