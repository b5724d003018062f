"""The ``AllowedCPUs`` part of vfio-hookd's systemd client: a mixin of
:class:`vfio_hookd.systemd.Systemd` (kept apart only for that module's size), on its connection,
with its error mapping. Nothing else in the product talks to systemd about CPUs.

Sources: ``systemd.resource-control(5)`` (``AllowedCPUs=``: the CPUs a unit's processes may
run on, cgroup v2 ``cpuset.cpus``; empty = no restriction; the effective set is also limited
by the parent's), ``org.freedesktop.systemd1(5)`` (``SetUnitProperties(in s name, in b runtime,
in a(sv) properties)``; the ``AllowedCPUs`` property of the ``Slice``/``Scope``/``Service``
interfaces, type ``ay``: a little-endian CPU bitmask, :func:`vfio_hookd.cpus.to_mask`).
``runtime=true`` keeps the change below ``/run/systemd/system.control/``: gone at reboot, so a
host that crashes while a VM runs boots with all its CPUs. The call is synchronous: systemd
answers once it has taken the new value; it writes the cgroup's ``cpuset.cpus`` itself (the
step reads the property back). Seen under real systemd 252 (the desktop guest,
tests/kernel/desktop_runner.py, Linux 6.1): ``AllowedCPUs`` works on ``init.scope`` as on the
slices; ``cpuset.cpus`` of each unit's cgroup held the new value by the time the prepare had
returned; systemd enabled the ``cpuset`` controller in the root cgroup's
``cgroup.subtree_control`` for it and disabled it again once every unit was reset to empty.
"""

from __future__ import annotations

from .errors import HookdError

#: The D-Bus interface that carries a unit's cgroup properties, by unit type.
_CGROUP_IFACES = {"slice": "org.freedesktop.systemd1.Slice",
                  "scope": "org.freedesktop.systemd1.Scope",
                  "service": "org.freedesktop.systemd1.Service"}


class AllowedCpus:
    """``allowed_cpus`` / ``set_allowed_cpus`` for :class:`vfio_hookd.systemd.Systemd` (uses
    its ``_connect``, ``_get`` and ``_fail``)."""

    def allowed_cpus(self, unit: str, timeout_s: float | None = None) -> bytes:
        """The ``AllowedCPUs`` bitmask of ``unit`` (``system.slice``, ``init.scope``, ...): bytes,
        ``b""`` when the unit has no restriction.

        :param timeout_s: the call's timeout (s; default: the client's call timeout).
        :raises HookdError: ``UNIT_FAILED`` (unknown unit, or a type without cgroup
            properties), ``TIMEOUT``, ``SYSTEMD_UNAVAILABLE``.
        """
        from gi.repository import GLib

        iface = _iface(unit)
        _, manager = self._connect()
        try:
            path = manager.LoadUnit(unit, timeout=timeout_s or self._call_timeout_s)
            return bytes(self._get(path, iface, "AllowedCPUs", timeout_s))
        except GLib.Error as e:
            raise self._fail(e, f"reading AllowedCPUs of {unit}", unit) from None

    def set_allowed_cpus(self, unit: str, mask: bytes, timeout_s: float) -> None:
        """``SetUnitProperties(unit, runtime=true, [("AllowedCPUs", mask)])``: restrict
        ``unit`` to the CPUs of ``mask`` until reboot (``b""``: no restriction).

        :param timeout_s: the call's deadline (s): systemd answers once the unit's cgroup has
            the new value.
        :raises HookdError: ``UNIT_FAILED`` naming the unit and systemd's D-Bus error,
            ``TIMEOUT``, ``SYSTEMD_UNAVAILABLE``.
        """
        from gi.repository import GLib

        from .gdbus import call

        bus, _ = self._connect()
        try:
            call(bus.con, "org.freedesktop.systemd1", "/org/freedesktop/systemd1",
                 "org.freedesktop.systemd1.Manager", "SetUnitProperties",
                 (unit, True, [("AllowedCPUs", GLib.Variant("ay", mask))]), "sba(sv)", timeout_s)
        except GLib.Error as e:
            raise self._fail(e, f"setting AllowedCPUs of {unit}", unit) from None


def _iface(unit: str) -> str:
    kind = unit.rsplit(".", 1)[-1]
    if kind not in _CGROUP_IFACES:
        from .errors import UNIT_FAILED
        raise HookdError(UNIT_FAILED, f"{unit}: only slices, scopes and services have "
                         f"AllowedCPUs", {"unit": unit})
    return _CGROUP_IFACES[kind]
