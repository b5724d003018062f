"""The inhibitor locks this process holds for VMs: VM name -> the descriptor logind gave
(``Manager.Inhibit``, :meth:`vfio_hookd.logind.Logind.inhibit`).

A logind inhibitor lock lasts exactly as long as its descriptor is open (systemd.io "Inhibitor
Locks"), so the descriptor lives here, in the daemon's memory, never in a record: the record
says what was taken (what, who, why, mode) and the ``inhibit`` step
(:mod:`vfio_hookd.steps.inhibit`) puts it here and takes it out. When the daemon stops, the
descriptors close with the process and logind drops the locks; a new daemon takes them again
for the VMs still prepared (:func:`vfio_hookd.steps.inhibit.retake_all`), and notes
here the VMs for which that failed, for ``status``.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Held:
    """One lock held: ``fd`` (int), ``what`` (``"sleep:idle"``), ``who``, ``why``, ``mode``
    (``"block"``), ``since`` (UTC, ``2026-12-07T03:01:02Z``: when this process took it)."""
    fd: int
    what: str
    who: str
    why: str
    mode: str
    since: str

    def to_dict(self) -> dict:
        """``{"what", "who", "why", "mode", "since"}`` (the descriptor is this process's)."""
        return {"what": self.what, "who": self.who, "why": self.why, "mode": self.mode,
                "since": self.since}


class Inhibitors:
    """The registry (module docstring); thread-safe. One per :class:`vfio_hookd.machine.Machine`."""

    def __init__(self):
        self._lock = threading.Lock()
        self._held: dict[str, Held] = {}
        self._errors: dict[str, str] = {}

    def hold(self, vm: str, fd: int, what: str, who: str, why: str, mode: str) -> Held:
        """Keep ``fd`` as ``vm``'s lock (it is now this registry's to close). A lock ``vm``
        held already is closed: one lock per VM. Clears a failure noted for ``vm``."""
        held = Held(fd, what, who, why, mode, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        with self._lock:
            old = self._held.pop(vm, None)
            self._held[vm] = held
            self._errors.pop(vm, None)
        if old is not None:
            _close(old.fd)
        return held

    def release(self, vm: str) -> Held | None:
        """Close ``vm``'s lock: logind drops it once no process holds the descriptor.

        :returns: what was held, or None when this process holds no lock for ``vm`` (never
            took one, or took it in a process that has ended).
        """
        with self._lock:
            held = self._held.pop(vm, None)
            self._errors.pop(vm, None)
        if held is not None:
            _close(held.fd)
        return held

    def get(self, vm: str) -> Held | None:
        """What this process holds for ``vm``, or None."""
        with self._lock:
            return self._held.get(vm)

    def failed(self, vm: str, message: str) -> None:
        """Note that taking ``vm``'s lock again failed (``message``: one line, for status)."""
        with self._lock:
            self._errors[vm] = message

    def error(self, vm: str) -> str | None:
        """The failure noted for ``vm`` by :meth:`failed`, or None."""
        with self._lock:
            return self._errors.get(vm)

    def close_all(self) -> None:
        """Close every lock (tests; a daemon simply ends and the kernel closes them)."""
        with self._lock:
            held, self._held = self._held, {}
        for h in held.values():
            _close(h.fd)


def _close(fd: int) -> None:
    """Close a lock's descriptor. Its number is forgotten first, and ``close(2)`` releases the
    descriptor whatever it reports (EINTR, EIO): never closed twice, never retried."""
    try:
        os.close(fd)
    except OSError:
        pass
