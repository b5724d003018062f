"""The desktop before prepare, and the check that it is back after release (or after a prepare
that rolled back).

Snapshot (taken before any step; the record's ``desktop``)::

    {"display_manager": {"unit": "lightdm.service", "active": true} | null,
     "sessions": [{"user": "alice", "class": "user", "type": "x11", "state": "active",
                   "tty": ""}],                      # seat0 sessions of class user/greeter
     "card": {"nodes": ["/dev/dri/card0"], "commands": ["Xorg"]},   # the display manager's
                                                   # or a session's process on the card node
     "audio": {"nodes": ["/dev/snd/controlC1", ...], "commands": ["pipewire", "wireplumber"],
               "users": ["alice"]} | null}          # a user's audio server held the audio nodes

The check (the record's ``desktop_check``, shown by ``status``)::

    {"check": "back" | "missing" | "waiting" | "none", "missing": [str],
     "seconds": float | null, "after": "release" | "rollback"}

"back" needs: the display manager active if it was; for each seat0 session a live one
(``online``/``active``) of the same user, class and type -- or, when there was a display manager,
its greeter instead of a user session (greetd runs its ``initial_session`` once per boot and
shows the greeter on a restart, FIELD-NOTES §8: that is the display manager's policy, and it
is accepted); the card node held by one of the same commands (with a greeter standing in: by
anyone, or by no one for a text greeter such as agreety, ``Type=tty``); the audio nodes held by
one of the same commands if they were. PID 1 and logind do not count as holders.

Waiting is event-driven: logind's signals (``SessionNew``, ``SessionRemoved``,
``PropertiesChanged``) and inotify ``IN_OPEN``/``IN_CLOSE`` on the card and audio nodes wake a
re-check. The display manager's state has no event here (the systemd client's subscription is
for jobs): while it is the only thing missing, the state is re-read every 0.5 s until the
deadline (a display manager becomes active before its session appears, so this is rare).
"""

from __future__ import annotations

import time

from . import errors
from .errors import HookdError

#: Session states that count as there (``org.freedesktop.login1(5)``).
LIVE = ("online", "active")
_DM_POLL_S = 0.5


def _nodes(host, devices) -> tuple[list[str], list[str]]:
    from .pci import device_nodes
    nodes: list[str] = []
    for addr in devices:
        nodes.extend(device_nodes(host, addr))
    nodes = list(dict.fromkeys(nodes))
    return ([n for n in nodes if n.startswith("/dev/dri/card")],
            [n for n in nodes if n.startswith("/dev/snd/")])


def _holders(host, nodes: list[str], system: set[int]):
    from . import procs
    return [h for h in procs.find_holders(host, nodes) if h.pid not in system]


def snapshot(host, devices, systemd, logind, display_manager: str | None) -> dict:
    """The desktop now (shape in the module docstring); ``{}`` when there is nothing of a
    desktop (no display manager, no seat0 session, nobody on the card or audio nodes).

    :param display_manager: ``"auto"`` (``display-manager.service``), a unit name, or None.
    :raises HookdError: ``SYSTEMD_UNAVAILABLE`` (systemd or logind do not answer).
    """
    dm = None
    if display_manager is not None:
        name = "display-manager.service" if display_manager == "auto" else display_manager
        try:
            unit = systemd.resolve(name)
            dm = {"unit": unit, "active": systemd.active_state(unit) == "active"}
        except HookdError as exc:
            if exc.code != errors.UNIT_FAILED:
                raise
    every = logind.sessions()
    names = {s.uid: s.user for s in every}
    sessions = [{"user": s.user, "class": s.cls, "type": s.type, "state": s.state,
                 "tty": s.tty} for s in every
                if s.seat == "seat0" and s.cls in ("user", "greeter") and s.state in LIVE]
    card_nodes, audio_nodes = _nodes(host, devices)
    system = logind.system_pids()
    held = _holders(host, card_nodes + audio_nodes, system)
    # only the desktop's own processes are expected back: the display manager's (Xorg) and
    # the sessions' (a compositor); a process that a later step terminates is not
    card = set()
    for h in held:
        if h.node in card_nodes and h.command not in card and (
                logind.session_of_pid(h.pid) is not None
                or (dm is not None and systemd.unit_of_pid(h.pid) == dm["unit"])):
            card.add(h.command)
    card = sorted(card)
    users, audio_cmds = set(), set()
    for h in held:   # the audio server of a user's instance (user@UID.service)
        if h.node in audio_nodes and logind.session_of_pid(h.pid) is None:
            uid = logind.user_of_pid(h.pid)
            if uid is not None:
                users.add(names.get(uid) or _name(uid))
                audio_cmds.add(h.command)
    audio = ({"nodes": audio_nodes, "commands": sorted(audio_cmds), "users": sorted(users)}
             if users else None)
    if not (dm and dm["active"]) and not sessions and not card and audio is None:
        return {}
    return {"display_manager": dm, "sessions": sessions,
            "card": {"nodes": card_nodes, "commands": card}, "audio": audio}


def _name(uid: int) -> str:
    try:
        import pwd
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def missing(host, systemd, logind, snap: dict) -> list[str]:
    """What of ``snap`` is not back now (empty: all back), one phrase each, e.g.
    ``"seat0 session of alice (user, wayland)"``."""
    out: list[str] = []
    if not snap:
        return out
    dm = snap.get("display_manager")
    if dm and dm.get("active"):
        state = systemd.active_state(dm["unit"])
        if state != "active":
            out.append(f"display manager {dm['unit']} ({state})")
    now = [s for s in logind.sessions() if s.seat == "seat0" and s.state in LIVE]
    greeters = [s for s in now if s.cls == "greeter"]
    stand_in = False
    for want in snap.get("sessions", []):
        if any(s.user == want["user"] and s.cls == want["class"] and s.type == want["type"]
               for s in now):
            continue
        if want["class"] == "greeter" and greeters:
            continue
        if dm and dm.get("active") and want["class"] == "user" and greeters:
            stand_in = True   # the display manager's policy: its greeter instead of autologin
            continue
        out.append(f"seat0 session of {want['user']} ({want['class']}, {want['type']})")
    system = logind.system_pids()
    card = snap.get("card") or {}
    if card.get("commands"):
        held = _holders(host, card["nodes"], system)
        ok = any(h.command in card["commands"] for h in held)
        if not ok and stand_in:
            ok = bool(held) or all(g.type == "tty" for g in greeters)
        if not ok:
            out.append(f"{', '.join(card['nodes'])} held by {' or '.join(card['commands'])}")
    audio = snap.get("audio")
    if audio and audio.get("commands"):
        held = _holders(host, audio["nodes"], system)
        if not any(h.command in audio["commands"] for h in held):
            out.append(f"audio nodes held by {' or '.join(audio['commands'])}")
    return out


def wait_back(host, systemd, logind, snap: dict, timeout_s: float, after: str) -> dict:
    """Wait until :func:`missing` is empty or ``timeout_s`` (s) has passed.

    :param after: ``"release"`` or ``"rollback"`` (recorded).
    :returns: the check (module docstring): ``back``, ``missing`` (with what), or ``none``
        when ``snap`` is empty.
    """
    if not snap:
        return {"check": "none", "missing": [], "seconds": None, "after": after}
    from .inotify import IN_CLOSE, IN_OPEN, Inotify
    t0 = time.monotonic()
    deadline = t0 + timeout_s
    watch = logind.watch()
    try:
        with Inotify() as ino:
            nodes = (snap.get("card") or {}).get("nodes", []) + \
                (snap.get("audio") or {}).get("nodes", [])
            for n in nodes:
                ino.add(host.path(n), IN_OPEN | IN_CLOSE)
            while True:
                if watch is not None:
                    watch.clear()
                left = missing(host, systemd, logind, snap)
                if not left or time.monotonic() >= deadline:
                    break
                until = deadline
                if all(m.startswith("display manager ") for m in left):
                    until = min(deadline, time.monotonic() + _DM_POLL_S)   # no event: see above
                ino.wait(until, [watch.fileno()] if watch is not None else [])
    finally:
        if watch is not None:
            watch.close()
    return {"check": "missing" if left else "back", "missing": left,
            "seconds": round(time.monotonic() - t0, 2), "after": after}


def not_back_error(vm: str, check: dict) -> HookdError:
    """``DESKTOP_NOT_BACK`` naming what is missing after ``check["seconds"]`` s."""
    return HookdError(errors.DESKTOP_NOT_BACK,
                      f"{vm!r} is released, but the desktop is not back after "
                      f"{check['seconds']:g} s: missing {'; '.join(check['missing'])}. Nothing "
                      f"is held any more: check the display manager's journal "
                      f"(journalctl -b -u display-manager)", {"missing": check["missing"]})


def record_snapshot(machine, rec, profile) -> None:
    """Put :func:`snapshot` of the host into ``rec.desktop`` (``{}`` and a warning in the log
    when systemd or logind do not answer: the prepare goes on without the check)."""
    import logging
    try:
        rec.desktop = snapshot(machine.host, rec.devices, machine.systemd(), machine.logind(),
                               profile.display_manager)
    except HookdError as exc:
        logging.getLogger("vfio_hookd").warning("no desktop snapshot: %s", exc,
                                                extra={"VM": rec.vm})
        rec.desktop = {}


def record_check(machine, rec, after: str) -> dict:
    """Run :func:`wait_back` for ``rec.desktop`` with the record's ``deadlines.desktop_back``,
    save the check in ``rec.desktop_check`` (``waiting`` while it runs, for ``status``) and
    return it."""
    from .profile import Deadlines
    timeout = Deadlines.from_record(rec.deadlines).desktop_back
    try:
        down = machine.systemd().shutting_down()
    except HookdError:
        down = False
    if down:   # nothing is started again during a shutdown (units step): nothing to check
        rec.desktop_check = {"check": "none", "missing": [], "seconds": None, "after": after}
        machine._save(rec)
        return rec.desktop_check
    if rec.desktop:
        rec.desktop_check = {"check": "waiting", "missing": [], "seconds": None, "after": after}
        machine._save(rec)
    try:
        check = wait_back(machine.host, machine.systemd(), machine.logind(), rec.desktop,
                          timeout, after)
    except HookdError as exc:
        check = {"check": "missing", "missing": [f"cannot check: {exc}"], "seconds": None,
                 "after": after}
    rec.desktop_check = check
    machine._save(rec)
    return check
