"""vfio-hookd's client for systemd's D-Bus API (``org.freedesktop.systemd1(5)``).

The only product module that imports pydbus / ``gi``; it does so on the first connection, so
``import vfio_hookd.systemd`` costs nothing on the hook's path (FIELD-NOTES §4).

Waiting for a job (FIELD-NOTES §3): the client calls ``Subscribe()`` once per connection (so
systemd emits job signals) and subscribes to ``JobRemoved(id, job, unit, result)`` once, for the
connection's lifetime (:class:`_JobWatch`), *before* any ``StopUnit`` / ``StartUnit``; every
``JobRemoved`` is recorded (the last 1024), and a job is over when the one for the returned job
path is among them -- also when it arrived before the method reply. The wait is a condition
variable with the deadline; nothing polls or sleeps.

Threads: every public method may be called from any thread, concurrently. The connection
(a ``GDBusConnection``, thread-safe) is shared and made under a lock. The subscription lives on
a ``GLib.MainContext`` of its own (``g_dbus_connection_signal_subscribe`` dispatches in the
thread-default context of the subscriber), iterated by one thread that blocks in ``poll(2)``
between signals. One subscription per connection, not per job: one per job on a fresh context
left about 0.5 KiB a job behind in GDBus (``bench/daemon_memory.py``).

Where pydbus is not enough, Gio from ``gi.repository`` is used directly, in this module:

- D-Bus error names: pydbus passes on the raw ``GLib.Error``; the name
  (``org.freedesktop.systemd1.NoSuchUnit``) comes from ``Gio.DBusError.get_remote_error``.
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

import collections
import math
import threading
import time

from .errors import SYSTEMD_UNAVAILABLE, TIMEOUT, UNIT_FAILED, HookdError

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


class Systemd:
    """A connection to systemd's manager on the system bus (or on ``address``).

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
    def stop(self, unit: str, timeout_s: float) -> str:
        """Stop ``unit`` (``StopUnit(unit, "replace")``) and wait for its job to end.

        :param unit: unit name (str); resolve aliases first with :meth:`resolve`.
        :param timeout_s: deadline (s) for the call and the job together.
        :returns: the job result, ``"done"``. Stopping an inactive unit is a job that is
            ``done`` at once.
        :raises HookdError: ``UNIT_FAILED`` "stopping gdm.service: job result failed" for any
            other result (``canceled``, ``timeout``, ``failed``, ``dependency``, ``skipped``) or
            an unknown unit; ``TIMEOUT`` if the job has not ended by the deadline (the job stays
            queued in systemd); ``SYSTEMD_UNAVAILABLE``.
        """
        return self._job("StopUnit", "stopping", unit, timeout_s)

    def start(self, unit: str, timeout_s: float) -> str:
        """Start ``unit`` (``StartUnit(unit, "replace")``) and wait for its job; as :meth:`stop`.

        :returns: ``"done"`` (also when the unit was already active).
        :raises HookdError: ``UNIT_FAILED`` "starting gdm.service: job result failed";
            ``TIMEOUT``; ``SYSTEMD_UNAVAILABLE``.
        """
        return self._job("StartUnit", "starting", unit, timeout_s)

    def _job(self, method: str, verb: str, unit: str, timeout_s: float) -> str:
        from gi.repository import GLib

        deadline = time.monotonic() + timeout_s
        _bus, manager = self._connect()
        watch = self._watch
        what = f"{verb} {unit}"
        try:
            job = getattr(manager, method)(
                unit, "replace", timeout=max(0.001, deadline - time.monotonic()))
        except GLib.Error as e:
            raise self._fail(e, what, unit) from None
        result = watch.wait(job, deadline)
        if result is None:
            raise HookdError(TIMEOUT, f"{what}: job {job} did not end within "
                             f"{timeout_s:g} s", {"unit": unit, "job": job})
        if result != "done":
            raise HookdError(UNIT_FAILED, f"{what}: job result {result}",
                             {"unit": unit, "job": job, "result": result})
        return result


class _JobWatch:
    """Every ``JobRemoved`` of one connection, for its lifetime: one subscription on a GLib
    main context of its own, iterated by one daemon thread that blocks in ``poll(2)`` between
    signals. :meth:`wait` is a condition-variable wait with a deadline.

    :param bus: the pydbus bus of the connection (already ``Subscribe()``d).
    """

    KEEP = 1024   #: recent results kept (other clients' jobs end too; ours are taken out)

    def __init__(self, bus):
        from gi.repository import GLib

        self._cv = threading.Condition()
        self._removed: collections.OrderedDict[str, str] = collections.OrderedDict()
        self._stopping = False
        self._ctx = GLib.MainContext.new()
        self._ctx.push_thread_default()
        try:
            self._sub = bus.subscribe(sender=BUS_NAME, iface=MANAGER_IFACE, signal="JobRemoved",
                                      object=MANAGER_PATH, signal_fired=self._on_removed)
        finally:
            self._ctx.pop_thread_default()
        threading.Thread(target=self._run, name="systemd JobRemoved", daemon=True).start()

    def _on_removed(self, _sender, _path, _iface, _signal, params) -> None:
        _id, job_path, _unit, result = params
        with self._cv:
            self._removed[job_path] = result
            while len(self._removed) > self.KEEP:
                self._removed.popitem(last=False)
            self._cv.notify_all()

    def _run(self) -> None:
        while not self._stopping:
            self._ctx.iteration(True)

    def wait(self, job: str, deadline: float) -> str | None:
        """The result (``done``, ``failed``, ...) of ``job`` once its ``JobRemoved`` came, or
        None at ``deadline`` (monotonic s)."""
        with self._cv:
            if self._cv.wait_for(lambda: job in self._removed,
                                 timeout=max(0.0, deadline - time.monotonic())):
                return self._removed.pop(job)
            return None

    def close(self) -> None:
        """Unsubscribe and end the thread."""
        self._stopping = True
        try:
            self._sub.unsubscribe()
        except Exception:  # the connection is already gone
            pass
        self._ctx.wakeup()


def load_bindings() -> None:
    """Import pydbus and GLib/Gio now (about 15 ms) instead of on the first connection."""
    import pydbus  # noqa: F401
    from gi.repository import Gio, GLib  # noqa: F401


def _error_name(e) -> str | None:
    """The D-Bus error name of a ``GLib.Error`` from a call, or None if it was not remote."""
    from gi.repository import Gio

    return Gio.DBusError.get_remote_error(e)


def _error_text(e) -> str:
    """``"name: message"`` without GDBus's ``GDBus.Error:`` prefix."""
    msg = e.message
    name = _error_name(e)
    if name and msg.startswith(f"GDBus.Error:{name}: "):
        msg = f"{name}: {msg[len('GDBus.Error:') + len(name) + 2:]}"
    return msg
