"""The simulated host's desktop: seats, login sessions, users and their systemd instances -- the
model both fakes of logind share (:mod:`testbed.sim.logind` on D-Bus, :mod:`testbed.fake_logind`
in-process), as :mod:`testbed.sim.units` is for the two fakes of systemd.

It behaves like FIELD-NOTES §7/§8 (systemd 252, logind, LightDM, greetd, PipeWire):

- Sessions are real processes (their leader, ``comm`` the compositor's or client's name) holding
  their ``holds`` (host paths) open; a session whose compositor opens the GPU through logind
  (``via_logind``) also makes *logind* hold those nodes (:meth:`Desktop.logind_hold`) until
  ``logind_release`` s after the session ended (logind's copy, PID 1's fdstore).
- The display manager (``dm``, a unit of the simulated systemd) is followed through
  ``units-state.json`` (inotify): ``session_close`` s after it stops, its sessions end; when it
  starts again, after ``session_start`` s it shows per ``policy``: ``autologin`` (LightDM: the
  autologin session every time), ``greeter`` (its greeter), ``initial_once`` (greetd: the
  ``initial_session`` once per boot, so a restart shows the greeter).
- A VT session (``vt``: getty autologin on ``ttyN`` -> compositor) ends when its getty unit
  stops, and comes back ``session_start`` s after it starts again -- or after it was
  terminated while the getty still runs (``Restart=always`` respawns the autologin).
- Each user with a session gets a systemd instance: its units (``pipewire.service`` ...) are real
  processes holding their ``holds`` (the HDMI audio's ``/dev/snd`` nodes), started
  ``audio_start`` s after the instance; the instance stays ``user_stop_delay`` s
  (``UserStopDelaySec``) after the user's last session, forever for ``linger`` users. A
  service stopped while a socket in its ``triggered_by`` still listens comes back after
  ``socket_reactivate`` s (a client connects). Jobs on user units: a stop sends SIGTERM and is
  done when the process exited; ``fail_stop`` / ``fail_start`` (unit names) end them ``failed``.
- Sessions not on a seat (``remote``: alice over SSH) never end by themselves.

Configuration ``<state_root>/.sim/desktop.json`` (:data:`testbed.sim.DESKTOPS`); listeners get
``(event, args)``: ``SessionNew``/``SessionRemoved`` ``(id, path)``, ``SessionChanged`` ``(id,)``,
``UserNew``/``UserRemoved`` ``(uid,)``, ``JobRemoved`` ``(uid, job id, job path, unit, result)``.
The system manager learns which unit a session's or user instance's process is in from
``.sim/scopes.json`` (``{pid: "session-2.scope" | "user@1000.service"}``, written on change).
"""

from __future__ import annotations

import json
import os
import signal
import threading

from . import units as unitmodel

from .seats import TIMING, Session, User, UserUnit, spawn  # noqa: F401 (re-exported)


class Desktop:
    """The model (module docstring); thread-safe, its timers are threads.

    :param root: the simulated host root; :param state_root: the directory holding ``.sim/``.
    """

    def __init__(self, root: str, state_root: str | None = None):
        self.root = os.path.abspath(root)
        self.state_root = os.path.abspath(state_root or root)
        self.simdir = os.path.join(self.state_root, ".sim")
        self.bindir = os.path.join(self.simdir, "bin")
        with open(os.path.join(self.simdir, "desktop.json")) as f:
            self.conf = json.load(f)
        self.timing = dict(TIMING, **self.conf.get("timing", {}))
        self.lock = threading.RLock()
        self.listeners: list = []
        self.sessions: dict[str, Session] = {}
        self.users = {n: User(n, s) for n, s in self.conf.get("users", {}).items()}
        self.logind_fds: dict[str, list] = {}
        self._next = 1
        self._jobs = 0
        self._closed = False
        self.initial_used = False
        self.dm_run = 0   # counts the display manager's starts
        self._units = self._unit_states()
        with self.lock:
            if self.conf.get("dm") and self._units.get(self.conf["dm"]) == "active":
                self._dm_shows(boot=True)
            vt = self.conf.get("vt")
            if vt and self._units.get(vt["getty"]) == "active":
                self._new_session(vt, "seat0", "user", "vt")
            for spec in self.conf.get("remote", []):
                self._new_session(spec, "", "user", "boot")
            for user in self.users.values():
                if user.linger:
                    self._start_instance(user)
        threading.Thread(target=self._follow_units, daemon=True, name="desktop units").start()

    # ---- events ---------------------------------------------------------------------------
    def _emit(self, event: str, *args) -> None:
        for fn in list(self.listeners):
            fn(event, args)

    def _after(self, key: str, fn, *args) -> None:
        def run():
            with self.lock:
                if not self._closed:
                    fn(*args)
        t = threading.Timer(self.timing[key], run)
        t.daemon = True
        t.start()
        return t

    def _reap(self, pid: int, then) -> None:
        def wait():
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
            with self.lock:
                then()
        threading.Thread(target=wait, daemon=True, name=f"reap {pid}").start()

    def _write_scopes(self) -> None:
        scopes = {}
        for s in self.sessions.values():
            if s.leader:
                scopes[str(s.leader)] = s.scope
        for u in self.users.values():
            for unit in u.units.values():
                if unit.pid:
                    scopes[str(unit.pid)] = f"user@{u.uid}.service"
        path = os.path.join(self.simdir, "scopes.json")
        with open(path + ".tmp", "w") as f:
            json.dump(scopes, f)
        os.replace(path + ".tmp", path)

    # ---- sessions ---------------------------------------------------------------------------
    def _dm_shows(self, boot: bool = False) -> None:
        policy = self.conf.get("policy", "autologin")
        if policy == "autologin" or (policy == "initial_once" and not self.initial_used):
            self.initial_used = True
            s = self._new_session(self.conf["autologin"], "seat0", "user", "dm")
        else:
            s = self._new_session(self.conf["greeter"], "seat0", "greeter", "dm")
        s.run = self.dm_run

    def _new_session(self, spec: dict, seat: str, cls: str, origin: str) -> Session:
        user = self.users[spec["user"]]
        s = Session(str(self._next), spec, user.uid, seat, cls, origin)
        self._next += 1
        s.leader = spawn(spec.get("comm", "session"), spec.get("holds", []), self.root,
                         self.bindir)
        self.sessions[s.id] = s
        if spec.get("via_logind"):
            self.logind_hold(s.id, spec["via_logind"])
        if user.stop_timer is not None:
            user.stop_timer.cancel()
            user.stop_timer = None
        if not user.running:
            self._start_instance(user)
        self._write_scopes()
        self._emit("SessionNew", s.id, s.path)
        self._reap(s.leader, lambda: self._leader_gone(s))
        return s

    def end_session(self, sid: str) -> bool:
        """End session ``sid`` (TerminateSession): SIGTERM its leader; False if unknown."""
        with self.lock:
            s = self.sessions.get(sid)
            if s is None:
                return False
            if s.state != "closing":
                s.state = "closing"
                self._emit("SessionChanged", s.id)
            try:
                os.kill(s.leader, signal.SIGTERM)
            except ProcessLookupError:
                pass
            return True

    def _leader_gone(self, s: Session) -> None:
        if self.sessions.get(s.id) is not s:
            return
        del self.sessions[s.id]
        s.leader = 0
        self._write_scopes()
        self._emit("SessionRemoved", s.id, s.path)
        if s.id in self.logind_fds:
            self._after("logind_release", self.logind_release, s.id)
        user = self.users[s.user]
        if not any(o.user == s.user for o in self.sessions.values()) and not user.linger:
            user.stop_timer = self._after("user_stop_delay", self._stop_instance, user)
        vt = self.conf.get("vt")
        if s.origin == "vt" and self._units.get(vt["getty"]) == "active":
            self._after("session_start", self._vt_respawn)   # getty's Restart=always

    def _vt_respawn(self) -> None:
        vt = self.conf["vt"]
        if self._units.get(vt["getty"]) == "active" and not any(
                s.origin == "vt" for s in self.sessions.values()):
            self._new_session(vt, "seat0", "user", "vt")

    def logind_hold(self, sid: str, nodes: list[str]) -> None:
        """logind takes the session's devices (TakeDevice): here it opens them itself; the
        in-process fake overrides it with a process of its own."""
        self.logind_fds[sid] = [os.open(unitmodel.host_path(self.root, n), os.O_RDONLY)
                                for n in nodes if os.path.exists(unitmodel.host_path(self.root, n))]

    def logind_release(self, sid: str) -> None:
        """logind lets go of the devices of ended session ``sid``."""
        for fd in self.logind_fds.pop(sid, []):
            os.close(fd)

    # ---- the system manager's units (display manager, gettys) ------------------------------
    def _unit_states(self) -> dict[str, str]:
        try:
            with open(os.path.join(self.simdir, "units-state.json")) as f:
                return {u: s["active_state"] for u, s in json.load(f).items()}
        except (OSError, ValueError):
            return {}

    def _follow_units(self) -> None:
        from vfio_hookd.inotify import IN_CLOSE_WRITE, IN_MOVED_TO, Inotify
        import time
        with Inotify() as ino:
            ino.add(self.simdir, IN_MOVED_TO | IN_CLOSE_WRITE)
            while not self._closed:
                ino.wait(time.monotonic() + 3600)
                with self.lock:
                    self._units_changed(self._unit_states())

    def _units_changed(self, now: dict[str, str]) -> None:
        before, self._units = self._units, now
        dm = self.conf.get("dm")
        if dm and before.get(dm) != now.get(dm):
            if now.get(dm) == "inactive" or now.get(dm) == "failed":
                ids = [s.id for s in self.sessions.values() if s.origin == "dm"]
                self._after("session_close", self._close_ids, ids)   # those of this DM run
            elif now.get(dm) == "active":
                self.dm_run += 1
                self._after("session_start", self._dm_start)
        vt = self.conf.get("vt")
        if vt and before.get(vt["getty"]) != now.get(vt["getty"]):
            if now.get(vt["getty"]) != "active":
                self._close_origin("vt")       # agetty/login killed with the unit
            else:
                self._after("session_start", self._vt_respawn)

    def _dm_start(self) -> None:
        # this run's own session; those of the run before are closing (LightDM starts anew)
        if self._units.get(self.conf["dm"]) == "active" and not any(
                s.origin == "dm" and s.run == self.dm_run for s in self.sessions.values()):
            self._dm_shows()

    def _close_ids(self, ids: list[str]) -> None:
        for sid in ids:
            self.end_session(sid)

    def _close_origin(self, origin: str) -> None:
        for s in list(self.sessions.values()):
            if s.origin == origin:
                self.end_session(s.id)

    # ---- users' systemd instances ----------------------------------------------------------
    def _start_instance(self, user: User) -> None:
        user.running = True
        self._emit("UserNew", user.uid)
        for unit in user.units.values():
            if unit.spec.get("active", True):
                if unit.spec.get("holds") is not None:
                    self._after("audio_start", self._unit_start, user, unit)
                else:
                    unit.active_state = "active"

    def _stop_instance(self, user: User) -> None:
        if any(s.user == user.name for s in self.sessions.values()) or not user.running:
            return
        user.stop_timer = None
        for unit in user.units.values():
            self._unit_stop(user, unit)
        user.running = False
        self._emit("UserRemoved", user.uid)

    def _unit_start(self, user: User, unit: UserUnit) -> bool:
        if not user.running or unit.active_state == "active":
            return user.running
        if unit.spec.get("holds") is not None:
            unit.pid = spawn(unit.spec.get("comm", unit.name.split(".")[0]), unit.spec["holds"],
                             self.root, self.bindir)
            pid = unit.pid
            self._reap(pid, lambda: self._unit_exited(user, unit, pid))
        unit.active_state = "active"
        self._write_scopes()
        return True

    def _unit_stop(self, user: User, unit: UserUnit, then=None) -> None:
        if unit.active_state != "active":
            unit.stop_pending = False
            if then:
                then()
            return
        unit.active_state = "deactivating"
        unit.stop_then = then
        if unit.pid:
            os.kill(unit.pid, signal.SIGTERM)
        else:
            self._unit_exited(user, unit, 0)

    def _unit_exited(self, user: User, unit: UserUnit, pid: int) -> None:
        if unit.pid != pid:
            return
        unit.pid = 0
        unit.active_state = "inactive"
        self._write_scopes()
        then, unit.stop_then = unit.stop_then, None
        unit.stop_pending = False
        if then:
            then()
        # a listening socket starts the service again on the next connection, unless its own
        # stop is pending (socket.c: "Suppressing connection request since unit stop is
        # scheduled")
        sockets = [user.units[s] for s in unit.spec.get("triggered_by", []) if s in user.units]
        if user.running and any(s.active_state == "active" and not s.stop_pending
                                for s in sockets):
            self._after("socket_reactivate", self._unit_start, user, unit)

    def run_job(self, uid: int, jtype: str, name: str) -> tuple[int, str]:
        """Enqueue a ``start``/``stop`` job on user ``uid``'s unit ``name``: ``(job id, path)``;
        its ``JobRemoved`` follows.

        :raises KeyError: no such instance or unit.
        """
        with self.lock:
            user = next(u for u in self.users.values() if u.uid == uid and u.running)
            unit = user.units[name]
            self._jobs += 1
            jid = self._jobs
            path = f"/org/freedesktop/systemd1/job/{jid}"

            def done(result="done"):
                self._emit("JobRemoved", uid, jid, path, name, result)
            fail = name in self.conf.get(f"fail_{jtype}", [])
            if fail:
                threading.Timer(0, lambda: done("failed")).start()
            elif jtype == "stop":
                unit.stop_pending = unit.active_state == "active"
                threading.Timer(0, lambda: self._locked(self._unit_stop, user, unit,
                                                        done)).start()
            else:
                threading.Timer(0, lambda: done("done" if self._locked(
                    self._unit_start, user, unit) else "failed")).start()
            return jid, path

    def _locked(self, fn, *args):
        with self.lock:
            return fn(*args)

    def user_of_pid(self, pid: int) -> int | None:
        """UID whose session leader or user unit process ``pid`` is, or None."""
        with self.lock:
            for s in self.sessions.values():
                if s.leader == pid:
                    return s.uid
            for u in self.users.values():
                if any(unit.pid == pid for unit in u.units.values()):
                    return u.uid
        return None

    def unit_of_pid(self, uid: int, pid: int) -> str | None:
        """The user unit of user ``uid`` whose process ``pid`` is, or None."""
        with self.lock:
            for u in self.users.values():
                if u.uid == uid:
                    for unit in u.units.values():
                        if unit.pid == pid:
                            return unit.name
        return None

    def close(self) -> None:
        """End every process of the model (leaders, user units) and logind's fds."""
        with self.lock:
            self._closed = True
            pids = [s.leader for s in self.sessions.values() if s.leader] + [
                unit.pid for u in self.users.values() for unit in u.units.values() if unit.pid]
            for sid in list(self.logind_fds):
                self.logind_release(sid)
        from ..procs import stop
        for pid in pids:
            stop(pid, 5.0)
