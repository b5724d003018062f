"""Who uses a GPU right now, for ``vfio-hookd init`` and ``check``: the processes holding the
device nodes of its functions, each with the systemd unit it belongs to, and what a prepare
would do about each (a unit it stops, a login session ending with the display manager, or
nothing: then ``on_busy`` decides).

Nodes: :func:`vfio_hookd.pci.device_nodes`; holders: :func:`vfio_hookd.procs.find_holders`
(``/proc/PID/fd`` and ``maps``); units: ``Manager.GetUnitByPID`` (org.freedesktop.systemd1(5))
through the systemd client. Read-only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .host import Host
from .pci import device_nodes


@dataclass
class GpuUser:
    """One process holding device nodes of the functions.

    :ivar pid: its PID (int).
    :ivar command: its name (str).
    :ivar nodes: the nodes it holds (host paths, e.g. ``/dev/nvidia0``).
    :ivar unit: its systemd unit (``gdm.service``, ``session-2.scope``) or None (none known,
        or systemd not asked).
    """
    pid: int
    command: str
    nodes: list[str] = field(default_factory=list)
    unit: str | None = None

    def __str__(self) -> str:
        where = f", unit {self.unit}" if self.unit else ""
        return f"PID {self.pid} ({self.command}{where}) holds {', '.join(self.nodes)}"

    @property
    def is_system_service(self) -> bool:
        """True for a process of a system service other than a user's instance
        (``user@UID.service``, which the display manager's stop ends in its time)."""
        return bool(self.unit) and self.unit.endswith(".service") and \
            not self.unit.startswith("user@")

    @property
    def is_session(self) -> bool:
        """True for a process of a login session's scope (``session-N.scope``)."""
        return bool(self.unit) and self.unit.startswith("session-") and \
            self.unit.endswith(".scope")


def gpu_users(host: Host, devices, systemd=None) -> list[GpuUser]:
    """The processes holding device nodes of ``devices`` (PCI addresses), by PID.

    :param systemd: a :class:`vfio_hookd.systemd.Systemd` (or None: units are not asked).
    :raises HookdError: ``SYSTEMD_UNAVAILABLE`` / ``TIMEOUT`` from systemd.
    """
    from . import procs
    nodes: list[str] = []
    for addr in devices:
        nodes.extend(device_nodes(host, addr))
    users: dict[int, GpuUser] = {}
    for h in procs.find_holders(host, list(dict.fromkeys(nodes))):
        users.setdefault(h.pid, GpuUser(h.pid, h.command)).nodes.append(h.node)
    if systemd is not None:
        for u in users.values():
            u.unit = systemd.unit_of_pid(u.pid)
    return [users[p] for p in sorted(users)]


#: How :func:`fate` says a prepare ends a holder, as ``check`` and ``plan`` print it.
FATES = {
    "unit": "its unit is stopped (display manager or stop_units)",
    "session": "its seat0 login session ends (sessions step, through logind)",
    "user": "its user unit is stopped through the user's systemd instance (sessions step)",
    "system": "systemd/logind let go once the sessions ended (never signalled)",
}


def fate(user: GpuUser, display_manager: str | None, stop_units) -> str | None:
    """How a prepare would end ``user``, as the units and sessions steps do
    (:mod:`vfio_hookd.steps.sessions`; FIELD-NOTES §7, §8): ``"unit"`` (its unit is stopped: the
    display manager or one of ``stop_units``), ``"session"`` (a login session's scope: the
    sessions step ends a seat0 session; a session off seat0 is left alone, which this
    unit-only view cannot tell), ``"user"`` (a unit of a user's instance, ``user@UID.service``:
    stopped through that instance), ``"system"`` (PID 1 or systemd-logind, holding a
    compositor's device for its session: they let go when it ends), or None (nothing ends it:
    ``on_busy`` decides). Keys of :data:`FATES`.

    :param display_manager: the resolved display manager that would be stopped, or None.
    """
    if user.unit and (user.unit == display_manager or user.unit in stop_units):
        return "unit"
    if user.is_session:
        return "session"
    if user.unit and user.unit.startswith("user@") and user.unit.endswith(".service"):
        return "user"
    if user.pid == 1 or user.unit == "systemd-logind.service":
        return "system"
    return None
