"""The simulated host's CPUs: sysfs CPU files with cpufreq, and the cgroup units whose
``AllowedCPUs`` systemd sets (shared by both fakes of systemd).

Kernel side (``Documentation/ABI/testing/sysfs-devices-system-cpu``,
``Documentation/admin-guide/pm/cpufreq.rst``, ``intel_pstate.rst``), laid out by :func:`build`:

- ``/sys/devices/system/cpu/{possible,present,online}`` (cpulists), ``cpuN/`` with ``online``
  (not for CPU 0, which cannot go offline on x86);
- ``cpuN/cpufreq`` -> ``cpufreq/policyN`` (one policy per CPU) with ``scaling_driver``,
  ``scaling_governor``, ``scaling_available_governors`` and, for ``intel_pstate``,
  ``energy_performance_preference`` + ``energy_performance_available_preferences``.
- Writes (:func:`write`, called by :meth:`testbed.sim.kernel.Kernel.write`): a governor not
  in ``scaling_available_governors`` is ``EINVAL``; an unknown EPP is ``EINVAL``; under
  intel_pstate the ``performance`` governor sets EPP to ``performance`` and an EPP write other
  than ``performance`` is then ``EBUSY`` (intel_pstate.rst). Going back to another governor
  leaves EPP at ``performance`` here (a driver that does not restore it: the step must).
- :func:`set_offline` (``online`` lists, ``cpuN/online`` 0, the ``cpufreq`` link gone, as
  cpufreq's remove_cpu_dev_symlink does) and :func:`drop_cpufreq` (a CPU without a cpufreq
  driver, as in a VM) shape a host for a test.

systemd side: ``system.slice``, ``user.slice``, ``init.scope`` (:data:`CGROUP_UNITS`) with
``AllowedCPUs`` (a cpulist, ``""`` = no restriction) in ``<state_root>/.sim/cgroups.json``;
on a simulated host (``root`` with ``.sim/state.json``) the value is mirrored where cgroup v2
has it, ``/sys/fs/cgroup/UNIT/cpuset.cpus``, so tree snapshots see it. Never on a real root
(the kernel tests run the fake systemd with ``root="/"``). Fault rules: op ``set_property``,
target the unit (:mod:`testbed.sim.faults`); latency key ``set_property``.
"""

from __future__ import annotations

import errno
import json
import os

from vfio_hookd import cpus as cpulist

from . import faults

CPU = "/sys/devices/system/cpu"
#: The units carrying ``AllowedCPUs`` in the fakes, besides the unit table's.
CGROUP_UNITS = ("system.slice", "user.slice", "init.scope", "machine.slice")

DRIVERS = {
    "intel_pstate": {"governors": "performance powersave", "epp": True},
    "acpi-cpufreq": {"governors": "conservative ondemand userspace powersave performance "
                                  "schedutil", "epp": False},
}
EPP_CHOICES = "default performance balance_performance balance_power power"


def _real(root: str, p: str) -> str:
    return root.rstrip("/") + p


def _put(root: str, p: str, text: str, mode: int = 0o644) -> None:
    path = _real(root, p)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text + "\n")
    os.chmod(path, mode)


def build(root: str, n: int = 16, driver: str = "intel_pstate", governor: str = "powersave",
          epp: dict[int, str] | None = None) -> None:
    """Lay out ``n`` CPUs, all online, each with a cpufreq policy of ``driver`` (a key of
    :data:`DRIVERS`) running ``governor``; ``epp``: per-CPU EPP (default
    ``balance_performance``; CPU 12 ``power`` when there are that many, so per-CPU values
    differ)."""
    every = f"0-{n - 1}"
    for name in ("possible", "present", "online"):
        _put(root, f"{CPU}/{name}", every, 0o444)
    spec = DRIVERS[driver]
    epp = dict({12: "power"} if n > 12 else {}, **(epp or {}))
    for c in range(n):
        if c:
            _put(root, f"{CPU}/cpu{c}/online", "1")
        else:
            os.makedirs(_real(root, f"{CPU}/cpu0"), exist_ok=True)
        pol = f"{CPU}/cpufreq/policy{c}"
        _put(root, f"{pol}/scaling_driver", driver, 0o444)
        _put(root, f"{pol}/scaling_available_governors", spec["governors"], 0o444)
        _put(root, f"{pol}/scaling_governor", governor)
        if spec["epp"]:
            _put(root, f"{pol}/energy_performance_available_preferences", EPP_CHOICES, 0o444)
            _put(root, f"{pol}/energy_performance_preference",
                 "performance" if governor == "performance" else epp.get(c, "balance_performance"))
        os.symlink(f"../cpufreq/policy{c}", _real(root, f"{CPU}/cpu{c}/cpufreq"))
    for unit in CGROUP_UNITS:
        _put(root, f"/sys/fs/cgroup/{unit}/cpuset.cpus", "")


def _read(root: str, p: str) -> str:
    with open(_real(root, p)) as f:
        return f.read().strip()


def set_offline(root: str, cpu: int) -> None:
    """Take ``cpu`` offline: out of ``online``, ``cpuN/online`` 0, no ``cpufreq`` link."""
    on = cpulist.parse(_read(root, f"{CPU}/online")) - {cpu}
    _put(root, f"{CPU}/online", cpulist.format_list(on), 0o444)
    _put(root, f"{CPU}/cpu{cpu}/online", "0")
    drop_cpufreq(root, [cpu])


def drop_cpufreq(root: str, cpus) -> None:
    """Make ``cpus`` CPUs without cpufreq (no ``cpuN/cpufreq``, no policy)."""
    import shutil
    for c in cpus:
        link = _real(root, f"{CPU}/cpu{c}/cpufreq")
        if os.path.lexists(link):
            os.unlink(link)
        shutil.rmtree(_real(root, f"{CPU}/cpufreq/policy{c}"), ignore_errors=True)


def handles(rp: str) -> bool:
    """True for a resolved host path this module answers writes to."""
    return rp.startswith(f"{CPU}/cpufreq/policy") and rp.rsplit("/", 1)[-1] in (
        "scaling_governor", "energy_performance_preference")


def write(root: str, rp: str, data: str) -> None:
    """A write of ``data`` to cpufreq attribute ``rp`` (module docstring).

    :raises OSError: ``EINVAL`` (unknown governor or EPP), ``EBUSY`` (EPP under the
        performance governor of intel_pstate).
    """
    pol, attr = rp.rsplit("/", 1)
    value = data.strip()
    driver = _read(root, f"{pol}/scaling_driver")
    if attr == "scaling_governor":
        if value not in _read(root, f"{pol}/scaling_available_governors").split():
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL), rp)
        _put(root, rp, value)
        if driver == "intel_pstate" and value == "performance":
            _put(root, f"{pol}/energy_performance_preference", "performance")
        return
    if value not in EPP_CHOICES.split():
        raise OSError(errno.EINVAL, os.strerror(errno.EINVAL), rp)
    if (driver == "intel_pstate" and _read(root, f"{pol}/scaling_governor") == "performance"
            and value != "performance"):
        raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), rp)
    _put(root, rp, value)


# ---- systemd's side: AllowedCPUs of the cgroup units ----------------------------------------

def _state_file(state_root: str) -> str:
    return os.path.join(state_root, ".sim", "cgroups.json")


def allowed(state_root: str, unit: str) -> str:
    """``AllowedCPUs`` of ``unit`` (cpulist; ``""`` = no restriction)."""
    try:
        with open(_state_file(state_root)) as f:
            return json.load(f).get(unit, "")
    except FileNotFoundError:
        return ""


def set_allowed(root: str, state_root: str, unit: str, cpus: str) -> None:
    """Set ``AllowedCPUs`` of ``unit`` to cpulist ``cpus`` (``""``: no restriction), and on
    a simulated host mirror it to ``/sys/fs/cgroup/UNIT/cpuset.cpus``."""
    path = _state_file(state_root)
    try:
        with open(path) as f:
            state = json.load(f)
    except FileNotFoundError:
        state = {}
    state[unit] = cpus
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        f.write(json.dumps(state, sort_keys=True))   # C encoder: no cyclic garbage in the daemon
    os.replace(path + ".tmp", path)
    if os.path.abspath(root) != "/" and os.path.isfile(os.path.join(root, ".sim", "state.json")):
        _put(root, f"/sys/fs/cgroup/{unit}/cpuset.cpus", cpus)


def property_rule(state_root: str, unit: str) -> dict | None:
    """The fault rule a ``SetUnitProperties`` of ``unit`` meets (op ``set_property``)."""
    return faults.match(state_root, "set_property", unit)


def property_latency(state_root: str) -> float:
    """How long (s) a ``SetUnitProperties`` call takes (latency key ``set_property``)."""
    return faults.latency(state_root, "set_property")
