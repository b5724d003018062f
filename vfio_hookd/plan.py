"""Plans: everything a prepare or a release will work with, validated before the host is
touched, and the deadline the daemon announces for it.

- prepare: the profile (parsed once), the devices (from the profile or the domain XML), the
  whole IOMMU group check, the drivers, and the deadline summed from what each step declares
  it may wait (:meth:`vfio_hookd.steps.Step.max_apply_s`, plus the rollback's
  :meth:`~vfio_hookd.steps.Step.max_undo_s` and ``deadlines.desktop_back``).
- release: the record alone (devices, drivers, deadlines in force, each held step's facts) and
  the deadline summed from each held step's declared undo wait. Today's profile is not read.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from . import errors, pci
from .errors import HookdError
from .host import Host
from .paths import Paths
from .record import Record
from .steps import STEPS, Shape
from .steps import hugepages
from .steps.modules import Modules
from .steps.units import Units

#: Added to every request's deadline (s): the daemon's own bookkeeping (records, locks, log).
MARGIN_S = 5.0


@dataclass
class Plan:
    """What :meth:`vfio_hookd.machine.Machine.run` will do.

    :ivar op: ``"prepare"`` or ``"release"``.
    :ivar vm: the domain name.
    :ivar devices: PCI addresses (tuple of str) to hand over or give back.
    :ivar deadlines: the :class:`vfio_hookd.profile.Deadlines` in force (s).
    :ivar deadline_s: the longest the run may take (s): what the daemon announces.
    :ivar profile: the validated profile (prepare) or None (release).
    :ivar drivers: each function's driver when planned (prepare; re-read under the lock).
    :ivar record: the record a release works from (None: nothing to release).
    :ivar shape: the :class:`vfio_hookd.steps.Shape` the deadline was computed for.
    :ivar cpus: whose CPUs are whose (:func:`vfio_hookd.cpus.resolve`; prepare), or None.
    """
    op: str
    vm: str
    devices: tuple
    deadlines: object
    deadline_s: float
    profile: object = None
    drivers: dict = field(default_factory=dict)
    record: Record | None = None
    shape: Shape | None = None
    cpus: dict | None = None


def plan_prepare(host: Host, paths: Paths, vm: str, xml: str | None, profile=None) -> Plan:
    """Validate a prepare of ``vm`` without touching the host.

    :param xml: the domain XML (needed for ``devices: auto``).
    :param profile: the profile if the caller has read it already (it is read once per
        request); else it is read from ``paths``.
    The plan's profile has ``hugepages`` resolved (:func:`vfio_hookd.steps.hugepages.resolve`:
    ``auto`` from the domain XML, the page size checked against the host's pools).

    :raises HookdError: ``VM_NAME_INVALID``, ``NOT_MANAGED``, ``PROFILE_INVALID``,
        ``DOMAIN_XML_INVALID``, ``DEVICE_NOT_FOUND``, ``IOMMU_GROUP_INCOMPLETE``; and for
        ``host_cpus``/``cpu_governor``, what :func:`vfio_hookd.cpus.resolve` raises.
    """
    if profile is None:
        from .profile import load_profile
        profile = load_profile(paths, vm)
    prof = profile
    if prof.devices is None:
        from .profile import devices_from_domain_xml
        if not xml:
            raise HookdError(errors.DOMAIN_XML_INVALID,
                             f"{prof.path}: devices: auto needs the domain XML and none came "
                             f"with the request; list the PCI addresses under devices:")
        devices = devices_from_domain_xml(xml)
        if not devices:
            raise HookdError(errors.DOMAIN_XML_INVALID,
                             f"{prof.path}: devices: auto, but the domain XML of {vm!r} has no "
                             f"PCI <hostdev>; list the GPU's functions under devices:")
    else:
        devices = tuple(prof.devices)
    for addr in devices:
        if not host.exists(pci.path(addr)):
            where = (f"{prof.path}: devices: {addr}" if prof.devices is not None else
                     f"the domain XML of {vm!r} (devices: auto in {prof.path}) names {addr} in "
                     f"a <hostdev>, but it")
            raise HookdError(errors.DEVICE_NOT_FOUND,
                             f"{where} is not a PCI function on this host (see lspci -D)")
    check_groups(host, prof.path if prof.devices is not None else
                  f"{prof.path} (devices: auto, from the domain XML's <hostdev>s)", devices)
    from .cpus import parse, resolve
    cpus = resolve(host, prof, xml)
    prof = hugepages.resolve(host, prof, xml, vm)   # auto: from the domain XML
    shape = Shape(devices=len(devices), units=Units.count(prof),
                  vtconsoles=len(host.listdir("/sys/class/vtconsole")),
                  modules=Modules.count(prof),
                  hugepages=int(bool(prof.hugepages and prof.hugepages.pages)),
                  cpus=len(parse(cpus["vm"])) if cpus else 0)
    wait = sum(s.max_apply_s(prof, shape) + s.max_undo_s(prof.deadlines, shape, None)
               for s in STEPS) + prof.deadlines.desktop_back   # the check after a rollback
    return Plan(op="prepare", vm=vm, devices=devices, deadlines=prof.deadlines,
                deadline_s=round(wait + MARGIN_S, 1), profile=prof,
                drivers={a: pci.current_driver(host, a) for a in devices}, shape=shape,
                cpus=cpus)


def check_groups(host: Host, source: str, devices) -> None:
    """Every endpoint of the devices' IOMMU groups must be among ``devices`` (PCI bridges are
    exempt; vfio.rst "Groups, Devices, and IOMMUs").

    :raises HookdError: ``IOMMU_GROUP_INCOMPLETE`` naming the missing functions.
    """
    groups: dict[str, list[str]] = {}
    for addr in devices:
        group = host.link_name(pci.path(addr, "iommu_group"))
        if group is None:
            raise HookdError(errors.IOMMU_GROUP_INCOMPLETE,
                             f"{addr} has no IOMMU group: enable the IOMMU "
                             f"(intel_iommu=on or amd_iommu=on) and reboot")
        groups.setdefault(group, [])
    for group in groups:
        for member in host.listdir(f"/sys/kernel/iommu_groups/{group}/devices"):
            cls = host.read_or(pci.path(member, "class"), "") or ""
            if cls.startswith("0x0604"):  # PCI bridges are exempt
                continue
            if member not in devices:
                groups[group].append(member)
    missing = {g: m for g, m in groups.items() if m}
    if missing:
        text = "; ".join(f"group {g}: {', '.join(m)}" for g, m in sorted(missing.items()))
        raise HookdError(errors.IOMMU_GROUP_INCOMPLETE,
                         f"{source}: every endpoint of an IOMMU group must be handed over "
                         f"together; add to devices: {text}",
                         {"missing": sorted(a for m in missing.values() for a in m)})


def plan_release(rec: Record | None, vm: str) -> Plan:
    """The release of ``vm`` from its record alone (``rec`` None: nothing to release).

    The deadline is the sum of each held step's declared undo wait for its recorded facts,
    with the deadlines recorded at prepare.
    """
    from .profile import Deadlines
    if rec is None:
        return Plan(op="release", vm=vm, devices=(), deadlines=Deadlines(), deadline_s=MARGIN_S)
    deadlines = Deadlines.from_record(rec.deadlines)
    shape = Shape(devices=len(rec.devices))
    by_name = {s.name: s for s in STEPS}
    wait = sum(by_name[e.name].max_undo_s(deadlines, shape, e.facts)
               for e in rec.steps if e.held and e.name in by_name)
    if rec.desktop:   # the desktop-back check after the undo (vfio_hookd.desktop)
        wait += deadlines.desktop_back
    return Plan(op="release", vm=vm, devices=tuple(rec.devices), deadlines=deadlines,
                deadline_s=round(wait + MARGIN_S, 1), drivers=dict(rec.drivers), record=rec,
                shape=shape)
