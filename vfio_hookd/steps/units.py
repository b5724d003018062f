"""The units step: stop the display manager and ``stop_units`` (systemd D-Bus API)."""

from __future__ import annotations

from .. import errors
from ..errors import HookdError
from ..pci import device_nodes
from .base import Context, Shape, Step

ACTIVE = ("active", "activating", "reloading")

class Units(Step):
    """Stop the display manager and the profile's ``stop_units`` over systemd's D-Bus API.

    ``display_manager: auto`` resolves ``display-manager.service`` (systemd.special(7)) to the
    real unit; absent alias = a host without a display manager, nothing to stop. The display
    manager is stopped only when something of the desktop holds a device node of the functions
    handed over: a process of the display manager's unit or of a login session's scope
    (``Manager.GetUnitByPID``). A GPU already on vfio-pci, or a second GPU the desktop does not
    use, is handed over with the desktop running. An explicit unit name always stops it, and
    ``stop_units`` are always stopped. Each stop waits
    for the job's ``JobRemoved`` with ``deadlines.unit_stop``. Undo starts again, last to first,
    only the units that were active, and starts nothing while the system shuts down
    (``Manager.SystemState == "stopping"``; tuned's ``_full_rollback_required``).
    Facts: ``{"plan": [unit ids active before], "done": [...], "skipped": [...],
    "why": {unit: reason}}``.
    """
    name = "units"

    def observe(self, ctx: Context) -> dict:
        prof = ctx.profile
        wanted: list[str] = []
        skipped: list[str] = []
        why: dict[str, str] = {}
        sd = None
        if prof.display_manager is not None or prof.stop_units:
            sd = ctx.systemd()
        if prof.display_manager == "auto":
            try:
                dm = sd.resolve("display-manager.service")
            except HookdError as exc:
                if exc.code != errors.UNIT_FAILED:
                    raise
                skipped.append("display-manager.service (no such unit: no display manager)")
            else:
                if sd.active_state(dm) in ACTIVE:
                    users = self._desktop_users(ctx, sd, dm)
                    if users:
                        wanted.append(dm)
                        why[dm] = "the desktop uses the GPU: " + "; ".join(users)
                    else:
                        skipped.append(f"{dm} (left running: nothing of the desktop holds a "
                                       f"device node of the functions handed over)")
                else:
                    wanted.append(dm)
        elif prof.display_manager is not None:
            dm = sd.resolve(prof.display_manager)
            wanted.append(dm)
            why[dm] = "display_manager in the profile"
        for unit in prof.stop_units:
            unit = sd.resolve(unit)
            wanted.append(unit)
            why.setdefault(unit, "stop_units in the profile")
        plan = []
        for unit in dict.fromkeys(wanted):
            if sd.active_state(unit) in ACTIVE:
                plan.append(unit)
            else:
                skipped.append(f"{unit} (not active)")
                why.pop(unit, None)
        return {"plan": plan, "skipped": skipped, "why": why}

    @staticmethod
    def _desktop_users(ctx: Context, sd, dm: str) -> list[str]:
        """``PID N (command, unit U) holds NODE, ...`` for each process of ``dm``'s unit or of a
        login session's scope that holds device nodes of the functions handed over."""
        from .. import procs
        nodes: list[str] = []
        for addr in ctx.devices:
            nodes.extend(device_nodes(ctx.host, addr))
        held: dict[tuple[int, str], list[str]] = {}
        for h in procs.find_holders(ctx.host, list(dict.fromkeys(nodes))):
            held.setdefault((h.pid, h.command), []).append(h.node)
        out = []
        for (pid, command), held_nodes in held.items():
            unit = sd.unit_of_pid(pid)   # once per process
            if unit == dm or (unit or "").startswith("session-"):
                out.append(f"PID {pid} ({command}, unit {unit}) holds {', '.join(held_nodes)}")
        return out

    def apply(self, ctx: Context, facts: dict) -> None:
        facts["done"] = []
        for unit in facts["plan"]:
            facts["done"].append(unit)
            ctx.systemd().stop(unit, ctx.deadlines.unit_stop)

    @staticmethod
    def count(profile) -> int:
        """How many units ``profile`` may stop (display manager + ``stop_units``)."""
        return (1 if profile.display_manager is not None else 0) + len(profile.stop_units)

    def max_apply_s(self, profile, shape: Shape) -> float:
        """One stop job per unit, each up to ``deadlines.unit_stop``."""
        return shape.units * profile.deadlines.unit_stop

    def max_undo_s(self, deadlines, shape: Shape, facts: dict | None) -> float:
        """One start job per stopped unit, each up to ``deadlines.unit_start``."""
        n = shape.units if facts is None else len(self.undo_items(facts))
        return n * deadlines.unit_start

    def undo(self, ctx: Context, facts: dict) -> list[str]:
        units = self.undo_items(facts)
        if not units:
            return []
        sd = ctx.systemd()
        if sd.shutting_down():
            return [f"system is shutting down: not starting {', '.join(units)}"]
        failures = []
        for unit in reversed(units):
            if sd.active_state(unit) == "active":
                continue
            try:
                sd.start(unit, ctx.deadlines.unit_start)
            except HookdError as exc:
                failures.append(exc)
        if failures:
            raise HookdError(failures[0].code, "; ".join(e.message for e in failures))
        return []
