"""The sessions step: end the seat0 login sessions that hold the GPU, stop the user services that
hold it, and wait for logind to let go of the devices of the sessions that ended."""

from __future__ import annotations

import time

from .. import errors
from ..errors import HookdError
from ..pci import device_nodes
from .base import Context, Shape, Step

#: Sessions logind counts as running (``org.freedesktop.login1(5)``, session ``State``).
LIVE = ("online", "active", "opening")


def gpu_nodes(ctx: Context) -> list[str]:
    """Every device node of the functions handed over (:func:`vfio_hookd.pci.device_nodes`)."""
    nodes: list[str] = []
    for addr in ctx.devices:
        nodes.extend(device_nodes(ctx.host, addr))
    return list(dict.fromkeys(nodes))


class Sessions(Step):
    """What of the desktop still holds the GPU once the units step has stopped the display
    manager, ended in order through logind and the users' systemd instances, never by signal.

    Observe (after the units step): every process holding a device node of the functions
    (:func:`vfio_hookd.procs.find_holders`) is placed with logind (``GetSessionByPID``,
    ``GetUserByPID``): in a session on ``seat0`` -> that session ends; in a user's instance
    (``user@UID.service``, FIELD-NOTES §7) -> its user unit (``GetUnitByPID`` on the user's
    manager, :mod:`vfio_hookd.usermgr`) stops. Sessions off seat0 (SSH), and seat0 sessions
    that hold nothing of these functions (the desktop on another GPU), are left alone. So are
    systemd (PID 1) and systemd-logind, which hold ``card0`` for a compositor that opened it
    through logind (FIELD-NOTES §8): they are never signalled; apply waits for them to let go.

    Apply, in this order:

    1. **VT sessions**: a session on ``ttyN`` whose ``getty@ttyN.service`` (or ``autovt@``,
       an alias of it) is active came from that getty (autologin -> compositor, no display
       manager). Ending the session alone would let the getty respawn (``Restart=always``)
       and log in again mid-prepare, so the getty unit is stopped (system manager, job
       awaited): that ends its ``login`` and with it the session. Undo starts it again.
    2. **Sessions**: ``TerminateSession`` for every planned seat0 session still there, then
       their ``SessionRemoved`` signals are awaited (``deadlines.unit_stop``). The display
       manager's own sessions usually close by themselves within ~1 s of its stop (§7).
    3. **User services**: in each user's instance, the ``.socket`` units that trigger the
       holding units (else PipeWire comes back on the next client's connection), then the
       holding units, are stopped: all jobs enqueued, sockets first, then awaited
       (``deadlines.unit_stop``). Nothing waits
       out ``UserStopDelaySec``. Undo starts them again if that instance still runs (else
       the user's next login starts them).
    4. **logind and PID 1**: while they still hold a node, wait for each close of a node
       (inotify ``IN_CLOSE``, :mod:`vfio_hookd.inotify`) up to ``deadlines.terminate``;
       then fail with ``DEVICE_BUSY`` naming them (never a signal).

    Facts: ``{"plan": {"sessions": [session dicts], "gettys": [units], "user_units":
    {uid: {"user", "units"}}}, "done": [{"getty": unit} | {"session": id, ...} |
    {"uid", "user", "units"}], "skipped": [...], "why": {what: "PID N holds NODES"}}``.
    """
    name = "sessions"

    def observe(self, ctx: Context) -> dict:
        from .. import procs
        lg = ctx.logind()
        nodes = gpu_nodes(ctx)
        system = lg.system_pids()
        sessions = {s.id: s for s in lg.sessions()}
        plan_sessions: dict[str, dict] = {}
        users: dict[int, dict] = {}
        skipped: list[str] = []
        managers = {}
        why: dict[str, str] = {}
        held: dict[int, list[str]] = {}
        for h in procs.find_holders(ctx.host, nodes):
            held.setdefault(h.pid, []).append(h.node)
        for pid in sorted(set(held) - system):
            sid = lg.session_of_pid(pid)
            if sid is not None:
                s = sessions.get(sid)
                if s is None:
                    continue
                if s.seat != "seat0":
                    skipped.append(f"session {sid} of {s.user} (not on seat0: left to the "
                                   f"holders step)")
                    continue
                plan_sessions[sid] = s.to_dict()
                why[f"session {sid} of {s.user} ({s.type})"] = \
                    f"PID {pid} holds {', '.join(held[pid])}"
                continue
            uid = lg.user_of_pid(pid)
            if uid is None:
                continue
            if uid not in managers:
                managers[uid] = lg.user_manager(uid)
            mgr = managers[uid]
            unit = mgr.unit_of_pid(pid) if mgr is not None else None
            if unit is None:
                continue
            entry = users.setdefault(uid, {"user": _user_name(uid, sessions), "units": []})
            if unit not in entry["units"]:
                entry["units"].append(unit)
                why[f"{unit} of {entry['user']}"] = f"PID {pid} holds {', '.join(held[pid])}"
        for uid, entry in users.items():
            mgr = managers[uid]
            sockets = []
            for unit in entry["units"]:
                for sock in mgr.triggered_by(unit):
                    if sock not in sockets and mgr.active_state(sock) == "active":
                        sockets.append(sock)
            # sockets first: each StopUnit is its own transaction, and a service whose socket
            # still listens when it exits is started again by the next client's connect
            entry["units"] = sockets + entry["units"]
        for mgr in managers.values():
            if mgr is not None:
                mgr.close()
        gettys = []
        for s in plan_sessions.values():
            unit = _getty_of(ctx, s["tty"])
            if unit and unit not in gettys:
                gettys.append(unit)
        return {"plan": {"sessions": list(plan_sessions.values()), "gettys": gettys,
                         "user_units": {str(u): e for u, e in users.items()}},
                "skipped": skipped, "why": why}

    def apply(self, ctx: Context, facts: dict) -> None:
        plan = facts["plan"]
        facts["done"] = []
        d = ctx.deadlines
        for unit in plan["gettys"]:
            facts["done"].append({"getty": unit})
            ctx.systemd().stop(unit, d.unit_stop)
        lg = ctx.logind()
        ids = [s["id"] for s in plan["sessions"]]
        for s in plan["sessions"]:
            facts["done"].append({"session": s["id"], "user": s["user"], "type": s["type"]})
        left = lg.terminate_sessions(ids, d.unit_stop)
        if left:
            raise HookdError(errors.DEVICE_BUSY, f"seat0 session(s) {', '.join(left)} did not "
                             f"end within {d.unit_stop:g} s of TerminateSession",
                             {"sessions": left})
        for uid, entry in plan["user_units"].items():
            mgr = lg.user_manager(int(uid))
            if mgr is None:
                continue   # the instance ended by itself meanwhile: its units with it
            try:
                units = [u for u in entry["units"] if mgr.active_state(u) != "inactive"]
                if not units:
                    continue
                facts["done"].append({"uid": int(uid), "user": entry["user"], "units": units})
                mgr.run_jobs("StopUnit", units, d.unit_stop)
            finally:
                mgr.close()
        self._wait_system_holders(ctx, d.terminate)

    @staticmethod
    def _wait_system_holders(ctx: Context, timeout_s: float) -> None:
        """Wait until PID 1 and logind hold no node (an ``IN_CLOSE`` on a node wakes the
        rescan; no event otherwise exists for another process's close).

        :raises HookdError: ``DEVICE_BUSY`` naming them at the deadline.
        """
        from .. import procs
        from ..inotify import IN_CLOSE, Inotify
        nodes = gpu_nodes(ctx)
        system = ctx.logind().system_pids()
        deadline = time.monotonic() + timeout_s
        with Inotify() as ino:
            for n in nodes:
                ino.add(ctx.host.path(n), IN_CLOSE)
            while True:
                held = [h for h in procs.find_holders(ctx.host, nodes) if h.pid in system]
                if not held:
                    return
                if not ino.wait(deadline):
                    break
        listing = "; ".join(str(h) for h in held)
        raise HookdError(errors.DEVICE_BUSY,
                         f"{listing}: systemd/systemd-logind keep the device of a session that "
                         f"ended for {timeout_s:g} s; vfio-hookd never signals them (raise "
                         f"deadlines.terminate, or log the session out first)",
                         {"holders": [h.to_dict() for h in held]})

    def undo(self, ctx: Context, facts: dict) -> list[str]:
        items = self.undo_items(facts) if "done" in facts else []
        notes: list[str] = []
        failures: list[HookdError] = []
        d = ctx.deadlines
        for item in reversed(items):
            try:
                if "uid" in item:
                    mgr = ctx.logind().user_manager(item["uid"])
                    if mgr is None:
                        notes.append(f"the systemd instance of {item['user']} has ended: "
                                     f"{', '.join(item['units'])} start with the next login")
                        continue
                    try:
                        mgr.run_jobs("StartUnit", item["units"], d.unit_start)
                    finally:
                        mgr.close()
                elif "getty" in item:
                    sd = ctx.systemd()
                    if sd.shutting_down():
                        notes.append(f"system is shutting down: not starting {item['getty']}")
                    elif sd.active_state(item["getty"]) != "active":
                        sd.start(item["getty"], d.unit_start)
            except HookdError as exc:
                failures.append(exc)
        if failures:
            raise HookdError(failures[0].code, "; ".join(e.message for e in failures))
        return notes

    def max_apply_s(self, profile, shape: Shape) -> float:
        """A getty stop, the sessions' end and the user units' stop (``deadlines.unit_stop``
        each), then logind's let-go (``deadlines.terminate``)."""
        d = profile.deadlines
        return 3 * d.unit_stop + d.terminate

    def max_undo_s(self, deadlines, shape: Shape, facts: dict | None) -> float:
        """One ``deadlines.unit_start`` per getty and per user instance to start again."""
        if facts is None:
            return 2 * deadlines.unit_start
        n = sum(1 for i in facts.get("done", []) if "uid" in i or "getty" in i)
        return n * deadlines.unit_start


def _user_name(uid: int, sessions: dict) -> str:
    for s in sessions.values():
        if s.uid == uid:
            return s.user
    try:
        import pwd
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _getty_of(ctx: Context, tty: str) -> str | None:
    """The active getty unit of ``tty`` (``ttyN``): ``getty@ttyN.service`` or what
    ``autovt@ttyN.service`` resolves to (``systemd-getty-generator(8)``, logind's autovt),
    else None."""
    if not tty.startswith("tty") or not tty[3:].isdigit():
        return None
    sd = ctx.systemd()
    for name in (f"getty@{tty}.service", f"autovt@{tty}.service"):
        try:
            unit = sd.resolve(name)
        except HookdError as exc:
            if exc.code != errors.UNIT_FAILED:
                raise
            continue
        if sd.active_state(unit) in ("active", "activating", "reloading"):
            return unit
    return None
