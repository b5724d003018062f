"""vfio-hookd's client for systemd's D-Bus API (``org.freedesktop.systemd1(5)``).

The only product module that imports pydbus / ``gi``; it does so on the first connection, so
``import vfio_hookd.systemd`` costs nothing on the hook's path (FIELD-NOTES §4).

Waiting for a job (FIELD-NOTES §3): the client calls ``Subscribe()`` once per connection (so
systemd emits job signals) and subscribes to ``JobRemoved(id, job, unit, result)`` once, for the
connection's lifetime (:class:`vfio_hookd.jobs.JobWatch`), *before* any ``StopUnit`` /
``StartUnit``; every ``JobRemoved`` is recorded (the last 1024), and a job is over when the one
for the returned job path is among them -- also when it arrived before the method reply. The
wait is a condition variable with the deadline; nothing polls or sleeps. Several units are
stopped or started as one batch (:meth:`Systemd.stop_all`), as ``systemctl stop A B`` does.

Threads: every public method may be called from any thread, concurrently. The connection
(a ``GDBusConnection``, thread-safe) is shared and made under a lock. The subscription lives on
a ``GLib.MainContext`` of its own (``g_dbus_connection_signal_subscribe`` dispatches in the
thread-default context of the subscriber), iterated by one thread that blocks in ``poll(2)``
between signals. One subscription per connection, not per job: one per job on a fresh context
left about 0.5 KiB a job behind in GDBus (``bench/daemon_memory.py``).

Where pydbus is not enough, Gio from ``gi.repository`` is used directly, in this module:

- D-Bus error names: pydbus passes on the raw ``GLib.Error``; the name
  (``org.freedesktop.systemd1.NoSuchUnit``) is read from the message the way
  ``Gio.DBusError.get_remote_error`` does (:func:`vfio_hookd.gdbus.error_name`).
- Properties: a pydbus proxy introspects the object first (``bus.get`` calls ``Introspect``: a
  real systemd unit answers with ~40 KB of XML to parse per unit read) and its property access
  has no timeout (it waits forever, ``G_MAXINT``), so unit and manager properties are read with
  ``Gio.DBusConnection.call_sync(..., "org.freedesktop.DBus.Properties", "Get", ...)`` and a
  timeout.
- A private connection to the system bus: ``pydbus.SystemBus()`` returns GIO's process-wide
  shared connection, which :meth:`Systemd.close` must not close under other users; the address
  comes from ``Gio.dbus_address_get_for_bus_sync`` (honours ``DBUS_SYSTEM_BUS_ADDRESS``) and
  ``pydbus.connect`` opens a connection of our own.
- The signal thread's ``GLib.MainContext``: pydbus has no event-loop API.

pydbus does the rest: the Manager proxy's methods (each with its ``timeout=``) and the signal
subscription.
"""

from __future__ import annotations

import math
import threading
import time

from .errors import SYSTEMD_UNAVAILABLE, TIMEOUT, UNIT_FAILED, HookdError
from .jobs import JobWatch as _JobWatch, enqueue_order, outcome
from .systemd_cpus import AllowedCpus

BUS_NAME = "org.freedesktop.systemd1"
MANAGER_PATH = "/org/freedesktop/systemd1"
MANAGER_IFACE = "org.freedesktop.systemd1.Manager"
UNIT_IFACE = "org.freedesktop.systemd1.Unit"
_NO_SUCH_UNIT = "org.freedesktop.systemd1.NoSuchUnit"
_NO_UNIT_FOR_PID = "org.freedesktop.systemd1.NoUnitForPID"
_NO_SUCH_PROCESS = "org.freedesktop.systemd1.NoSuchProcess"
_ALREADY_SUBSCRIBED = "org.freedesktop.systemd1.AlreadySubscribed"
#: D-Bus errors meaning systemd is not (or no longer) on the bus.
_UNREACHABLE = {
    "org.freedesktop.DBus.Error.ServiceUnknown", "org.freedesktop.DBus.Error.NameHasNoOwner",
    "org.freedesktop.DBus.Error.NoReply", "org.freedesktop.DBus.Error.Disconnected",
    "org.freedesktop.DBus.Error.UnknownObject",
}
#: Default for single method calls and property reads (s): sd-bus's default method timeout.
DEFAULT_CALL_TIMEOUT_S = 25.0


class Systemd(AllowedCpus):
    """A connection to systemd's manager on the system bus (or on ``address``); its
    ``AllowedCPUs`` methods are in :mod:`vfio_hookd.systemd_cpus`.

    :param address: a D-Bus address (str, e.g. ``"unix:path=/run/x/bus.sock"``), or None for the
        system bus (``DBUS_SYSTEM_BUS_ADDRESS`` if set, else ``/run/dbus/system_bus_socket``).
    :param call_timeout_s: timeout (s) of each single method call / property read that has no
        deadline of its own (default 25, sd-bus's).

    The connection is opened on first use; every method raises
    ``HookdError(SYSTEMD_UNAVAILABLE)`` if the bus or systemd cannot be reached, and reconnects
    on the next call after the connection was closed. Thread-safe (see the module docstring).
    """

    def __init__(self, address: str | None = None, call_timeout_s: float = DEFAULT_CALL_TIMEOUT_S):
        self._address = address
        self._call_timeout_s = call_timeout_s
        self._lock = threading.Lock()
        self._bus = None        # pydbus Bus, on a private Gio.DBusConnection
        self._manager = None    # pydbus proxy of org.freedesktop.systemd1.Manager
        self._watch = None      # _JobWatch of the connection

    # ---- connection -----------------------------------------------------------------------------
    def _connect(self):
        """``(bus, manager)``, connecting and calling ``Subscribe()`` if needed."""
        with self._lock:
            if self._bus is not None and not self._bus.con.is_closed():
                return self._bus, self._manager
            if self._watch is not None:
                self._watch.close()
            self._bus = self._manager = self._watch = None
            import pydbus
            from gi.repository import Gio, GLib

            address = self._address
            try:
                if address is None:
                    address = Gio.dbus_address_get_for_bus_sync(Gio.BusType.SYSTEM, None)
                bus = pydbus.connect(address)
            except GLib.Error as e:
                raise HookdError(SYSTEMD_UNAVAILABLE,
                                 f"cannot connect to the D-Bus bus at {address}: {e.message}",
                                 {"address": address}) from None
            try:
                manager = bus.get(BUS_NAME, MANAGER_PATH,
                                  timeout=self._call_timeout_s)[MANAGER_IFACE]
                try:
                    manager.Subscribe(timeout=self._call_timeout_s)
                except GLib.Error as e:
                    if _error_name(e) != _ALREADY_SUBSCRIBED:
                        raise
            except GLib.Error as e:
                bus.con.close_sync(None)
                raise HookdError(SYSTEMD_UNAVAILABLE,
                                 f"systemd does not answer on {address}: {_error_text(e)}",
                                 {"address": address}) from None
            self._watch = _JobWatch(bus)
            self._bus, self._manager = bus, manager
            return bus, manager

    def connect(self) -> None:
        """Connect now (the daemon does it right after start, so that the first request does
        not pay for it).

        :raises HookdError: ``SYSTEMD_UNAVAILABLE``.
        """
        self._connect()

    def close(self) -> None:
        """Close the connection (systemd drops the subscription); a later call reconnects."""
        with self._lock:
            bus, self._bus, self._manager = self._bus, None, None
            watch, self._watch = self._watch, None
        if watch is not None:
            watch.close()
        if bus is not None:
            try:
                bus.con.close_sync(None)
            except Exception:  # already closed by the peer
                pass

    def __enter__(self) -> "Systemd":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _fail(self, e, what: str, unit: str | None = None) -> HookdError:
        """Map a ``GLib.Error`` from a call about ``what`` to a :class:`HookdError`."""
        from gi.repository import Gio

        name = _error_name(e)
        if name == _NO_SUCH_UNIT and unit is not None:
            return HookdError(UNIT_FAILED, f"unit {unit} not found", {"unit": unit})
        if e.matches(Gio.io_error_quark(), Gio.IOErrorEnum.TIMED_OUT):
            return HookdError(TIMEOUT, f"{what}: systemd did not answer in time",
                              {"unit": unit} if unit else {})
        if name in _UNREACHABLE or e.matches(Gio.io_error_quark(), Gio.IOErrorEnum.CLOSED):
            self.close()
            return HookdError(SYSTEMD_UNAVAILABLE, f"{what}: {_error_text(e)}")
        return HookdError(UNIT_FAILED, f"{what}: {_error_text(e)}",
                          {"unit": unit, "dbus_error": name} if unit else {"dbus_error": name})

    def _get(self, path: str, iface: str, prop: str, timeout_s: float | None = None):
        """Property ``iface.prop`` of object ``path`` (unpacked), via Properties.Get + timeout."""
        from gi.repository import Gio, GLib

        bus, _ = self._connect()
        reply = bus.con.call_sync(
            BUS_NAME, path, "org.freedesktop.DBus.Properties", "Get",
            GLib.Variant("(ss)", (iface, prop)), GLib.VariantType.new("(v)"),
            Gio.DBusCallFlags.NONE, max(1, math.ceil((timeout_s or self._call_timeout_s) * 1000)),
            None)
        return reply.unpack()[0]

    # ---- queries --------------------------------------------------------------------------------
    def resolve(self, name: str) -> str:
        """The real unit id (str) of ``name``: ``display-manager.service`` -> ``gdm.service``.

        ``GetUnit(name)`` (``LoadUnit`` if it is not loaded) and the unit's ``Id`` property; an
        alias resolves to its unit, whose ``Id`` is the real name (``systemd.unit(5)``, "Alias=").

        :raises HookdError: ``UNIT_FAILED`` "unit X not found" (``NoSuchUnit`` or ``LoadState``
            ``not-found``); ``SYSTEMD_UNAVAILABLE``; ``TIMEOUT``.
        """
        from gi.repository import GLib

        _, manager = self._connect()
        what = f"resolving {name}"
        try:
            try:
                path = manager.GetUnit(name, timeout=self._call_timeout_s)
            except GLib.Error as e:
                if _error_name(e) != _NO_SUCH_UNIT:
                    raise
                path = manager.LoadUnit(name, timeout=self._call_timeout_s)
            if self._get(path, UNIT_IFACE, "LoadState") == "not-found":
                raise HookdError(UNIT_FAILED, f"unit {name} not found", {"unit": name})
            return self._get(path, UNIT_IFACE, "Id")
        except GLib.Error as e:
            raise self._fail(e, what, name) from None

    def active_state(self, unit: str) -> str:
        """``ActiveState`` of ``unit`` (str: ``active``, ``inactive``, ``failed``, ``activating``,
        ``deactivating``, ``reloading``); a unit systemd has not loaded is ``inactive``.

        :raises HookdError: ``SYSTEMD_UNAVAILABLE``; ``TIMEOUT``.
        """
        from gi.repository import GLib

        _, manager = self._connect()
        try:
            try:
                path = manager.GetUnit(unit, timeout=self._call_timeout_s)
            except GLib.Error as e:
                if _error_name(e) == _NO_SUCH_UNIT:
                    return "inactive"
                raise
            return self._get(path, UNIT_IFACE, "ActiveState")
        except GLib.Error as e:
            raise self._fail(e, f"reading the state of {unit}", unit) from None

    def unit_of_pid(self, pid: int) -> str | None:
        """The unit (id, str) process ``pid`` belongs to: its service, or the scope of its login
        session (``session-2.scope``), from ``Manager.GetUnitByPID`` (org.freedesktop.systemd1(5));
        None when systemd knows no unit for it (``NoUnitForPID``, or the process is gone).

        :raises HookdError: ``SYSTEMD_UNAVAILABLE``; ``TIMEOUT``.
        """
        from gi.repository import GLib

        _, manager = self._connect()
        try:
            try:
                path = manager.GetUnitByPID(pid, timeout=self._call_timeout_s)
            except GLib.Error as e:
                if _error_name(e) in (_NO_SUCH_UNIT, _NO_UNIT_FOR_PID, _NO_SUCH_PROCESS):
                    return None
                raise
            return self._get(path, UNIT_IFACE, "Id")
        except GLib.Error as e:
            raise self._fail(e, f"asking which unit PID {pid} belongs to") from None

    def shutting_down(self) -> bool:
        """True while the system shuts down: ``Manager.SystemState`` is ``stopping``.

        A display manager must not be started then (its start job would conflict with the
        shutdown transaction; FIELD-NOTES §3).

        :raises HookdError: ``SYSTEMD_UNAVAILABLE``; ``TIMEOUT``.
        """
        from gi.repository import GLib

        try:
            return self._get(MANAGER_PATH, MANAGER_IFACE, "SystemState") == "stopping"
        except GLib.Error as e:
            raise self._fail(e, "reading SystemState") from None

    def list_units(self) -> dict[str, str]:
        """``{unit id: ActiveState}`` of every loaded unit (``ListUnits``; aliases not listed).

        :raises HookdError: ``SYSTEMD_UNAVAILABLE``; ``TIMEOUT``.
        """
        from gi.repository import GLib

        _, manager = self._connect()
        try:
            rows = manager.ListUnits(timeout=self._call_timeout_s)
        except GLib.Error as e:
            raise self._fail(e, "listing units") from None
        return {row[0]: row[3] for row in rows}

    # ---- jobs -----------------------------------------------------------------------------------
    def stop_all(self, units: list[str], timeout_s: float) -> dict[str, str]:
        """Stop ``units`` together, as ``systemctl stop A B`` does: ``StopUnit(unit,
        "replace")`` for every unit before any job is awaited, then every job awaited against
        one deadline. systemd runs the jobs at once unless the units' ``After=``/``Before=``
        order them (then a unit that is ``After=`` another stops first; ``systemd.unit(5)``);
        for that the jobs are queued in that order, from each unit's ``After`` property
        (:func:`vfio_hookd.jobs.enqueue_order`).

        :param units: unit names (list of str); resolve aliases first with :meth:`resolve`.
        :param timeout_s: deadline (s) for the calls and all the jobs together.
        :returns: ``{unit: "done"}``. Stopping an inactive unit is a job ``done`` at once.
        :raises HookdError: ``UNIT_FAILED`` naming each unit that is unknown or whose job
            ended other than ``done`` ("stopping gdm.service: job result failed"; the other
            units' jobs were still awaited); ``TIMEOUT`` naming the units whose jobs had not
            ended by the deadline (they stay queued in systemd); ``SYSTEMD_UNAVAILABLE``
            (:func:`vfio_hookd.jobs.outcome`).
        """
        return self._jobs("StopUnit", "stopping", units, timeout_s)

    def start_all(self, units: list[str], timeout_s: float) -> dict[str, str]:
        """Start ``units`` together (``StartUnit(unit, "replace")`` each), as :meth:`stop_all`;
        systemd orders the start jobs by ``After=``/``Before=``.

        :returns: ``{unit: "done"}`` (also for a unit that was already active).
        :raises HookdError: ``UNIT_FAILED`` "starting gdm.service: job result failed" for each
            failed unit; ``TIMEOUT``; ``SYSTEMD_UNAVAILABLE``.
        """
        return self._jobs("StartUnit", "starting", units, timeout_s)

    def stop(self, unit: str, timeout_s: float) -> str:
        """Stop one ``unit``: :meth:`stop_all` of ``[unit]``; returns ``"done"``, raises as it
        ("stopping gdm.service: job result failed"; "stopping gdm.service: job J did not end
        within S s")."""
        return self._jobs("StopUnit", "stopping", [unit], timeout_s)[unit]

    def start(self, unit: str, timeout_s: float) -> str:
        """Start one ``unit``: :meth:`start_all` of ``[unit]``; returns ``"done"``."""
        return self._jobs("StartUnit", "starting", [unit], timeout_s)[unit]

    def _job(self, method: str, verb: str, unit: str, timeout_s: float) -> str:
        return self._jobs(method, verb, [unit], timeout_s)[unit]

    def _jobs(self, method: str, verb: str, units: list[str], timeout_s: float) -> dict:
        """Call ``method(unit, "replace")`` for every unit, then await all the jobs."""
        from gi.repository import GLib

        deadline = time.monotonic() + timeout_s
        _bus, manager = self._connect()
        watch = self._watch   # subscribed before the first call: no JobRemoved is missed
        jobs: dict[str, str] = {}
        refused: list[HookdError] = []
        units = list(dict.fromkeys(units))
        if len(units) > 1:
            units = enqueue_order(units, {u: self._after(manager, u) for u in units},
                                  stop=method == "StopUnit")
        for unit in units:
            try:
                jobs[unit] = getattr(manager, method)(
                    unit, "replace", timeout=max(0.001, deadline - time.monotonic()))
            except GLib.Error as e:
                err = self._fail(e, f"{verb} {unit}", unit)
                if err.code == SYSTEMD_UNAVAILABLE:
                    raise err from None
                refused.append(err)
        results = watch.wait_all(jobs.values(), deadline)
        return outcome(verb, jobs, results, refused, timeout_s)

    def _after(self, manager, unit: str) -> set[str]:
        """The units ``unit`` is ordered after (its ``After`` property; ``LoadUnit`` first);
        empty if systemd cannot say (the job call then reports the error)."""
        from gi.repository import GLib

        try:
            return set(self._get(manager.LoadUnit(unit, timeout=self._call_timeout_s),
                                 UNIT_IFACE, "After"))
        except GLib.Error as e:
            err = self._fail(e, f"reading the order of {unit}", unit)
            if err.code == SYSTEMD_UNAVAILABLE:
                raise err from None
            return set()


def load_bindings() -> None:
    """Import pydbus and GLib/Gio now (about 15 ms) instead of on the first connection."""
    import pydbus  # noqa: F401
    from gi.repository import Gio, GLib  # noqa: F401


def _error_name(e) -> str | None:
    """The D-Bus error name of a ``GLib.Error`` from a call, or None if it was not remote
    (:func:`vfio_hookd.gdbus.error_name`)."""
    from .gdbus import error_name

    return error_name(e)


def _error_text(e) -> str:
    """``"name: message"`` without GDBus's ``GDBus.Error:`` prefix."""
    msg = e.message
    name = _error_name(e)
    if name and msg.startswith(f"GDBus.Error:{name}: "):
        msg = f"{name}: {msg[len('GDBus.Error:') + len(name) + 2:]}"
    return msg
