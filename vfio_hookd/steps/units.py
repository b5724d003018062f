"""The units step: stop the display manager and ``stop_units`` (systemd D-Bus API)."""

from __future__ import annotations

from .. import errors
from ..errors import HookdError
from .base import Context, Shape, Step

class Units(Step):
    """Stop the display manager and the profile's ``stop_units`` over systemd's D-Bus API.

    ``display_manager: auto`` resolves ``display-manager.service`` (systemd.special(7)) to the
    real unit; absent alias = a host without a display manager, nothing to stop. Each stop waits
    for the job's ``JobRemoved`` with ``deadlines.unit_stop``. Undo starts again, last to first,
    only the units that were active, and starts nothing while the system shuts down
    (``Manager.SystemState == "stopping"``; tuned's ``_full_rollback_required``).
    Facts: ``{"plan": [unit ids active before], "done": [...], "skipped": [...]}``.
    """
    name = "units"

    def observe(self, ctx: Context) -> dict:
        prof = ctx.profile
        wanted: list[str] = []
        skipped: list[str] = []
        sd = None
        if prof.display_manager is not None or prof.stop_units:
            sd = ctx.systemd()
        if prof.display_manager == "auto":
            try:
                wanted.append(sd.resolve("display-manager.service"))
            except HookdError as exc:
                if exc.code != errors.UNIT_FAILED:
                    raise
                skipped.append("display-manager.service (no such unit: no display manager)")
        elif prof.display_manager is not None:
            wanted.append(sd.resolve(prof.display_manager))
        for unit in prof.stop_units:
            wanted.append(sd.resolve(unit))
        plan = []
        for unit in dict.fromkeys(wanted):
            if sd.active_state(unit) in ("active", "activating", "reloading"):
                plan.append(unit)
            else:
                skipped.append(f"{unit} (not active)")
        return {"plan": plan, "skipped": skipped}

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
