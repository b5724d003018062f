"""The CPU steps, last in prepare order: ``cpu_isolation`` (the host's processes off the VM's
CPUs) and ``cpu_governor`` (a cpufreq governor on the VM's CPUs). Both are off unless the
profile asks (``host_cpus``, ``cpu_governor``); which CPUs are whose is decided, and
validated, before the prepare touches anything (:func:`vfio_hookd.cpus.resolve`, in the plan).

What users do today (the guides' hooks, e.g. seed 000) is a cgroup cpuset partition written by
hand and ``echo performance > .../scaling_governor`` for CPUs 8-15, undone by writing
``schedutil`` whatever the CPU had before. Here both go through the same discipline as the
other steps: the old values are recorded before anything changes and exactly those come back.
"""

from __future__ import annotations

from .. import cpus as cpumod
from .. import errors
from ..errors import HookdError
from ..pci import write_attr
from .base import Context, Shape, Step

#: The units whose ``AllowedCPUs`` confine everything but the VM: every service, every user's
#: session and user instance, and PID 1 (``systemd.special(7)``). machine.slice (libvirt's
#: QEMU processes) is left alone: the VM's own pinning places its threads.
UNITS = ("system.slice", "user.slice", "init.scope")

CPU_DIR = "/sys/devices/system/cpu"


def _all(text: str) -> str:
    return text or "all CPUs (no restriction)"


class CpuIsolation(Step):
    """Restrict ``system.slice``, ``user.slice`` and ``init.scope`` to the host's CPUs with
    systemd's ``AllowedCPUs=`` set at runtime (``SetUnitProperties(unit, true,
    [("AllowedCPUs", ay)])``, :mod:`vfio_hookd.systemd_cpus`; ``systemd.resource-control(5)``;
    FIELD-NOTES §3), never by writing cgroup files: systemd owns the cgroup tree and would
    write its own value back. Each unit's ``AllowedCPUs`` is read first (empty: no
    restriction) and exactly that is set again on undo (an empty value restores "no
    restriction"). The value set is read back.

    Facts: ``{"plan": [{"unit": "system.slice", "before": "" | cpulist, "after": "0-7"}],
    "done": [...], "host_cpus": "0-7", "vm_cpus": "8-15", "source": str, "why": {unit:
    text}, "skipped": [...]}``.
    """
    name = "cpu_isolation"

    def observe(self, ctx: Context) -> dict:
        plan_cpus = ctx.cpus or {}
        if not plan_cpus.get("host"):
            return {"plan": [], "skipped": ["host_cpus: none in the profile"]}
        keep = plan_cpus["host"]
        now_online = cpumod.online(ctx.host)
        if not cpumod.parse(keep) & now_online:
            raise HookdError(errors.CPU_TUNING_FAILED,
                             f"host_cpus {keep}: none of these CPUs is online now (online: "
                             f"{cpumod.format_list(now_online)}); the host would have no CPU")
        sd = ctx.systemd()
        plan, why = [], {}
        for unit in UNITS:
            before = cpumod.format_list(cpumod.from_mask(
                _call(sd.allowed_cpus, unit, ctx.deadlines.unit_start)))
            plan.append({"unit": unit, "before": before, "after": keep})
            why[unit] = f"AllowedCPUs {keep} (before: {_all(before)})"
        return {"plan": plan, "host_cpus": keep, "vm_cpus": plan_cpus["vm"],
                "source": plan_cpus["source"], "why": why}

    def _set(self, ctx: Context, unit: str, cpus: str) -> None:
        sd = ctx.systemd()
        t = ctx.deadlines.unit_start
        _call(sd.set_allowed_cpus, unit, cpumod.to_mask(cpumod.parse(cpus)), t)
        now = cpumod.format_list(cpumod.from_mask(_call(sd.allowed_cpus, unit, t)))
        if now != cpus:
            raise HookdError(errors.CPU_TUNING_FAILED,
                             f"{unit}: AllowedCPUs reads {_all(now)!r} after setting "
                             f"{_all(cpus)!r}")

    def apply(self, ctx: Context, facts: dict) -> None:
        facts["done"] = []
        for item in facts["plan"]:
            facts["done"].append(item)
            self._set(ctx, item["unit"], item["after"])

    def undo(self, ctx: Context, facts: dict) -> list[str]:
        failed = []
        for item in reversed(self.undo_items(facts)):
            try:
                self._set(ctx, item["unit"], item["before"])
            except HookdError as e:   # give the other units back all the same
                failed.append(e)
        _raise_all(failed)
        return []

    def max_apply_s(self, profile, shape: Shape) -> float:
        """Per unit: a read at observe, the ``SetUnitProperties`` call and a read back, each up
        to ``deadlines.unit_start``."""
        return 3 * len(UNITS) * profile.deadlines.unit_start if profile.host_cpus else 0.0

    def max_undo_s(self, deadlines, shape: Shape, facts: dict | None) -> float:
        """Per changed unit: the call and a read back, each up to ``deadlines.unit_start``
        (before apply: every unit when the plan tunes CPUs, ``shape.cpus`` > 0, else none)."""
        n = (len(UNITS) if shape.cpus else 0) if facts is None else len(self.undo_items(facts))
        return 2 * n * deadlines.unit_start


class CpuGovernor(Step):
    """Set the cpufreq scaling governor of each of the VM's online CPUs
    (``/sys/devices/system/cpu/cpuN/cpufreq/scaling_governor``;
    ``Documentation/admin-guide/pm/cpufreq.rst``, ``Documentation/ABI/testing/
    sysfs-devices-system-cpu``). The VM's CPUs: the online CPUs outside ``host_cpus`` when it
    is set, else the domain XML's ``<vcpupin>`` CPUs (:func:`vfio_hookd.cpus.resolve`). Per
    CPU the governor and, where the file exists, ``energy_performance_preference`` (EPP:
    intel_pstate and amd-pstate; intel_pstate forces it to ``performance`` under the
    performance governor and refuses other EPP writes then, EBUSY, ``intel_pstate.rst``) are
    recorded; undo writes the CPU's own governor back first, then its EPP if it changed. The
    governor must be in ``scaling_available_governors`` of every CPU it goes on, else the step
    fails before writing. A CPU without cpufreq (no ``cpuN/cpufreq``: a VM, a disabled
    driver) or offline is reported (``skipped``), not an error.

    Facts: ``{"plan": [{"cpu": 8, "governor": "powersave", "epp": str | None}], "done":
    [...], "governor": "performance", "vm_cpus": "8-15", "no_cpufreq": [ints], "offline":
    [ints], "skipped": [...], "why": {"CPU 8-15": "scaling_governor performance (before:
    powersave)"}}`` (``why`` and ``skipped`` are what ``status`` and ``plan`` show).
    """
    name = "cpu_governor"

    def observe(self, ctx: Context) -> dict:
        governor = ctx.profile.cpu_governor
        if governor is None:
            return {"plan": [], "skipped": ["cpu_governor: none in the profile"]}
        vm = cpumod.parse(ctx.cpus["vm"])
        online = cpumod.online(ctx.host)
        plan, missing, skipped = [], [], []
        for cpu in sorted(vm & online):
            base = f"{CPU_DIR}/cpu{cpu}/cpufreq"
            if not ctx.host.exists(base):
                missing.append(cpu)
                continue
            available = (ctx.host.read_or(f"{base}/scaling_available_governors") or "").split()
            if governor not in available:
                raise HookdError(errors.CPU_TUNING_FAILED,
                                 f"cpu_governor: {governor!r} is not available on CPU {cpu} "
                                 f"(scaling_available_governors: {' '.join(available) or 'none'}"
                                 f"); load its module (e.g. cpufreq_{governor}) or choose one "
                                 f"of these")
            plan.append({"cpu": cpu, "governor": ctx.host.read_or(f"{base}/scaling_governor"),
                         "epp": ctx.host.read_or(f"{base}/energy_performance_preference")})
        offline = sorted(vm - online)
        if missing:
            skipped.append(f"CPU {cpumod.format_list(missing)}: no cpufreq "
                           f"({CPU_DIR}/cpuN/cpufreq absent): governor left as it is")
        if offline:
            skipped.append(f"CPU {cpumod.format_list(offline)}: offline: left alone")
        was: dict[str, list[int]] = {}
        for item in plan:
            was.setdefault(item["governor"] or "unknown", []).append(item["cpu"])
        why = {f"CPU {cpumod.format_list(c)}": f"scaling_governor {governor} (before: {g})"
               for g, c in sorted(was.items())}
        return {"plan": plan, "governor": governor, "vm_cpus": ctx.cpus["vm"],
                "no_cpufreq": missing, "offline": offline, "skipped": skipped, "why": why}

    def _write(self, ctx: Context, cpu: int, attr: str, value: str) -> None:
        p = f"{CPU_DIR}/cpu{cpu}/cpufreq/{attr}"
        write_attr(ctx.host, p, value, ctx.deadlines.unbind, errors.CPU_TUNING_FAILED,
                   f"CPU {cpu}")
        now = ctx.host.read_or(p)
        if now != value:
            raise HookdError(errors.CPU_TUNING_FAILED,
                             f"CPU {cpu}: {attr} reads {now!r} after writing {value!r}")

    def apply(self, ctx: Context, facts: dict) -> None:
        facts["done"] = []
        for item in facts["plan"]:
            facts["done"].append(item)
            self._write(ctx, item["cpu"], "scaling_governor", facts["governor"])

    def undo(self, ctx: Context, facts: dict) -> list[str]:
        failed, notes = [], []
        for item in reversed(self.undo_items(facts)):
            cpu = item["cpu"]
            base = f"{CPU_DIR}/cpu{cpu}/cpufreq"
            if not ctx.host.exists(base):
                notes.append(f"CPU {cpu} has no cpufreq now (offline?): nothing to give back")
                continue
            try:
                for attr, key in (("scaling_governor", "governor"),
                                  ("energy_performance_preference", "epp")):
                    if item.get(key) is not None and ctx.host.read_or(f"{base}/{attr}") != item[key]:
                        self._write(ctx, cpu, attr, item[key])
            except HookdError as e:   # the other CPUs get theirs back all the same
                failed.append(e)
        _raise_all(failed)
        return notes

    def max_apply_s(self, profile, shape: Shape) -> float:
        """One ``scaling_governor`` write per VM CPU, each up to ``deadlines.unbind``."""
        return shape.cpus * profile.deadlines.unbind if profile.cpu_governor else 0.0

    def max_undo_s(self, deadlines, shape: Shape, facts: dict | None) -> float:
        """Two writes (governor, EPP) per changed CPU, each up to ``deadlines.unbind``."""
        n = shape.cpus if facts is None else len(self.undo_items(facts))
        return 2 * n * deadlines.unbind


def _call(fn, *args):
    """``fn(*args)`` of the systemd client, its ``UNIT_FAILED`` as ``CPU_TUNING_FAILED``
    (``TIMEOUT`` and ``SYSTEMD_UNAVAILABLE`` stay what they are)."""
    try:
        return fn(*args)
    except HookdError as e:
        if e.code != errors.UNIT_FAILED:
            raise
        raise HookdError(errors.CPU_TUNING_FAILED, e.message, e.details) from None


def _raise_all(failed: list[HookdError]) -> None:
    """Raise the one error of ``failed``, or ``CPU_TUNING_FAILED`` naming them all."""
    if len(failed) == 1:
        raise failed[0]
    if failed:
        raise HookdError(errors.CPU_TUNING_FAILED, "; ".join(str(e) for e in failed))
