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

from .plan import Plan


def document(machine, plan: Plan) -> dict:
    """``{"vm", "op", "devices": [{"address", "driver"}], "deadline_s", "already_prepared",
    "steps": [{"name", "facts"}]}`` for ``plan`` on ``machine``'s host.

    :raises HookdError: what a step's observe raises (e.g. ``SYSTEMD_UNAVAILABLE``),
        ``RECORD_INVALID`` / ``UNTRUSTED_FILE`` for the VM's record.
    """
    rec = machine.records.load(plan.vm)
    prepared = bool(rec and rec.phase == "prepared")
    return {"vm": plan.vm, "op": plan.op, "deadline_s": plan.deadline_s,
            "already_prepared": prepared,
            "devices": [{"address": a, "driver": plan.drivers.get(a)} for a in plan.devices],
            "steps": [] if prepared else
            [{"name": name, "facts": facts} for name, facts in machine.observe(plan)]}


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
    lines.append(f"  deadline: {doc['deadline_s']:g} s (the longest the prepare may take, its "
                 f"rollback included: what the daemon announces)")
    return lines
