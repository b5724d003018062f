"""``vfio-hookd plan VM``: what a prepare would do on this host now, step by step, and its
deadline; nothing is applied.

The plan is the one a prepare runs (:func:`vfio_hookd.plan.plan_prepare`, through
:meth:`vfio_hookd.machine.Machine.plan_prepare`), and each step's facts are that step's own
``observe`` on the context a prepare builds (:meth:`vfio_hookd.machine.Machine.observe`), so
the two cannot disagree. The rendering knows no step: it prints each step's facts by their
keys (``plan``: what apply would change or check; ``why``, ``skipped``, ``warnings``, ...), so a new
step shows up without a change here. Each step observes the host as it is now; in a prepare,
a later step observes after the earlier ones have run (e.g. after the display manager's stop).
"""

from __future__ import annotations

from .gpu_users import FATES
from .plan import Plan


def document(machine, plan: Plan) -> dict:
    """``{"vm", "op", "devices": [{"address", "driver"}], "deadline_s", "already_prepared",
    "steps": [{"name", "facts"}], "holders_now": [{"pid", "command", "nodes", "unit",
    "ends"}]}`` for ``plan`` on ``machine``'s host. ``holders_now`` are the processes holding
    the functions' nodes now; ``ends`` says how the prepare ends each: ``"unit"`` (the units
    step stops its unit), ``"session"``, ``"user"``, ``"system"`` (the sessions step ends its
    seat0 session, stops its user unit, or waits for systemd/logind to let go:
    :data:`vfio_hookd.gpu_users.FATES`) or ``"on_busy"`` (nothing does: the profile's
    ``on_busy`` decides).

    :raises HookdError: what a step's observe raises (e.g. ``SYSTEMD_UNAVAILABLE``),
        ``RECORD_INVALID`` / ``UNTRUSTED_FILE`` for the VM's record.
    """
    rec = machine.records.load(plan.vm)
    prepared = bool(rec and rec.phase == "prepared")
    steps = [] if prepared else [{"name": n, "facts": f} for n, f in machine.observe(plan)]
    return {"vm": plan.vm, "op": plan.op, "deadline_s": plan.deadline_s,
            "already_prepared": prepared, "on_busy": plan.profile.on_busy,
            "devices": [{"address": a, "driver": plan.drivers.get(a)} for a in plan.devices],
            "steps": steps, "holders_now": [] if prepared else _holders(machine, plan, steps)}


def _holders(machine, plan: Plan, steps: list[dict]) -> list[dict]:
    """The processes holding the functions' nodes now, and how the prepare would end each."""
    from .gpu_users import fate, gpu_users
    from .steps.units import Units
    stopped = next((s["facts"].get("plan", []) for s in steps if s["name"] == Units.name), [])
    # the units step stops the display manager first, then stop_units
    dm = stopped[0] if stopped and plan.profile.display_manager is not None \
        and stopped[0] not in plan.profile.stop_units else None
    out = []
    for u in gpu_users(machine.host, plan.devices, machine.systemd()):
        how = fate(u, dm, stopped)
        out.append({"pid": u.pid, "command": u.command, "nodes": u.nodes, "unit": u.unit,
                    "ends": how or "on_busy"})
    return out


def _item(value) -> str:
    """One fact item as text: a list joined by spaces, a dict as ``k=v`` pairs."""
    if isinstance(value, dict):
        return ", ".join(f"{k}={_item(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return " ".join(_item(v) for v in value)
    return "none" if value is None else str(value)


def render(doc: dict) -> list[str]:
    """The lines ``vfio-hookd plan`` prints for :func:`document`'s ``doc``."""
    vm = doc["vm"]
    lines = [f"{vm}: a prepare now would hand over "
             + ", ".join(f"{d['address']} (now on {d['driver'] or 'no driver'})"
                         for d in doc["devices"])]
    if doc["already_prepared"]:
        lines.append(f"  {vm} is prepared already: a prepare only checks that every function "
                     f"is still on vfio-pci")
    for step in doc["steps"]:
        lines.append(f"  step {step['name']}")
        facts = step["facts"]
        for key, value in facts.items():
            label = key
            if isinstance(value, dict):
                if not value:
                    continue
                lines.extend(f"    {label}: {k}: {_item(v)}" for k, v in value.items())
            elif isinstance(value, list):
                if not value:
                    if key == "plan":
                        lines.append("    plan: nothing to do")
                    continue
                if all(isinstance(v, str) for v in value):   # names: one line, in order
                    lines.append(f"    {label}: {', '.join(value)}")
                else:
                    lines.extend(f"    {label}: {_item(v)}" for v in value)
            else:
                lines.append(f"    {label}: {_item(value)}")
    for h in doc["holders_now"]:
        unit = f", unit {h['unit']}" if h["unit"] else ""
        how = ("ends: " + FATES[h["ends"]]) if h["ends"] in FATES else (
            f"nothing ends it: on_busy: {doc['on_busy']}"
            + (" fails the start (DEVICE_BUSY)" if doc["on_busy"] == "fail" else ""))
        lines.append(f"  holding the GPU now: PID {h['pid']} ({h['command']}{unit}) holds "
                     f"{', '.join(h['nodes'])}: {how}")
    lines.append(f"  deadline: {doc['deadline_s']:g} s (the longest the prepare may take, its "
                 f"rollback included: what the daemon announces)")
    return lines
