"""vfio-hookd's client for systemd-logind (``org.freedesktop.login1(5)``), and the door to the
users' systemd instances (:mod:`vfio_hookd.usermgr`).

What the desktop steps ask logind (FIELD-NOTES §3, §7, §8):

- ``Manager.ListSessions() -> a(susso)`` and each session's properties ``Id``, ``Name`` (user
  name), ``User`` (``(uo)``), ``Seat`` (``(so)``), ``Class`` (``user``, ``greeter``,
  ``lock-screen``, ``background``), ``Type`` (``x11``, ``wayland``, ``tty``, ``mir``,
  ``unspecified``), ``State`` (``online``, ``active``, ``closing``), ``Leader`` (PID), ``TTY``,
  ``Scope`` (``session-2.scope``), ``Service`` (the PAM service), ``Remote``;
- ``Manager.GetSessionByPID(u)`` / ``GetUserByPID(u)`` (errors ``NoSessionForPID``,
  ``NoUserForPID``) and the user's ``UID``;
- ``Manager.TerminateSession(s)``, and the signals ``SessionNew(so)``, ``SessionRemoved(so)``
  and ``PropertiesChanged`` of the session objects, to wait without sleeping;
- ``Manager.Inhibit(ssss) -> h`` and ``ListInhibitors() -> a(ssssuu)`` for the ``inhibit``
  step (:mod:`vfio_hookd.steps.inhibit`; systemd.io "Inhibitor Locks").

A host where nothing owns ``org.freedesktop.login1`` (or no bus at all) has no sessions: the
queries answer empty, so the steps leave the desktop to the units step as before.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import asdict, dataclass

from . import gdbus
from .errors import INHIBIT_FAILED, SYSTEMD_UNAVAILABLE, HookdError

LOGIND = "org.freedesktop.login1"
MANAGER_PATH = "/org/freedesktop/login1"
MANAGER_IFACE = "org.freedesktop.login1.Manager"
SESSION_IFACE = "org.freedesktop.login1.Session"
USER_IFACE = "org.freedesktop.login1.User"
_ABSENT = {"org.freedesktop.DBus.Error.ServiceUnknown", "org.freedesktop.DBus.Error.NameHasNoOwner"}
#: How long (s) logind may take to answer ``Inhibit`` (it answers in milliseconds; a logind
#: that does not answer in this time fails the prepare rather than hanging it).
INHIBIT_CALL_S = 10.0
_NO_SUCH = {"org.freedesktop.login1.NoSessionForPID", "org.freedesktop.login1.NoUserForPID",
            "org.freedesktop.login1.NoSuchSession", "org.freedesktop.DBus.Error.UnknownObject"}


@dataclass(frozen=True)
class Session:
    """One login session as logind shows it: ``id`` (str), ``user`` (name), ``uid`` (int),
    ``seat`` (``"seat0"`` or ``""``), ``cls`` (``Class``), ``type`` (``Type``), ``state``,
    ``leader`` (PID, int), ``tty`` (``"tty1"`` or ``""``), ``scope`` (unit), ``service`` (PAM
    service), ``remote`` (bool)."""
    id: str
    user: str
    uid: int
    seat: str
    cls: str
    type: str
    state: str
    leader: int
    tty: str
    scope: str
    service: str = ""
    remote: bool = False

    def to_dict(self) -> dict:
        """The JSON-able form (``cls`` under the key ``class``)."""
        d = asdict(self)
        d["class"] = d.pop("cls")
        return d


@dataclass(frozen=True)
class Inhibitor:
    """One inhibitor lock as ``ListInhibitors`` shows it (``systemd-inhibit --list``): ``what``
    (``"sleep:idle"``), ``who``, ``why``, ``mode`` (``block`` or ``delay``), ``uid`` and
    ``pid`` (int) of the process that took it."""
    what: str
    who: str
    why: str
    mode: str
    uid: int
    pid: int


class Logind:
    """A connection to systemd-logind on the system bus (or on ``address``).

    :param address: D-Bus address (str) or None for the system bus.
    :param run_user: the real path of ``/run/user`` (users' runtime directories; the simulated
        host passes its own).
    :param call_timeout_s: timeout (s) of each method call and property read.

    Thread-safe; the connection is opened on first use and closed by :meth:`close`.
    """

    def __init__(self, address: str | None = None, run_user: str = "/run/user",
                 call_timeout_s: float = 25.0):
        self._address = address
        self.run_user = run_user
        self._timeout = call_timeout_s
        self._lock = threading.Lock()
        self._con = None
        self._signals = None   # gdbus.SignalWatch of _con, made by the first watch()
        self._unreachable = False

    def _connection(self):
        """The bus connection, or None when there is no bus (a host without D-Bus).

        :raises HookdError: ``SYSTEMD_UNAVAILABLE`` when the process is out of file
            descriptors (that is no host without logind: going on as if would skip sessions).
        """
        from gi.repository import Gio, GLib
        with self._lock:
            if self._con is not None and not self._con.is_closed():
                return self._con
            self._close_signals()
            try:
                self._con = gdbus.connect_bus(self._address)
            except GLib.Error as e:
                self._con = None
                if e.matches(Gio.io_error_quark(), Gio.IOErrorEnum.TOO_MANY_OPEN_FILES):
                    raise HookdError(SYSTEMD_UNAVAILABLE, f"systemd-logind: cannot connect to "
                                     f"the bus: {e.message}") from None
            return self._con

    def _close_signals(self) -> None:
        """End the signal subscription of the connection that was (under ``_lock``)."""
        if self._signals is not None:
            self._signals.close()
            self._signals = None

    def _call(self, method: str, args=None, signature=None):
        """``Manager.method``; None when logind is absent."""
        from gi.repository import GLib
        con = self._connection()
        if con is None:
            return None
        try:
            return gdbus.call(con, LOGIND, MANAGER_PATH, MANAGER_IFACE, method, args, signature,
                              self._timeout)
        except GLib.Error as e:
            name = gdbus.error_name(e)
            if name in _ABSENT:
                return None
            if name in _NO_SUCH:
                raise LookupError(name) from None
            raise HookdError(SYSTEMD_UNAVAILABLE, f"systemd-logind: {method}: {e.message}") \
                from None

    def available(self) -> bool:
        """True when something owns ``org.freedesktop.login1`` on the bus."""
        from gi.repository import GLib
        con = self._connection()
        if con is None:
            return False
        try:
            return bool(gdbus.call(con, "org.freedesktop.DBus", "/org/freedesktop/DBus",
                                   "org.freedesktop.DBus", "NameHasOwner", (LOGIND,), "s",
                                   self._timeout)[0])
        except GLib.Error:
            return False

    def sessions(self) -> list[Session]:
        """Every session (``ListSessions`` + each one's properties); sessions that end while
        read are left out; ``[]`` without logind.

        :raises HookdError: ``SYSTEMD_UNAVAILABLE`` (logind fails to answer).
        """
        from gi.repository import GLib
        rows = self._call("ListSessions")
        if not rows:
            return []
        out = []
        for sid, _uid, _name, _seat, path in rows[0]:
            try:
                p = gdbus.get_all(self._connection(), LOGIND, path, SESSION_IFACE, self._timeout)
            except GLib.Error:
                continue   # ended meanwhile
            out.append(Session(
                id=str(p.get("Id", sid)), user=str(p.get("Name", "")),
                uid=int((p.get("User") or (0, ""))[0]), seat=str((p.get("Seat") or ("", ""))[0]),
                cls=str(p.get("Class", "")), type=str(p.get("Type", "")),
                state=str(p.get("State", "")), leader=int(p.get("Leader", 0)),
                tty=str(p.get("TTY", "")), scope=str(p.get("Scope", "")),
                service=str(p.get("Service", "")), remote=bool(p.get("Remote", False))))
        return out

    def session_of_pid(self, pid: int) -> str | None:
        """Id of the session process ``pid`` belongs to (``GetSessionByPID``), or None (not in a
        session, gone, or no logind)."""
        from gi.repository import GLib
        try:
            reply = self._call("GetSessionByPID", (pid,), "u")
            if not reply:
                return None
            return str(gdbus.get(self._connection(), LOGIND, reply[0], SESSION_IFACE, "Id",
                                 self._timeout))
        except (LookupError, GLib.Error):
            return None

    def user_of_pid(self, pid: int) -> int | None:
        """UID of the user whose slice process ``pid`` runs in (``GetUserByPID``: also the
        processes of ``user@UID.service``), or None."""
        from gi.repository import GLib
        try:
            reply = self._call("GetUserByPID", (pid,), "u")
            if not reply:
                return None
            return int(gdbus.get(self._connection(), LOGIND, reply[0], USER_IFACE, "UID",
                                 self._timeout))
        except (LookupError, GLib.Error):
            return None

    def system_pids(self) -> set[int]:
        """PIDs never to signal: 1 (systemd, whose fdstore keeps logind's copies of session
        devices), and the owners of ``org.freedesktop.login1`` and ``org.freedesktop.systemd1``
        on the bus (``GetConnectionUnixProcessID``; FIELD-NOTES §8)."""
        from gi.repository import GLib
        pids = {1}
        con = self._connection()
        if con is None:
            return pids
        for name in (LOGIND, "org.freedesktop.systemd1"):
            try:
                pids.add(int(gdbus.call(con, "org.freedesktop.DBus", "/org/freedesktop/DBus",
                                        "org.freedesktop.DBus", "GetConnectionUnixProcessID",
                                        (name,), "s", self._timeout)[0]))
            except GLib.Error:
                pass
        return pids

    def watch(self):
        """A :class:`vfio_hookd.gdbus.SignalListener` of logind's signals (``SessionNew``,
        ``SessionRemoved``, ``UserNew``, ``UserRemoved``, ``PropertiesChanged``) from now on,
        or None without a bus; the caller closes it. Open it *before* reading the state it
        waits on. All listeners share one subscription per connection (why:
        :class:`vfio_hookd.gdbus.SignalWatch`), made on the first call."""
        con = self._connection()
        if con is None:
            return None
        with self._lock:
            if self._signals is None:
                self._signals = gdbus.SignalWatch(con, LOGIND, None, None)
            return self._signals.listen()

    def terminate_sessions(self, ids: list[str], timeout_s: float) -> list[str]:
        """``TerminateSession`` each of ``ids`` (all at once), then wait for their
        ``SessionRemoved`` until ``timeout_s`` (s) in all. A session already gone counts as
        ended.

        :returns: the ids still present at the deadline (empty: all ended).
        :raises HookdError: ``SYSTEMD_UNAVAILABLE``.
        """
        if not ids:
            return []
        deadline = time.monotonic() + timeout_s
        watch = self.watch()
        if watch is None:
            return list(ids)
        try:
            for sid in ids:
                try:
                    self._call("TerminateSession", (sid,), "s")
                except LookupError:
                    pass
            present = {s.id for s in self.sessions()}
            left = [i for i in ids if i in present]

            def gone() -> bool:
                removed = {str(p[0]) for m, _path, p in watch.events if m == "SessionRemoved"}
                return not [i for i in left if i not in removed]
            watch.wait(gone, deadline)
            removed = {str(p[0]) for m, _path, p in list(watch.events) if m == "SessionRemoved"}
            return [i for i in left if i not in removed]
        finally:
            watch.close()

    def inhibit(self, what: str, who: str, why: str, mode: str = "block",
                timeout_s: float = INHIBIT_CALL_S) -> int:
        """Take an inhibitor lock: ``Manager.Inhibit(what, who, why, mode) -> h``
        (``org.freedesktop.login1(5)``; systemd.io "Inhibitor Locks"). The lock holds while
        the returned descriptor (one end of a FIFO logind watches) is open anywhere: closing
        it releases the lock, and so does the end of the process that holds it.

        :param what: lock types joined by ``:`` (``"sleep"``, ``"sleep:idle"``).
        :param who: / :param why: what ``systemd-inhibit --list`` shows. :param mode:
            ``block`` or ``delay``. :param timeout_s: how long logind may take to answer (s).
        :returns: the descriptor (int, close-on-exec); the caller owns it.
        :raises HookdError: ``INHIBIT_FAILED``: no system bus, logind not running, the lock
            refused (polkit, a bad argument), or no answer within ``timeout_s``.
        """
        from gi.repository import GLib
        con = self._connection()
        if con is None:
            raise HookdError(INHIBIT_FAILED, f"no D-Bus system bus: systemd-logind cannot be "
                             f"asked for the {what} inhibitor lock")
        try:
            reply, fds = gdbus.call_fds(con, LOGIND, MANAGER_PATH, MANAGER_IFACE, "Inhibit",
                                        (what, who, why, mode), "ssss", timeout_s)
        except GLib.Error as e:
            if gdbus.error_name(e) in _ABSENT:
                raise HookdError(INHIBIT_FAILED, f"systemd-logind is not running (nothing owns "
                                 f"{LOGIND} on the system bus): no {what} inhibitor lock; "
                                 f"start systemd-logind.service, or set inhibit: none") from None
            raise HookdError(INHIBIT_FAILED, f"systemd-logind did not give the {what} "
                             f"inhibitor lock (mode {mode}): {gdbus.remote_message(e)}") \
                from None
        index = reply[0] if reply else -1
        fd = fds.pop(index) if isinstance(index, int) and 0 <= index < len(fds) else None
        for other in fds:   # a reply carries one; never leak what else came with it
            os.close(other)
        if fd is None:
            raise HookdError(INHIBIT_FAILED, f"systemd-logind answered Inhibit({what!r}) "
                             f"without a file descriptor")
        return fd

    def inhibitors(self) -> list[Inhibitor]:
        """Every inhibitor lock logind holds now (``ListInhibitors``); ``[]`` without logind.

        :raises HookdError: ``SYSTEMD_UNAVAILABLE`` (logind fails to answer).
        """
        reply = self._call("ListInhibitors")
        return [Inhibitor(str(w), str(who), str(why), str(m), int(u), int(p))
                for w, who, why, m, u, p in (reply[0] if reply else [])]

    def user_manager(self, uid: int):
        """The client of user ``uid``'s systemd instance
        (:class:`vfio_hookd.usermgr.UserManager` on ``<run_user>/UID/systemd/private``), or None
        when that instance does not run (no socket, or nothing listens on it any more).

        :raises HookdError: ``SYSTEMD_UNAVAILABLE`` if the socket exists but does not answer.
        """
        from .usermgr import UserManager
        path = os.path.join(self.run_user, str(uid), "systemd", "private")
        try:
            return UserManager(path, uid, self._timeout)
        except LookupError:   # no instance, or one on its way out (UserStopDelaySec over)
            return None

    def close(self) -> None:
        """Close the connection (a later call reconnects)."""
        with self._lock:
            con, self._con = self._con, None
            self._close_signals()
        if con is not None:
            try:
                con.close_sync(None)
            except Exception:  # closed by the peer already
                pass

