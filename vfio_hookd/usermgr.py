"""vfio-hookd's client for a user's systemd instance (``user@UID.service``), peer to peer on its
private socket ``/run/user/UID/systemd/private`` (the socket ``systemctl --user`` uses; no
session bus needed). Same ``org.freedesktop.systemd1(5)`` API as the system manager.

Facts relied on:

- sd-bus accepts EXTERNAL authentication when the token equals the peer's ``SO_PEERCRED`` uid
  (``verify_external_token``, ``src/libsystemd/sd-bus/bus-socket.c``): root's connection (token
  ``0``, peer uid 0) is accepted by a user's manager.
- On a direct connection there is no bus name: calls carry no destination, and the manager
  sends its signals to every direct connection, unconditionally (``bus_foreach_bus`` in
  ``src/core/dbus.c``), without a sender; ``Subscribe()`` is still called, as ``systemctl``
  does.
- Jobs: ``StopUnit`` / ``StartUnit`` return a job path; ``JobRemoved(id, job, unit, result)``
  ends it. All jobs are enqueued before any is awaited (``systemctl --user stop A B``): the
  manager orders them by their own ``After=``/``Before=``; the wait costs the slowest one.
- A socket-activated service (PipeWire's ``pipewire.socket``, ``pipewire-pulse.socket``) comes
  straight back on the next connection while its socket listens: the socket units in the
  service's ``TriggeredBy`` are stopped with it (``systemd.socket(5)``).
"""

from __future__ import annotations

import threading
import time

from . import gdbus
from .errors import SYSTEMD_UNAVAILABLE, TIMEOUT, UNIT_FAILED, HookdError

MANAGER_PATH = "/org/freedesktop/systemd1"
MANAGER_IFACE = "org.freedesktop.systemd1.Manager"
UNIT_IFACE = "org.freedesktop.systemd1.Unit"
#: How long (s) the courtesy ``Subscribe()`` of a new connection may take (its answer is not
#: needed: see :class:`UserManager`).
SUBSCRIBE_TIMEOUT_S = 2.0
_NO_UNIT = {"org.freedesktop.systemd1.NoSuchUnit", "org.freedesktop.systemd1.NoUnitForPID",
            "org.freedesktop.systemd1.NoSuchProcess"}


class UserManager:
    """A connection to user ``uid``'s systemd instance on its private socket ``path``.

    :param path: real path of ``/run/user/UID/systemd/private``.
    :param uid: the user's UID (int, for messages).
    :param call_timeout_s: timeout (s) of each call.
    :raises LookupError: the instance is gone (no socket, or nothing listens on it: it is
        stopping).
    :raises HookdError: ``SYSTEMD_UNAVAILABLE`` when the instance does not answer.
    """

    def __init__(self, path: str, uid: int, call_timeout_s: float = 25.0):
        from gi.repository import GLib
        self.path = path
        self.uid = uid
        self._timeout = call_timeout_s
        self._lock = threading.Lock()
        try:
            try:
                self._con = gdbus.connect_peer(path, call_timeout_s)
            except (FileNotFoundError, ConnectionRefusedError) as e:
                raise LookupError(f"{path}: {e.strerror}") from None
            self._watch = gdbus.SignalWatch(self._con, None, MANAGER_IFACE, "JobRemoved")
            self._jobs = self._watch.listen()
            try:
                # a direct connection gets the manager's signals without it (bus_foreach_bus);
                # asked as systemctl does, but not waited on for long: in the real-systemd
                # guest the first call on a new connection sometimes got no answer until the
                # 25 s call timeout, after which the connection worked (2 of 4 variants)
                self._manager("Subscribe", timeout_s=SUBSCRIBE_TIMEOUT_S)
            except HookdError:
                pass   # AlreadySubscribed, or no answer: the signals come all the same
        except (OSError, GLib.Error) as e:
            raise HookdError(SYSTEMD_UNAVAILABLE, f"the systemd instance of uid {uid} does not "
                             f"answer on {path}: {getattr(e, 'message', e)}") from None

    def _manager(self, method: str, args=None, signature=None, timeout_s: float | None = None):
        from gi.repository import GLib
        try:
            return gdbus.call(self._con, None, MANAGER_PATH, MANAGER_IFACE, method, args,
                              signature, self._timeout if timeout_s is None else timeout_s)
        except GLib.Error as e:
            if gdbus.error_name(e) in _NO_UNIT:
                raise LookupError(e.message) from None
            raise HookdError(UNIT_FAILED, f"systemd instance of uid {self.uid}: {method}: "
                             f"{e.message}") from None

    def _unit_prop(self, unit: str, prop: str):
        from gi.repository import GLib
        try:
            path = self._manager("GetUnit", (unit,), "s")[0]
        except LookupError:
            return None
        try:
            return gdbus.get(self._con, None, path, UNIT_IFACE, prop, self._timeout)
        except GLib.Error:
            return None

    def unit_of_pid(self, pid: int) -> str | None:
        """The user unit (id) process ``pid`` belongs to (``GetUnitByPID``), or None."""
        from gi.repository import GLib
        try:
            path = self._manager("GetUnitByPID", (pid,), "u")[0]
            return str(gdbus.get(self._con, None, path, UNIT_IFACE, "Id", self._timeout))
        except (LookupError, GLib.Error):
            return None

    def active_state(self, unit: str) -> str:
        """``ActiveState`` of ``unit``; ``inactive`` for a unit not loaded."""
        return str(self._unit_prop(unit, "ActiveState") or "inactive")

    def triggered_by(self, unit: str) -> list[str]:
        """The units that activate ``unit`` (``TriggeredBy``: its ``.socket`` units)."""
        return [str(u) for u in (self._unit_prop(unit, "TriggeredBy") or [])]

    def run_jobs(self, method: str, units: list[str], timeout_s: float) -> None:
        """Enqueue ``method`` (``StopUnit`` / ``StartUnit``, mode ``replace``) for every unit
        of ``units`` first, then wait for all their ``JobRemoved`` until ``timeout_s`` (s) in
        all.

        :raises HookdError: ``UNIT_FAILED`` naming each unit whose job ended other than
            ``done``; ``TIMEOUT`` naming the jobs still pending at the deadline.
        """
        deadline = time.monotonic() + timeout_s
        jobs: dict[str, str] = {}
        failed = []
        for unit in units:
            try:
                jobs[str(self._manager(method, (unit, "replace"), "ss")[0])] = unit
            except LookupError as e:
                failed.append(f"{unit}: {e}")

        def results() -> dict[str, str]:
            return {str(p[1]): str(p[3]) for m, _path, p in self._jobs.events
                    if m == "JobRemoved" and str(p[1]) in jobs}
        self._jobs.wait(lambda: len(results()) == len(jobs), deadline)
        with self._jobs._cv:
            got = results()
        failed += [f"{jobs[j]}: job result {r}" for j, r in got.items() if r != "done"]
        pending = [jobs[j] for j in jobs if j not in got]
        verb = "stopping" if method == "StopUnit" else "starting"
        if pending:
            raise HookdError(TIMEOUT, f"{verb} {', '.join(pending)} in the systemd instance of "
                             f"uid {self.uid}: no end within {timeout_s:g} s",
                             {"uid": self.uid, "units": pending})
        if failed:
            raise HookdError(UNIT_FAILED, f"{verb} in the systemd instance of uid {self.uid}: "
                             + "; ".join(failed), {"uid": self.uid})

    def close(self) -> None:
        """Unsubscribe and close the connection."""
        self._jobs.close()
        self._watch.close()
        try:
            self._con.close_sync(None)
        except Exception:  # the instance went away
            pass
