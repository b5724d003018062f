"""An in-process fake of vfio-hookd's logind client (:class:`vfio_hookd.logind.Logind`) and of
its user-instance client (:class:`vfio_hookd.usermgr.UserManager`), for the fast tests: no
``dbus-daemon``. It runs the shared desktop model (:mod:`testbed.sim.desktop`) when the
simulated host has one (``.sim/desktop.json``), else it is a host without logind (no sessions).

Same interface, results and errors as the real clients: ``available``, ``sessions`` (list of
:class:`vfio_hookd.logind.Session`), ``session_of_pid``, ``user_of_pid``, ``system_pids``,
``watch`` (an object with ``fileno``, ``clear``, ``wait``, ``close``, ``events``),
``terminate_sessions``, ``user_manager`` (None when the instance does not run), ``inhibit``
(a real descriptor: a pipe end, :mod:`testbed.sim.inhibitors`), ``inhibitors``, ``close``.

logind's own hold on a compositor's devices is a process named ``systemd-logind`` here (the test
process itself is excluded from holder scans), whose PID :meth:`FakeLogind.system_pids` names.
"""

from __future__ import annotations

import collections
import os
import signal
import threading
import time

from vfio_hookd.errors import INHIBIT_FAILED, TIMEOUT, UNIT_FAILED, HookdError
from vfio_hookd.logind import Inhibitor, Session

from .procs import stop as stop_process
from .sim import desktop as model
from .sim.inhibitors import Inhibitors, Refused


class _Watch:
    """Events of the model since the watch was opened (as :class:`vfio_hookd.gdbus.SignalListener`:
    ``(member, path, args)``)."""

    def __init__(self, owner: "_Source"):
        self._owner = owner
        self._cv = threading.Condition()
        self.events: collections.deque = collections.deque(maxlen=4096)
        self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        owner.watches.append(self)

    def push(self, member: str, path: str, args: tuple) -> None:
        """Record one event and wake waiters."""
        with self._cv:
            self.events.append((member, path, args))
            self._cv.notify_all()
        try:
            os.eventfd_write(self._efd, 1)
        except OSError:
            pass

    def fileno(self) -> int:
        """An eventfd readable after each event."""
        return self._efd

    def clear(self) -> None:
        """Reset :meth:`fileno`."""
        try:
            os.eventfd_read(self._efd)
        except OSError:
            pass

    def wait(self, predicate, deadline: float) -> bool:
        """Wait until ``predicate()`` or ``deadline`` (monotonic s)."""
        with self._cv:
            return bool(self._cv.wait_for(predicate, max(0.0, deadline - time.monotonic())))

    def close(self) -> None:
        """Stop recording."""
        if self in self._owner.watches:
            self._owner.watches.remove(self)
        try:
            os.close(self._efd)
        except OSError:
            pass


class _Source:
    def __init__(self):
        self.watches: list[_Watch] = []


class _FakeDesktop(model.Desktop):
    """The model, with logind's device hold as a process (module docstring)."""

    def logind_hold(self, sid: str, nodes: list[str]) -> None:
        self.logind_fds[sid] = [model.spawn("systemd-logind", nodes, self.root, self.bindir)]
        pid = self.logind_fds[sid][0]
        threading.Thread(target=_reap, args=(pid,), daemon=True).start()

    def logind_release(self, sid: str) -> None:
        for pid in self.logind_fds.pop(sid, []):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass


class FakeLogind:
    """The fake logind and its client in one object (module docstring).

    :param root: the simulated host root; :param state_root: directory holding ``.sim/``.
    """

    def __init__(self, root: str, state_root: str | None = None):
        state_root = state_root or root
        self.model = None
        self.locks = None
        self._src = _Source()
        if os.path.exists(os.path.join(state_root, ".sim", "desktop.json")):
            self.model = _FakeDesktop(root, state_root)
            self.model.listeners.append(self._on_event)
            self.locks = Inhibitors(state_root)

    def _on_event(self, event: str, args: tuple) -> None:
        member = {"SessionChanged": "PropertiesChanged"}.get(event, event)
        path = args[1] if event in ("SessionNew", "SessionRemoved") else ""
        out = (args[0], path) if event in ("SessionNew", "SessionRemoved") else args
        for w in list(self._src.watches):
            w.push(member, path, out)

    def available(self) -> bool:
        """True when the host has a desktop model (logind runs)."""
        return self.model is not None

    def sessions(self) -> list[Session]:
        """Every session of the model, as :meth:`vfio_hookd.logind.Logind.sessions`."""
        if self.model is None:
            return []
        with self.model.lock:
            return [Session(id=s.id, user=s.user, uid=s.uid, seat=s.seat, cls=s.cls,
                            type=s.type, state=s.state, leader=s.leader, tty=s.tty,
                            scope=s.scope, service=s.service, remote=s.remote)
                    for s in self.model.sessions.values()]

    def session_of_pid(self, pid: int) -> str | None:
        """Id of the session whose leader ``pid`` is, or None."""
        if self.model is None:
            return None
        with self.model.lock:
            return next((s.id for s in self.model.sessions.values() if s.leader == pid), None)

    def user_of_pid(self, pid: int) -> int | None:
        """UID of the session leader or user unit process ``pid``, or None."""
        return None if self.model is None else self.model.user_of_pid(pid)

    def system_pids(self) -> set[int]:
        """1 and the processes standing for logind's device holds."""
        pids = {1}
        if self.model is not None:
            with self.model.lock:
                pids.update(p for fds in self.model.logind_fds.values() for p in fds)
        return pids

    def watch(self):
        """A watch of the model's events (None without a desktop)."""
        return _Watch(self._src) if self.model is not None else None

    def terminate_sessions(self, ids: list[str], timeout_s: float) -> list[str]:
        """End ``ids`` and wait for their ``SessionRemoved``; the ids left at the deadline."""
        if self.model is None or not ids:
            return list(ids) if self.model is None else []
        deadline = time.monotonic() + timeout_s
        w = self.watch()
        try:
            for sid in ids:
                self.model.end_session(sid)
            with self.model.lock:
                left = [i for i in ids if i in self.model.sessions]

            def gone():
                removed = {str(a[0]) for m, _p, a in w.events if m == "SessionRemoved"}
                return all(i in removed for i in left)
            w.wait(gone, deadline)
            removed = {str(a[0]) for m, _p, a in list(w.events) if m == "SessionRemoved"}
            return [i for i in left if i not in removed]
        finally:
            w.close()

    def user_manager(self, uid: int):
        """User ``uid``'s instance (:class:`FakeUserManager`), or None when it does not run."""
        if self.model is None:
            return None
        with self.model.lock:
            if not any(u.uid == uid and u.running for u in self.model.users.values()):
                return None
        return FakeUserManager(self, uid)

    def inhibit(self, what: str, who: str, why: str, mode: str = "block",
                timeout_s: float = 10.0) -> int:
        """As :meth:`vfio_hookd.logind.Logind.inhibit` (same errors and messages): the caller's
        end of a pipe whose other end the model keeps."""
        if self.locks is None:
            raise HookdError(INHIBIT_FAILED, f"systemd-logind is not running (nothing owns "
                             f"org.freedesktop.login1 on the system bus): no {what} inhibitor "
                             f"lock; start systemd-logind.service, or set inhibit: none")
        try:
            return self.locks.take(what, who, why, mode, os.getuid(), os.getpid())
        except Refused as exc:
            raise HookdError(INHIBIT_FAILED, f"systemd-logind did not give the {what} "
                             f"inhibitor lock (mode {mode}): {exc.message}") from None

    def inhibitors(self) -> list[Inhibitor]:
        """The locks whose descriptor is open (``ListInhibitors``)."""
        return [Inhibitor(*row) for row in self.locks.live()] if self.locks else []

    def close(self) -> None:
        """"Close the connection" (the model keeps running)."""

    def kill_all(self) -> None:
        """End every process of the model (tests call it at teardown)."""
        if self.locks is not None:
            self.locks.close()
        if self.model is not None:
            pids = [p for fds in self.model.logind_fds.values() for p in fds]
            self.model.close()
            for pid in pids:
                stop_process(pid, 5.0)


class FakeUserManager:
    """User ``uid``'s instance, as :class:`vfio_hookd.usermgr.UserManager`."""

    def __init__(self, logind: FakeLogind, uid: int):
        self._lg = logind
        self.model = logind.model
        self.uid = uid

    def _user(self):
        return next(u for u in self.model.users.values() if u.uid == self.uid)

    def unit_of_pid(self, pid: int) -> str | None:
        """The user unit whose process ``pid`` is, or None."""
        return self.model.unit_of_pid(self.uid, pid)

    def active_state(self, unit: str) -> str:
        """``ActiveState`` of the user unit (``inactive`` if unknown)."""
        with self.model.lock:
            u = self._user().units.get(unit)
            return u.active_state if u is not None else "inactive"

    def triggered_by(self, unit: str) -> list[str]:
        """The socket units that start ``unit``."""
        with self.model.lock:
            u = self._user().units.get(unit)
            return list(u.spec.get("triggered_by", [])) if u is not None else []

    def run_jobs(self, method: str, units: list[str], timeout_s: float) -> None:
        """As :meth:`vfio_hookd.usermgr.UserManager.run_jobs` (same errors)."""
        deadline = time.monotonic() + timeout_s
        jtype = "stop" if method == "StopUnit" else "start"
        w = self._lg.watch()
        try:
            jobs = {}
            failed = []
            for unit in units:
                try:
                    jobs[self.model.run_job(self.uid, jtype, unit)[1]] = unit
                except (KeyError, StopIteration):
                    failed.append(f"{unit}: Unit {unit} not loaded.")

            def results():
                return {a[2]: a[4] for m, _p, a in w.events
                        if m == "JobRemoved" and a[0] == self.uid and a[2] in jobs}
            w.wait(lambda: len(results()) == len(jobs), deadline)
            with w._cv:
                got = results()
        finally:
            w.close()
        failed += [f"{jobs[j]}: job result {r}" for j, r in got.items() if r != "done"]
        pending = [jobs[j] for j in jobs if j not in got]
        verb = "stopping" if jtype == "stop" else "starting"
        if pending:
            raise HookdError(TIMEOUT, f"{verb} {', '.join(pending)} in the systemd instance of "
                             f"uid {self.uid}: no end within {timeout_s:g} s")
        if failed:
            raise HookdError(UNIT_FAILED, f"{verb} in the systemd instance of uid {self.uid}: "
                             + "; ".join(failed))

    def close(self) -> None:
        """Nothing to close."""
