"""The holders step: processes still holding the GPU's device nodes."""

from __future__ import annotations

import time

from .. import errors
from ..errors import HookdError
from ..pci import device_nodes
from .base import Context, Shape, Step

class Holders(Step):
    """Deal with processes that still hold the GPU's device nodes once the units are stopped.

    ``on_busy: fail`` refuses with ``DEVICE_BUSY`` listing PID, command and node. Holders that
    belong to a unit the units step just stopped, or to a login session (its end follows the
    display manager's), first get up to ``ctx.holders_grace_s`` (or ``deadlines.terminate`` if
    shorter) to exit on their own; a holder nothing stopped fails the start at once;
    ``on_busy: terminate`` sends SIGTERM, then SIGKILL after ``deadlines.terminate`` s, but
    never to PID 1 or to the owners of logind's and systemd's bus names
    (:meth:`vfio_hookd.logind.Logind.system_pids`): those fail with ``DEVICE_BUSY``.
    Unbinding a GPU someone holds can block the kernel forever (NVIDIA) or leave a stale
    DRM node (FIELD-NOTES §2), so this is checked before any unbind. Undo: ended processes
    are not restarted (the units step restarts what systemd owns).
    Facts: ``{"plan": [nodes], "terminated": [holder dicts]}``.
    """
    name = "holders"

    def observe(self, ctx: Context) -> dict:
        nodes: list[str] = []
        for addr in ctx.devices:
            nodes.extend(device_nodes(ctx.host, addr))
        return {"plan": list(dict.fromkeys(nodes)), "terminated": []}

    def apply(self, ctx: Context, facts: dict) -> None:
        from .. import procs
        holders = procs.find_holders(ctx.host, facts["plan"])
        if holders and ctx.profile.on_busy != "terminate" and ctx.stopped_units:
            # processes of a unit or login session that was just stopped may still be on
            # their way out: they get the grace period; a holder nothing stopped fails at once
            sd = ctx.systemd()
            leaving = [pid for pid in sorted({h.pid for h in holders})   # once per process
                       if _ending(sd.unit_of_pid(pid), ctx.stopped_units)]
            deadline = time.monotonic() + min(ctx.deadlines.terminate, ctx.holders_grace_s)
            for pid in leaving:
                procs.wait_gone(pid, max(0.0, deadline - time.monotonic()))
            if leaving:
                holders = procs.find_holders(ctx.host, facts["plan"])
        if not holders:
            return
        listing = "; ".join(str(h) for h in holders)
        if ctx.profile.on_busy != "terminate":
            raise HookdError(errors.DEVICE_BUSY,
                             f"{listing}. Stop them, add their unit to stop_units, or set "
                             f"on_busy: terminate", {"holders": [h.to_dict() for h in holders]})
        system = ctx.logind().system_pids() if ctx.logind is not None else {1}
        kept = [h for h in holders if h.pid in system]
        if kept:
            raise HookdError(errors.DEVICE_BUSY,
                             f"{'; '.join(str(h) for h in kept)}: systemd and systemd-logind "
                             f"are never signalled (FIELD-NOTES §8)",
                             {"holders": [h.to_dict() for h in kept]})
        pids = sorted({h.pid for h in holders})
        ctx.log.warning("terminating GPU holders: %s", listing)
        facts["terminated"] = [h.to_dict() for h in holders]
        left = procs.terminate(pids, ctx.deadlines.terminate)
        if left:
            raise HookdError(errors.DEVICE_BUSY,
                             f"PIDs {', '.join(map(str, left))} did not end after SIGKILL "
                             f"within {ctx.deadlines.terminate:g} s",
                             {"holders": [h.to_dict() for h in holders if h.pid in left]})

    def max_apply_s(self, profile, shape: Shape) -> float:
        """``on_busy: terminate``: SIGTERM to all, one ``deadlines.terminate`` wait, SIGKILL to
        the rest, one more (:func:`vfio_hookd.procs.terminate`); ``fail``: the grace period,
        at most ``deadlines.terminate``."""
        d = profile.deadlines
        return 2 * d.terminate if profile.on_busy == "terminate" else d.terminate

    def max_undo_s(self, deadlines, shape: Shape, facts: dict | None) -> float:
        """Nothing to wait for: ended processes are not restarted."""
        return 0.0

    def undo(self, ctx: Context, facts: dict) -> list[str]:
        if facts.get("terminated"):
            return ["terminated processes are not restarted: " + ", ".join(
                f"PID {h['pid']} ({h['command']})" for h in facts["terminated"])]
        return []


def _ending(unit: str | None, stopped: tuple) -> bool:
    """True for a process of a unit the units step just stopped, or of a login session's scope
    (``session-N.scope``): the display manager's stop ends the seat's sessions, whose
    processes may still be exiting (FIELD-NOTES §7: within about a second)."""
    return bool(unit) and (unit in stopped or (unit.startswith("session-")
                                               and unit.endswith(".scope")))
