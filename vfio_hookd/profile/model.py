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
        "on_busy", "inhibit", "deadlines")

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
    """

    unit_stop: float = DEFAULT_DEADLINES["unit_stop"]
    unit_start: float = DEFAULT_DEADLINES["unit_start"]
    terminate: float = DEFAULT_DEADLINES["terminate"]
    unbind: float = DEFAULT_DEADLINES["unbind"]
    module_unload: float = DEFAULT_DEADLINES["module_unload"]
    module_load: float = DEFAULT_DEADLINES["module_load"]
    desktop_back: float = DEFAULT_DEADLINES["desktop_back"]

    def to_dict(self) -> dict:
        """``{"unit_stop": float, ...}``: the seven deadlines in seconds."""
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
    :ivar deadlines: :class:`Deadlines`.
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
    deadlines: Deadlines = field(default_factory=Deadlines)

    def to_dict(self) -> dict:
        """A JSON-able dict in the profile file's own vocabulary, plus ``name`` and ``path``.

        ``devices`` is ``"auto"`` or a list; ``display_manager`` ``"auto"``, a unit or
        ``"none"``; ``vtconsoles``/``framebuffer`` ``"auto"``/``"none"``; ``modules``
        ``"auto"``, a list or ``"none"``; ``inhibit`` a list or ``"none"``; ``deadlines`` a
        dict of floats (seconds).
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
            "deadlines": self.deadlines.to_dict(),
        }
