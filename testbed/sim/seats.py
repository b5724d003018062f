"""The pieces of the simulated desktop (:mod:`testbed.sim.desktop`): its timings, the
processes it runs, sessions, users and their units."""

from __future__ import annotations

import os
import shutil

from . import units as unitmodel

TIMING = {"session_close": 0.3, "session_start": 0.3, "audio_start": 0.2,
          "user_stop_delay": 10.0, "socket_reactivate": 0.1, "logind_release": 0.2}


def spawn(comm: str, holds: list[str], root: str, bindir: str) -> int:
    """A real process named ``comm`` (``sleep infinity`` through a symlink) holding the
    existing ``holds`` (host paths under ``root``) on fds 3...; its pid (the caller reaps it)."""
    link = os.path.join(bindir, comm[:15])
    os.makedirs(bindir, exist_ok=True)
    if not os.path.islink(link):
        os.symlink(shutil.which("sleep") or "/bin/sleep", link)
    actions = [(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
               (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
               (os.POSIX_SPAWN_OPEN, 2, os.devnull, os.O_WRONLY, 0)]
    present = [h for h in holds if os.path.exists(unitmodel.host_path(root, h))]
    for fd, h in enumerate(present, start=3):
        actions.append((os.POSIX_SPAWN_OPEN, fd, unitmodel.host_path(root, h), os.O_RDONLY, 0))
    return os.posix_spawn(link, [comm[:15], "infinity"], os.environ, file_actions=actions,
                          setsid=True)


class Session:
    """One session: ``id``, ``user``, ``uid``, ``seat``, ``cls``, ``type``, ``state``, ``tty``,
    ``service``, ``remote``, ``leader`` (pid), ``origin`` (``dm``, ``vt``, ``boot``)."""

    def __init__(self, sid: str, spec: dict, uid: int, seat: str, cls: str, origin: str):
        self.id, self.user, self.uid, self.seat, self.cls = sid, spec["user"], uid, seat, cls
        self.type = spec.get("type", "tty")
        self.tty = spec.get("tty", "")
        self.service = spec.get("service", "")
        self.remote = not seat
        self.state = "active" if seat else "online"
        self.leader = 0
        self.origin = origin
        self.spec = spec
        self.run = 0   # the display manager's run that started it (origin "dm")

    @property
    def path(self) -> str:
        return f"/org/freedesktop/login1/session/_3{self.id}"

    @property
    def scope(self) -> str:
        return f"session-{self.id}.scope"


class UserUnit:
    """A unit of a user's instance: ``name``, ``spec``, ``active_state``, ``pid``."""

    def __init__(self, name: str, spec: dict):
        self.name, self.spec = name, spec
        self.active_state = "inactive"
        self.pid = 0
        self.stop_pending = False   # a stop job is queued (systemd's unit_stop_pending())
        self.stop_then = None


class User:
    """A user: ``name``, ``uid``, ``linger``, ``running`` (its instance), ``units``."""

    def __init__(self, name: str, spec: dict):
        self.name, self.uid, self.linger = name, int(spec["uid"]), bool(spec.get("linger"))
        self.spec = spec
        self.running = False
        self.units = {n: UserUnit(n, s or {}) for n, s in spec.get("units", {}).items()}
        self.stop_timer = None
