"""What a validated profile is: :class:`Profile`, :class:`Deadlines` and the profile constants.

Representation of the "auto"/"none" choices in :class:`Profile` (the one place to look):

=================  ======================  ==========================  =======================
key                ``auto``                ``none``                    explicit value
=================  ======================  ==========================  =======================
devices            ``None``                (not allowed)               ``tuple`` of addresses
display_manager    ``"auto"`` (``AUTO``)   ``None``                    unit name ``str``
modules            ``"auto"`` (``AUTO``)   ``()`` (empty tuple)        ``tuple`` of names
vtconsoles         ``True``                ``False``                   --
framebuffer        ``True``                ``False``                   --
inhibit            --                      ``()`` (empty tuple)        ``tuple`` of lock types
host_cpus          ``"auto"`` (``AUTO``)   ``None``                    canonical cpulist ``str``
cpu_governor       --                      ``None``                    governor name ``str``
hugepages          ``"auto"`` (``AUTO``)   ``None``                    :class:`Hugepages`
=================  ======================  ==========================  =======================

The defaults of the dataclass fields are the defaults of the profile keys (an absent key takes
them). This module imports nothing else of the package at import time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

AUTO = "auto"
NONE = "none"

#: The display-manager alias unit ``display_manager: auto`` resolves (systemd.special(7)).
DISPLAY_MANAGER_ALIAS = "display-manager.service"

#: The values of ``on_busy``.
ON_BUSY = ("fail", "terminate")

#: The logind lock types ``inhibit`` may name, in the order they are joined for ``Inhibit``'s
#: ``what`` (``org.freedesktop.login1(5)``; systemd.io "Inhibitor Locks").
INHIBIT_WHAT = ("sleep", "idle")

#: Top-level keys of a profile, in the order they are documented.
KEYS = ("devices", "display_manager", "stop_units", "vtconsoles", "framebuffer", "modules",
        "on_busy", "inhibit", "hugepages", "host_cpus", "cpu_governor", "deadlines")

#: The largest profile file (bytes): refused before YAML builds anything from it. A profile
#: with every key and every list full is about 23 KiB.
MAX_PROFILE_BYTES = 64 * 1024

#: The most items a profile list (``devices``, ``stop_units``, ``modules``) may have: far more
#: than a host has GPU functions, units to stop or modules to unload.
MAX_LIST_ITEMS = 64

#: The longest deadline a profile may set (s): one hour.
MAX_DEADLINE_S = 3600

#: Keys under ``deadlines`` and their defaults in seconds.
DEFAULT_DEADLINES = {
    # Longer than systemd's DefaultTimeoutStopSec (90 s, systemd-system.conf(5)), after which
    # systemd SIGKILLs what ignores SIGTERM and the stop job ends: seen in the real-systemd
    # guest, LightDM and its session scope hung on SIGTERM for the full 90 s. A shorter
    # deadline turned that slow stop into a failed prepare whose rollback could not start
    # the display manager either (its start job waits behind the stop).
    "unit_stop": 100.0,
    "unit_start": 30.0,
    "terminate": 5.0,
    "unbind": 10.0,
    "module_unload": 15.0,
    "module_load": 30.0,
    # FIELD-NOTES §8 (TCG guest, 2 cores): after the display manager's start the session is
    # back at +2.8 s and PipeWire/WirePlumber hold the audio nodes at +6.8 s; greetd's greeter
    # user instance takes /dev/snd within ~4 s. 30 s is about four times the slowest of these.
    "desktop_back": 30.0,
    # Each write of the hugepages step (compact_memory, nr_hugepages): compacting and
    # allocating gigabytes of 2 MiB pages takes seconds on a loaded host, 1 GiB pages more.
    "hugepages": 60.0,
}


@dataclass(frozen=True)
class Deadlines:
    """Deadlines of the host operations, all in seconds (float, > 0).

    :ivar unit_stop: one systemd StopUnit job, until its ``JobRemoved`` signal.
    :ivar unit_start: one systemd StartUnit job, likewise.
    :ivar terminate: per holder process: SIGTERM, then SIGKILL once this has passed.
    :ivar unbind: each sysfs ``bind``/``unbind``/``drivers_probe`` write.
    :ivar module_unload: each module unload.
    :ivar module_load: each ``modprobe``.
    :ivar desktop_back: after a release (or a rolled-back prepare): until the desktop seen at
        prepare is back (:mod:`vfio_hookd.desktop`).
    :ivar hugepages: each write of the hugepages step (``/proc/sys/vm/compact_memory``,
        ``nr_hugepages``), which the kernel answers once it has compacted or allocated.
    """

    unit_stop: float = DEFAULT_DEADLINES["unit_stop"]
    unit_start: float = DEFAULT_DEADLINES["unit_start"]
    terminate: float = DEFAULT_DEADLINES["terminate"]
    unbind: float = DEFAULT_DEADLINES["unbind"]
    module_unload: float = DEFAULT_DEADLINES["module_unload"]
    module_load: float = DEFAULT_DEADLINES["module_load"]
    desktop_back: float = DEFAULT_DEADLINES["desktop_back"]
    hugepages: float = DEFAULT_DEADLINES["hugepages"]

    def to_dict(self) -> dict:
        """``{"unit_stop": float, ...}``: every deadline in seconds."""
        return {k: getattr(self, k) for k in DEFAULT_DEADLINES}

    @classmethod
    def from_record(cls, data: dict) -> "Deadlines":
        """Deadlines as stored in a VM's record (:meth:`to_dict` output of this or an older
        version), read leniently: never raises.

        Each known key (:data:`DEFAULT_DEADLINES`) whose value is a positive finite number
        (``int`` or ``float``, not ``bool``; seconds) is taken as a float; a missing key or any
        other value gives that deadline's default. Unknown keys are ignored, and so is ``data``
        that is not a dict (all defaults). Unlike a profile file, there is no upper bound
        (:data:`MAX_DEADLINE_S`): the record keeps what prepare ran with.

        :param data: ``{"unit_stop": seconds, ...}`` (dict).
        :returns: :class:`Deadlines`.
        """
        if not isinstance(data, dict):
            return cls()
        values = {}
        for key in DEFAULT_DEADLINES:
            v = data.get(key)
            if (isinstance(v, (int, float)) and not isinstance(v, bool)
                    and math.isfinite(v) and v > 0):
                values[key] = float(v)
        return cls(**values)


#: The largest hugepages request (KiB): 16 TiB, beyond any host this runs on.
MAX_HUGEPAGES_KIB = 16 * 1024 ** 3


def size_text(kib: int) -> str:
    """A page size in KiB as the profile writes it: ``2048`` -> ``"2M"``, ``1048576`` ->
    ``"1G"``, ``64`` -> ``"64K"``."""
    for unit, factor in (("G", 1024 ** 2), ("M", 1024)):
        if kib % factor == 0:
            return f"{kib // factor}{unit}"
    return f"{kib}K"


@dataclass(frozen=True)
class Hugepages:
    """An explicit hugepages request: ``pages`` pages (int >= 0; 0 only after ``auto``
    found nothing to back) of ``size_kb`` KiB each (int, e.g. 2048 or 1048576; None: the
    host's default hugepage size, ``Hugepagesize`` of ``/proc/meminfo``). ``why`` says where
    it came from (``"auto: ..."`` once :func:`vfio_hookd.steps.hugepages.resolve` read the
    domain XML; not compared, not written by :meth:`Profile.to_dict`)."""
    pages: int
    size_kb: int | None = None
    why: str = field(default="", compare=False)

    def to_dict(self) -> dict:
        """``{"pages": N, "size": "2M"}`` (``size`` left out when it is the host's default)."""
        out: dict = {"pages": self.pages}
        if self.size_kb is not None:
            out["size"] = size_text(self.size_kb)
        return out


@dataclass(frozen=True)
class Profile:
    """The validated profile of one domain. Build it with :func:`vfio_hookd.profile.load_profile`,
    :func:`vfio_hookd.profile.parse_profile` or :func:`vfio_hookd.profile.profile_from_dict`, not by hand.

    :ivar name: the libvirt domain name (str).
    :ivar path: the file it came from (str; for a profile rebuilt from a record, the path the
        record names).
    :ivar devices: ``None`` for ``auto`` (the PCI ``<hostdev>`` functions of the domain XML the
        hook receives, see :func:`vfio_hookd.profile.devices_from_domain_xml`), else a non-empty
        tuple of normalised PCI addresses (``"0000:01:00.0"``), in file order, without
        duplicates.
    :ivar display_manager: ``"auto"`` (:data:`AUTO`: resolve ``display-manager.service`` to the
        real unit), a ``.service`` unit name, or ``None`` for ``none`` (stop no display manager).
    :ivar stop_units: more units to stop first-to-last and start again last-to-first (tuple of
        unit names; may be empty).
    :ivar vtconsoles: ``True`` for ``auto`` (unbind the framebuffer vtconsoles), ``False`` for
        ``none``.
    :ivar framebuffer: ``True`` for ``auto`` (unbind the firmware framebuffer), ``False`` for
        ``none``.
    :ivar modules: ``"auto"`` (:data:`AUTO`: derived from the functions' drivers and their
        module holders), a tuple of module names (``-`` normalised to ``_``) to unload in the
        given order, or ``()`` for ``none``. Test with ``profile.modules == AUTO`` before
        iterating.
    :ivar on_busy: ``"fail"`` or ``"terminate"``: what to do with processes still holding the
        GPU's device nodes once the units are stopped.
    :ivar inhibit: the logind lock types held while the VM runs (a block inhibitor taken by
        the ``inhibit`` step, :mod:`vfio_hookd.steps.inhibit`): a tuple of
        :data:`INHIBIT_WHAT` members in that order (``("sleep",)``, ``("sleep", "idle")``),
        or ``()`` for ``none`` (the default: no inhibitor).
    :ivar hugepages: ``None`` for ``none`` (the default: no hugepages allocated), ``"auto"``
        (:data:`AUTO`: the domain's ``<memory>`` when its XML has
        ``<memoryBacking><hugepages/>``), or a :class:`Hugepages` request. A prepare's plan
        replaces ``auto`` by the :class:`Hugepages` it resolves to.
    :ivar deadlines: :class:`Deadlines`.
    :ivar host_cpus: the CPUs the host keeps while the VM runs (step ``cpu_isolation``): a
        canonical cpulist (``"0-7"``, :func:`vfio_hookd.cpus.format_list`), ``"auto"``
        (:data:`AUTO`: the online CPUs outside the domain XML's ``<vcpupin>``/``<emulatorpin>``)
        or ``None`` for ``none`` (no isolation).
    :ivar cpu_governor: the cpufreq scaling governor for the VM's CPUs (step
        ``cpu_governor``, e.g. ``"performance"``), or ``None`` for ``none``.
    """

    name: str
    path: str
    devices: tuple[str, ...] | None = None
    display_manager: str | None = AUTO
    stop_units: tuple[str, ...] = ()
    vtconsoles: bool = True
    framebuffer: bool = True
    modules: str | tuple[str, ...] = AUTO
    on_busy: str = "fail"
    inhibit: tuple[str, ...] = ()
    hugepages: str | Hugepages | None = None
    deadlines: Deadlines = field(default_factory=Deadlines)
    host_cpus: str | None = None
    cpu_governor: str | None = None

    @property
    def needs_domain_xml(self) -> bool:
        """True when a prepare needs the domain XML: ``devices: auto``, ``hugepages: auto``,
        ``host_cpus: auto``, or ``cpu_governor`` without ``host_cpus`` (the ``<vcpupin>`` CPUs)."""
        return (self.devices is None or self.hugepages == AUTO or self.host_cpus == AUTO
                or (self.cpu_governor is not None and self.host_cpus is None))

    def to_dict(self) -> dict:
        """A JSON-able dict in the profile file's own vocabulary, plus ``name`` and ``path``.

        ``devices`` is ``"auto"`` or a list; ``display_manager`` ``"auto"``, a unit or
        ``"none"``; ``vtconsoles``/``framebuffer`` ``"auto"``/``"none"``; ``modules``
        ``"auto"``, a list or ``"none"``; ``inhibit`` a list or ``"none"``; ``hugepages``
        ``"none"``, ``"auto"`` or ``{"pages", "size"}``; ``host_cpus`` ``"auto"``, a cpulist or
        ``"none"``; ``cpu_governor`` a name or ``"none"``; ``deadlines`` a dict of floats
        (seconds).
        :func:`vfio_hookd.profile.profile_from_dict` reads it back to an equal :class:`Profile`.
        """
        return {
            "name": self.name,
            "path": self.path,
            "devices": AUTO if self.devices is None else list(self.devices),
            "display_manager": NONE if self.display_manager is None else self.display_manager,
            "stop_units": list(self.stop_units),
            "vtconsoles": AUTO if self.vtconsoles else NONE,
            "framebuffer": AUTO if self.framebuffer else NONE,
            "modules": (AUTO if self.modules == AUTO
                        else NONE if not self.modules else list(self.modules)),
            "on_busy": self.on_busy,
            "inhibit": list(self.inhibit) if self.inhibit else NONE,
            "hugepages": (NONE if self.hugepages is None else self.hugepages
                          if self.hugepages == AUTO else self.hugepages.to_dict()),
            "deadlines": self.deadlines.to_dict(),
            "host_cpus": NONE if self.host_cpus is None else self.host_cpus,
            "cpu_governor": NONE if self.cpu_governor is None else self.cpu_governor,
        }
