"""The units step: stop the display manager and ``stop_units`` (systemd D-Bus API)."""

from __future__ import annotations

from .. import errors
from ..errors import HookdError
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
    ``stop_units`` are always stopped.

    The units are stopped together, as ``systemctl stop A B`` does
    (:meth:`vfio_hookd.systemd.Systemd.stop_all`): every stop job is enqueued before any is
    awaited, systemd orders them by the units' own ``After=``/``Before=``, and every job's
    ``JobRemoved`` is awaited; the step costs about its slowest unit, not the sum. Every unit
    of the plan is recorded in ``done`` before the first job is enqueued, so a rollback after a
    failed or timed-out stop starts whatever was stopped. Undo starts the recorded units that
    are not active, together in the same way, and starts nothing while the system shuts down
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
        login session's scope that holds device nodes of the functions handed over
        (:func:`vfio_hookd.gpu_users.gpu_users`: one ``GetUnitByPID`` per process)."""
        from ..gpu_users import gpu_users
        return [str(u) for u in gpu_users(ctx.host, ctx.devices, sd)
                if u.unit == dm or (u.unit or "").startswith("session-")]

    def apply(self, ctx: Context, facts: dict) -> None:
        facts["done"] = list(facts["plan"])   # before any job: a rollback knows them all
        if facts["done"]:
            ctx.systemd().stop_all(facts["done"],
                                   self._deadline(ctx.deadlines.unit_stop, len(facts["done"])))

    @staticmethod
    def _deadline(per_job_s: float, n: int) -> float:
        """A batch of ``n`` jobs: ``n * per_job_s`` (s), as :meth:`max_apply_s` explains."""
        return n * per_job_s

    @staticmethod
    def count(profile) -> int:
        """How many units ``profile`` may stop (display manager + ``stop_units``)."""
        return (1 if profile.display_manager is not None else 0) + len(profile.stop_units)

    def max_apply_s(self, profile, shape: Shape) -> float:
        """``units * deadlines.unit_stop`` (s): the stop batch's deadline. The jobs run at once
        unless systemd orders them, and which unit is ordered after which (``After=`` /
        ``Before=``, drop-ins included) is systemd's to know, not the profile's: at worst every
        job waits for another, a chain as long as serial stops. So each job keeps its own
        ``unit_stop`` from the batch's start and a hung stop is reported at ``units *
        unit_stop``; unordered units end at about the slowest one."""
        return self._deadline(profile.deadlines.unit_stop, shape.units)

    def max_undo_s(self, deadlines, shape: Shape, facts: dict | None) -> float:
        """``units * deadlines.unit_start`` (s) for the recorded units: the start batch's
        deadline, for the reason in :meth:`max_apply_s`."""
        n = shape.units if facts is None else len(self.undo_items(facts))
        return self._deadline(deadlines.unit_start, n)

    def undo(self, ctx: Context, facts: dict) -> list[str]:
        units = self.undo_items(facts)
        if not units:
            return []
        sd = ctx.systemd()
        if sd.shutting_down():
            return [f"system is shutting down: not starting {', '.join(units)}"]
        # last to first, as before; systemd orders the start jobs by After=/Before=
        todo = [u for u in reversed(units) if sd.active_state(u) != "active"]
        if todo:   # raises one HookdError naming every unit that did not start
            sd.start_all(todo, self._deadline(ctx.deadlines.unit_start, len(todo)))
        return []
