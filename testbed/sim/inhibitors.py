"""logind's inhibitor locks on the simulated host, shared by both fakes of logind (the D-Bus one,
:mod:`testbed.sim.logind`, and the in-process one, :mod:`testbed.fake_logind`).

As real logind does (systemd.io "Inhibitor Locks", ``src/login/logind-inhibit.c``): ``Inhibit``
gives the caller one end of a pipe (logind: of a FIFO under ``/run/systemd/inhibit/``) and keeps
the other; the lock lasts until every copy of the caller's end is closed, which the kept end
sees as ``POLLHUP``. :meth:`Inhibitors.live` checks that on each query (``poll`` with timeout 0:
a point query, no wait), so ``ListInhibitors`` never shows a lock whose descriptor is closed,
whatever the order in which a fake's main loop handles events.

The arguments are checked as logind 252 checks them (``method_inhibit`` in
``src/login/logind-dbus.c``): known lock types, ``block`` or ``delay``, ``delay`` only for
``sleep`` and ``shutdown``; errors are ``org.freedesktop.DBus.Error.InvalidArgs``.

Fault injection (:mod:`.faults`): op ``inhibit``, target the ``what`` string; ``fail`` refuses
the lock as polkit would (``org.freedesktop.DBus.Error.AccessDenied``).
"""

from __future__ import annotations

import os
import select
import threading

from . import faults

#: Lock types logind knows (``inhibit_what_from_string``).
WHAT = ("shutdown", "sleep", "idle", "handle-power-key", "handle-suspend-key",
        "handle-hibernate-key", "handle-lid-switch", "handle-reboot-key")


class Refused(Exception):
    """logind refuses the lock: ``name`` (the D-Bus error name) and the message."""

    def __init__(self, name: str, message: str):
        super().__init__(message)
        self.name = name
        self.message = message


class Inhibitors:
    """The locks (module docstring); thread-safe.

    :param state_root: the directory holding ``.sim/`` (fault rules).
    """

    def __init__(self, state_root: str):
        self.state_root = state_root
        self._lock = threading.Lock()
        self._locks: list[tuple[int, tuple]] = []   # (kept end, (what, who, why, mode, uid, pid))

    def take(self, what: str, who: str, why: str, mode: str, uid: int, pid: int) -> int:
        """A new lock; returns the caller's end (the caller hands it out and closes its copy).

        :raises Refused: bad arguments (``InvalidArgs``) or an injected refusal.
        """
        kinds = what.split(":")
        if not what or any(k not in WHAT for k in kinds):
            raise Refused("org.freedesktop.DBus.Error.InvalidArgs",
                          f"Invalid what specification {what}")
        if mode not in ("block", "delay"):
            raise Refused("org.freedesktop.DBus.Error.InvalidArgs",
                          f"Unknown inhibitor mode {mode}")
        if mode == "delay" and any(k not in ("sleep", "shutdown") for k in kinds):
            raise Refused("org.freedesktop.DBus.Error.InvalidArgs",
                          "Delay inhibitors only supported for shutdown and sleep")
        if faults.match(self.state_root, "inhibit", what):
            raise Refused("org.freedesktop.DBus.Error.AccessDenied", "Access denied")
        r, w = os.pipe2(os.O_CLOEXEC)
        with self._lock:
            self._locks.append((r, (what, who, why, mode, uid, pid)))
        return w

    def live(self) -> list[tuple]:
        """``[(what, who, why, mode, uid, pid)]`` of the locks whose descriptor is still open
        somewhere (``ListInhibitors``); closed ones are dropped here."""
        with self._lock:
            keep, rows = [], []
            for r, row in self._locks:
                p = select.poll()
                p.register(r, select.POLLIN)
                if any(ev & (select.POLLHUP | select.POLLERR) for _fd, ev in p.poll(0)):
                    os.close(r)
                else:
                    keep.append((r, row))
                    rows.append(row)
            self._locks = keep
            return rows

    def close(self) -> None:
        """Drop every lock (the fake logind ends)."""
        with self._lock:
            locks, self._locks = self._locks, []
        for r, _row in locks:
            os.close(r)
